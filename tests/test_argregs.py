"""Where arguments are still in registers (argregs.py), on machine code assembled by GNU as.

Each function below is the shape a compiler gives a kernel function with one XFRM site;
the resolver is asked for argument slot 0 (the skb, ``rdi`` at entry) unless said otherwise.
"""

from __future__ import annotations

import pytest

from tests.support.kasm import Assembled, needs_binutils
from xfrmtrace.bpf.abi import XtArgRole
from xfrmtrace.resolve.model import ENTRY_RECORD, FunctionArgs, RecordPoint, in_registers

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
    assert site.records == ()
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
    (point,) = site.records
    assert point.registers[0] == "rbx"
    assert point.depth == 8
    assert a.read(a.symbols["f1"] + point.offset, 3) == bytes.fromhex("488b1b")


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
    (point,) = site.records
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
    assert site.records == (ENTRY_RECORD,)


def test_without_roles_nothing_is_planned(asm):
    """No argument is read (no BTF roles): the sites get no registers and no record point."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  ret
{FENTRY}"""), needed=frozenset())
    assert site.records == ()


def test_flow_family_slots_only_with_a_flow():
    """dst and family only give a flow's family: a function with an skb does not need them."""
    with_skb = FunctionArgs("f", 0, positions={XtArgRole.SKB: 2, XtArgRole.FAMILY: 3})
    with_flow = FunctionArgs("g", 0, positions={XtArgRole.FLOW: 2, XtArgRole.DST: 1,
                                                XtArgRole.FAMILY: 3})
    assert with_skb.slots == {2}
    assert with_flow.slots == {1, 2, 3}
    assert with_skb.records == (RecordPoint(0, 0, ("rdi", "rsi", "rdx", "rcx", "r8", "r9")),)


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
  mov rbx, qword ptr [rbx]
  jmp 8f
8:
  inc qword ptr gs:[rax + 0x20]
9:
  pop rbx
  ret
g:
  ret
{FENTRY}""")
    site = _site(a)
    assert site.arg_regs[0] is None
    (point,) = site.records
    assert point.offset != site.offset
    assert a.read(a.symbols["f1"] + point.offset, 1) == b"\xe8"  # `call g`, before it


def test_disabled_static_branch_gives_up_the_record_point(asm):
    """The kernel flips static branches while it runs: a record point must stay on every path
    to the site whichever way they point.  A jump label's 5-byte nop (the kernel's nop5) may
    become a jump to anywhere: no record point."""
    site = _site(asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY,
                                          branch="  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00")))
    assert site.records == (ENTRY_RECORD,)


NOP5 = bytes.fromhex("0f1f440000")


def test_padding_nop_is_no_branch_when_the_jump_label_table_is_known(asm):
    """Paravirt and alternative patching leave the same nop5: with the kernel's table
    (jumplabels.py) a nop that is not in it is just a nop, and the record point stays."""
    a = asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY,
                                branch="  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00"))
    (site,) = a.resolve(lambda function, obj: SKB, jump_labels={}).sites
    (point,) = site.records
    assert a.read(a.symbols["f1"] + point.offset, 4) == bytes.fromhex("488b7f48")


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
    (point,) = kept.records
    assert a.read(f1 + point.offset, 4) == bytes.fromhex("488b7f48")
    (site,) = a.resolve(lambda function, obj: SKB, jump_labels={nop: target}).sites
    assert site.records == (ENTRY_RECORD,)  # a path from the entry to the site has no other


def test_table_that_disagrees_with_the_disassembly_is_not_used(asm):
    """A static branch in the table that is not an instruction start here: the table and
    the disassembly disagree, so the conservative rule applies (the nop may jump)."""
    a = asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY,
                                branch="  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00"))
    f1 = a.symbols["f1"]
    inside_the_nop = f1 + a.read(f1, 0x40).index(NOP5) + 1
    (site,) = a.resolve(lambda function, obj: SKB, jump_labels={inside_the_nop: f1}).sites
    assert site.records == (ENTRY_RECORD,)


def test_enabled_static_branch_may_fall_through(asm):
    """``jmp 7f`` may turn into a nop: the block after it is a path to the site too, so the
    record point is the block both paths share (before the jump), not the jump's target."""
    a = asm(EARLY_RETURN.format(prologue=PROLOGUE, fentry=FENTRY, branch="  jmp 7f"))
    site = _site(a)
    (point,) = site.records
    assert a.read(a.symbols["f1"] + point.offset, 4) == bytes.fromhex("488b7f48")


# --- arguments from stack slots (arglocations.py) -------------------------------------------

# The skb (rdi) is spilled to [rsp + 8] and rbx is reused for something else: the site finds
# the skb in its own frame.  {between} goes after the spill, {reload} just before the site.
SPILLED = """
f1:{prologue}
  push rbx
  sub rsp, 0x20
  mov qword ptr [rsp + 8], rdi
{between}
  call g
  mov rbx, qword ptr [rdi + 0x1b0]
  test eax, eax
  je 9f
{reload}
  inc qword ptr gs:[rbx + 0x20]
9:
  add rsp, 0x20
  pop rbx
  ret
g:
  ret
{fentry}"""


def _spilled(asm, between="", reload=""):
    return _site(asm(SPILLED.format(prologue=PROLOGUE, fentry=FENTRY, between=between,
                                    reload=reload)))


def test_spilled_argument_is_read_from_the_sites_frame(asm):
    """No register holds the skb after the call: the site reads [sp + 8], no record probe."""
    site = _spilled(asm)
    assert site.arg_regs[0] is None
    assert site.arg_stack[0] == 8
    assert site.records == ()
    assert site.holds(SKB) and site.argument_source(0) == "stack sp+0x8"


def test_reloaded_argument_is_read_from_the_register(asm):
    """``mov rax, [rsp + 8]`` reloads the spill: the register holds the skb at the site."""
    site = _spilled(asm, reload="  mov rax, qword ptr [rsp + 8]")
    assert site.arg_regs[0] == "rax" and site.arg_stack[0] is None


@pytest.mark.parametrize("between, why", [
    ("  mov qword ptr [rsp + 8], rsi", "the slot is overwritten with another value"),
    ("  mov dword ptr [rsp + 12], 0", "part of the slot is overwritten"),
    ("  lea rsi, [rsp + 8]", "the slot's address is taken: a callee may write it"),
    ("  lea rsi, [rsp]", "an address below the slot is taken: an object there may cover it"),
    ("  mov rsi, rsp", "the frame's address is handed out"),
    ("  mov qword ptr [rsp + rax*8], rsi", "an array starting below the slot is written"),
    ("  test esi, esi\n  je 1f\n  mov qword ptr [rsp + 8], rdx\n1:",
     "overwritten on one of the paths to the site"),
])
def test_slot_that_may_not_hold_the_argument_is_not_used(asm, between, why):
    site = _spilled(asm, between=between)
    assert site.arg_stack[0] is None, why
    assert site.records != (), why  # the skb is recorded instead


@pytest.mark.parametrize("between", [
    "  lea rsi, [rsp + 0x10]\n  mov qword ptr [rsi - 8], rdx",  # through a pointer: assumed
    "  mov qword ptr [rsp + rax*8 + 0x10], rsi",  # an array above the slot
    "  mov qword ptr [rsp + 0x10], rsi",  # the neighbouring slot
])
def test_writes_that_cannot_reach_the_slot_keep_it(asm, between):
    """What C lets reach a slot below every taken address: nothing but the function's own
    direct writes.  (A pointer to an object above the slot is not used to write below that
    object: the remaining assumption, arglocations.py.)"""
    assert _spilled(asm, between=between).arg_stack[0] == 8


def test_spill_that_does_not_dominate_the_site_is_not_used(asm):
    """The spill happens on one path only: on the other the slot holds anything."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  push rbx
  sub rsp, 0x20
  test esi, esi
  je 1f
  mov qword ptr [rsp + 8], rdi
1:
  call g
  mov rbx, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rbx + 0x20]
  add rsp, 0x20
  pop rbx
  ret
g:
  ret
{FENTRY}"""))
    assert site.arg_stack[0] is None and site.arg_regs[0] is None


def test_slot_released_before_the_site_is_not_used(asm):
    """``add rsp`` gives the slot back: an interrupt may overwrite it before the site."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  push rbx
  sub rsp, 0x20
  mov qword ptr [rsp + 8], rdi
  call g
  mov rbx, qword ptr [rdi + 0x1b0]
  add rsp, 0x20
  inc qword ptr gs:[rbx + 0x20]
  pop rbx
  ret
g:
  ret
{FENTRY}"""))
    assert site.arg_stack[0] is None


def test_stack_chk_fail_does_not_return(asm):
    """``call __stack_chk_fail`` never returns: the bytes after it are another path, not a
    fall-through that clobbers the register."""
    a = asm(f"""
f1:{PROLOGUE}
  push rbx
  mov rbx, rdi
  call g
  test eax, eax
  jne 2f
  test esi, esi
  jne 1f
  pop rbx
  ret
1:
  mov rbx, rsi
  call __stack_chk_fail
2:
  mov rax, qword ptr [rbx + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  pop rbx
  ret
g:
  ret
__stack_chk_fail:
  ret
{FENTRY}""")
    site = _site(a)
    assert site.arg_regs[0] == "rbx" and site.records == ()


def test_warn_resumes_after_ud2(asm):
    """WARN_ON() is a ud2 that execution continues after: the path through it counts."""
    site = _site(asm(f"""
f1:{PROLOGUE}
  push rbx
  sub rsp, 0x10
  mov qword ptr [rsp], rdi
  test esi, esi
  je 1f
  ud2
  mov qword ptr [rsp], rdx
1:
  call g
  mov rbx, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rbx + 0x20]
  add rsp, 0x10
  pop rbx
  ret
g:
  ret
{FENTRY}"""))
    assert site.arg_stack[0] is None


def test_record_points_cut_every_path_after_the_early_return(asm):
    """Two paths join before the site: the skb is lost on both, so each path records it
    at its own latest point, both after the early return: no probe on the path that leaves
    early (``if (!policy_count) goto nopol``)."""
    a = asm(f"""
f1:{PROLOGUE}
  push rbx
  cmp qword ptr [rdi + 0x40], 0
  je 9f
  mov rbx, rdi
  test esi, esi
  je 2f
  call g
  mov rbx, qword ptr [rbx]
  jmp 3f
2:
  call g
  mov rbx, qword ptr [rbx + 8]
3:
  mov rax, qword ptr [rbx + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
9:
  pop rbx
  ret
g:
  ret
{FENTRY}""")
    # The jump label table is known (and empty): ``jmp 3f`` is no static branch that might
    # fall through into the other path.
    (site,) = a.resolve(lambda function, obj: SKB, jump_labels={}).sites
    assert site.arg_regs[0] is None and site.arg_stack[0] is None
    assert len(site.records) == 2
    f1 = a.symbols["f1"]
    assert {a.read(f1 + p.offset, 1) for p in site.records} == {b"\xe8"}  # both `call g`
    assert all(p.registers[0] == "rbx" and p.depth == 8 for p in site.records)


def test_sites_json_names_each_arguments_source(asm):
    """``sites --output json``: per role, the register, the stack slot or the record points."""
    from xfrmtrace.resolve.model import argument_sources

    args = FunctionArgs("f1", 0, positions={XtArgRole.SKB: 0})
    assert argument_sources(_spilled(asm), args) == {"skb": "stack sp+0x8"}
    kept = _spilled(asm, reload="  mov rax, qword ptr [rsp + 8]")
    assert argument_sources(kept, args) == {"skb": "rax"}
    lost = _spilled(asm, between="  mov qword ptr [rsp + 8], rsi")
    (point,) = lost.records
    where = "entry" if point.offset == 0 else f"f1+{point.offset:#x}"
    assert argument_sources(lost, args) == {"skb": f"record at {where}"}
    assert argument_sources(lost, None) == {}
