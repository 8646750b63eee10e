"""BTF (BPF Type Format) queries through libbpf's BTF API.

Used for what must come from the kernel actually running (or the vmlinux given offline):
structure member offsets (``net->mib.xfrm_statistics``), enumerators (``LINUX_MIB_XFRM*``),
function prototypes (which argument is the ``struct sk_buff *``), and, on our own built BPF
object, the layout of the structs shared with Python.

The C records that follow ``struct btf_type`` are mirrored with ctypes below; kind numbers
are defined here because libbpf 1.1's headers may predate some kinds (ENUM64 is 19).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import weakref
from typing import Any, Iterator, NamedTuple, Optional, Union

from xfrmtrace.bpf.ffi import Closable, api, check_ptr, strerror
from xfrmtrace.errors import BtfLookupError, InputError, KernelFeatureMissing, LibbpfError

__all__ = [
    "Btf",
    "BtfArray",
    "BtfEnum",
    "BtfEnum64",
    "BtfKind",
    "BtfMember",
    "BtfParam",
    "BtfType",
    "BtfVarSecinfo",
    "Param",
    "VarLocation",
    "VMLINUX_BTF_PATH",
]

VMLINUX_BTF_PATH = "/sys/kernel/btf/vmlinux"
MODULE_BTF_DIR = "/sys/kernel/btf"


class BtfKind(enum.IntEnum):
    """BTF_KIND_* from uapi/linux/btf.h."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


class BtfType(ctypes.Structure):
    """``struct btf_type``; the last field is the ``size``/``type`` union."""

    _fields_ = [
        ("name_off", ctypes.c_uint32),
        ("info", ctypes.c_uint32),
        ("size_or_type", ctypes.c_uint32),
    ]


class BtfMember(ctypes.Structure):
    """``struct btf_member`` (follows STRUCT and UNION)."""

    _fields_ = [
        ("name_off", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
    ]


class BtfEnum(ctypes.Structure):
    """``struct btf_enum`` (follows ENUM)."""

    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class BtfEnum64(ctypes.Structure):
    """``struct btf_enum64`` (follows ENUM64)."""

    _fields_ = [
        ("name_off", ctypes.c_uint32),
        ("val_lo32", ctypes.c_uint32),
        ("val_hi32", ctypes.c_uint32),
    ]


class BtfParam(ctypes.Structure):
    """``struct btf_param`` (follows FUNC_PROTO)."""

    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32)]


class BtfArray(ctypes.Structure):
    """``struct btf_array`` (follows ARRAY)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("index_type", ctypes.c_uint32),
        ("nelems", ctypes.c_uint32),
    ]


class BtfVarSecinfo(ctypes.Structure):
    """``struct btf_var_secinfo`` (follows DATASEC)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
    ]


class Param(NamedTuple):
    """A function parameter: its name and its C type as written, e.g. ``struct sk_buff *``."""

    name: str
    type: str


class VarLocation(NamedTuple):
    """Where a global variable lives in a BPF object: section name, offset, size in bytes."""

    section: str
    offset: int
    size: int


class _Type(NamedTuple):
    """One decoded ``struct btf_type`` plus the address of the records following it."""

    id: int
    kind: int
    name: str
    vlen: int
    kflag: bool
    size_or_type: int
    tail: int


_MODIFIERS = frozenset({BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT,
                        BtfKind.TYPE_TAG})
_COMPOSITES = frozenset({BtfKind.STRUCT, BtfKind.UNION})
_KEYWORDS = {BtfKind.STRUCT: "struct", BtfKind.UNION: "union", BtfKind.ENUM: "enum",
             BtfKind.ENUM64: "enum"}
# DWARF spells integer types the long way; C programmers and our tables use the short way.
_INT_NAMES = {
    "short int": "short",
    "short unsigned int": "unsigned short",
    "long int": "long",
    "long unsigned int": "unsigned long",
    "long long int": "long long",
    "long long unsigned int": "unsigned long long",
}
_MAX_DEPTH = 64  # type chains in real BTF are short; this only stops a corrupt loop


class Btf(Closable):
    """Parsed BTF: the running kernel's, a module's (split on a base), or a file's."""

    def __init__(self, handle: int, source: str, *, owned: bool = True,
                 base: Optional[Btf] = None) -> None:
        """Wrap a ``struct btf *``; use the class methods instead."""
        self._handle: Optional[int] = handle
        self.source = source
        self._owned = owned
        self._base = base  # split BTF points into its base: keep the base alive
        self._splits: weakref.WeakSet[Btf] = weakref.WeakSet()
        if base is not None:
            base._splits.add(self)

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def vmlinux(cls) -> Btf:
        """The running kernel's BTF (``/sys/kernel/btf/vmlinux`` first, as libbpf looks)."""
        try:
            handle = _load_vmlinux_handle()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH):
                raise KernelFeatureMissing(
                    f"kernel has no BTF (CONFIG_DEBUG_INFO_BTF): {VMLINUX_BTF_PATH} is missing;"
                    " run a kernel built with CONFIG_DEBUG_INFO_BTF=y"
                ) from exc
            raise
        return cls(handle, VMLINUX_BTF_PATH)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike[str]], base: Optional[Btf] = None) -> Btf:
        """BTF from an ELF file's ``.BTF`` section or a raw BTF file (split on ``base``)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise InputError(f"cannot read BTF from {path}: no such file")
        if base is None:
            handle = api().btf__parse(path.encode(), None)
        else:
            handle = api().btf__parse_split(path.encode(), base._require_open())
        if not handle:
            err = ctypes.get_errno() or errno.EINVAL
            # The file exists, so ENOENT/ENODATA mean libbpf found no .BTF section in it.
            no_section = err in (errno.ENOENT, errno.ENODATA)
            reason = "ELF file without a .BTF section" if no_section else strerror(err)
            raise InputError(f"cannot read BTF from {path}: {reason} "
                             "(need an ELF file with a .BTF section, or raw BTF)")
        return cls(handle, path, base=base)

    @classmethod
    def module(cls, name: str, base: Btf) -> Optional[Btf]:
        """The split BTF of loaded kernel module ``name`` on ``base``; None if not loaded."""
        path = os.path.join(MODULE_BTF_DIR, name)
        if "/" in name or not os.path.exists(path):
            return None
        handle = api().btf__parse_split(path.encode(), base._require_open())
        return cls(check_ptr(handle, "btf__parse_split", path), path, base=base)

    @classmethod
    def borrowed(cls, handle: int, source: str) -> Btf:
        """Wrap BTF owned by someone else (e.g. ``bpf_object__btf``); close() will not free it."""
        return cls(handle, source, owned=False)

    def _require_open(self) -> int:
        if self._handle is None:
            raise LibbpfError(f"BTF of {self.source} is already closed")
        return self._handle

    def close(self) -> None:
        """Free the BTF (if owned) and any split BTF built on it; safe to call twice."""
        for split in list(self._splits):
            split.close()  # their types point into ours
        handle, self._handle = self._handle, None
        if handle is not None and self._owned:
            api().btf__free(handle)
        self._base = None

    # --- raw access --------------------------------------------------------------------------

    @property
    def type_count(self) -> int:
        """Number of type ids, including id 0 (void) and any base BTF's types."""
        return int(api().btf__type_cnt(self._require_open()))

    def find(self, name: str, kind: BtfKind) -> Optional[int]:
        """Type id of the first type called ``name`` of ``kind``, or None."""
        tid = api().btf__find_by_name_kind(self._require_open(), name.encode(), int(kind))
        return tid if tid > 0 else None

    def _name(self, name_off: int) -> str:
        raw = api().btf__name_by_offset(self._require_open(), name_off)
        return raw.decode("utf-8", "replace") if raw else ""

    def _type(self, tid: int) -> _Type:
        ptr = api().btf__type_by_id(self._require_open(), tid)
        if not ptr:
            raise BtfLookupError(f"BTF of {self.source} has no type id {tid}")
        raw = BtfType.from_address(ptr)
        info = raw.info
        return _Type(id=tid, kind=(info >> 24) & 0x1F, name=self._name(raw.name_off),
                     vlen=info & 0xFFFF, kflag=bool(info >> 31), size_or_type=raw.size_or_type,
                     tail=ptr + ctypes.sizeof(BtfType))

    def _records(self, t: _Type, record: Any) -> Any:
        """The ``vlen`` records of C type ``record`` that follow type ``t``."""
        return (record * t.vlen).from_address(t.tail)

    def _skip_modifiers(self, tid: int) -> _Type:
        """Follow typedef/const/volatile/restrict/type-tag to the underlying type."""
        t = self._type(tid)
        for _ in range(_MAX_DEPTH):
            if t.kind not in _MODIFIERS:
                return t
            t = self._type(t.size_or_type)
        raise BtfLookupError(f"BTF of {self.source}: type {tid} has a modifier loop")

    def resolve_size(self, tid: int) -> int:
        """Size in bytes of type ``tid`` (typedefs and modifiers resolved)."""
        size = int(api().btf__resolve_size(self._require_open(), tid))
        if size < 0:
            raise BtfLookupError(f"BTF of {self.source}: type {tid} has no size")
        return size

    def _iter_types(self, kinds: frozenset[int]) -> Iterator[_Type]:
        """Every type whose kind is in ``kinds`` (a linear scan: BTF has no other index)."""
        handle = self._require_open()
        type_by_id = api().btf__type_by_id
        for tid in range(1, self.type_count):
            ptr = type_by_id(handle, tid)
            # Read just `info` first: decoding names of the other ~100k types is the slow part.
            if ptr and (ctypes.c_uint32.from_address(ptr + 4).value >> 24) & 0x1F in kinds:
                yield self._type(tid)

    # --- composites --------------------------------------------------------------------------

    def _find_composite(self, name: str) -> _Type:
        keyword, _, bare = name.partition(" ")
        kinds = [BtfKind.STRUCT, BtfKind.UNION]
        if bare:
            kinds = {"struct": [BtfKind.STRUCT], "union": [BtfKind.UNION]}.get(keyword, [])
        else:
            bare = name
        for kind in kinds:
            tid = self.find(bare, kind)
            if tid is not None:
                return self._type(tid)
        raise BtfLookupError(f"BTF of {self.source} has no struct or union {bare!r}")

    def _members(self, t: _Type) -> Iterator[tuple[str, int, int, int]]:
        """(name, bit offset, bitfield size, type id) of each member of struct/union ``t``."""
        for m in self._records(t, BtfMember):
            offset, bitfield = m.offset, 0
            if t.kflag:  # kind_flag: offset packs bitfield size << 24 | bit offset
                offset, bitfield = m.offset & 0xFFFFFF, m.offset >> 24
            yield self._name(m.name_off), offset, bitfield, m.type

    def _find_member(self, t: _Type, name: str) -> Optional[tuple[int, int, int]]:
        """(bit offset, bitfield size, type id) of member ``name`` of composite ``t``,
        searching inside anonymous struct/union members too."""
        if t.kind not in _COMPOSITES:
            return None
        for member_name, offset, bitfield, tid in self._members(t):
            if member_name == name:
                return offset, bitfield, tid
            if not member_name:
                inner = self._find_member(self._skip_modifiers(tid), name)
                if inner is not None:
                    return offset + inner[0], inner[1], inner[2]
        return None

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (dotted, e.g. ``mib.xfrm_statistics``) in ``struct_name``.

        Raises BtfLookupError("struct net has no mib.xfrm_statistics") when absent.
        """
        outer = self._find_composite(struct_name)
        t = outer
        bits = 0
        bitfield = 0
        for component in path.split("."):
            found = self._find_member(self._skip_modifiers(t.id), component)
            if found is None:
                raise BtfLookupError(f"{_KEYWORDS[BtfKind(outer.kind)]} {outer.name} has no {path}")
            bits += found[0]
            bitfield = found[1]
            t = self._type(found[2])
        if bitfield or bits % 8:
            raise BtfLookupError(f"{struct_name}.{path} is a bitfield, not byte-addressable")
        return bits // 8

    def struct_layout(self, name: str) -> dict[str, tuple[int, int]]:
        """``{member: (byte offset, byte size)}`` of a struct or union.

        Members of anonymous struct/union members are listed under their own names.
        Bitfields raise BtfLookupError (shared ABI structs must not have them).
        """
        t = self._find_composite(name)
        layout: dict[str, tuple[int, int]] = {}
        self._collect_layout(t, 0, layout)
        return layout

    def _collect_layout(self, t: _Type, base_bits: int,
                        layout: dict[str, tuple[int, int]]) -> None:
        for member_name, offset, bitfield, tid in self._members(t):
            bits = base_bits + offset
            if not member_name:
                self._collect_layout(self._skip_modifiers(tid), bits, layout)
                continue
            if bitfield or bits % 8:
                raise BtfLookupError(f"{t.name}.{member_name} is a bitfield: no byte layout")
            layout[member_name] = (bits // 8, self.resolve_size(tid))

    def type_size(self, name: str) -> int:
        """Size in bytes of the named type (``foo``, ``struct foo``, ``union foo``...)."""
        keyword, _, bare = name.partition(" ")
        by_keyword = {"struct": [BtfKind.STRUCT], "union": [BtfKind.UNION],
                      "enum": [BtfKind.ENUM, BtfKind.ENUM64]}
        if bare and keyword in by_keyword:
            kinds = by_keyword[keyword]
        else:
            bare = name
            kinds = [BtfKind.STRUCT, BtfKind.UNION, BtfKind.TYPEDEF, BtfKind.INT,
                     BtfKind.ENUM, BtfKind.ENUM64, BtfKind.FLOAT]
        for kind in kinds:
            tid = self.find(bare, kind)
            if tid is not None:
                return self.resolve_size(tid)
        raise BtfLookupError(f"BTF of {self.source} has no type {name!r}")

    # --- enums -------------------------------------------------------------------------------

    def _enumerators(self, t: _Type) -> dict[str, int]:
        values: dict[str, int] = {}
        if t.kind == BtfKind.ENUM:
            for e in self._records(t, BtfEnum):
                # kind_flag marks a signed enum; otherwise the 32 bits are unsigned.
                values[self._name(e.name_off)] = e.val if t.kflag else e.val & 0xFFFFFFFF
        elif t.kind == BtfKind.ENUM64:
            for e in self._records(t, BtfEnum64):
                value = e.val_hi32 << 32 | e.val_lo32
                if t.kflag and value >= 1 << 63:
                    value -= 1 << 64
                values[self._name(e.name_off)] = value
        return values

    def enum_values(self, containing: str) -> dict[str, int]:
        """``{enumerator: value}`` of the (often anonymous) enum that has ``containing``."""
        for t in self._iter_types(frozenset({BtfKind.ENUM, BtfKind.ENUM64})):
            values = self._enumerators(t)
            if containing in values:
                return values
        raise BtfLookupError(f"BTF of {self.source} has no enum with {containing}")

    # --- functions ---------------------------------------------------------------------------

    def func_params(self, func_name: str) -> Optional[list[Param]]:
        """Parameters of function ``func_name`` with normalized C types; None if not in BTF."""
        tid = self.find(func_name, BtfKind.FUNC)
        if tid is None:
            return None
        proto = self._type(self._type(tid).size_or_type)
        if proto.kind != BtfKind.FUNC_PROTO:
            raise BtfLookupError(f"BTF of {self.source}: {func_name} has no prototype")
        return self._params(proto)

    def _params(self, proto: _Type) -> list[Param]:
        params = []
        for p in self._records(proto, BtfParam):
            if p.type == 0:  # a trailing void parameter marks a variadic function
                params.append(Param("", "..."))
            else:
                params.append(Param(self._name(p.name_off), self.type_string(p.type)))
        return params

    def type_string(self, tid: int) -> str:
        """C spelling of type ``tid``: typedef names as written, ``const struct flowi *``."""
        return self._render(tid, 0)

    def _render(self, tid: int, depth: int) -> str:
        if tid == 0:
            return "void"
        if depth > _MAX_DEPTH:
            raise BtfLookupError(f"BTF of {self.source}: type {tid} nests too deeply")
        t = self._type(tid)
        if t.kind in (BtfKind.INT, BtfKind.FLOAT):
            return _INT_NAMES.get(t.name, t.name)
        if t.kind == BtfKind.TYPEDEF:
            return t.name
        if t.kind in _KEYWORDS:
            return f"{_KEYWORDS[BtfKind(t.kind)]} {t.name or '(anon)'}"
        if t.kind == BtfKind.FWD:
            return f"{'union' if t.kflag else 'struct'} {t.name}"
        if t.kind == BtfKind.PTR:
            return self._render_pointer(t, depth)
        if t.kind in (BtfKind.CONST, BtfKind.VOLATILE):
            return self._render_qualified(t, depth)
        if t.kind in (BtfKind.RESTRICT, BtfKind.TYPE_TAG):  # __restrict, __rcu, __user: no ABI
            return self._render(t.size_or_type, depth + 1)
        if t.kind == BtfKind.ARRAY:
            array = BtfArray.from_address(t.tail)
            return f"{self._render(array.type, depth + 1)}[{array.nelems}]"
        if t.kind == BtfKind.FUNC_PROTO:
            args = ", ".join(p.type for p in self._params(t)) or "void"
            return f"{self._render(t.size_or_type, depth + 1)} ({args})"
        return f"{BtfKind(t.kind).name.lower()} {t.name}".strip()

    def _render_pointer(self, t: _Type, depth: int) -> str:
        target = self._type(t.size_or_type) if t.size_or_type else None
        if target is not None and target.kind == BtfKind.FUNC_PROTO:
            args = ", ".join(p.type for p in self._params(target)) or "void"
            return f"{self._render(target.size_or_type, depth + 1)} (*)({args})"
        inner = self._render(t.size_or_type, depth + 1)
        return f"{inner}*" if inner.endswith("*") else f"{inner} *"

    def _render_qualified(self, t: _Type, depth: int) -> str:
        qualifier = "const" if t.kind == BtfKind.CONST else "volatile"
        inner = self._render(t.size_or_type, depth + 1)
        if inner.endswith("*"):  # a qualified pointer: `struct x *const`
            return f"{inner}{qualifier}"
        return f"{qualifier} {inner}"

    # --- variables ---------------------------------------------------------------------------

    def find_var(self, name: str, section_prefix: str = ".") -> VarLocation:
        """Section, offset and size of global variable ``name`` from the DATASEC records.

        Only sections whose name starts with ``section_prefix`` are searched.  Offsets are
        meaningful in the BTF of an opened ``BpfObject`` (libbpf fixes them up at open).
        """
        for t in self._iter_types(frozenset({BtfKind.DATASEC})):
            if not t.name.startswith(section_prefix):
                continue
            for info in self._records(t, BtfVarSecinfo):
                if self._type(info.type).name == name:
                    return VarLocation(t.name, int(info.offset), int(info.size))
        raise BtfLookupError(f"{self.source} has no variable {name!r} in a "
                             f"{section_prefix}* section")

    def __repr__(self) -> str:
        return f"<Btf {self.source}{' closed' if self._handle is None else ''}>"


def _load_vmlinux_handle() -> int:
    """``btf__load_vmlinux_btf()``, raising OSError (ESRCH when no kernel BTF is found)."""
    return check_ptr(api().btf__load_vmlinux_btf(), "btf__load_vmlinux_btf", "")
