"""The kernel's jump label table: parsed from its relative entries, and refused when it
does not point into the text (a kallsyms from another kernel, a different layout)."""

from __future__ import annotations

import struct

from xfrmtrace.kernel import jumplabels
from xfrmtrace.kernel.kallsyms import Kallsyms

TEXT = (0xFFFFFFFF81000000, 0xFFFFFFFF82000000)
TABLE = 0xFFFFFFFF82600000


def _entry(at: int, code: int, target: int, key: int = 0xFFFFFFFF83000000) -> bytes:
    """struct jump_entry { s32 code; s32 target; long key; }, each relative to itself."""
    return struct.pack("<iiq", code - at, target - (at + 4), key - (at + 8))


def test_entries_are_relative_to_themselves() -> None:
    data = (_entry(TABLE, 0xFFFFFFFF81000100, 0xFFFFFFFF81000180)
            + _entry(TABLE + 16, 0xFFFFFFFF81234567, 0xFFFFFFFF81234500))
    assert jumplabels.parse(data, TABLE) == {0xFFFFFFFF81000100: 0xFFFFFFFF81000180,
                                             0xFFFFFFFF81234567: 0xFFFFFFFF81234500}
    read = {TABLE: data}.get
    table = jumplabels.read_table((TABLE, TABLE + len(data)),
                                  lambda addr, size: read(addr, b"")[:size], TEXT)
    assert table is not None and len(table) == 2


def test_a_table_that_points_elsewhere_is_not_trusted() -> None:
    data = _entry(TABLE, 0xFFFFFFFF81000100, 0xFFFFFFFF81000180) + bytes(16 * 9)
    assert jumplabels.read_table((TABLE, TABLE + len(data)),
                                 lambda addr, size: data[:size], TEXT) is None
    # Unreadable (kcore without that range), cut short, or no symbols for it at all.
    assert jumplabels.read_table((TABLE, TABLE + 32), lambda addr, size: b"", TEXT) is None
    assert jumplabels.read_table((TABLE, TABLE + 32),
                                 lambda addr, size: data[:20], TEXT) is None
    assert jumplabels.read_table(None, lambda addr, size: data, TEXT) is None


def test_kallsyms_keeps_where_the_table_is() -> None:
    syms = Kallsyms.parse("\n".join([
        "ffffffff81000000 T _stext",
        "ffffffff81000100 T f",
        "ffffffff82000000 T _etext",
        "ffffffff82600000 D __start___jump_table",
        "ffffffff82610000 D __stop___jump_table",
        "ffffffff82620000 D some_other_data",
    ]))
    assert syms.jump_table_range() == (0xFFFFFFFF82600000, 0xFFFFFFFF82610000)
    assert syms.find("some_other_data") is None
    assert Kallsyms.parse("ffffffff81000000 T _stext\n").jump_table_range() is None
