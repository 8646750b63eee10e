"""The ctypes binding itself: loading the system libbpf (``libbpf.so.1``, libbpf >= 1.0),
its C prototypes, error conversion and libbpf's log.  The object model built on it is
:mod:`xfrmtrace.bpf.objects`; BTF is :mod:`xfrmtrace.bpf.btf`.

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
from typing import Any, Iterator, Optional, TypeVar

from xfrmtrace.errors import LibbpfError, VerifierError

log = logging.getLogger("xfrmtrace.libbpf")

LIBBPF_SONAME = "libbpf.so.1"
MIN_VERSION = (1, 0)
#: Overrides the library path (e.g. to test against a newer libbpf build).
LIBBPF_PATH_ENV = "XFRMTRACE_LIBBPF"
_INSTALL_HINT = "install libbpf1 (Debian/Ubuntu) or libbpf (Fedora)"

# libbpf-specific error codes live above the errno range (enum libbpf_errno in libbpf.h).
_LIBBPF_ERRNO_START = 4000
_LIBBPF_ERRNO_END = 4100

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
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

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
    ("bpf_program__attach_perf_event", _P, (_P, _INT)),
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
    ("ring_buffer__new", _P, (_INT, SAMPLE_FN, _P, _P)),
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
    return check(api().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus", "")


# --- errors ---------------------------------------------------------------------------------

def strerror(err: int) -> str:
    if _LIBBPF_ERRNO_START <= err < _LIBBPF_ERRNO_END and _api is not None:
        buf = ctypes.create_string_buffer(128)
        _api.libbpf_strerror(err, buf, len(buf))
        return buf.value.decode("utf-8", "replace")
    return os.strerror(err)


def call_error(err: int, function: str, subject: str) -> Exception:
    """The exception for libbpf function ``function`` failing with errno ``err``."""
    err = abs(err) or errno.EINVAL
    message = f"{function}({subject}): {strerror(err)}"
    if err >= _LIBBPF_ERRNO_START:
        return LibbpfError(message, errno=err)
    return OSError(err, message)


def check(ret: int, function: str, subject: str) -> int:
    """Pass a non-negative int result through; turn ``-errno`` into an exception."""
    if ret < 0:
        raise call_error(ret, function, subject)
    return ret


def check_ptr(ptr: Optional[int], function: str, subject: str) -> int:
    """Pass a non-NULL pointer result through; turn NULL + errno into an exception."""
    if not ptr:
        raise call_error(ctypes.get_errno(), function, subject)
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
def capturing_warnings() -> Iterator[list[str]]:
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


def load_error(err: int, path: str, warnings: list[str]) -> Exception:
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
    exc = call_error(err, "bpf_object__load", path)
    if isinstance(exc, OSError):
        return OSError(exc.errno, f"{exc.strerror}{detail}")
    return LibbpfError(f"{exc}{detail}", errno=abs(err))


# --- objects ---------------------------------------------------------------------------------

def decode_text(raw: Optional[bytes]) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


_C = TypeVar("_C", bound="Closable")


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
