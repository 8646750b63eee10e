"""Programs the VM tests run inside the guest (as root, ``python -m tests.guest.NAME``).

- :mod:`.trace_run`: the end-to-end suite of one kernel (scenarios, late modules, audit);
  :mod:`.scenarios`: one scenario per counter.
- :mod:`.robust_run`: SIGKILL, ring overflow, namespaces and modules going away.
- :mod:`.deploy_run` with :mod:`.pod_run`: the Helm chart's container, and the zipapp.
- :mod:`.record_netlink`: records the netlink fixtures of tests/fixtures/netlink.

Each writes what the host-side assertions need into its ``--out`` directory.
"""
