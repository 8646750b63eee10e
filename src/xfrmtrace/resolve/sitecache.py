"""On-disk cache of resolved sites, one file per (object, GNU build id).

Entries hold positions relative to symbols, so they survive KASLR and module
reloads.  Loading re-checks every site's instruction bytes against the live
text: a corrupted, truncated or foreign file is detected and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from xfrmtrace.bpf.abi import XT_ARG_STACK_MAX
from xfrmtrace.kernel.view import KernelView
from xfrmtrace.resolve.model import REGISTER_SLOTS, AuditEntry, RecordPoint, Resolution, Site

log = logging.getLogger("xfrmtrace.resolve.sitecache")

FORMAT = 8  # bump when Site/AuditEntry or the resolver's rules change
_NT_GNU_BUILD_ID = 3


def default_cache_dir() -> Path:
    """$XFRMTRACE_CACHE_DIR, else /var/cache/xfrmtrace as root, else the XDG cache."""
    env = os.environ.get("XFRMTRACE_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/xfrmtrace")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xfrmtrace"


def parse_build_id(notes: bytes) -> Optional[str]:
    """The GNU build id (hex) in a blob of ELF notes, as in /sys/kernel/notes."""
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        pos += 12
        name = notes[pos:pos + namesz]
        pos += (namesz + 3) & ~3
        desc = notes[pos:pos + descsz]
        pos += (descsz + 3) & ~3
        if kind == _NT_GNU_BUILD_ID and name.rstrip(b"\0") == b"GNU" and len(desc) == descsz:
            return desc.hex() if desc else None
    return None


def _read_build_id(path: Path) -> Optional[str]:
    try:
        return parse_build_id(path.read_bytes())
    except OSError:
        return None


def kernel_build_id() -> Optional[str]:
    return _read_build_id(Path("/sys/kernel/notes"))


def module_build_id(module: str) -> Optional[str]:
    return _read_build_id(Path("/sys/module") / module / "notes" / ".note.gnu.build-id")


class SiteCache:
    """Reads and writes cached resolutions in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, obj: str, build_id: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", obj)
        return self.directory / f"{safe}-{build_id}.json"

    def load(self, obj: str, build_id: str, view: KernelView) -> Optional[Resolution]:
        """The cached resolution, or None when absent, unreadable or not matching the text."""
        path = self._path(obj, build_id)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError(f"a JSON {type(data).__name__}, not an object")
            if data.get("format") != FORMAT or data.get("object") != obj:
                raise ValueError("format or object mismatch")
            result = Resolution(
                sites=[self._site(obj, s, view) for s in data["sites"]],
                audit=[self._audit(obj, a, view) for a in data["audit"]],
            )
        except (FileNotFoundError, NotADirectoryError):  # the directory's problem: see store()
            return None
        except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as err:
            log.warning("site cache %s is unusable (%s): resolving again", path, err)
            return None
        return result

    def store(self, obj: str, build_id: str, result: Resolution) -> None:
        """Write atomically; a cache that cannot be written only costs time."""
        path = self._path(obj, build_id)
        data = {
            "format": FORMAT,
            "object": obj,
            "sites": [self._relative(asdict(s)) for s in result.sites],
            "audit": [self._relative(asdict(a)) for a in result.audit],
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(path)
        except OSError as err:
            log.warning("cannot write site cache %s: %s", path, err)

    @staticmethod
    def _relative(record: dict[str, Any]) -> dict[str, Any]:
        record.pop("address", None)  # rebuilt from the symbol at load time
        return record

    @staticmethod
    def _address(obj: str, record: dict[str, Any], view: KernelView) -> int:
        start = view.syms.address(record["function"], obj)
        if start is None:
            raise ValueError(f"function {record['function']} is not in kallsyms")
        address = int(start) + int(record["offset"])
        # Symbols decide where a function ends; a record written from a wrong view of them
        # (a neighbouring module that was not yet visible) must not outlive that view.
        func = view.syms.lookup(address)
        if func is None or (func.name, func.object) != (record["function"], obj):
            raise ValueError(f"{record['function']}+{int(record['offset']):#x} is outside "
                             "that function")
        return address

    def _site(self, obj: str, record: dict[str, Any], view: KernelView) -> Site:
        address = self._address(obj, record, view)
        fields = {k: v for k, v in record.items() if k != "address"}
        known = REGISTER_SLOTS[view.machine]
        for name in ("mib_reg", "net_reg", "cpu_reg"):
            if fields.get(name) is not None and fields[name] not in known:
                raise ValueError(f"bad {name} {fields[name]!r}")
        fields["arg_regs"] = _registers(fields.get("arg_regs", ()), known)
        fields["arg_stack"] = _stack_offsets(fields.get("arg_stack", ()))
        if not isinstance(fields.get("hw_breakpoint", False), bool):
            raise ValueError(f"bad hw_breakpoint {fields['hw_breakpoint']!r}")
        points = fields.get("records", [])
        if not isinstance(points, list):
            raise ValueError(f"bad record point list {points!r}")
        fields["records"] = tuple(RecordPoint(offset=_int(point["offset"]),
                                              depth=_int(point["depth"]),
                                              registers=_registers(point["registers"], known))
                                  for point in points)
        site = Site(address=address, **fields)
        self._check_instruction(site, view)
        return site

    def _audit(self, obj: str, record: dict[str, Any], view: KernelView) -> AuditEntry:
        return AuditEntry(address=self._address(obj, record, view), **record)

    @staticmethod
    def _check_instruction(site: Site, view: KernelView) -> None:
        """The cached site must still hold the very instruction it was resolved from (or
        hold it under someone else's kprobe)."""
        if not resolved_or_probed(site, view.text.read):
            raise ValueError(f"instruction at {site.label} differs from the cached one")


def _registers(value: Any, known: dict[str, int]) -> tuple[Optional[str], ...]:
    """A cached argument-slot -> register list, checked against the machine's ``known``
    registers (no stack pointer among them): it ends up in BPF maps."""
    if not isinstance(value, list) or len(value) not in (0, 6):
        raise ValueError(f"bad register list {value!r}")
    for name in value:
        if name is not None and name not in known:
            raise ValueError(f"bad register {name!r}")
    return tuple(value)


def _stack_offsets(value: Any) -> tuple[Optional[int], ...]:
    """A cached argument-slot -> stack offset list, checked: it ends up in BPF maps (u16)."""
    if not isinstance(value, list) or len(value) not in (0, 6):
        raise ValueError(f"bad stack offset list {value!r}")
    for offset in value:
        if offset is not None and not (isinstance(offset, int) and not isinstance(offset, bool)
                                       and 0 <= offset <= XT_ARG_STACK_MAX):
            raise ValueError(f"bad stack offset {offset!r}")
    return tuple(value)


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"bad number {value!r}")
    return value


KPROBE_INT3 = 0xCC  # x86 breakpoint, a kprobe's first form
KPROBE_JMP = 0xE9  # jmp rel32, an optimized kprobe (CONFIG_OPTPROBES)
JMP_REL32_LEN = 5


def decodes_as_resolved(site: Site, read: Callable[[int, int], bytes]) -> bool:
    """True when the text at ``site`` still holds the bytes it was resolved from (not, say,
    a kprobe's int3 or jump).  Bytes, not disassembly: a warm start needs no disassembler."""
    code = _code(site)
    return bool(code) and read(site.address, len(code)) == code


def resolved_or_probed(site: Site, read: Callable[[int, int], bytes]) -> bool:
    """True when the text at ``site`` holds the bytes it was resolved from, or those bytes
    under another tracer's kprobe: a cached site is still good then.

    A kprobe writes int3 (0xcc) over the first byte of the instruction it probes and, once
    optimized, a 5-byte ``jmp rel32`` (0xe9) to its detour buffer; the other bytes stay.
    Another xfrmtrace (a second pod, a host run) or pwru, bpftrace or perf probe on the same
    site must not make the cache look stale: a resolution from scratch then sees no
    increment there at all.
    """
    code = _code(site)
    live = read(site.address, len(code)) if code else b""
    if not code or len(live) != len(code):
        return False
    if live == code or (live[0] == KPROBE_INT3 and live[1:] == code[1:]):
        return True
    # An instruction shorter than the jump is covered whole (with its neighbour): nothing
    # of it to compare, the address and the build (the cache's key) vouch for it.
    return live[0] == KPROBE_JMP and live[JMP_REL32_LEN:] == code[JMP_REL32_LEN:]


def _code(site: Site) -> bytes:
    try:
        return bytes.fromhex(site.code)
    except (TypeError, ValueError):
        return b""
