"""Where arm64 sites find their function's arguments (arm64_frame.py through argregs.py), on
machine code assembled by clang.

Each function is the shape a compiler gives a kernel function with one XFRM site (``INC``:
the per-CPU increment, probed on its ``add x8, x8, x9``); the resolver is asked for argument
slot 0 (``x0`` at entry) unless said otherwise.  Debian's arm64 kernel is checked in
tests/test_arm64_sites.py.
"""

from __future__ import annotations

import pytest

from tests.support.kasm import Arm64Assembled, needs_clang
from xfrmtrace.kernel import arch
from xfrmtrace.resolve.model import ENTRY_RECORDS, RecordPoint

pytestmark = needs_clang

SKB = frozenset({0})
ENTRY = ENTRY_RECORDS[arch.ARM64]
# XfrmInBufferError (index 2), through the struct net in x23.
INC = """
  ldr x8, [x23, #0x1d0]
  mrs x9, tpidr_el1
  mov x10, #1
  add x8, x8, #0x10
  add x8, x8, x9
  stadd x10, [x8]
"""
CALLEE = """
g:
  ret
"""


@pytest.fixture
def asm(tmp_path):
    return lambda body: Arm64Assembled(tmp_path, body)


def _site(a: Arm64Assembled, needed=SKB, jump_labels=None):
    (site,) = a.resolve(lambda function, obj: needed, jump_labels).sites
    assert site.counter == "XfrmInBufferError" and site.instruction == "add x8, x8, x9"
    return site


def _frame(body: str, size: int = 48) -> str:
    """f: the kernel's prologue (frame record, x29 as frame pointer), ``body``, the epilogue."""
    return f"""
f:
  paciasp
  stp x29, x30, [sp, #-{size}]!
  mov x29, sp
  stp x19, x23, [sp, #16]
{body}
  ldp x19, x23, [sp, #16]
  ldp x29, x30, [sp], #{size}
  autiasp
  ret
{CALLEE}"""


def test_callee_saved_copy_is_read_at_the_site(asm):
    site = _site(asm(_frame(f"  mov x19, x0\n  bl g\n{INC}")))
    assert site.arg_regs[0] == "x19" and site.records == ()


def test_argument_still_in_its_register(asm):
    """No call between entry and site: x0 itself still holds it."""
    site = _site(asm(_frame(INC)))
    assert site.arg_regs[0] == "x0" and site.records == ()


def test_spill_to_the_frame_is_read_from_the_slot(asm):
    """``str x0, [sp, #40]`` and a call that clobbers x0: the site reads sp + 40."""
    site = _site(asm(_frame(f"  str x0, [sp, #40]\n  bl g\n{INC}")))
    assert site.arg_regs[0] is None and site.arg_stack[0] == 40 and site.records == ()
    assert site.stack_depth == 48


def test_spill_through_the_frame_pointer_read_below_a_later_sp(asm):
    """``str x0, [x29, #40]``, then 16 more bytes of stack: sp + 56 at the site."""
    site = _site(asm(_frame(f"  str x0, [x29, #40]\n  sub sp, sp, #16\n  bl g\n{INC}\n"
                            "  add sp, sp, #16")))
    assert site.arg_stack[0] == 56 and site.stack_depth == 64 and site.records == ()


def test_pair_spill_and_reload(asm):
    """``stp x0, x1`` then ``ldp x20, x21`` from the same slots: both in registers again."""
    site = _site(asm(_frame(f"  stp x0, x1, [sp, #32]\n  bl g\n  ldp x20, x21, [sp, #32]\n"
                            f"{INC}")), needed=frozenset({0, 1}))
    assert site.arg_regs[:2] == ("x20", "x21") and site.records == ()


def test_a_32_bit_copy_holds_only_the_low_half(asm):
    """``mov w19, w3``: enough for the family (2 bytes), not for a pointer."""
    body = asm(_frame(f"  mov w19, w3\n  bl g\n{INC}"))
    assert _site(body, needed={3: 2}).arg_regs[3] == "x19"
    assert _site(body, needed={3: 8}).arg_regs[3] is None


def test_slot_overwritten_on_one_path_is_recorded_where_both_paths_meet(asm):
    """The slot is rewritten on one path: at the join x0 still holds the argument, so the
    record goes there (not at the entry), with the frame's depth."""
    a = asm(_frame(f"""  str x0, [sp, #40]
  cbz x1, 1f
  str x2, [sp, #40]
1:
  bl g
{INC}"""))
    site = _site(a)
    assert site.arg_stack[0] is None and site.arg_regs[0] is None
    (point,) = site.records
    join = 7 * 4  # label 1: after paciasp, stp, mov, stp, str, cbz, str
    assert point == RecordPoint(offset=join, depth=48, registers=("x0", *[None] * 5))


def test_no_record_point_where_the_kernel_refuses_a_kprobe(asm):
    """The same join starting with ``mrs`` (arm64 kprobes refuse it): the record goes on
    each path before it instead, here the entry on one of them."""
    a = asm(_frame(f"""  str x0, [sp, #40]
  cbz x1, 1f
  str x2, [sp, #40]
1:
  mrs x11, tpidr_el1
  bl g
{INC}"""))
    assert _site(a).records == (ENTRY,)


def test_address_taken_below_the_slot_leaves_it_untracked(asm):
    """``add x1, sp, #16`` hands a callee the frame from sp + 16 up: the slot at sp + 40
    may be written by it."""
    site = _site(asm(_frame(f"  str x0, [sp, #40]\n  add x1, sp, #16\n  bl g\n{INC}")))
    assert site.arg_stack[0] is None and site.records == (ENTRY,)


def test_address_taken_above_the_slot_keeps_it(asm):
    site = _site(asm(_frame(f"  str x0, [sp, #32]\n  add x1, sp, #40\n  bl g\n{INC}")))
    assert site.arg_stack[0] == 32 and site.records == ()


def test_sp_handed_out_leaves_every_slot_untracked(asm):
    site = _site(asm(_frame(f"  str x0, [sp, #40]\n  mov x1, sp\n  bl g\n{INC}")))
    assert site.arg_stack[0] is None and site.records == (ENTRY,)


def test_an_unknown_store_into_the_frame_ends_the_slot(asm):
    """An indexed store may hit any slot."""
    site = _site(asm(_frame(f"  str x0, [sp, #40]\n  str x3, [sp, x4, lsl #3]\n  bl g\n{INC}")))
    assert site.arg_stack[0] is None and site.records == (ENTRY,)


def test_an_indirect_branch_proves_nothing(asm):
    site = _site(asm(_frame(f"  mov x19, x0\n  cbz x4, 1f\n  br x3\n1:\n  bl g\n{INC}")))
    assert site.arg_regs[0] is None and site.records == (ENTRY,)


def test_a_nop_is_a_possible_static_branch_without_the_table(asm):
    """A module's functions come without the jump label table: a ``nop`` there may be a
    disabled static branch, so nothing is proven.  With the table (no entry for it) the
    nop is only a nop."""
    a = asm(_frame(f"  mov x19, x0\n  nop\n  bl g\n{INC}"))
    assert _site(a).records == (ENTRY,)
    assert _site(a, jump_labels={}).arg_regs[0] == "x19"


def test_without_the_table_a_branch_may_fall_through(asm):
    """A ``b`` that may be a static branch the kernel turns into a nop: the path that
    falls through, where the slot is overwritten, counts too."""
    a = asm(_frame(f"""  str x0, [sp, #40]
  b 1f
  str x2, [sp, #40]
1:
  bl g
{INC}"""))
    assert _site(a, jump_labels={}).arg_stack[0] == 40
    assert _site(a).arg_stack[0] is None
