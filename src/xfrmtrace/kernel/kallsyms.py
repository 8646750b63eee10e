"""Kernel symbol table (/proc/kallsyms format): function extents and address lookup."""

from __future__ import annotations

import bisect
import itertools
import logging
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from xfrmtrace.errors import InputError, PermissionProblem

log = logging.getLogger("xfrmtrace.kernel.kallsyms")


def code_location(function: str, offset: int, obj: str = "vmlinux") -> str:
    """``function+0xoff``, with ``[module]`` appended for module text: how sites are printed."""
    text = f"{function}+{offset:#x}"
    return text if obj == "vmlinux" else f"{text} [{obj}]"

VMLINUX = "vmlinux"
PROC_KALLSYMS = Path("/proc/kallsyms")
SYS_MODULE = Path("/sys/module")

# Module text is laid out by the module loader; past a module's last text
# symbol we have no end marker, so we assume at most this much code follows.
_LAST_SYMBOL_SPAN = 4096
_ADDRESS_LIMIT = 1 << 64


@dataclass(frozen=True)
class Function:
    """A text symbol and the bytes up to the next symbol of the same object."""

    name: str
    object: str  # "vmlinux" or module name
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class SymbolColumns:
    """Text symbols as they are read, in any order, column by column."""

    def __init__(self, object_names: Optional[list[str]] = None) -> None:
        self.addrs = array("Q")
        self.names: list[bytes] = []
        self.object_ids = array("H")
        self.object_names: list[str] = list(object_names or ())
        self._object_id = {name: n for n, name in enumerate(self.object_names)}

    def __len__(self) -> int:
        return len(self.addrs)

    def object_id(self, obj: str) -> int:
        object_id = self._object_id.get(obj)
        if object_id is None:
            object_id = self._object_id[obj] = len(self.object_names)
            self.object_names.append(sys.intern(obj))
        return object_id


class SymbolTable:
    """Symbols ordered by (address, name, object), exact duplicates dropped, stored compactly.

    A kernel with its modules has 100k-200k text symbols.  As (address, name, object) tuples
    they took ~300 bytes each and set the tool's memory; here a symbol is an 8-byte address,
    its name's bytes in one blob, a 4-byte name end, a 2-byte object id and two 4-byte index
    entries (by name, by object).
    """

    def __init__(self, columns: SymbolColumns) -> None:
        # Sorted by address (C-level sorts over one int per symbol); only runs of aliases
        # (the same address) are then ordered by name and object, in Python.
        order = sorted(range(len(columns)), key=columns.addrs.__getitem__)
        addrs = array("Q", map(columns.addrs.__getitem__, order))
        names = list(map(columns.names.__getitem__, order))
        object_ids = array("H", map(columns.object_ids.__getitem__, order))
        del order
        if any(addrs[k] == addrs[k - 1] for k in range(1, len(addrs))):
            addrs, names, object_ids = _order_aliases(addrs, names, object_ids,
                                                      columns.object_names)
        self.object_names = columns.object_names
        self.addrs = addrs
        self.object_ids = object_ids
        self.blob = b"".join(names)
        self.name_ends = array("I", itertools.accumulate(map(len, names)))
        # Symbol indices ordered by name bytes, then address: name lookups bisect it.
        self.by_name = array("I", sorted(range(len(names)), key=names.__getitem__))
        del names
        # Symbol indices per object, so listing one module's functions does not scan them all.
        self.by_object: dict[str, array] = {}
        for i, object_id in enumerate(object_ids):
            obj = self.object_names[object_id]
            indices = self.by_object.get(obj)
            if indices is None:
                indices = self.by_object[obj] = array("I")
            indices.append(i)

    def __len__(self) -> int:
        return len(self.addrs)

    def name_start(self, i: int) -> int:
        return self.name_ends[i - 1] if i else 0

    def name_bytes(self, i: int) -> bytes:
        return self.blob[self.name_start(i):self.name_ends[i]]

    def name(self, i: int) -> str:
        return self.name_bytes(i).decode("utf-8", "surrogateescape")

    def object(self, i: int) -> str:
        return self.object_names[self.object_ids[i]]

    def index_of(self, name: str, obj: str) -> Optional[int]:
        """The first (lowest address) symbol called ``name`` in ``obj``."""
        key = name.encode("utf-8", "surrogateescape")
        lo, hi = 0, len(self.by_name)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.name_bytes(self.by_name[mid]) < key:
                lo = mid + 1
            else:
                hi = mid
        while lo < len(self.by_name):
            i = self.by_name[lo]
            if self.name_bytes(i) != key:
                break
            if self.object(i) == obj:
                return i
            lo += 1
        return None

    def function_at(self, i: int, core_text_end: int) -> Function:
        """Symbol i with its extent: up to the next symbol of its object (vmlinux's last one
        up to _etext, a module's last one at most _LAST_SYMBOL_SPAN)."""
        obj = self.object(i)
        start = self.addrs[i]
        j = i + 1
        # Aliases share an address; the extent runs to the next distinct address.
        while j < len(self.addrs) and self.addrs[j] == start:
            j += 1
        if j < len(self.addrs) and self.object_ids[j] == self.object_ids[i]:
            end = self.addrs[j]
        elif obj == VMLINUX and core_text_end > start:
            end = core_text_end
        else:
            end = start + _LAST_SYMBOL_SPAN
            if j < len(self.addrs):
                end = min(end, self.addrs[j])
        return Function(self.name(i), obj, start, end)

    def columns_without(self, objects: set[str]) -> SymbolColumns:
        """The symbols of every object but ``objects``, to be added to and indexed again."""
        columns = SymbolColumns(self.object_names)
        keep = sorted(i for obj, indices in self.by_object.items() if obj not in objects
                      for i in indices)
        columns.addrs = array("Q", (self.addrs[i] for i in keep))
        columns.names = [self.name_bytes(i) for i in keep]
        columns.object_ids = array("H", (self.object_ids[i] for i in keep))
        return columns


def _order_aliases(addrs: array, names: list[bytes], object_ids: array,
                   object_names: list[str]) -> tuple[array, list[bytes], array]:
    """Runs of equal addresses ordered by (name, object), exact duplicates dropped."""
    out_addrs = array("Q")
    out_names: list[bytes] = []
    out_ids = array("H")
    copied = 0  # addrs[:copied] are in the output
    k = 1
    while k < len(addrs):
        if addrs[k] != addrs[k - 1]:
            k += 1
            continue
        start, end = k - 1, k + 1
        while end < len(addrs) and addrs[end] == addrs[start]:
            end += 1
        out_addrs += addrs[copied:start]
        out_names += names[copied:start]
        out_ids += object_ids[copied:start]
        for name, _obj, object_id in sorted({(names[j], object_names[object_ids[j]],
                                              object_ids[j]) for j in range(start, end)}):
            out_addrs.append(addrs[start])
            out_names.append(name)
            out_ids.append(object_id)
        copied = k = end
    out_addrs += addrs[copied:]
    out_names += names[copied:]
    out_ids += object_ids[copied:]
    return out_addrs, out_names, out_ids


class Kallsyms:
    """Text symbols of the kernel and its modules, sorted by address."""

    def __init__(self, symbols: SymbolColumns, core_text_end: int = 0,
                 data: Optional[dict[str, int]] = None) -> None:
        """``symbols``: text symbols in any order; ``data``: the vmlinux data symbols of
        DATA_SYMBOLS that were found."""
        self._core_text_end = core_text_end
        self._data = dict(data or {})
        # Where the symbols came from, so refresh_modules() re-reads the same file.
        self.source_path: Path = PROC_KALLSYMS
        self.sysfs: Optional[Path] = None
        self._index(symbols)

    def _index(self, symbols: SymbolColumns) -> None:
        # One assignment: a query binds the table once, so a refresh on another thread
        # (modules followed while tracing) never mixes two tables in one answer.
        self._symbols = SymbolTable(symbols)

    # --- loading -----------------------------------------------------------

    @classmethod
    def load(cls, path: Union[str, Path] = PROC_KALLSYMS,
             sysfs: Optional[Path] = None) -> Kallsyms:
        """Parse a kallsyms file; the live one needs root to show real addresses.

        ``sysfs`` (default: /sys/module for the live file) is where module section
        addresses are read from, to drop stale init symbols (see :class:`_Sections`).
        """
        if sysfs is None and Path(path).name == PROC_KALLSYMS.name:
            sysfs = SYS_MODULE  # a live kallsyms, e.g. /proc/kallsyms or /host/proc/kallsyms
        try:
            # Line by line: the whole file (several MB, more as lines) is never in memory.
            with open(path, errors="replace") as lines:
                syms = cls._from_lines(lines, str(path), sysfs)
        except OSError as err:
            raise InputError(f"cannot read {path}: {err.strerror}") from err
        syms.source_path, syms.sysfs = Path(path), sysfs
        return syms

    @classmethod
    def parse(cls, text: str, source: str = "kallsyms",
              sysfs: Optional[Path] = None) -> Kallsyms:
        return cls._from_lines(text.splitlines(), source, sysfs)

    @classmethod
    def _from_lines(cls, lines: Iterable[str], source: str,
                    sysfs: Optional[Path]) -> Kallsyms:
        symbols = SymbolColumns()
        data: dict[str, int] = {}
        etext = _parse_lines(lines, source, symbols, _InitFilter(sysfs), data)
        if not symbols:
            raise InputError(f"{source} has no text symbols: is it a kallsyms file?")
        return cls(symbols, core_text_end=etext, data=data)

    def refresh_modules(self, modules: Iterable[str], path: Union[str, Path, None] = None,
                        sysfs: Optional[Path] = None) -> None:
        """Re-read the symbols of ``modules``: loaded, reloaded elsewhere, or gone.

        Only those modules' lines are parsed, so a module load costs a read of
        kallsyms, not a re-parse of all of it.  ``path`` and ``sysfs`` default to
        what :meth:`load` read from.
        """
        names = set(modules)
        if not names:
            return
        path = path or self.source_path
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as err:
            raise InputError(f"cannot read {path}: {err.strerror}") from err
        symbols = self._symbols.columns_without(names)
        suffixes = tuple(f"[{name}]" for name in names)
        lines = [line for line in text.splitlines() if line.endswith(suffixes)]
        _parse_lines(lines, str(path), symbols, _InitFilter(sysfs or self.sysfs or SYS_MODULE))
        self._index(symbols)

    # --- queries -----------------------------------------------------------

    def objects(self) -> list[str]:
        """``vmlinux`` first, then module names in order of address.  Pseudo-modules are left
        out: kprobe instruction slots and ftrace trampolines (``[__builtin__kprobes]``,
        ``[__builtin__ftrace]``) and JIT-compiled BPF (``[bpf]``) are not kernel code."""
        return [VMLINUX, *(obj for obj in self._symbols.by_object
                           if obj != VMLINUX and not _is_pseudo_module(obj))]

    def functions(self, obj: Optional[str] = None) -> Iterator[Function]:
        """Every text symbol (of one object, if given) with its extent."""
        table = self._symbols
        indices: Iterable[int] = (range(len(table)) if obj is None
                                  else table.by_object.get(obj, ()))
        for i in indices:
            if not table.blob.startswith(b"__pfx_", table.name_start(i)):
                yield table.function_at(i, self._core_text_end)

    def find(self, name: str, obj: str = VMLINUX) -> Optional[Function]:
        """The function named ``name`` in ``obj``."""
        table = self._symbols
        i = table.index_of(name, obj)
        return None if i is None else table.function_at(i, self._core_text_end)

    def lookup(self, addr: int) -> Optional[Function]:
        """The function containing ``addr``, or None."""
        table = self._symbols
        i = bisect.bisect_right(table.addrs, addr) - 1
        if i < 0:
            return None
        func = table.function_at(i, self._core_text_end)
        return func if func.start <= addr < func.end else None

    def symbolize(self, addr: int) -> str:
        """``func+0x1f`` (``[module]`` appended for module text), or the hex address."""
        func = self.lookup(addr)
        if func is None:
            return f"{addr:#x}"
        return code_location(func.name, addr - func.start, func.object)

    def address(self, name: str, obj: str = VMLINUX) -> Optional[int]:
        table = self._symbols
        i = table.index_of(name, obj)
        return None if i is None else table.addrs[i]

    def data_address(self, name: str) -> Optional[int]:
        """Where one of vmlinux's DATA_SYMBOLS is, if the kallsyms lists data symbols
        (CONFIG_KALLSYMS_ALL)."""
        return self._data.get(name)

    def jump_table_range(self) -> Optional[tuple[int, int]]:
        """vmlinux's jump label table (``__start___jump_table`` up to its stop), if known."""
        start = self.data_address("__start___jump_table")
        stop = self.data_address("__stop___jump_table")
        return (start, stop) if start and stop and start < stop else None

    def core_text_range(self) -> tuple[int, int]:
        """[_stext, _etext) of vmlinux."""
        start = self.address("_stext") or self.address("_text")
        if start is None or not self._core_text_end:
            raise InputError("kallsyms lacks _stext/_etext: is it a complete kallsyms file?")
        return start, self._core_text_end

def _is_pseudo_module(obj: str) -> bool:
    return obj.startswith("__builtin__") or obj == "bpf"


#: vmlinux data symbols worth keeping: where the jump label table is (jumplabels.py)...
DATA_SYMBOLS = frozenset({"__start___jump_table", "__stop___jump_table",
                          "linux_banner"})  # and what tells one build from another


def _parse_lines(lines: Iterable[str], source: str, symbols: SymbolColumns,
                 keep: _InitFilter, data: Optional[dict[str, int]] = None) -> int:
    """Add the text symbols of ``lines`` to ``symbols``, and vmlinux's DATA_SYMBOLS to
    ``data``; the address of vmlinux's _etext (0 if absent)."""
    etext = 0
    nonzero = False
    added = 0
    # Bound once: this loop runs for every line of a 100k+ line file.
    add_addr, add_name, add_object = (symbols.addrs.append, symbols.names.append,
                                      symbols.object_ids.append)
    last_obj, last_id = None, 0
    for line in lines:
        parts = line.split()
        if len(parts) < 3 or parts[1] not in ("t", "T"):
            if len(parts) == 3 and parts[2] == "_etext":  # arm64 types it D (data)
                try:
                    etext = int(parts[0], 16)
                except ValueError:
                    pass
            elif data is not None and len(parts) == 3 and parts[2] in DATA_SYMBOLS:
                try:
                    data[parts[2]] = int(parts[0], 16)
                except ValueError:
                    pass
            continue  # otherwise only text symbols (_etext is one)
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        if not 0 <= addr < _ADDRESS_LIMIT:  # "-1", or more digits than an address has
            continue
        name = parts[2]
        nonzero = nonzero or addr != 0
        obj = parts[3].strip("[]") if len(parts) > 3 else VMLINUX
        if obj != last_obj:  # lines come grouped by object
            last_obj, last_id = obj, symbols.object_id(obj)
        if name == "_etext" and obj == VMLINUX:
            etext = addr
        # __pfx_ padding symbols (6.2+) are kept: they end the function before.
        if obj == VMLINUX or keep(addr, obj):
            add_addr(addr)
            add_name(name.encode("utf-8", "surrogateescape"))
            add_object(last_id)
            added += 1
    if not nonzero and added:
        raise PermissionProblem(
            f"{source} shows only zero addresses: run as root "
            "(or lower kernel.kptr_restrict)"
        )
    return etext


class _InitFilter:
    """Drops symbols of module init sections (see :class:`_Sections`); keeps all without
    a sysfs to look in."""

    def __init__(self, sysfs: Optional[Path]) -> None:
        self._sysfs = sysfs
        self._sections: dict[str, _Sections] = {}

    def __call__(self, addr: int, obj: str) -> bool:
        if self._sysfs is None or obj == VMLINUX:
            return True
        sections = self._sections.get(obj)
        if sections is None:
            sections = self._sections[obj] = _Sections.of(obj, self._sysfs)
        return not sections.is_init(addr)


class _Sections:
    """Where a module's ELF sections were placed (/sys/module/NAME/sections, root only).

    Right after a module goes live, kallsyms still lists its init functions for a while
    (seen on 7.2), although their memory is freed and often handed to the next module;
    symbols kept from then would later claim that module's code.  A symbol lies in the
    section with the greatest start at or below it; those in ``.init*`` are dropped.
    """

    def __init__(self, starts: list[tuple[int, str]]) -> None:
        self._starts = sorted(starts)
        self._addresses = [start for start, _name in self._starts]

    @classmethod
    def of(cls, module: str, sysfs: Path) -> _Sections:
        starts = []
        try:
            for entry in (sysfs / module / "sections").iterdir():
                try:
                    starts.append((int(entry.read_text(), 16), entry.name))
                except (OSError, ValueError):
                    continue
        except OSError:
            pass  # no sysfs (or not root): nothing is filtered
        return cls(starts)

    def is_init(self, addr: int) -> bool:
        i = bisect.bisect_right(self._addresses, addr) - 1
        return i >= 0 and self._starts[i][1].startswith(".init")
