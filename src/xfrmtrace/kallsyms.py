"""Kernel symbol table (/proc/kallsyms format): function extents and address lookup."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from xfrmtrace.errors import InputError, PermissionProblem
from xfrmtrace.model import code_location

VMLINUX = "vmlinux"
PROC_KALLSYMS = Path("/proc/kallsyms")

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
        self._index(symbols)

    def _index(self, symbols: list[tuple[int, str, str]]) -> None:
        symbols = sorted(set(symbols))
        self._addrs = [s[0] for s in symbols]
        self._names = [s[1] for s in symbols]
        self._objects = [s[2] for s in symbols]
        self._by_name: dict[tuple[str, str], int] = {}
        # Symbol indices per object, so listing one module's functions does not scan them all.
        self._by_object: dict[str, list[int]] = {}
        for i, (_addr, name, obj) in enumerate(symbols):
            self._by_name.setdefault((name, obj), i)
            self._by_object.setdefault(obj, []).append(i)

    # --- loading -----------------------------------------------------------

    @classmethod
    def load(cls, path: Union[str, Path] = PROC_KALLSYMS) -> Kallsyms:
        """Parse a kallsyms file; the live one needs root to show real addresses."""
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as err:
            raise InputError(f"cannot read {path}: {err.strerror}") from err
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "kallsyms") -> Kallsyms:
        symbols, etext = _parse_lines(text.splitlines(), source)
        if not symbols:
            raise InputError(f"{source} has no text symbols: is it a kallsyms file?")
        return cls(symbols, core_text_end=etext)

    def refresh_modules(self, modules: Iterable[str], path: Union[str, Path] = PROC_KALLSYMS,
                        sysfs: Path = Path("/sys/module")) -> None:
        """Re-read the symbols of ``modules``: loaded, reloaded elsewhere, or gone.

        Only those modules' lines are parsed, so a module load costs a read of
        kallsyms, not a re-parse of all of it.
        """
        names = set(modules)
        if not names:
            return
        # Read before kallsyms: the kernel drops init symbols from kallsyms before it
        # zeroes the init size, so a non-zero size read first covers whatever we see.
        init_text = {name: _init_text(name, sysfs) for name in names}
        try:
            text = Path(path).read_text(errors="replace")
        except OSError as err:
            raise InputError(f"cannot read {path}: {err.strerror}") from err
        suffixes = tuple(f"[{name}]" for name in names)
        lines = [line for line in text.splitlines() if line.endswith(suffixes)]
        fresh = [(addr, name, obj) for addr, name, obj in _parse_lines(lines, str(path))[0]
                 if not init_text[obj][0] <= addr < init_text[obj][1]]
        kept = [(a, n, o) for a, n, o in zip(self._addrs, self._names, self._objects)
                if o not in names]
        self._index(kept + fresh)

    # --- queries -----------------------------------------------------------

    def objects(self) -> list[str]:
        """``vmlinux`` first, then module names in order of address."""
        return [VMLINUX, *(obj for obj in self._by_object if obj != VMLINUX)]

    def functions(self, obj: Optional[str] = None) -> Iterator[Function]:
        """Every text symbol (of one object, if given) with its extent."""
        indices = range(len(self._names)) if obj is None else self._by_object.get(obj, [])
        for i in indices:
            if not self._names[i].startswith("__pfx_"):
                yield self._function_at(i)

    def find(self, name: str, obj: str = VMLINUX) -> Optional[Function]:
        """The function named ``name`` in ``obj``."""
        i = self._by_name.get((name, obj))
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
        i = self._by_name.get((name, obj))
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


def _init_text(module: str, sysfs: Path) -> tuple[int, int]:
    """[start, end) of a module's init text while it still has one, else (0, 0).

    A module that has just gone live still lists its init functions in kallsyms for a
    moment; that memory is freed right after and the next module is often loaded
    there, so symbols kept from it would later claim that module's code.
    """
    try:
        size = int((sysfs / module / "initsize").read_text())
        start = int((sysfs / module / "sections" / ".init.text").read_text(), 16)
    except (OSError, ValueError):
        return 0, 0
    return (start, start + size) if size > 0 else (0, 0)
