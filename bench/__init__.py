"""Benchmarks for xfrmtrace (``make bench``): hot-path overhead, error storm, start-up and
resolver, measured in the VM lab and written to ``bench/RESULTS.md``.

- :mod:`bench.run` (host): boots the kernel once, runs :mod:`bench.guest` in it, resolves
  sites offline on the host, and writes the report (:mod:`bench.report`).
- :mod:`bench.guest` (guest, root): the measurements that need kprobes.
- :mod:`bench.broad` (guest): the "broad probe set" of earlier tracers, for comparison.
- :mod:`bench.offline` (host): resolver timing from a vmlinux file plus the guest's kallsyms.
- :mod:`bench.stats`: pure helpers (statistics, parsing, packet building), unit-tested in
  ``tests/test_bench.py``.
"""
