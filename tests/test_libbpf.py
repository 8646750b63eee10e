"""Tests of the ctypes libbpf binding against the real libbpf.so.1 and the running kernel.

The BPF object (tests/bpf/selftest.bpf.c) hooks the raw tracepoint sys_enter, which loads
and attaches on the development host; kprobes are exercised in the VM lab, here only their
clean failure.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import random
import select
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from tests.bpf import selftest
from tests.support.require import not_applicable
from xfrmtrace.bpf import ffi
from xfrmtrace.bpf.objects import BpfObject, KprobeOpts, RingBuffer, kprobe_pmu_available
from xfrmtrace.errors import BtfLookupError, LibbpfError, VerifierError

SelftestCfg = selftest.SelftestCfg
SelftestEvent = selftest.SelftestEvent

NR_GETPPID = 110  # x86_64
NO_SUCH_TGID = 0x7FFFFFF0  # above any pid_max: the filter matches nothing
ZERO_KEY = b"\0" * 4

needs_bpf = pytest.mark.skipif(selftest.why_not_loadable() is not None,
                               reason=str(selftest.why_not_loadable()))


def _libbpf_missing() -> Optional[str]:
    try:
        ffi.api()
    except LibbpfError as exc:
        return str(exc)
    return None


needs_libbpf = pytest.mark.skipif(_libbpf_missing() is not None, reason=str(_libbpf_missing()))


@pytest.fixture(scope="session")
def selftest_obj_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = selftest.why_not_buildable()
    if reason:
        pytest.skip(reason)
    return selftest.build(tmp_path_factory.mktemp("bpf"))  # type: ignore[no-any-return]


def _open(path: Path, tgid: int = 0, tag: int = 0) -> BpfObject:
    obj = BpfObject.open_file(path)
    obj.set_rodata("cfg", bytes(SelftestCfg(tag=tag, tgid=tgid)))
    return obj


@pytest.fixture
def loaded(selftest_obj_path: Path) -> Iterator[BpfObject]:
    """The selftest object, loaded, filtering on this process."""
    obj = _open(selftest_obj_path, tgid=os.getpid(), tag=random.getrandbits(64))
    obj.load()
    yield obj
    obj.close()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _percpu_sum(obj: BpfObject) -> int:
    values = obj.map("syscall_counts").lookup_percpu(ZERO_KEY)
    assert values is not None
    return sum(int.from_bytes(v, "little") for v in values)


def _record_syscalls(obj: BpfObject, count: int) -> list[Any]:
    """Attach on_sys_enter, make ``count`` getppid() calls, detach, return all events."""
    events: list[Any] = []
    ring = RingBuffer(obj.map("events"), lambda raw: events.append(raw))
    link = obj.program("on_sys_enter").attach_raw_tracepoint("sys_enter")
    for _ in range(count):
        os.getppid()
    link.destroy()
    ring.consume()
    ring.close()
    for raw in events:
        assert len(raw) == ctypes.sizeof(SelftestEvent)
    return [SelftestEvent.from_buffer_copy(raw) for raw in events]


# --- library loading --------------------------------------------------------------------------

def test_import_needs_no_libbpf_and_missing_library_is_one_actionable_line() -> None:
    code = textwrap.dedent("""
        import xfrmtrace.bpf.ffi as lb, xfrmtrace.bpf.objects, xfrmtrace.bpf.btf
        assert lb._api is None, "importing must not load libbpf"
        try:
            lb.api()
        except lb.LibbpfError as exc:
            print(exc)
        else:
            raise SystemExit("api() should have failed")
        try:
            xfrmtrace.bpf.btf.Btf.vmlinux()
        except lb.LibbpfError:
            print("btf: LibbpfError")
    """)
    env = dict(os.environ, XFRMTRACE_LIBBPF="/nonexistent/libbpf.so.1",
               PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "/nonexistent/libbpf.so.1 not found: install libbpf1 (Debian/Ubuntu) or libbpf (Fedora)",
        "btf: LibbpfError",
    ]


def test_too_old_library_reports_found_version() -> None:
    with pytest.raises(LibbpfError) as info:
        ffi._check_version("libbpf.so.1", 0, 8)
    assert "libbpf 0.8" in str(info.value) and ">= 1.0" in str(info.value)
    ffi._check_version("libbpf.so.1", 1, 0)


@needs_libbpf
def test_prototype_helper_refuses_unknown_symbols_and_sets_argtypes() -> None:
    lib = ctypes.CDLL(ffi.LIBBPF_SONAME)
    with pytest.raises(LibbpfError, match="bpf_objekt__open_file"):
        ffi._fn(lib, "bpf_objekt__open_file", ctypes.c_void_p, ctypes.c_char_p)
    func = ffi._fn(lib, "bpf_map_delete_elem", ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    assert func.argtypes == [ctypes.c_int, ctypes.c_void_p]
    for name, _restype, argtypes in ffi._LIBBPF_PROTOTYPES:
        assert getattr(ffi.api(), name).argtypes == list(argtypes), name


@needs_libbpf
def test_version_matches_installed_headers() -> None:
    header = Path("/usr/include/bpf/libbpf_version.h")
    if not header.exists():
        pytest.skip(f"{header} missing (Debian package libbpf-dev)")
    text = header.read_text()
    major = int(text.split("LIBBPF_MAJOR_VERSION")[1].split()[0])
    minor = int(text.split("LIBBPF_MINOR_VERSION")[1].split()[0])
    assert ffi.libbpf_version() == (major, minor)
    assert ffi.libbpf_version() >= (1, 0)


@needs_libbpf
def test_kprobe_opts_mirror_matches_libbpf_header(tmp_path: Path) -> None:
    clang = shutil.which("clang")
    if clang is None or not Path("/usr/include/bpf/libbpf.h").exists():
        pytest.skip("needs clang and libbpf-dev headers")
    names = [field[0] for field in KprobeOpts._fields_]
    asserts = [f"_Static_assert(offsetof(struct bpf_kprobe_opts, {name}) == "
               f"{getattr(KprobeOpts, name).offset}, \"{name}\");"
               for name in names]
    size = ctypes.sizeof(KprobeOpts)
    source = "\n".join([
        "#include <stddef.h>", "#include <bpf/libbpf.h>", *asserts,
        # 1.1 has exactly our layout; later versions may only append.
        "#if LIBBPF_MAJOR_VERSION == 1 && LIBBPF_MINOR_VERSION < 2",
        f"_Static_assert(sizeof(struct bpf_kprobe_opts) == {size}, \"size\");",
        "#else",
        f"_Static_assert(sizeof(struct bpf_kprobe_opts) >= {size}, \"size\");",
        "#endif", ""])
    (tmp_path / "opts.c").write_text(source)
    result = subprocess.run([clang, "-fsyntax-only", str(tmp_path / "opts.c")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- errors and logging -----------------------------------------------------------------------

@needs_libbpf
def test_open_missing_file_is_oserror_naming_the_function() -> None:
    with pytest.raises(FileNotFoundError) as info:
        BpfObject.open_file("/nonexistent/x.bpf.o")
    assert info.value.errno == errno.ENOENT
    assert "bpf_object__open_file(/nonexistent/x.bpf.o)" in str(info.value)


@needs_libbpf
def test_libbpf_error_codes_become_libbpf_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.o"
    garbage.write_bytes(b"not an ELF file\n")
    with pytest.raises(LibbpfError) as info:
        BpfObject.open_file(garbage)
    assert info.value.errno >= 4000  # LIBBPF_ERRNO__FORMAT
    assert "format" in str(info.value).lower() and "\n" not in str(info.value)


@needs_libbpf
def test_print_callback_formats_varargs_into_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="xfrmtrace.libbpf")
    with pytest.raises(OSError):
        BpfObject.open_file("/nonexistent/formatted-path.bpf.o")
    records = [r for r in caplog.records if r.name == "xfrmtrace.libbpf"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    # The path only appears if the %s of libbpf's format string was expanded.
    assert any("/nonexistent/formatted-path.bpf.o" in w for w in warnings), warnings
    assert all("%s" not in r.getMessage() and not r.getMessage().endswith("\n")
               for r in records)


# --- objects, maps, ring buffers ----------------------------------------------------------------

@needs_bpf
def test_rodata_filter_on_own_pid_delivers_exact_events(selftest_obj_path: Path) -> None:
    tag = random.getrandbits(64)
    with _open(selftest_obj_path, tgid=os.getpid(), tag=tag) as obj:
        obj.load()
        events = _record_syscalls(obj, 25)
        counted = _percpu_sum(obj)
    assert events, "no event for our own syscalls"
    assert {e.tag for e in events} == {tag}
    assert {e.tgid for e in events} == {os.getpid()}
    assert {e.pid for e in events} == {threading.get_native_id()}
    assert sum(e.syscall_nr == NR_GETPPID for e in events) == 25
    # Counter and events come from the same invocations: equal once all are consumed.
    assert counted == len(events)


@needs_bpf
def test_rodata_filter_on_other_tgid_silences_program(selftest_obj_path: Path) -> None:
    with _open(selftest_obj_path, tgid=NO_SUCH_TGID) as obj:
        obj.load()
        assert _record_syscalls(obj, 25) == []
        assert _percpu_sum(obj) == 0


@needs_bpf
def test_set_rodata_checks_name_size_and_timing(selftest_obj_path: Path) -> None:
    with BpfObject.open_file(selftest_obj_path) as obj:
        with pytest.raises(ValueError, match="16 bytes"):
            obj.set_rodata("cfg", b"\0" * 8)
        with pytest.raises(BtfLookupError, match="no_such_var"):
            obj.set_rodata("no_such_var", b"\0")
        obj.set_rodata("cfg", bytes(SelftestCfg(tgid=NO_SUCH_TGID)))
        obj.load()
        with pytest.raises(LibbpfError, match="after load"):
            obj.set_rodata("cfg", bytes(SelftestCfg()))
        rodata = next(m for m in obj.maps() if m.name.endswith(".rodata"))
        value = rodata.lookup(ZERO_KEY)
        assert value is not None
        assert SelftestCfg.from_buffer_copy(value).tgid == NO_SUCH_TGID


@needs_bpf
def test_map_properties_and_max_entries(selftest_obj_path: Path) -> None:
    with BpfObject.open_file(selftest_obj_path) as obj:
        scratch = obj.map("scratch")
        assert scratch.fd == -1
        scratch.set_max_entries(32)
        with pytest.raises(LibbpfError, match="not created"):
            scratch.lookup(ZERO_KEY)
        obj.load()
        assert (scratch.key_size, scratch.value_size, scratch.max_entries) == (4, 8, 32)
        assert scratch.fd >= 0 and not scratch.percpu and obj.map("syscall_counts").percpu
        with pytest.raises(OSError) as info:
            scratch.set_max_entries(64)
        assert info.value.errno == errno.EBUSY
        with pytest.raises(LibbpfError, match="no map named 'nope'"):
            obj.map("nope")
        with pytest.raises(LibbpfError, match="no program named 'nope'"):
            obj.program("nope")


@needs_bpf
def test_map_update_lookup_delete_keys(loaded: BpfObject) -> None:
    scratch = loaded.map("scratch")
    keys = [i.to_bytes(4, "little") for i in (3, 1, 7)]
    for i, key in enumerate(keys):
        scratch.update(key, (100 + i).to_bytes(8, "little"))
    assert sorted(scratch.keys()) == sorted(keys)
    assert scratch.lookup(keys[1]) == (101).to_bytes(8, "little")
    with pytest.raises(FileExistsError):
        scratch.update(keys[0], bytes(8), flags=1)  # BPF_NOEXIST
    assert scratch.delete(keys[0]) is True
    assert scratch.delete(keys[0]) is False
    assert scratch.lookup(keys[0]) is None
    assert sorted(scratch.keys()) == sorted(keys[1:])
    with pytest.raises(ValueError, match="key is 2 bytes"):
        scratch.lookup(b"\0\0")
    with pytest.raises(ValueError, match="value is 4 bytes"):
        scratch.update(keys[1], b"\0" * 4)


@needs_bpf
def test_percpu_map_values_per_cpu(loaded: BpfObject) -> None:
    counts = loaded.map("syscall_counts")
    ncpus = ffi.num_possible_cpus()
    assert ncpus >= 1
    with pytest.raises(ValueError, match="per-CPU"):
        counts.lookup(ZERO_KEY)
    values = b"".join((10 * (cpu + 1)).to_bytes(8, "little") for cpu in range(ncpus))
    counts.update(ZERO_KEY, values)
    slots = counts.lookup_percpu(ZERO_KEY)
    assert slots is not None and len(slots) == ncpus
    assert [int.from_bytes(s, "little") for s in slots] == [10 * (c + 1) for c in range(ncpus)]
    assert _percpu_sum(loaded) == 10 * ncpus * (ncpus + 1) // 2


@needs_bpf
def test_ring_buffer_callback_stays_referenced(loaded: BpfObject) -> None:
    seen: list[bytes] = []
    ring = RingBuffer(loaded.map("events"), lambda raw: seen.append(raw))  # no other reference
    gc.collect()
    link = loaded.program("on_sys_enter").attach_raw_tracepoint("sys_enter")
    os.getppid()
    link.destroy()
    assert ring.poll(1000) > 0
    assert seen
    ring.close()


@needs_bpf
def test_ring_buffer_fileno_is_selectable(loaded: BpfObject) -> None:
    ring = RingBuffer(loaded.map("events"), lambda raw: None)
    link = loaded.program("on_sys_enter").attach_raw_tracepoint("sys_enter")
    os.getppid()
    link.destroy()
    readable, _, _ = select.select([ring], [], [], 1.0)
    assert readable == [ring]
    assert ring.consume() > 0
    ring.close()


@needs_bpf
def test_callback_exception_is_raised_from_poll(loaded: BpfObject) -> None:
    calls: list[bytes] = []

    def explode_once(raw: bytes) -> None:
        calls.append(raw)
        if len(calls) == 1:
            raise KeyError("decoder bug")

    ring = RingBuffer(loaded.map("events"), explode_once)
    link = loaded.program("on_sys_enter").attach_raw_tracepoint("sys_enter")
    for _ in range(5):
        os.getppid()
    link.destroy()
    with pytest.raises(KeyError, match="decoder bug"):
        ring.poll(1000)
    assert len(calls) == 1, "consumption must stop at the failing record"
    assert ring.consume() >= 4  # the rest is still there and the ring buffer still works
    ring.close()


@needs_bpf
def test_callback_negative_return_stops_poll(loaded: BpfObject) -> None:
    calls: list[bytes] = []

    def stop(raw: bytes) -> int:
        calls.append(raw)
        return -7

    ring = RingBuffer(loaded.map("events"), stop)
    link = loaded.program("on_sys_enter").attach_raw_tracepoint("sys_enter")
    for _ in range(3):
        os.getppid()
    link.destroy()
    assert ring.consume() == -7
    assert len(calls) == 1
    ring.close()


@needs_bpf
def test_session_drains_a_full_ring_in_bounded_batches_losing_nothing(loaded: BpfObject) -> None:
    """The tracing loop's contract with libbpf (session.bounded_callback): a drain stops once a
    batch is full, the record that filled it counts as consumed, and draining again while
    told to stop delivers every record exactly once, in order."""
    from xfrmtrace.session import _STOP_DRAIN, bounded_callback

    pending: list[Any] = []
    ring = RingBuffer(loaded.map("events"), bounded_callback(SelftestEvent.from_buffer_copy,
                                                             pending, batch=16))
    link = loaded.program("on_sys_enter").attach_raw_tracepoint("sys_enter")
    for _ in range(100):
        os.getppid()
    link.destroy()
    batches, delivered = [], []
    while ring.consume() == _STOP_DRAIN:
        batches.append(len(pending))
        delivered += pending
        pending.clear()
    batches.append(len(pending))
    delivered += pending
    ring.close()
    assert len(batches) > 100 // 16 and all(size == 16 for size in batches[:-1])
    assert 0 < batches[-1] < 16
    # Every getppid() call arrives once: none lost at a batch boundary, none repeated.
    assert sum(1 for e in delivered if e.syscall_nr == NR_GETPPID) == 100
    assert all(e.tag == delivered[0].tag for e in delivered)


@needs_bpf
def test_ring_buffer_refuses_other_map_types(loaded: BpfObject) -> None:
    with pytest.raises(ValueError, match="not a BPF ring buffer"):
        RingBuffer(loaded.map("scratch"), lambda raw: None)


# --- verifier, attach failures, cleanup --------------------------------------------------------

@needs_bpf
def test_verifier_rejection_carries_the_log(selftest_obj_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="xfrmtrace.libbpf")
    with BpfObject.open_file(selftest_obj_path) as obj:
        obj.program("rejected_by_verifier").set_autoload(True)
        with pytest.raises(VerifierError) as info:
            obj.load()
    message = str(info.value)
    assert "\n" not in message
    assert "'rejected_by_verifier'" in message and "invalid mem access" in message
    assert info.value.errno == errno.EACCES
    assert "invalid mem access" in info.value.log and "processed" in info.value.log
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("BEGIN PROG LOAD LOG" in r.getMessage() for r in loud)


@needs_bpf
def test_load_twice_is_refused(loaded: BpfObject) -> None:
    with pytest.raises(LibbpfError, match="once"):
        loaded.load()


@needs_bpf
def test_attach_before_load_is_refused(selftest_obj_path: Path) -> None:
    with BpfObject.open_file(selftest_obj_path) as obj:
        with pytest.raises(LibbpfError, match="not loaded"):
            obj.program("on_sys_enter").attach_raw_tracepoint("sys_enter")


def _kernel_has_kprobes() -> bool:
    return kprobe_pmu_available() or any(
        Path(d, "kprobe_events").exists()
        for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"))


@needs_bpf
def test_kprobe_attach_fails_cleanly_without_kprobes(selftest_obj_path: Path) -> None:
    if _kernel_has_kprobes():
        not_applicable("this kernel has kprobes; attaching is covered by the VM lab tests")
    with BpfObject.open_file(selftest_obj_path) as obj:
        obj.program("on_xfrm_input").set_autoload(True)
        obj.load()
        program = obj.program("on_xfrm_input")
        fds_before = _open_fds()
        with pytest.raises(OSError) as info:
            program.attach_kprobe("xfrm_input", 0x10)
        assert "bpf_program__attach_kprobe_opts(prog 'on_xfrm_input', xfrm_input+0x10)" in str(
            info.value)
        with pytest.raises(OSError) as raw:
            program.attach_kprobe(None, 0xFFFFFFFF81000000)
        assert raw.value.errno == errno.EOPNOTSUPP and "kprobe PMU" in str(raw.value)
        assert _open_fds() == fds_before
        assert obj._links == []


@needs_bpf
def test_attach_kprobe_needs_a_target(loaded: BpfObject) -> None:
    with pytest.raises(ValueError):
        loaded.program("on_sys_enter").attach_kprobe(None, 0)


@needs_bpf
def test_close_twice_and_use_after_close(selftest_obj_path: Path) -> None:
    obj = _open(selftest_obj_path, tgid=os.getpid())
    obj.load()
    ring = RingBuffer(obj.map("events"), lambda raw: None)
    link = obj.program("on_sys_enter").attach_raw_tracepoint("sys_enter")
    scratch = obj.map("scratch")
    obj.close()
    assert link.destroyed, "closing the object destroys its links"
    obj.close()
    link.destroy()
    ring.close()
    with pytest.raises(LibbpfError, match="closed"):
        scratch.lookup(ZERO_KEY)
    with pytest.raises(LibbpfError, match="closed"):
        ring.poll(0)
    with pytest.raises(LibbpfError, match="closed"):
        obj.program("on_sys_enter")


@needs_bpf
def test_garbage_collection_releases_everything_quietly(selftest_obj_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    fds_before = _open_fds()
    obj = _open(selftest_obj_path, tgid=os.getpid())
    obj.load()
    RingBuffer(obj.map("events"), lambda raw: None)
    obj.program("on_sys_enter").attach_raw_tracepoint("sys_enter")
    assert _open_fds() != fds_before
    del obj
    gc.collect()
    assert unraisable == []
    assert _open_fds() == fds_before
