"""Site resolver on real machine code assembled by GNU as: every provenance rule, root-free."""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.kasm import BASE, COUNTERS, MIB_OFFSET, Assembled, needs_binutils
from xfrmtrace.kernel.kallsyms import VMLINUX, Kallsyms
from xfrmtrace.resolve import discovery
from xfrmtrace.resolve.model import Resolution
from xfrmtrace.resolve.sitecache import FORMAT, SiteCache
from xfrmtrace.resolve.sites import DOUBTFUL, OTHER, XFRM

pytestmark = needs_binutils


@pytest.fixture
def asm(tmp_path):
    return lambda body: Assembled(tmp_path, body)


def _by_function(result):
    return {(a.function, a.classification) for a in result.audit}


def test_same_block_inc_and_add_forms_with_depth(asm):
    a = asm("""
f1:
  push rbx
  sub rsp, 0x10
  mov rax, qword ptr [rdi + 0x1b0]
  test esi, esi
  je 1f
  inc qword ptr gs:[rax + 0x20]
1:
  add qword ptr gs:[rax + 0x18], 1
  add rsp, 0x10
  pop rbx
  ret
""")
    result = a.resolve()
    assert [(s.function, s.counter) for s in result.sites] == [
        ("f1", "XfrmInNoStates"), ("f1", "XfrmInHdrError")]
    for site in result.sites:
        assert site.stack_depth == 0x18
        assert site.mib_reg == "rax"
        assert site.net_reg == "rdi"
        assert site.entry_function == "f1"
        assert a.read(site.address, 1) == b"\x65"


def test_load_in_other_block_and_register_copy(asm):
    a = asm("""
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  test esi, esi
  jne 2f
  mov rdx, rax
  inc qword ptr gs:[rdx + 0x08]
  ret
2:
  inc qword ptr gs:[rax + 0x10]
  ret
""")
    result = a.resolve()
    assert [(s.counter, s.mib_reg) for s in result.sites] == [
        ("XfrmInError", "rdx"), ("XfrmInBufferError", "rax")]


def test_mixed_provenance_is_doubtful(asm):
    a = asm("""
f1:
  test esi, esi
  je 1f
  mov rax, qword ptr [rdi + 0x1b0]
  jmp 2f
1:
  mov rax, qword ptr [rdi + 0x10]
2:
  inc qword ptr gs:[rax + 0x20]
  ret
""")
    result = a.resolve()
    assert result.sites == []
    assert [e.classification for e in result.audit] == [DOUBTFUL]


def test_other_offsets_and_clobbering_calls_are_not_sites(asm):
    a = asm("""
g_other:
  mov rax, qword ptr [rdi + 0x1a8]
  inc qword ptr gs:[rax + 0x20]
  ret
f_call:
  mov rax, qword ptr [rdi + 0x1b0]
  call g_other
  inc qword ptr gs:[rax + 0x20]
  ret
f_ok:
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  ret
""")
    result = a.resolve()
    assert [s.function for s in result.sites] == ["f_ok"]
    classes = {a.function: a for a in result.audit}
    assert classes["g_other"].classification == OTHER
    assert "never loads" in classes["g_other"].reason
    assert classes["f_call"].classification == OTHER
    assert "call" in classes["f_call"].reason


def test_cold_part_belongs_to_its_function(asm):
    a = asm("""
f2:
  push r12
  push rbx
  mov rbx, qword ptr [rdi + 0x1b0]
  test esi, esi
  jne f2.cold
  pop rbx
  pop r12
  ret
  int3
f2.cold:
  inc qword ptr gs:[rbx + 0x20]
  pop rbx
  pop r12
  ret
""")
    result = a.resolve()
    (site,) = result.sites
    assert site.function == "f2.cold" and site.offset == 0
    assert site.entry_function == "f2"
    assert site.stack_depth == 16
    assert site.net_reg == "rdi"


def test_clobbered_base_is_not_reported_as_net_register(asm):
    a = asm("""
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  xor edi, edi
  inc qword ptr gs:[rax + 0x20]
  ret
""")
    (site,) = a.resolve().sites
    assert site.net_reg is None


def test_unknown_counter_and_misaligned_bytes(asm):
    a = asm("""
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x400]
  movabs rcx, 0x2040ff4865
  ret
""")
    result = a.resolve()
    assert result.sites == []
    reasons = sorted((e.classification, e.reason.split(" ")[0]) for e in result.audit)
    assert reasons == [(DOUBTFUL, "XFRM"), (OTHER, "not")]


def test_stack_depth_unknown_after_realignment(asm):
    a = asm("""
f1:
  push rbp
  mov rbp, rsp
  and rsp, -16
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  leave
  ret
""")
    (site,) = a.resolve().sites
    assert site.stack_depth is None


def test_site_cache_round_trip_and_corruption(asm, tmp_path):
    a = asm(CACHED_TEXT)
    result = a.resolve()
    assert [s.function for s in result.sites] == ["f1", "f2"]
    view = SimpleNamespace(syms=a.syms, text=SimpleNamespace(read=a.read), machine="x86_64")
    cache = SiteCache(tmp_path / "cache")
    cache.store("vmlinux", "abc", result)
    loaded = cache.load("vmlinux", "abc", view)
    assert loaded is not None and loaded.sites == result.sites
    assert cache.load("vmlinux", "other-build", view) is None
    path = next((tmp_path / "cache").glob("*.json"))
    path.write_text(path.read_text()[:-20])
    assert cache.load("vmlinux", "abc", view) is None
    # A cache from another build whose offsets point elsewhere is refused too.
    cache.store("vmlinux", "abc", result)
    assert '"offset": 8' in path.read_text()
    text = path.read_text().replace('"offset": 8', '"offset": 1')
    path.write_text(text)
    assert cache.load("vmlinux", "abc", view) is None
    # A site that kallsyms now places in another function (a symbol appeared between the
    # function's start and the site) is refused, even though the bytes still match.
    cache.store("vmlinux", "abc", result)
    site = result.sites[0]
    split = Kallsyms.parse(f"{BASE:016x} T _stext\n{BASE:016x} T f1\n"
                           f"{site.address - 1:016x} t neighbour\n"
                           f"{BASE + len(a.code):016x} T _etext\n")
    assert cache.load("vmlinux", "abc", SimpleNamespace(syms=split, text=view.text,
                                                        machine="x86_64")) is None
    assert cache.load("vmlinux", "abc", view) is not None
    # Registers end up in BPF maps as the machine numbers them: another machine's names
    # (an arm64 x0 here) or the stack pointer make the cache unusable.
    for field, name in (("mib_reg", "x0"), ("net_reg", "rsp"), ("arg_regs", "x1")):
        value = [name] * 6 if field == "arg_regs" else name
        cache.store("vmlinux", "abc", Resolution(
            sites=[replace(s, **{field: tuple(value) if field == "arg_regs" else value})
                   for s in result.sites], audit=result.audit))
        assert cache.load("vmlinux", "abc", view) is None, field


def test_classification_is_exhaustive(asm):
    """Every gs increment in the text appears in the audit exactly once."""
    a = asm("""
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  inc qword ptr gs:[rcx + 0x20]
  add qword ptr gs:[rax + 0x8], 2
  ret
""")
    result = a.resolve()
    assert [e.classification for e in result.audit] == [XFRM, DOUBTFUL, OTHER]
    assert "entry" in result.audit[1].reason  # rcx: an argument, provenance unknown


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_chunked_scan_finds_every_increment_once(asm, monkeypatch, chunk):
    """Core text is scanned in overlapping chunks: increments across a chunk boundary are
    found once, whatever the chunk size."""
    import xfrmtrace.resolve.sites as sites_module

    text = """
f1:
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  inc qword ptr gs:[rcx + 0x20]
  add qword ptr gs:[rax + 0x8], 2
  inc qword ptr gs:[rax + 0x28]
  ret
"""
    whole = [(e.address, e.classification) for e in asm(text).resolve().audit]
    monkeypatch.setattr(sites_module, "_SCAN_CHUNK", chunk)
    assert [(e.address, e.classification) for e in asm(text).resolve().audit] == whole
    assert len(whole) == 4


# --- site cache robustness: every bad cache file is detected, resolved again and rewritten ---

CACHED_TEXT = """
f1:
  push rbx
  mov rax, qword ptr [rdi + 0x1b0]
  inc qword ptr gs:[rax + 0x20]
  pop rbx
  ret
f2:
  mov rax, qword ptr [rdi + 0x1b0]
  add qword ptr gs:[rax + 0x10], 1
  inc qword ptr gs:[rcx + 0x20]
  ret
"""
BUILD_ID = "5eedc0de"
# BTF of the assembled text: f1(struct sk_buff *skb) has an argument to record.
PROTOTYPES = SimpleNamespace(func_params=lambda name: [
    SimpleNamespace(name="skb", type="struct sk_buff *")] if name == "f1" else None)


@pytest.fixture
def live(asm, monkeypatch):
    """The assembled text seen as a running kernel whose build id is BUILD_ID."""
    a = asm(CACHED_TEXT)
    monkeypatch.setattr(discovery, "kernel_build_id", lambda: BUILD_ID)
    model = SimpleNamespace(mib_offset=MIB_OFFSET, counters=COUNTERS, btf=PROTOTYPES)
    return SimpleNamespace(syms=a.syms, text=SimpleNamespace(read=a.read), live=True,
                           machine="x86_64", model=model)


def _resolve(view, cache_dir: Path):
    return discovery.resolve_sites(view, [VMLINUX], SiteCache(cache_dir))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _edit(field: str, value: object, kind: str = "sites"):
    def edit(data: dict) -> dict:
        data[kind][0][field] = value
        return data
    return edit


def _as_text(edit):
    return lambda text: json.dumps(edit(json.loads(text)))


BAD_CACHES = {
    # damaged files
    "truncated": (lambda text: text[:len(text) // 2], "line 1 column"),  # a JSON error
    "empty": (lambda text: "", "Expecting value"),
    "random bytes": (b"\xff" + random.Random(6).randbytes(300), "utf-8"),
    "nul bytes": (b"\0" * 64, "Expecting value"),
    "nested too deeply": (lambda text: "[" * 200_000, "recursion"),
    # valid JSON of the wrong shape
    "a list": (lambda text: "[]", "a JSON list, not an object"),
    "a number": (lambda text: "42", "a JSON int, not an object"),
    "null": (lambda text: "null", "a JSON NoneType, not an object"),
    "no sites": (_as_text(lambda d: {k: v for k, v in d.items() if k != "sites"}), "sites"),
    "sites not a list": (_as_text(lambda d: {**d, "sites": 5}), "not iterable"),
    "site not an object": (_as_text(lambda d: {**d, "sites": ["f1"]}), "string indices"),
    "site without offset": (_as_text(lambda d: {**d, "sites": [
        {k: v for k, v in d["sites"][0].items() if k != "offset"}]}), "offset"),
    "site with an unknown field": (_as_text(_edit("colour", "red")), "colour"),
    "offset not a number": (_as_text(_edit("offset", "eight")), "eight"),
    "offset infinite": (lambda text: text.replace('"offset": 8', '"offset": Infinity', 1),
                        "infinity"),
    # argument registers and record points end up in BPF maps: checked
    "argument registers not a list": (_as_text(_edit("arg_regs", "rdi")), "register list"),
    "argument register rsp": (_as_text(_edit("arg_regs", ["rsp"] + [None] * 5)),
                              "bad register 'rsp'"),
    "argument register unknown": (_as_text(_edit("arg_regs", ["xmm0"] + [None] * 5)),
                                  "bad register 'xmm0'"),
    "breakpoint flag not a bool": (_as_text(_edit("hw_breakpoint", "yes")),
                                   "bad hw_breakpoint 'yes'"),
    "record points not a list": (_as_text(_edit("records", 5)), "bad record point list"),
    "record point not an object": (_as_text(_edit("records", [5])), "not subscriptable"),
    "record depth not a number": (_as_text(_edit("records", [{
        "offset": 0, "depth": "deep", "registers": ["rdi"] + [None] * 5}])), "bad number"),
    "stack offsets not a list": (_as_text(_edit("arg_stack", 8)), "stack offset list"),
    "stack offset negative": (_as_text(_edit("arg_stack", [-8] + [None] * 5)),
                              "bad stack offset -8"),
    "stack offset past the BPF field": (_as_text(_edit("arg_stack", [0x10000] + [None] * 5)),
                                        "bad stack offset 65536"),
    "stack offset not a number": (_as_text(_edit("arg_stack", [True] + [None] * 5)),
                                  "bad stack offset True"),
    # another format or object
    "older format": (_as_text(lambda d: {**d, "format": FORMAT - 1}), "format or object"),
    "newer format": (_as_text(lambda d: {**d, "format": FORMAT + 1}), "format or object"),
    "no format": (_as_text(lambda d: {k: v for k, v in d.items() if k != "format"}),
                  "format or object"),
    "another object": (_as_text(lambda d: {**d, "object": "esp4"}), "format or object"),
    # foreign: written from another kernel's text under this build id
    "instruction differs": (_as_text(_edit("code", "6548ff4028")),  # inc gs:[rax + 0x28]
                            "differs from the cached one"),
    "instruction bytes not hex": (_as_text(_edit("code", "inc")), "differs from the cached one"),
    "instruction bytes missing": (_as_text(lambda d: {**d, "sites": [
        {k: v for k, v in d["sites"][0].items() if k != "code"}]}),
        "differs from the cached one"),
    "mid-instruction offset": (_as_text(_edit("offset", 3)), "differs from the cached one"),
    "function not in kallsyms": (_as_text(_edit("function", "f9")),
                                 "function f9 is not in kallsyms"),
    # records outside their function
    "site past its function": (_as_text(_edit("offset", 0x40)), "outside that function"),
    "site before its function": (_as_text(_edit("offset", -1)), "outside that function"),
    "audit entry outside": (_as_text(_edit("offset", 0x1000, "audit")),
                            "outside that function"),
}


@pytest.mark.parametrize("damage, reason", BAD_CACHES.values(), ids=list(BAD_CACHES))
def test_bad_site_cache_is_detected_resolved_again_and_rewritten(live, tmp_path, caplog,
                                                                 damage, reason) -> None:
    cache_dir = tmp_path / "cache"
    fresh = _resolve(live, cache_dir)
    assert [s.function for s in fresh.sites] == ["f1", "f2"] and len(fresh.audit) == 3
    assert fresh.sites[0].arg_regs[0] == "rdi"  # f1's skb, cached with the site
    path = cache_dir / f"vmlinux-{BUILD_ID}.json"
    written = path.read_text()
    assert '"offset": 8' in written  # f1's site, which the edits above rely on
    if isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        path.write_text(damage(written))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="xfrmtrace")
    again = _resolve(live, cache_dir)
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"site cache {path} is unusable (")
    assert reason.lower() in warning.lower() and warning.endswith("): resolving again")
    assert again == fresh
    assert any(m.startswith("vmlinux: 2 sites resolved") for m in caplog.messages)
    # Rewritten: the same valid file as the first time, used as it is from now on.
    assert json.loads(path.read_text()) == json.loads(written)
    caplog.clear()
    assert _resolve(live, cache_dir) == fresh
    assert _warnings(caplog) == []
    assert any(m.startswith("vmlinux: 2 sites from cache") for m in caplog.messages)


def test_cache_of_another_build_is_left_alone(live, tmp_path, caplog) -> None:
    cache_dir = tmp_path / "cache"
    fresh = _resolve(live, cache_dir)
    ours = cache_dir / f"vmlinux-{BUILD_ID}.json"
    other = cache_dir / "vmlinux-0badbeef.json"
    ours.rename(other)
    other.write_text(other.read_text().replace('"offset": 8', '"offset": 3', 1))
    foreign = other.read_text()
    caplog.clear()
    assert _resolve(live, cache_dir) == fresh
    assert _warnings(caplog) == []  # not ours: never read
    assert other.read_text() == foreign and json.loads(ours.read_text())["format"] == FORMAT


def _immutable(path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["a regular file", "an immutable directory"])
def test_unwritable_cache_directory_costs_one_warning(live, tmp_path, caplog, how) -> None:
    cache_dir = tmp_path / "cache"
    if how == "a regular file":
        cache_dir.write_text("not a directory")
    else:
        cache_dir.mkdir()
        if not _immutable(cache_dir):
            pytest.skip("chattr +i not possible here (needs root and ext2/3/4, xfs, btrfs)")
    try:
        for _run in range(2):  # the next run has no cache either, and says so again
            caplog.clear()
            result = _resolve(live, cache_dir)
            assert [s.function for s in result.sites] == ["f1", "f2"]
            (warning,) = _warnings(caplog)
            assert warning.startswith(f"cannot write site cache {cache_dir}/vmlinux-")
    finally:
        if how != "a regular file":
            subprocess.run(["chattr", "-i", cache_dir], check=True)


def test_a_warm_start_loads_no_disassembler() -> None:
    """Tracing with every object in the site cache needs no capstone (13 MiB, and seconds of
    imports under emulation): nothing the trace command imports loads it up front."""
    modules = ("xfrmtrace.cli", "xfrmtrace.session", "xfrmtrace.resolve.discovery",
               "xfrmtrace.resolve.sitecache", "xfrmtrace.trace.modulesites",
               "xfrmtrace.trace.tracer")
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'capstone'"
            " or m == 'xfrmtrace.resolve.sites'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_cached_site_under_another_tracers_kprobe_is_still_good() -> None:
    """A second xfrmtrace (or pwru, bpftrace) attached first leaves int3, or once optimized a
    jmp rel32, over the site's first bytes: the cache is still right, the exact check is
    not (it is what waiting for our own probes to go away needs)."""
    from xfrmtrace.resolve.model import Site
    from xfrmtrace.resolve.sitecache import decodes_as_resolved, resolved_or_probed

    code = bytes.fromhex("65488104c5e8010000" "01000000")  # add qword gs:[rax*8+0x1e8], 1
    site = Site(object="vmlinux", function="f", offset=8, address=0x1000, counter="C",
                counter_index=1, mib_reg="rax", code=code.hex())

    def text(live: bytes):
        return lambda address, size: live[:size] if address == 0x1000 else b""

    under_int3 = b"\xcc" + code[1:]
    under_jmp = b"\xe9\x10\x20\x30\x40" + code[5:]
    for live, probed_ok, exact_ok in [(code, True, True), (under_int3, True, False),
                                      (under_jmp, True, False),
                                      (b"\xe9\x10\x20\x30\x40" + b"\0" * (len(code) - 5),
                                       False, False),  # a jump, but the rest differs
                                      (b"\x90" + code[1:], False, False),
                                      (code[:-1], False, False)]:  # short read
        assert resolved_or_probed(site, text(live)) is probed_ok, live.hex()
        assert decodes_as_resolved(site, text(live)) is exact_ok, live.hex()
    short = Site(object="vmlinux", function="f", offset=8, address=0x1000, counter="C",
                 counter_index=0, mib_reg="rax", code="6548ff00")  # inc qword gs:[rax]
    assert resolved_or_probed(short, text(b"\xe9\x01\x02\x03"))  # the jump covers it whole
