"""The test suite (a package: test modules import ``tests.support``, ``tests.fixtures`` ...).

- ``test_*.py``: the tests.  ``test_vm_*.py`` boot real kernels (marker ``vm``); the rest run
  on this machine.
- :mod:`tests.support`: helper libraries of the tests (helm, an API server, assembled
  machine code, the zipapp build, the Dockerfile runner, the CI switch).
- :mod:`tests.guest`: programs the VM tests run inside the guest.
- :mod:`tests.fixtures`: recorded bytes (packets, netlink messages) and event builders.
- :mod:`tests.bpf`: a small BPF object that exercises the libbpf binding.

The VM lab itself (kernels, qemu, IPsec labs) is the top-level :mod:`vmlab` package, shared
with the benchmarks.
"""
