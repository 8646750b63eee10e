"""The kernel's jump label table: which instructions are static branches, and where to.

The kernel flips static branches while it runs: a branch's 5- or 2-byte nop becomes a
``jmp`` to its target and back.  Without the table, the argument analysis (argregs.py)
must assume any nop may jump anywhere and any ``jmp`` may fall through, and give up
record points that would have been safe.  Paravirt and alternative patching leave nops
of the same bytes that are not branches at all: only the table tells them apart.

x86-64 keeps the table relative (CONFIG_HAVE_ARCH_JUMP_LABEL_RELATIVE, every kernel
since 5.0): ``struct jump_entry { s32 code; s32 target; long key; }`` with ``code``
relative to itself and ``target`` relative to itself.  Only vmlinux's table is read
(``__start___jump_table`` to ``__stop___jump_table``); module functions keep the
conservative assumption.
"""

from __future__ import annotations

import bisect
import logging
import struct
from typing import Callable, Mapping, Optional

log = logging.getLogger("xfrmtrace.kernel.jumplabels")

_ENTRY = struct.Struct("<iiq")
# A table read from the wrong place, or laid out otherwise, points mostly outside the
# text: it is then ignored rather than trusted.
_MIN_IN_TEXT = 0.9

JumpLabels = dict[int, int]  # branch instruction address -> target address


class LabelIndex:
    """The table, with its branch addresses sorted to find those inside a function."""

    def __init__(self, targets: Mapping[int, int]) -> None:
        self.targets = targets
        self._sorted = sorted(targets)

    def within(self, start: int, end: int) -> list[int]:
        """Branch addresses in [start, end)."""
        lo = bisect.bisect_left(self._sorted, start)
        return self._sorted[lo:bisect.bisect_left(self._sorted, end, lo)]


def parse(data: bytes, base: int) -> JumpLabels:
    """The entries of a table whose first byte is at ``base``."""
    table: JumpLabels = {}
    for off in range(0, len(data) - _ENTRY.size + 1, _ENTRY.size):
        code, target, _key = _ENTRY.unpack_from(data, off)
        entry = base + off
        table[entry + code] = entry + 4 + target
    return table


def read_table(span: Optional[tuple[int, int]], read: Callable[[int, int], bytes],
               text: tuple[int, int]) -> Optional[JumpLabels]:
    """vmlinux's table at ``span`` (from kallsyms), or None when it cannot be trusted:
    absent, unreadable, or not pointing into the core ``text`` range."""
    if span is None:
        return None
    start, stop = span
    data = read(start, stop - start)
    if len(data) != stop - start or len(data) % _ENTRY.size:
        log.info("jump label table at %#x unreadable (%d of %d bytes)", start, len(data),
                 stop - start)
        return None
    table = parse(data, start)
    inside = sum(1 for code, target in table.items()
                 if text[0] <= code < text[1] and text[0] <= target < text[1])
    if not table or inside < _MIN_IN_TEXT * len(table):
        log.info("jump label table at %#x ignored: %d of %d entries in the text", start,
                 inside, len(table))
        return None
    return table
