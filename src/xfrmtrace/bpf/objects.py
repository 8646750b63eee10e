"""libbpf's object model over the ctypes binding (:mod:`xfrmtrace.bpf.ffi`): a BPF ELF object,
its programs and maps, the links that attach programs, and ring buffers.

Maps and programs handed out stay valid until their object is closed; callbacks stay
referenced as long as their ring buffer lives.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from typing import Callable, Iterator, Optional, TypeVar, Union

from xfrmtrace.bpf.btf import Btf
from xfrmtrace.bpf.ffi import (
    SAMPLE_FN,
    Closable,
    KprobeOpts,
    api,
    capturing_warnings,
    check,
    check_ptr,
    decode_text,
    load_error,
    num_possible_cpus,
)
from xfrmtrace.errors import LibbpfError

__all__ = [
    "BpfObject",
    "KprobeOpts",
    "Link",
    "Map",
    "Program",
    "RingBuffer",
    "SampleCallback",
    "kprobe_pmu_available",
]

_PartT = TypeVar("_PartT", bound="_ObjectPart")

log = logging.getLogger("xfrmtrace.libbpf")

# The kprobe PMU lets perf_event_open() take a raw address (attr.config1 = 0,
# attr.config2 = address); without it libbpf falls back to tracefs, which needs a name.
_KPROBE_PMU_TYPE = "/sys/bus/event_source/devices/kprobe/type"

# enum bpf_map_type values of the per-CPU maps (uapi/linux/bpf.h).
_PERCPU_MAP_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH,
# PERCPU_CGROUP_STORAGE
_MAP_TYPE_RINGBUF = 27


def kprobe_pmu_available() -> bool:
    """True if the kernel has the perf kprobe PMU (needed to attach at a raw address)."""
    return os.path.exists(_KPROBE_PMU_TYPE)


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
        return cls(check_ptr(handle, "bpf_object__open_file", path), path)

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

        if self._btf is None:
            handle = api().bpf_object__btf(self._require_open())
            self._btf = Btf.borrowed(check_ptr(handle, "bpf_object__btf", self.path), self.path)
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
        section_map = check_ptr(section_map, "bpf_object__find_map_by_name", section)
        map_size = ctypes.c_size_t()
        current = api().bpf_map__initial_value(section_map, ctypes.byref(map_size))
        current = check_ptr(current, "bpf_map__initial_value", section)
        image = bytearray(ctypes.string_at(current, map_size.value))
        image[offset:offset + size] = data
        buf = (ctypes.c_char * len(image)).from_buffer(image)
        ret = api().bpf_map__set_initial_value(section_map, buf, len(image))
        check(ret, "bpf_map__set_initial_value", section)

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
            found.append(self._part(cls, cache, decode_text(name_of(ptr))))
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
        with capturing_warnings() as warnings:
            ret = api().bpf_object__load(handle)
        if ret < 0:
            raise load_error(ret, self.path, warnings)

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
        self.name = decode_text(getattr(api(), f"bpf_{self._KIND}__name")(handle))

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
        check(ret, "bpf_program__set_autoload", f"prog '{self.name}'")

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
        handle = check_ptr(handle, "bpf_program__attach_kprobe_opts", subject)
        kind = "kretprobe" if retprobe else "kprobe"
        return self._owner._track_link(Link(handle, f"{kind} {where} ({self.name})", self._owner))

    def attach_raw_tracepoint(self, tracepoint: str) -> Link:
        """Attach to the raw tracepoint ``tracepoint`` (e.g. ``sys_enter``)."""
        handle = api().bpf_program__attach_raw_tracepoint(self._require_loaded(),
                                                          tracepoint.encode())
        subject = f"prog '{self.name}', {tracepoint}"
        handle = check_ptr(handle, "bpf_program__attach_raw_tracepoint", subject)
        description = f"raw tracepoint {tracepoint} ({self.name})"
        return self._owner._track_link(Link(handle, description, self._owner))

    def attach_perf_event(self, perf_fd: int, description: str) -> Link:
        """Attach to the open perf event ``perf_fd`` (a hardware breakpoint, say).  The link
        owns the descriptor from then on: libbpf closes it when the link is destroyed.  If the
        attach fails, the descriptor is still the caller's to close."""
        subject = f"prog '{self.name}', {description}"
        handle = api().bpf_program__attach_perf_event(self._require_loaded(), perf_fd)
        handle = check_ptr(handle, "bpf_program__attach_perf_event", subject)
        return self._owner._track_link(Link(handle, f"{description} ({self.name})", self._owner))

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
        check(api().bpf_link__destroy(handle), "bpf_link__destroy", self.description)

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
        check(ret, "bpf_map__set_max_entries", f"map '{self.name}'")

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
        check(ret, "bpf_map_lookup_elem", f"map '{self.name}'")
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
        check(ret, "bpf_map_update_elem", f"map '{self.name}'")

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        ret = api().bpf_map_delete_elem(self._loaded_fd(), self._key(key))
        if ret == -errno.ENOENT:
            return False
        check(ret, "bpf_map_delete_elem", f"map '{self.name}'")
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
            check(ret, "bpf_map_get_next_key", f"map '{self.name}'")
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
        self._c_callback = SAMPLE_FN(self._on_sample)
        handle = api().ring_buffer__new(ring_map._loaded_fd(), self._c_callback, None, None)
        self._handle = check_ptr(handle, "ring_buffer__new", f"map '{ring_map.name}'")
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
        return check(ret, function, f"map '{self.map.name}'")

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
        return check(api().ring_buffer__epoll_fd(self._require_open()),
                      "ring_buffer__epoll_fd", f"map '{self.map.name}'")

    def close(self) -> None:
        """Free the ring buffer; safe to call twice."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        self.map._owner._forget_ring_buffer(self)
        api().ring_buffer__free(handle)
