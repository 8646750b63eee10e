"""Where arguments are still in registers (argregs.py), on machine code assembled by GNU as.

Each function below is the shape a compiler gives a kernel function with one XFRM site;
the resolver is asked for argument slot 0 (the skb, ``rdi`` at entry) unless said otherwise.
"""

from __future__ import annotations

import pytest

from tests.support.kasm import Assembled, needs_binutils
from xfrmtrace.bpf.abi import XtArgRole
from xfrmtrace.resolve.model import FunctionArgs, RecordPoint, in_registers

pytestmark = needs_binutils

SKB = frozenset({0})


@pytest.fixture
def asm(tmp_path):
    return lambda body: Assembled(tmp_path, body)


def _site(a: Assembled, needed=SKB):
    (site,) = a.resolve(lambda function, obj: needed).sites
    return site


# The prologue every traced kernel function starts with: endbr64, then the ftrace hook.
PROLOGUE = """
  endbr64
  call __fentry__
"""
FENTRY = """
__fentry__:
  ret
"""


def test_callee_saved_copy_is_read_at_the_site(asm):
    """``mov rbx, rdi`` in the entry block and rbx never written again: no recording probe."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  push rbx
  mov rbx, rdi
  call g
  mov rax, qword ptr [rbx + 0x1b0]
  test eax, eax
  je 1f
  inc qword ptr gs:[rax + 0x20]
1:
  pop rbx
  ret
g:
  ret
{FENTRY}"""))
    assert site.arg_regs[0] == "rbx"
    assert site.record is None
    assert in_registers(site.arg_regs, SKB)


def test_ftrace_hook_is_not_a_clobbering_call(asm):
    """Without the hook exemption rdi would look clobbered by ``call __fentry__``."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  push rbx
  mov rbx, rdi
  mov rax, qword ptr [rdi + 0x1b0]
  test esi, esi
  je 1f
  inc qword ptr gs:[rax + 0x20]
1:
  pop rbx
  ret
{FENTRY}"""))
    assert site.arg_regs[0] == "rbx"


def test_register_written_again_is_not_used(asm):
    """``skb = skb->next``: rbx no longer holds the argument at the site, so it is recorded
    before, at the last block start where it still does."""
    a = asm(f"""
f1:{PROLOGUE}
  push rbx
  mov rbx, rdi
  call g
  mov rax, qword ptr [rbx + 0x1b0]
  test eax, eax
  je 1f
  mov rbx, qword ptr [rbx]
  inc qword ptr gs:[rax + 0x20]
1:
  pop rbx
  ret
g:
  ret
{FENTRY}""")
    site = _site(a)
    assert site.arg_regs[0] is None  # nor rdi: the call clobbers it
    assert not in_registers(site.arg_regs, SKB)
    assert site.record is not None and site.record.registers[0] == "rbx"
    assert site.record.depth == 8
    assert a.read(a.symbols["f1"] + site.record.offset, 3) == bytes.fromhex("488b1b")


def test_caller_saved_register_is_clobbered_by_a_call(asm):
    site = _site(asm(f"""
f1:{PROLOGUE}
  mov r8, rdi
  call g
  mov rax, qword ptr [r8 + 0x1b0]
  test eax, eax
  je 1f
  inc qword ptr gs:[rax + 0x20]
1:
  ret
g:
  ret
{FENTRY}"""))
    assert site.arg_regs[0] is None


def test_pop_in_the_middle_is_a_write(asm):
    """Only a pop on the way out (to ret or a tail jump) keeps the register invariant."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  push rbx
  mov rbx, rdi
  call g
  push rbx
  pop rbx
  mov rax, qword ptr [rbx + 0x1b0]
  test eax, eax
  je 1f
  push rdx
  pop rbx
  inc qword ptr gs:[rax + 0x20]
1:
  pop rbx
  jmp g
g:
  ret
{FENTRY}"""))
    assert site.arg_regs[0] is None


# ``if (!xo) return skb;`` then ``skb = skb->next`` before the site, with a place for a
# static branch (jump label) before that.
EARLY_RETURN = """
f1:{prologue}
  push rbx
  mov rbx, rdi
  sub rsp, 0x18
  cmp qword ptr [rdi + 0x40], 0
  je 9f
  mov rdi, qword ptr [rdi + 0x48]
  call g
{branch}
  mov rbx, qword ptr [rbx]
7:
  mov rax, qword ptr [rdi + 0x1b0]
  test eax, eax
  je 9f
  inc qword ptr gs:[rax + 0x20]
9:
  add rsp, 0x18
  pop rbx
  ret
g:
  ret
{fentry}"""


def test_record_point_after_the_early_return(asm):
    """``if (!xo) return skb;`` runs on every packet: the probe goes after it, where rbx holds
    the skb and the stack depth is known."""
    a = asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY, branch=""))
    site = _site(a)
    assert site.arg_regs[0] is None  # rbx is overwritten before the site
    point = site.record
    assert point is not None
    assert point.registers[0] == "rbx"
    # The first instruction after the early exit: `mov rdi, [rdi + 0x48]`, 0x20 deep
    # (push rbx + sub rsp, 0x18).
    assert point.depth == 0x20
    assert a.read(a.symbols["f1"] + point.offset, 4) == bytes.fromhex("488b7f48")


def test_indirect_jump_falls_back_to_the_entry(asm):
    """A jump table hides edges: dominance cannot be proved, so the entry records."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  push rbx
  mov rbx, rdi
  cmp qword ptr [rdi + 0x40], 0
  je 9f
  call g
  jmp qword ptr [rsi]
  mov rbx, qword ptr [rbx]
  mov rax, qword ptr [rbx + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
9:
  pop rbx
  ret
g:
  ret
{FENTRY}"""))
    assert site.arg_regs[0] is None
    assert site.record is None


def test_without_roles_nothing_is_planned(asm):
    """No argument is read (no BTF roles): the sites get no registers and no record point."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  ret
{FENTRY}"""), needed=frozenset())
    assert site.record is None


def test_flow_family_slots_only_with_a_flow():
    """dst and family only give a flow's family: a function with an skb does not need them."""
    with_skb = FunctionArgs("f", 0, positions={XtArgRole.SKB: 2, XtArgRole.FAMILY: 3})
    with_flow = FunctionArgs("g", 0, positions={XtArgRole.FLOW: 2, XtArgRole.DST: 1,
                                                XtArgRole.FAMILY: 3})
    assert with_skb.slots == {2}
    assert with_flow.slots == {1, 2, 3}
    assert with_skb.record == RecordPoint(0, 0, ("rdi", "rsi", "rdx", "rcx", "r8", "r9"))


def test_record_point_is_never_a_site(asm):
    """A site that starts the block dominating all sites is not a record point: its own
    probe would run before the recording one."""
    a = asm(f"""
f1:{PROLOGUE}
  push rbx
  mov rbx, rdi
  mov rax, qword ptr [rdi + 0x1b0]
  cmp qword ptr [rdi + 0x40], 0
  je 9f
  call g
  mov rax, qword ptr [rbx + 0x1b0]
  jmp 8f
8:
  inc qword ptr gs:[rax + 0x20]
  mov rbx, qword ptr [rbx]
9:
  pop rbx
  ret
g:
  ret
{FENTRY}""")
    site = _site(a)
    assert site.arg_regs[0] is None
    assert site.record is not None
    assert site.record.offset != site.offset
    assert a.read(a.symbols["f1"] + site.record.offset, 1) == b"\xe8"  # `call g`, before it


def test_disabled_static_branch_gives_up_the_record_point(asm):
    """The kernel flips static branches while it runs: a record point must stay on every path
    to the site whichever way they point.  A jump label's 5-byte nop (the kernel's nop5) may
    become a jump to anywhere: no record point."""
    site = _site(asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY,
                                          branch="  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00")))
    assert site.record is None


NOP5 = bytes.fromhex("0f1f440000")


def test_padding_nop_is_no_branch_when_the_jump_label_table_is_known(asm):
    """Paravirt and alternative patching leave the same nop5: with the kernel's table
    (jumplabels.py) a nop that is not in it is just a nop, and the record point stays."""
    a = asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY,
                                branch="  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00"))
    (site,) = a.resolve(lambda function, obj: SKB, jump_labels={}).sites
    assert site.record is not None
    assert a.read(a.symbols["f1"] + site.record.offset, 4) == bytes.fromhex("488b7f48")


def test_static_branch_from_the_table_has_both_edges(asm):
    """A static branch in the table, before the early return, jumping straight to the site's
    block: the point after the early return no longer dominates the site, so the record
    point moves up to the only block every path shares: the entry."""
    text = EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY, branch="").replace(
        "  cmp qword ptr [rdi + 0x40], 0",
        "  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n  cmp qword ptr [rdi + 0x40], 0")
    a = asm(text)
    f1 = a.symbols["f1"]
    nop = f1 + a.read(f1, 0x40).index(NOP5)
    target = f1 + a.read(f1, 0x60).index(bytes.fromhex("488b87b0010000"))  # the `7:` block
    (kept,) = a.resolve(lambda function, obj: SKB, jump_labels={}).sites
    assert kept.record is not None and a.read(f1 + kept.record.offset, 4) == \
        bytes.fromhex("488b7f48")
    (site,) = a.resolve(lambda function, obj: SKB, jump_labels={nop: target}).sites
    assert site.record is None  # recorded at the entry


def test_table_that_disagrees_with_the_disassembly_is_not_used(asm):
    """A static branch in the table that is not an instruction start here: the table and
    the disassembly disagree, so the conservative rule applies (the nop may jump)."""
    a = asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY,
                                branch="  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00"))
    f1 = a.symbols["f1"]
    inside_the_nop = f1 + a.read(f1, 0x40).index(NOP5) + 1
    (site,) = a.resolve(lambda function, obj: SKB, jump_labels={inside_the_nop: f1}).sites
    assert site.record is None


def test_enabled_static_branch_may_fall_through(asm):
    """``jmp 7f`` may turn into a nop: the block after it is a path to the site too, so the
    record point is the block both paths share (before the jump), not the jump's target."""
    a = asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY, branch="  jmp 7f"))
    site = _site(a)
    assert site.record is not None
    assert a.read(a.symbols["f1"] + site.record.offset, 4) == bytes.fromhex("488b7f48")
