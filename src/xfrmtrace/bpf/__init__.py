"""Stage 1, the BPF binding: libbpf through ctypes and the ABI shared with the BPF program.

- :mod:`.ffi`: loading ``libbpf.so.1``, its C prototypes (one table), errno -> exceptions,
  libbpf's log.
- :mod:`.objects`: the object model on top: BPF object, programs, maps, links, ring buffers.
- :mod:`.btf`: BTF through libbpf: struct offsets, enums, function prototypes.
- :mod:`.abi`: ctypes mirror of ``bpf/xfrm.h`` (checked against the built object's BTF).
- ``xfrm.x86_64.bpf.o``, ``xfrm.aarch64.bpf.o``: the CO-RE objects built from
  ``bpf/xfrm.bpf.c`` for each machine (package data; ``trace.tracer.bpf_object`` picks one).

Imports nothing else of xfrmtrace but :mod:`xfrmtrace.errors`.
"""
