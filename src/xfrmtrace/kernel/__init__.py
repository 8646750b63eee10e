"""Stage 2, the kernel as data: what the running kernel (or a vmlinux file) holds.

- :mod:`.kallsyms`: the symbol table; :mod:`.ktext`: kernel and module text (/proc/kcore or
  a vmlinux file); :mod:`.jumplabels`: the static branch table; :mod:`.view`: all of them
  plus the BTF facts (MIB offset, counter enum) as one :class:`~.view.KernelView`.
- :mod:`.modules`: loaded modules and their changes (/proc/modules).
- :mod:`.counters`: counter names (BTF enum, /proc/net/xfrm_stat).
- :mod:`.netns`, :mod:`.nsenter`: network namespace names and setns().
- :mod:`.preflight`: kernel features and privileges, checked before anything else.
"""
