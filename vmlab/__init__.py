"""VM lab: real Debian kernels under qemu, IPsec labs in network namespaces inside them.

Shared by the tests (tests/test_vm_*.py) and the benchmarks (bench/); not shipped.

- :mod:`vmlab.host` (runs on the lab host): :mod:`~vmlab.host.kernels` resolves, downloads and
  unpacks Debian kernel packages; :mod:`~vmlab.host.vm` boots one with virtme-ng and runs a
  command in it; :mod:`~vmlab.host.demo` is ``make demo``.
- :mod:`vmlab.guest` (runs inside the guest, as root): :mod:`~vmlab.guest.ipsec` builds
  namespace IPsec labs, :mod:`~vmlab.guest.nsutil` and :mod:`~vmlab.guest.xfrm_netlink` do
  what ``ip`` cannot, :mod:`~vmlab.guest.tool` runs xfrmtrace and reads the kernel's probes.
"""
