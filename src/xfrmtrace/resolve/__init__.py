"""Stage 3, the site resolver: which instructions increment an XFRM counter, and where
their functions' arguments can be read.

- :mod:`.x86_registers`: x86-64 register names, roles and ``pt_regs`` numbers (no capstone);
  :mod:`.x86_code`: a function's machine code (capstone), CFG, stack depth, dataflow.
- :mod:`.sites`: the resolver (candidates, provenance of the incremented pointer).
- :mod:`.argregs`: arguments still in registers at the sites, record points.
- :mod:`.funcargs`: argument roles from BTF prototypes.
- :mod:`.model`: the plain data it produces (Site, FunctionArgs, audit entries).
- :mod:`.sitecache`: resolved sites cached per build id; :mod:`.discovery`: cache or resolve,
  for a :class:`~xfrmtrace.kernel.view.KernelView`.
"""
