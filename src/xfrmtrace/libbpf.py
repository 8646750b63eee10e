"""Thin ctypes binding to the system libbpf (``libbpf.so.1``, libbpf >= 1.0).

The library is loaded on first use, not at import, so that ``xfrmtrace --help`` and the pure
decoders work on machines without libbpf.  Every C prototype is declared in one table through
one helper (:func:`_fn`), so a misspelt name fails loudly instead of silently running without
``argtypes``.

Error conventions (libbpf 1.x returns ``-errno`` from int functions and ``NULL`` with ``errno``
set from pointer functions):

* a failed call raises :class:`OSError` whose ``errno`` is the kernel's and whose message names
  the libbpf function and its subject, e.g.
  ``[Errno 2] bpf_program__attach_kprobe_opts(prog 'p', xfrm_input+0x10): No such file ...``;
* libbpf's own error codes (4000 and up) raise :class:`LibbpfError` with ``errno`` set;
* a program rejected by the verifier raises :class:`VerifierError` carrying the verifier log;
* a missing or too old library raises :class:`LibbpfError` with an install hint;
* misuse of this API (wrong key size, object already closed) raises ``ValueError`` or
  :class:`LibbpfError`.

libbpf's diagnostics go to the ``logging`` logger ``xfrmtrace.libbpf``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import threading
from contextlib import contextmanager
from types import SimpleNamespace, TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, TypeVar, Union

from xfrmtrace.errors import LibbpfError, VerifierError

if TYPE_CHECKING:
    from xfrmtrace.btf import Btf

__all__ = [
    "BpfObject",
    "KprobeOpts",
    "Link",
    "Map",
    "Program",
    "RingBuffer",
    "SampleCallback",
    "api",
    "kprobe_pmu_available",
    "libbpf_version",
    "num_possible_cpus",
]

log = logging.getLogger("xfrmtrace.libbpf")

LIBBPF_SONAME = "libbpf.so.1"
MIN_VERSION = (1, 0)
#: Overrides the library path (e.g. to test against a newer libbpf build).
LIBBPF_PATH_ENV = "XFRMTRACE_LIBBPF"
_INSTALL_HINT = "install libbpf1 (Debian/Ubuntu) or libbpf (Fedora)"

# libbpf-specific error codes live above the errno range (enum libbpf_errno in libbpf.h).
_LIBBPF_ERRNO_START = 4000
_LIBBPF_ERRNO_END = 4100

# The kprobe PMU lets perf_event_open() take a raw address (attr.config1 = 0,
# attr.config2 = address); without it libbpf falls back to tracefs, which needs a name.
_KPROBE_PMU_TYPE = "/sys/bus/event_source/devices/kprobe/type"

# enum bpf_map_type values of the per-CPU maps (uapi/linux/bpf.h).
_PERCPU_MAP_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH,
# PERCPU_CGROUP_STORAGE
_MAP_TYPE_RINGBUF = 27

# enum libbpf_print_level -> logging level.
_PRINT_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
_LIBBPF_WARN = 0

# Fallback buffer for libc without vasprintf (one formatting pass only: a va_list cannot be
# reused, so there is no second pass with a bigger buffer).
_VSNPRINTF_BUF = 64 * 1024


class KprobeOpts(ctypes.Structure):
    """``struct bpf_kprobe_opts`` as of libbpf 1.1 (later versions append fields; ``sz`` tells
    libbpf which layout we mean)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("offset", ctypes.c_size_t),
        ("retprobe", ctypes.c_bool),
    ]


# int (*libbpf_print_fn_t)(enum libbpf_print_level, const char *, va_list).  On x86-64 and
# arm64 a va_list argument arrives as a pointer, which vasprintf() takes back unchanged.
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_P = ctypes.c_void_p
_STR = ctypes.c_char_p
_INT = ctypes.c_int
_U32 = ctypes.c_uint32
_SIZE = ctypes.c_size_t

# (name, restype, argtypes): the only place C prototypes are written down.
_LIBBPF_PROTOTYPES: tuple[tuple[str, Any, tuple[Any, ...]], ...] = (
    ("libbpf_set_print", _P, (_PRINT_FN,)),
    ("libbpf_strerror", _INT, (_INT, ctypes.c_char_p, _SIZE)),
    ("libbpf_num_possible_cpus", _INT, ()),
    ("bpf_object__open_file", _P, (_STR, _P)),
    ("bpf_object__load", _INT, (_P,)),
    ("bpf_object__close", None, (_P,)),
    ("bpf_object__btf", _P, (_P,)),
    ("bpf_object__find_map_by_name", _P, (_P, _STR)),
    ("bpf_object__find_program_by_name", _P, (_P, _STR)),
    ("bpf_object__next_map", _P, (_P, _P)),
    ("bpf_object__next_program", _P, (_P, _P)),
    ("bpf_program__name", _STR, (_P,)),
    ("bpf_program__fd", _INT, (_P,)),
    ("bpf_program__autoload", ctypes.c_bool, (_P,)),
    ("bpf_program__set_autoload", _INT, (_P, ctypes.c_bool)),
    ("bpf_program__attach_kprobe_opts", _P, (_P, _STR, ctypes.POINTER(KprobeOpts))),
    ("bpf_program__attach_raw_tracepoint", _P, (_P, _STR)),
    ("bpf_link__destroy", _INT, (_P,)),
    ("bpf_map__name", _STR, (_P,)),
    ("bpf_map__fd", _INT, (_P,)),
    ("bpf_map__type", _INT, (_P,)),
    ("bpf_map__key_size", _U32, (_P,)),
    ("bpf_map__value_size", _U32, (_P,)),
    ("bpf_map__max_entries", _U32, (_P,)),
    ("bpf_map__set_max_entries", _INT, (_P, _U32)),
    ("bpf_map__initial_value", _P, (_P, ctypes.POINTER(_SIZE))),
    ("bpf_map__set_initial_value", _INT, (_P, _P, _SIZE)),
    ("bpf_map_lookup_elem", _INT, (_INT, _P, _P)),
    ("bpf_map_update_elem", _INT, (_INT, _P, _P, ctypes.c_uint64)),
    ("bpf_map_delete_elem", _INT, (_INT, _P)),
    ("bpf_map_get_next_key", _INT, (_INT, _P, _P)),
    ("ring_buffer__new", _P, (_INT, _SAMPLE_FN, _P, _P)),
    ("ring_buffer__free", None, (_P,)),
    ("ring_buffer__poll", _INT, (_P, _INT)),
    ("ring_buffer__consume", _INT, (_P,)),
    ("ring_buffer__epoll_fd", _INT, (_P,)),
    ("btf__free", None, (_P,)),
    ("btf__parse", _P, (_STR, _P)),
    ("btf__parse_split", _P, (_STR, _P)),
    ("btf__load_vmlinux_btf", _P, ()),
    ("btf__find_by_name_kind", ctypes.c_int32, (_P, _STR, _U32)),
    ("btf__type_cnt", _U32, (_P,)),
    ("btf__type_by_id", _P, (_P, _U32)),
    ("btf__name_by_offset", _STR, (_P, _U32)),
    ("btf__resolve_size", ctypes.c_int64, (_P, _U32)),
)

_LIBC_PROTOTYPES: tuple[tuple[str, Any, tuple[Any, ...]], ...] = (
    ("vasprintf", _INT, (ctypes.POINTER(ctypes.c_void_p), _P, _P)),
    ("vsnprintf", _INT, (ctypes.c_char_p, _SIZE, _P, _P)),
    ("free", None, (_P,)),
)


def _fn(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    """Return ``lib.name`` with its prototype set; a missing symbol is a LibbpfError."""
    try:
        func = getattr(lib, name)
    except AttributeError:
        raise LibbpfError(
            f"{lib._name} has no {name}(): it is not libbpf >= 1.0; {_INSTALL_HINT}"
        ) from None
    func.restype = restype
    func.argtypes = list(argtypes)
    return func


def _bind(lib: ctypes.CDLL, prototypes: tuple[tuple[str, Any, tuple[Any, ...]], ...],
          into: SimpleNamespace, optional: bool = False) -> None:
    for name, restype, argtypes in prototypes:
        try:
            setattr(into, name, _fn(lib, name, restype, *argtypes))
        except LibbpfError:
            if not optional:
                raise
            setattr(into, name, None)


def _dlopen(path: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(path, use_errno=True)
    except OSError as exc:
        if "No such file" in str(exc):
            raise LibbpfError(f"{path} not found: {_INSTALL_HINT}") from exc
        raise LibbpfError(f"cannot load {path} ({exc}): {_INSTALL_HINT}") from exc


def _check_version(path: str, major: int, minor: int) -> None:
    """Refuse libbpf older than MIN_VERSION with the version that was found."""
    if (major, minor) < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise LibbpfError(
            f"{path} is libbpf {major}.{minor}, xfrmtrace needs libbpf >= {need}: {_INSTALL_HINT}"
        )


def _open_library(path: str) -> SimpleNamespace:
    """Load libbpf from ``path``, check its version, declare prototypes, hook its logging."""
    lib = _dlopen(path)
    funcs = SimpleNamespace()
    _bind(lib, (("libbpf_major_version", _U32, ()), ("libbpf_minor_version", _U32, ())), funcs)
    funcs.version = (int(funcs.libbpf_major_version()), int(funcs.libbpf_minor_version()))
    _check_version(path, *funcs.version)
    _bind(lib, _LIBBPF_PROTOTYPES, funcs)
    libc = ctypes.CDLL(None, use_errno=True)
    _bind(libc, _LIBC_PROTOTYPES, funcs, optional=True)
    funcs.libbpf_set_print(_PRINT_CALLBACK)
    return funcs


_api_lock = threading.Lock()
_api: Optional[SimpleNamespace] = None


def api() -> Any:
    """The prototyped libbpf functions as attributes (loads libbpf on first use).

    Raises LibbpfError when libbpf is missing or older than 1.0.
    """
    global _api
    if _api is None:
        with _api_lock:
            if _api is None:
                _api = _open_library(os.environ.get(LIBBPF_PATH_ENV) or LIBBPF_SONAME)
    return _api


def libbpf_version() -> tuple[int, int]:
    """(major, minor) of the loaded libbpf."""
    version: tuple[int, int] = api().version
    return version


def num_possible_cpus() -> int:
    """Number of possible CPUs, the number of slots in a per-CPU map value."""
    return _check(api().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus", "")


def kprobe_pmu_available() -> bool:
    """True if the kernel has the perf kprobe PMU (needed to attach at a raw address)."""
    return os.path.exists(_KPROBE_PMU_TYPE)


# --- errors ---------------------------------------------------------------------------------

def _strerror(err: int) -> str:
    if _LIBBPF_ERRNO_START <= err < _LIBBPF_ERRNO_END and _api is not None:
        buf = ctypes.create_string_buffer(128)
        _api.libbpf_strerror(err, buf, len(buf))
        return buf.value.decode("utf-8", "replace")
    return os.strerror(err)


def _call_error(err: int, function: str, subject: str) -> Exception:
    """The exception for libbpf function ``function`` failing with errno ``err``."""
    err = abs(err) or errno.EINVAL
    message = f"{function}({subject}): {_strerror(err)}"
    if err >= _LIBBPF_ERRNO_START:
        return LibbpfError(message, errno=err)
    return OSError(err, message)


def _check(ret: int, function: str, subject: str) -> int:
    """Pass a non-negative int result through; turn ``-errno`` into an exception."""
    if ret < 0:
        raise _call_error(ret, function, subject)
    return ret


def _check_ptr(ptr: Optional[int], function: str, subject: str) -> int:
    """Pass a non-NULL pointer result through; turn NULL + errno into an exception."""
    if not ptr:
        raise _call_error(ctypes.get_errno(), function, subject)
    return ptr


# --- libbpf's print callback -----------------------------------------------------------------

_capture = threading.local()


def _vformat(fmt: int, args: int) -> str:
    """printf-format libbpf's message; ``args`` is a va_list, consumed by this call."""
    funcs = _api
    if funcs is None:
        return ""
    if funcs.vasprintf is not None:
        out = ctypes.c_void_p()
        n = funcs.vasprintf(ctypes.byref(out), fmt, args)
        if n < 0 or not out.value:
            return ""
        try:
            return ctypes.string_at(out.value, n).decode("utf-8", "replace")
        finally:
            funcs.free(out)
    buf = ctypes.create_string_buffer(_VSNPRINTF_BUF)
    funcs.vsnprintf(buf, len(buf), fmt, args)
    return buf.value.decode("utf-8", "replace")


def _on_libbpf_print(level: int, fmt: int, args: int) -> int:
    """Route one libbpf message to logging (and to a load() in progress on this thread)."""
    try:
        captured: Optional[list[str]] = getattr(_capture, "warnings", None)
        py_level = _PRINT_LEVELS.get(level, logging.DEBUG)
        wanted = captured is not None and level == _LIBBPF_WARN
        if not wanted and not log.isEnabledFor(py_level):
            return 0  # formatting every debug line would slow down object loading
        text = _vformat(fmt, args)
        if wanted and captured is not None:
            captured.append(text)
        if _PROG_LOG_RE.search(text):
            py_level = logging.DEBUG  # the VerifierError carries the log already
        log.log(py_level, "%s", text.rstrip("\n"))
    except Exception:  # noqa: BLE001 - an exception must not unwind through C frames
        return 0
    return 0


# Kept alive for the life of the process: libbpf keeps the pointer.
_PRINT_CALLBACK = _PRINT_FN(_on_libbpf_print)


@contextmanager
def _capturing_warnings() -> Iterator[list[str]]:
    """Collect libbpf warnings printed on this thread while the block runs."""
    previous = getattr(_capture, "warnings", None)
    warnings: list[str] = []
    _capture.warnings = warnings
    try:
        yield warnings
    finally:
        _capture.warnings = previous


_PROG_LOG_RE = re.compile(
    r"prog '(?P<prog>[^']*)': -- BEGIN PROG LOAD LOG --\n(?P<log>.*?)-- END PROG LOAD LOG --",
    re.DOTALL,
)
_PROG_FAILED_RE = re.compile(r"prog '(?P<prog>[^']*)': BPF program load failed")
# Statistics the verifier prints after the reason.
_LOG_TRAILER_RE = re.compile(r"^(processed \d+ insns|verification time|stack depth|-- )")


def _verifier_reason(verifier_log: str) -> str:
    """The line of a verifier log that says why the program was refused."""
    lines = [line.strip() for line in verifier_log.splitlines() if line.strip()]
    for line in reversed(lines):
        if not _LOG_TRAILER_RE.match(line):
            return line[:200]
    return "no reason given"


def _load_error(err: int, path: str, warnings: list[str]) -> Exception:
    """The exception for bpf_object__load() failing, using what libbpf printed."""
    for text in warnings:
        match = _PROG_LOG_RE.search(text)
        if match and match.group("log").strip():
            verifier_log = match.group("log")
            return VerifierError(
                f"the BPF verifier rejected program '{match.group('prog')}' of {path}: "
                f"{_verifier_reason(verifier_log)}",
                errno=abs(err),
                log=verifier_log,
            )
    first = next((w.strip() for w in warnings if w.strip()), "")
    detail = f" ({first.splitlines()[0]})" if first else ""
    exc = _call_error(err, "bpf_object__load", path)
    if isinstance(exc, OSError):
        return OSError(exc.errno, f"{exc.strerror}{detail}")
    return LibbpfError(f"{exc}{detail}", errno=abs(err))


# --- objects ---------------------------------------------------------------------------------

def _decode(raw: Optional[bytes]) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


_C = TypeVar("_C", bound="Closable")
_PartT = TypeVar("_PartT", bound="_ObjectPart")


class Closable:
    """Context manager and finalizer for wrappers of libbpf handles: both call ``close()``,
    which subclasses make idempotent."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


class BpfObject(Closable):
    """An opened BPF ELF object (``struct bpf_object``); create with :meth:`open_file`.

    Maps and programs handed out stay valid until :meth:`close`, which first frees ring
    buffers and destroys links made from this object.
    """

    def __init__(self, handle: int, path: str) -> None:
        """Wrap a ``struct bpf_object *``; use :meth:`open_file` instead."""
        self._handle: Optional[int] = handle
        self.path = path
        self._load_attempted = False
        self._maps: dict[str, Map] = {}
        self._programs: dict[str, Program] = {}
        self._links: list[Link] = []
        self._ring_buffers: list[RingBuffer] = []
        self._btf: Optional[Btf] = None

    @classmethod
    def open_file(cls, path: Union[str, os.PathLike[str]]) -> BpfObject:
        """Open (parse, not load) the BPF object file at ``path``."""
        path = os.fspath(path)
        handle = api().bpf_object__open_file(path.encode(), None)
        return cls(_check_ptr(handle, "bpf_object__open_file", path), path)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._handle is None

    @property
    def loaded(self) -> bool:
        """True once :meth:`load` was attempted (libbpf allows a single attempt)."""
        return self._load_attempted

    def _require_open(self) -> int:
        if self._handle is None:
            raise LibbpfError(f"BPF object {self.path} is already closed")
        return self._handle

    def btf(self) -> Btf:
        """The object's own BTF (borrowed: valid until :meth:`close`)."""
        from xfrmtrace.btf import Btf  # btf imports this module

        if self._btf is None:
            handle = api().bpf_object__btf(self._require_open())
            self._btf = Btf.borrowed(_check_ptr(handle, "bpf_object__btf", self.path), self.path)
        return self._btf

    def set_rodata(self, name: str, data: bytes) -> None:
        """Write ``data`` into the ``const volatile`` global ``name`` before :meth:`load`.

        ``data`` must be exactly the variable's size, so a Python/C layout mismatch
        fails here instead of configuring the program with shifted fields.
        """
        handle = self._require_open()
        if self._load_attempted:
            raise LibbpfError(f"{self.path}: cannot set {name!r} after load()")
        section, offset, size = self.btf().find_var(name, section_prefix=".rodata")
        if len(data) != size:
            raise ValueError(f"{name!r} is {size} bytes, got {len(data)}")
        section_map = api().bpf_object__find_map_by_name(handle, section.encode())
        section_map = _check_ptr(section_map, "bpf_object__find_map_by_name", section)
        map_size = ctypes.c_size_t()
        current = api().bpf_map__initial_value(section_map, ctypes.byref(map_size))
        current = _check_ptr(current, "bpf_map__initial_value", section)
        image = bytearray(ctypes.string_at(current, map_size.value))
        image[offset:offset + size] = data
        buf = (ctypes.c_char * len(image)).from_buffer(image)
        ret = api().bpf_map__set_initial_value(section_map, buf, len(image))
        _check(ret, "bpf_map__set_initial_value", section)

    def map(self, name: str) -> Map:
        """The map called ``name`` (LibbpfError if the object has none)."""
        return self._part(Map, self._maps, name)

    def maps(self) -> list[Map]:
        """All maps of the object, in ELF order (including .rodata/.bss)."""
        return self._parts(Map, self._maps)

    def program(self, name: str) -> Program:
        """The program whose C function is called ``name`` (LibbpfError if none)."""
        return self._part(Program, self._programs, name)

    def programs(self) -> list[Program]:
        """All programs of the object."""
        return self._parts(Program, self._programs)

    def _part(self, cls: type[_PartT], cache: dict[str, _PartT], name: str) -> _PartT:
        """The map or program ``name``, wrapped once and cached."""
        handle = self._require_open()
        if name not in cache:
            ptr = getattr(api(), f"bpf_object__find_{cls._KIND}_by_name")(handle, name.encode())
            if not ptr:
                raise LibbpfError(f"BPF object {self.path} has no {cls._KIND} named {name!r}")
            cache[name] = cls(ptr, self)
        return cache[name]

    def _parts(self, cls: type[_PartT], cache: dict[str, _PartT]) -> list[_PartT]:
        """Every map or program, in the order libbpf iterates them."""
        handle = self._require_open()
        lib = api()
        next_part = getattr(lib, f"bpf_object__next_{cls._KIND}")
        name_of = getattr(lib, f"bpf_{cls._KIND}__name")
        found: list[_PartT] = []
        ptr = next_part(handle, None)
        while ptr:
            found.append(self._part(cls, cache, _decode(name_of(ptr))))
            ptr = next_part(handle, ptr)
        return found

    def load(self) -> None:
        """Create the maps and load the programs into the kernel.

        Raises VerifierError when the verifier refuses a program, OSError for other
        kernel refusals.  libbpf allows one attempt per opened object.
        """
        handle = self._require_open()
        if self._load_attempted:
            raise LibbpfError(f"{self.path}: load() can be attempted once; open the file again")
        self._load_attempted = True
        with _capturing_warnings() as warnings:
            ret = api().bpf_object__load(handle)
        if ret < 0:
            raise _load_error(ret, self.path, warnings)

    def _track_link(self, link: Link) -> Link:
        self._links.append(link)
        return link

    def _forget_link(self, link: Link) -> None:
        if link in self._links:
            self._links.remove(link)

    def _track_ring_buffer(self, ring_buffer: RingBuffer) -> None:
        self._ring_buffers.append(ring_buffer)

    def _forget_ring_buffer(self, ring_buffer: RingBuffer) -> None:
        if ring_buffer in self._ring_buffers:
            self._ring_buffers.remove(ring_buffer)

    def close(self) -> None:
        """Free ring buffers, destroy links, close the object; safe to call twice."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        for ring_buffer in list(self._ring_buffers):
            ring_buffer.close()
        for link in list(self._links):
            try:
                link.destroy()
            except OSError as exc:
                log.warning("destroying %s: %s", link.description, exc)
        if self._btf is not None:
            self._btf.close()  # its memory belongs to the object freed below
            self._btf = None
        api().bpf_object__close(handle)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("loaded" if self._load_attempted else "open")
        return f"<BpfObject {self.path} {state}>"


class _ObjectPart:
    """A program or map: a libbpf handle that is only valid while its object is open."""

    _KIND = ""  # "program" or "map": selects bpf_<kind>__name / bpf_<kind>__fd

    def __init__(self, handle: int, owner: BpfObject) -> None:
        self._handle = handle
        self._owner = owner
        self.name = _decode(getattr(api(), f"bpf_{self._KIND}__name")(handle))

    def _ptr(self) -> int:
        self._owner._require_open()
        return self._handle

    @property
    def fd(self) -> int:
        """The file descriptor (-1 before load)."""
        fd: int = getattr(api(), f"bpf_{self._KIND}__fd")(self._ptr())
        return fd if fd >= 0 else -1


class Program(_ObjectPart):
    """One BPF program of a :class:`BpfObject`; get it from :meth:`BpfObject.program`."""

    _KIND = "program"

    @property
    def autoload(self) -> bool:
        """Whether :meth:`BpfObject.load` loads this program."""
        return bool(api().bpf_program__autoload(self._ptr()))

    def set_autoload(self, enabled: bool) -> None:
        """Choose whether :meth:`BpfObject.load` loads this program (before load only)."""
        ret = api().bpf_program__set_autoload(self._ptr(), enabled)
        _check(ret, "bpf_program__set_autoload", f"prog '{self.name}'")

    def _require_loaded(self) -> int:
        ptr = self._ptr()
        if api().bpf_program__fd(ptr) < 0:
            raise LibbpfError(f"program '{self.name}' is not loaded: call BpfObject.load() first")
        return ptr

    def attach_kprobe(self, function: Optional[str], offset: int = 0, *,
                      retprobe: bool = False) -> Link:
        """Attach as a kprobe at ``function + offset``, or at the absolute address ``offset``
        when ``function`` is None.

        Raw addresses need the kernel's kprobe PMU: libbpf 1.1 passes them through
        ``perf_event_open`` (``config1 = 0``, ``config2 = address``), but its tracefs fallback
        would write ``(null)+0x...``, so that case is refused here with EOPNOTSUPP (later
        libbpf refuses it too).
        """
        if function is None and not offset:
            raise ValueError("attach_kprobe: give a function name or an absolute address")
        where = f"{function}+{offset:#x}" if function is not None else f"{offset:#x}"
        subject = f"prog '{self.name}', {where}"
        if function is None and not kprobe_pmu_available():
            raise OSError(
                errno.EOPNOTSUPP,
                f"bpf_program__attach_kprobe_opts({subject}): attaching at an address needs the"
                f" kernel's kprobe PMU ({_KPROBE_PMU_TYPE} is missing)",
            )
        opts = KprobeOpts(sz=ctypes.sizeof(KprobeOpts), offset=offset, retprobe=retprobe)
        name = function.encode() if function is not None else None
        handle = api().bpf_program__attach_kprobe_opts(self._require_loaded(), name,
                                                       ctypes.byref(opts))
        handle = _check_ptr(handle, "bpf_program__attach_kprobe_opts", subject)
        kind = "kretprobe" if retprobe else "kprobe"
        return self._owner._track_link(Link(handle, f"{kind} {where} ({self.name})", self._owner))

    def attach_raw_tracepoint(self, tracepoint: str) -> Link:
        """Attach to the raw tracepoint ``tracepoint`` (e.g. ``sys_enter``)."""
        handle = api().bpf_program__attach_raw_tracepoint(self._require_loaded(),
                                                          tracepoint.encode())
        subject = f"prog '{self.name}', {tracepoint}"
        handle = _check_ptr(handle, "bpf_program__attach_raw_tracepoint", subject)
        description = f"raw tracepoint {tracepoint} ({self.name})"
        return self._owner._track_link(Link(handle, description, self._owner))

    def __repr__(self) -> str:
        return f"<Program {self.name}>"


class Link:
    """An attachment of a program (``struct bpf_link``); detached by :meth:`destroy`."""

    def __init__(self, handle: int, description: str, owner: Optional[BpfObject] = None) -> None:
        """Wrap a ``struct bpf_link *``; made by the ``Program.attach_*`` methods."""
        self._handle: Optional[int] = handle
        self.description = description
        self._owner = owner

    @property
    def destroyed(self) -> bool:
        """True once :meth:`destroy` ran."""
        return self._handle is None

    def destroy(self) -> None:
        """Detach and free the link; safe to call twice."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        if self._owner is not None:
            self._owner._forget_link(self)
        _check(api().bpf_link__destroy(handle), "bpf_link__destroy", self.description)

    def __del__(self) -> None:
        try:
            self.destroy()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        return f"<Link {self.description}{' destroyed' if self.destroyed else ''}>"


class Map(_ObjectPart):
    """One map of a :class:`BpfObject`, keys and values as raw bytes; see :meth:`BpfObject.map`."""

    _KIND = "map"

    @property
    def type(self) -> int:
        """The ``enum bpf_map_type`` value."""
        return int(api().bpf_map__type(self._ptr()))

    @property
    def key_size(self) -> int:
        """Key size in bytes."""
        return int(api().bpf_map__key_size(self._ptr()))

    @property
    def value_size(self) -> int:
        """Value size in bytes (of one CPU's slot for per-CPU maps)."""
        return int(api().bpf_map__value_size(self._ptr()))

    @property
    def max_entries(self) -> int:
        """Capacity (bytes for ring buffers)."""
        return int(api().bpf_map__max_entries(self._ptr()))

    @property
    def percpu(self) -> bool:
        """True for per-CPU maps (values have one slot per possible CPU)."""
        return self.type in _PERCPU_MAP_TYPES

    def set_max_entries(self, max_entries: int) -> None:
        """Resize the map; only before :meth:`BpfObject.load`."""
        ret = api().bpf_map__set_max_entries(self._ptr(), max_entries)
        _check(ret, "bpf_map__set_max_entries", f"map '{self.name}'")

    def _loaded_fd(self) -> int:
        fd = self.fd
        if fd < 0:
            raise LibbpfError(f"map '{self.name}' is not created: call BpfObject.load() first")
        return fd

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise ValueError(f"map '{self.name}': key is {len(key)} bytes, "
                             f"expected {self.key_size}")
        return ctypes.create_string_buffer(bytes(key), len(key))

    def _full_value_size(self) -> int:
        if self.percpu:
            return (self.value_size + 7) // 8 * 8 * num_possible_cpus()
        return self.value_size

    def _lookup_raw(self, key: bytes, size: int) -> Optional[bytes]:
        value = ctypes.create_string_buffer(size)
        ret = api().bpf_map_lookup_elem(self._loaded_fd(), self._key(key), value)
        if ret == -errno.ENOENT:
            return None
        _check(ret, "bpf_map_lookup_elem", f"map '{self.name}'")
        return value.raw

    def lookup(self, key: bytes) -> Optional[bytes]:
        """The value stored under ``key``, or None.  Per-CPU maps: use :meth:`lookup_percpu`."""
        if self.percpu:
            # The kernel would write one slot per CPU past a single-value buffer.
            raise ValueError(f"map '{self.name}' is per-CPU: use lookup_percpu()")
        return self._lookup_raw(key, self.value_size)

    def lookup_percpu(self, key: bytes) -> Optional[list[bytes]]:
        """One value per possible CPU for ``key`` of a per-CPU map, or None."""
        if not self.percpu:
            raise ValueError(f"map '{self.name}' is not per-CPU: use lookup()")
        raw = self._lookup_raw(key, self._full_value_size())
        if raw is None:
            return None
        stride = (self.value_size + 7) // 8 * 8
        return [raw[i:i + self.value_size] for i in range(0, len(raw), stride)]

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        """Store ``value`` under ``key`` (``flags``: BPF_ANY=0, BPF_NOEXIST=1, BPF_EXIST=2).

        For per-CPU maps ``value`` holds every CPU's slot, each padded to 8 bytes.
        """
        expected = self._full_value_size()
        if len(value) != expected:
            raise ValueError(f"map '{self.name}': value is {len(value)} bytes, "
                             f"expected {expected}")
        buf = ctypes.create_string_buffer(bytes(value), len(value))
        ret = api().bpf_map_update_elem(self._loaded_fd(), self._key(key), buf, flags)
        _check(ret, "bpf_map_update_elem", f"map '{self.name}'")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        ret = api().bpf_map_delete_elem(self._loaded_fd(), self._key(key))
        if ret == -errno.ENOENT:
            return False
        _check(ret, "bpf_map_delete_elem", f"map '{self.name}'")
        return True

    def keys(self) -> Iterator[bytes]:
        """Iterate over the keys (bpf_map_get_next_key order)."""
        fd = self._loaded_fd()
        size = self.key_size
        current: Optional[ctypes.Array[ctypes.c_char]] = None
        while True:
            following = ctypes.create_string_buffer(size)
            ret = api().bpf_map_get_next_key(fd, current, following)
            if ret == -errno.ENOENT:
                return
            _check(ret, "bpf_map_get_next_key", f"map '{self.name}'")
            yield following.raw
            current = following

    def __repr__(self) -> str:
        return f"<Map {self.name}>"


#: Ring buffer callback: gets one record; a negative return value stops the current poll.
SampleCallback = Callable[[bytes], Optional[int]]

# What the C callback returns after the Python callback raised: stops consumption.
_STOP_AFTER_EXCEPTION = -errno.ECANCELED


class RingBuffer(Closable):
    """Consumer of a ``BPF_MAP_TYPE_RINGBUF`` map; ``callback`` runs once per record.

    An exception raised by ``callback`` stops the poll and is re-raised by :meth:`poll`
    or :meth:`consume`; the record that raised counts as consumed.
    """

    def __init__(self, ring_map: Map, callback: SampleCallback) -> None:
        """Set up consumption of ``ring_map`` (which must be loaded)."""
        if ring_map.type != _MAP_TYPE_RINGBUF:
            raise ValueError(f"map '{ring_map.name}' is not a BPF ring buffer")
        self._handle: Optional[int] = None
        self.map = ring_map
        self._callback = callback
        self._pending: Optional[BaseException] = None
        self._stopped_with: Optional[int] = None
        # libbpf keeps this pointer until ring_buffer__free(): it must outlive self._handle.
        self._c_callback = _SAMPLE_FN(self._on_sample)
        handle = api().ring_buffer__new(ring_map._loaded_fd(), self._c_callback, None, None)
        self._handle = _check_ptr(handle, "ring_buffer__new", f"map '{ring_map.name}'")
        ring_map._owner._track_ring_buffer(self)

    def _on_sample(self, _ctx: Optional[int], data: int, size: int) -> int:
        try:
            ret = self._callback(ctypes.string_at(data, size))
        except BaseException as exc:  # noqa: BLE001 - re-raised from poll()/consume()
            self._pending = exc
            return _STOP_AFTER_EXCEPTION
        if ret is not None and ret < 0:
            self._stopped_with = ret
            return int(ret)
        return 0

    def _require_open(self) -> int:
        if self._handle is None:
            raise LibbpfError(f"ring buffer of map '{self.map.name}' is closed")
        return self._handle

    def _result(self, ret: int, function: str) -> int:
        pending, self._pending = self._pending, None
        stopped_with, self._stopped_with = self._stopped_with, None
        if pending is not None:
            raise pending
        if ret < 0 and ret == stopped_with:
            return ret
        if ret == -errno.EINTR:
            return 0  # a signal: let Python's handler run, the caller polls again
        return _check(ret, function, f"map '{self.map.name}'")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` (-1: forever) for records and handle them.

        Returns the number of records handled, or the callback's negative return value
        if it asked to stop.
        """
        ret = api().ring_buffer__poll(self._require_open(), timeout_ms)
        return self._result(ret, "ring_buffer__poll")

    def consume(self) -> int:
        """Handle every record available now without waiting; same result as :meth:`poll`."""
        ret = api().ring_buffer__consume(self._require_open())
        return self._result(ret, "ring_buffer__consume")

    def fileno(self) -> int:
        """The epoll file descriptor, readable when records are waiting (for selectors)."""
        return _check(api().ring_buffer__epoll_fd(self._require_open()),
                      "ring_buffer__epoll_fd", f"map '{self.map.name}'")

    def close(self) -> None:
        """Free the ring buffer; safe to call twice."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        self.map._owner._forget_ring_buffer(self)
        api().ring_buffer__free(handle)
