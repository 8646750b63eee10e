"""Kernel symbol table (/proc/kallsyms format): function extents and address lookup."""

from __future__ import annotations

import bisect
import logging
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from xfrmtrace.errors import InputError, PermissionProblem
from xfrmtrace.model import code_location

log = logging.getLogger("xfrmtrace.kallsyms")

VMLINUX = "vmlinux"
PROC_KALLSYMS = Path("/proc/kallsyms")
SYS_MODULE = Path("/sys/module")

# Module text is laid out by the module loader; past a module's last text
# symbol we have no end marker, so we assume at most this much code follows.
_LAST_SYMBOL_SPAN = 4096


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


class Kallsyms:
    """Text symbols of the kernel and its modules, sorted by address."""

    def __init__(self, symbols: list[tuple[int, str, str]], core_text_end: int = 0) -> None:
        """``symbols``: (address, name, object) of text symbols, any order."""
        self._core_text_end = core_text_end
        # Where the symbols came from, so refresh_modules() re-reads the same file.
        self.source_path: Path = PROC_KALLSYMS
        self.sysfs: Optional[Path] = None
        self._index(symbols)

    def _index(self, symbols: list[tuple[int, str, str]]) -> None:
        # Compact on purpose: a kernel with its modules has 100k-200k text symbols, and this
        # table is most of the tool's memory.  Addresses in an array (8 bytes each, not an int
        # object), object names interned, vmlinux names keyed by the name alone.
        symbols = sorted(symbols)  # duplicates (the same line twice) are dropped below
        unique = [s for i, s in enumerate(symbols) if i == 0 or s != symbols[i - 1]]
        del symbols
        self._addrs = array("Q", (s[0] for s in unique))
        self._names = [s[1] for s in unique]
        self._objects = [sys.intern(s[2]) for s in unique]
        del unique
        self._by_name: dict[str, int] = {}  # vmlinux
        self._by_module_name: dict[tuple[str, str], int] = {}
        # Symbol indices per object, so listing one module's functions does not scan them all.
        self._by_object: dict[str, array] = {}
        for i, (name, obj) in enumerate(zip(self._names, self._objects)):
            if obj == VMLINUX:
                self._by_name.setdefault(name, i)
            else:
                self._by_module_name.setdefault((name, obj), i)
            indices = self._by_object.get(obj)
            if indices is None:
                indices = self._by_object[obj] = array("I")
            indices.append(i)

    def _index_of(self, name: str, obj: str) -> Optional[int]:
        if obj == VMLINUX:
            return self._by_name.get(name)
        return self._by_module_name.get((name, obj))

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
        symbols, etext = _parse_lines(lines, source)
        if not symbols:
            raise InputError(f"{source} has no text symbols: is it a kallsyms file?")
        if sysfs is not None:
            sections = {obj: _Sections.of(obj, sysfs)
                        for obj in {o for _a, _n, o in symbols if o != VMLINUX}}
            symbols = [(a, n, o) for a, n, o in symbols
                       if o == VMLINUX or not sections[o].is_init(a)]
        return cls(symbols, core_text_end=etext)

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
        sysfs = sysfs or self.sysfs or SYS_MODULE
        sections = {name: _Sections.of(name, sysfs) for name in names}
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as err:
            raise InputError(f"cannot read {path}: {err.strerror}") from err
        suffixes = tuple(f"[{name}]" for name in names)
        lines = [line for line in text.splitlines() if line.endswith(suffixes)]
        fresh = [(addr, name, obj) for addr, name, obj in _parse_lines(lines, str(path))[0]
                 if not sections[obj].is_init(addr)]
        kept = [(a, n, o) for a, n, o in zip(self._addrs, self._names, self._objects)
                if o not in names]
        self._index(kept + fresh)

    # --- queries -----------------------------------------------------------

    def objects(self) -> list[str]:
        """``vmlinux`` first, then module names in order of address."""
        return [VMLINUX, *(obj for obj in self._by_object if obj != VMLINUX)]

    def functions(self, obj: Optional[str] = None) -> Iterator[Function]:
        """Every text symbol (of one object, if given) with its extent."""
        indices: Iterable[int] = (range(len(self._names)) if obj is None
                                  else self._by_object.get(obj, ()))
        for i in indices:
            if not self._names[i].startswith("__pfx_"):
                yield self._function_at(i)

    def find(self, name: str, obj: str = VMLINUX) -> Optional[Function]:
        """The function named ``name`` in ``obj``."""
        i = self._index_of(name, obj)
        return None if i is None else self._function_at(i)

    def lookup(self, addr: int) -> Optional[Function]:
        """The function containing ``addr``, or None."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        func = self._function_at(i)
        return func if func.start <= addr < func.end else None

    def symbolize(self, addr: int) -> str:
        """``func+0x1f`` (``[module]`` appended for module text), or the hex address."""
        func = self.lookup(addr)
        if func is None:
            return f"{addr:#x}"
        return code_location(func.name, addr - func.start, func.object)

    def address(self, name: str, obj: str = VMLINUX) -> Optional[int]:
        i = self._index_of(name, obj)
        return None if i is None else self._addrs[i]

    def core_text_range(self) -> tuple[int, int]:
        """[_stext, _etext) of vmlinux."""
        start = self.address("_stext") or self.address("_text")
        if start is None or not self._core_text_end:
            raise InputError("kallsyms lacks _stext/_etext: is it a complete kallsyms file?")
        return start, self._core_text_end

    def _function_at(self, i: int) -> Function:
        obj = self._objects[i]
        start = self._addrs[i]
        j = i + 1
        # Aliases share an address; the extent runs to the next distinct address.
        while j < len(self._addrs) and self._addrs[j] == start:
            j += 1
        if j < len(self._addrs) and self._objects[j] == obj:
            end = self._addrs[j]
        elif obj == VMLINUX and self._core_text_end > start:
            end = self._core_text_end
        else:
            end = start + _LAST_SYMBOL_SPAN
            if j < len(self._addrs):
                end = min(end, self._addrs[j])
        return Function(self._names[i], obj, start, end)


def _parse_lines(lines: Iterable[str], source: str) -> tuple[list[tuple[int, str, str]], int]:
    """Text symbols (address, name, object) and the address of vmlinux's _etext (0 if absent)."""
    symbols: list[tuple[int, str, str]] = []
    etext = 0
    nonzero = False
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        if not 0 <= addr < 1 << 64:  # "-1", or more digits than an address has
            continue
        kind, name = parts[1], parts[2]
        nonzero = nonzero or addr != 0
        obj = parts[3].strip("[]") if len(parts) > 3 else VMLINUX
        if name == "_etext" and obj == VMLINUX:
            etext = addr
        if kind in ("t", "T"):
            # __pfx_ padding symbols (6.2+) are kept: they end the function before.
            symbols.append((addr, name, obj))
    if not nonzero and symbols:
        raise PermissionProblem(
            f"{source} shows only zero addresses: run as root "
            "(or lower kernel.kptr_restrict)"
        )
    return symbols, etext


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
