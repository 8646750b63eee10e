"""arm64 registers: their names as the resolver writes them and their ``pt_regs`` numbers.

The resolver names registers ``x0`` .. ``x30`` (arm64_code.xreg folds ``w``, ``fp`` and ``lr``
into those); the BPF side numbers them as ``struct pt_regs``'s ``regs[]``: ``xN`` is N
(``XT_NUM_REGS_ARM64`` in ``bpf/xfrm.h``).  No disassembler is imported here: the warm start
(sites from the cache) needs these names but no capstone.
"""

from __future__ import annotations

from xfrmtrace.bpf.abi import XT_NUM_REGS_ARM64

#: AAPCS64 passes the first eight integer arguments in x0..x7; the BPF side records six.
ARGUMENT_REGISTERS: tuple[str, ...] = tuple(f"x{n}" for n in range(6))

#: Register name -> its slot in ``struct pt_regs`` as the BPF side reads it.
PT_REGS_SLOT: dict[str, int] = {f"x{n}": n for n in range(XT_NUM_REGS_ARM64)}
