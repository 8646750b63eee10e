"""Resolver benchmark on the host (no TCG): the kernel's own vmlinux plus the guest's kallsyms.

Debian's vmlinuz decompresses to an ELF vmlinux that keeps its ``.BTF`` section (symbols are
stripped; kallsyms from the running guest supplies them), which is exactly what
``xfrmtrace sites --vmlinux F --kallsyms F`` needs.  Offline, only vmlinux is resolved
(module text is not in the file).

Two figures:

- ``cli``: wall seconds of the real command, repeated, with the resolver's own share from its
  ``-v`` log;
- ``growth``: the resolver alone (``SiteResolver.resolve``) on the first 25/50/75/100 % of
  vmlinux text (``_stext`` up to a cut), to see how the time grows with text size.
"""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Sequence

from bench import stats

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def extract_vmlinux(vmlinuz: Path, dest: Path) -> Path:
    """Decompress a bzImage's payload into ``dest`` (kept: a second run reuses it)."""
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    kind, payload = stats.bzimage_payload(vmlinuz.read_bytes())
    # The kernel build appends the uncompressed size (le32) to every compressed payload.
    size = int.from_bytes(payload[-4:], "little")
    payload = payload[:-4]
    if kind == "zstd":
        data = subprocess.run(["zstd", "-dcq"], input=payload, stdout=subprocess.PIPE,
                              check=True).stdout
    elif kind == "xz":
        data = lzma.LZMADecompressor().decompress(payload)
    elif kind == "gzip":
        data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise ValueError(f"{vmlinuz}: {kind} payloads are not supported here")
    if len(data) != size or not data.startswith(b"\x7fELF"):
        raise ValueError(f"{vmlinuz}: the payload did not decompress to an ELF file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(dest)
    return dest


def time_cli(xfrmtrace: str, vmlinux: Path, kallsyms: Path, repeats: int) -> Dict[str, Any]:
    """``xfrmtrace sites --vmlinux --kallsyms`` ``repeats`` times."""
    walls: List[float] = []
    resolves: List[float] = []
    sites = None
    for _ in range(repeats):
        started = time.monotonic()
        proc = subprocess.run([xfrmtrace, "sites", "-v", "--vmlinux", str(vmlinux),
                               "--kallsyms", str(kallsyms), "--output", "json"],
                              capture_output=True, text=True, check=False)
        walls.append(time.monotonic() - started)
        if proc.returncode != 0:
            raise RuntimeError(f"xfrmtrace sites (offline) failed:\n{proc.stderr[-3000:]}")
        times = stats.resolver_log_times(proc.stderr)
        resolves.append(sum(times["objects"].values()))
        sites = sum(times["sites"].values())
    return {"wall": walls, "resolve": resolves, "sites": sites}


class _CutKallsyms:
    """A Kallsyms whose vmlinux text ends at ``end``: the resolver then sees only that much."""

    def __init__(self, syms: Any, end: int) -> None:
        self._syms, self._end = syms, end

    def core_text_range(self) -> tuple[int, int]:
        return self._syms.core_text_range()[0], self._end

    def __getattr__(self, name: str) -> Any:
        return getattr(self._syms, name)


def time_growth(vmlinux: Path, kallsyms: Path, repeats: int,
                fractions: Sequence[float] = FRACTIONS) -> List[Dict[str, Any]]:
    """Resolver seconds for growing prefixes of vmlinux text."""
    from xfrmtrace.kernel.kallsyms import VMLINUX
    from xfrmtrace.kernel.view import open_offline
    from xfrmtrace.resolve.sites import SiteResolver

    view = open_offline(vmlinux, kallsyms)
    rows = []
    try:
        start, end = view.syms.core_text_range()
        for fraction in fractions:
            cut = start + int((end - start) * fraction)
            syms = _CutKallsyms(view.syms, cut)
            seconds = []
            result = None
            for _ in range(repeats):
                resolver = SiteResolver(view.text.read, syms, view.model.mib_offset,
                                        view.model.counters)
                t0 = time.perf_counter()
                result = resolver.resolve([VMLINUX])
                seconds.append(time.perf_counter() - t0)
            assert result is not None
            rows.append({"fraction": fraction, "text_bytes": cut - start,
                         "seconds": seconds, "sites": len(result.sites),
                         "candidates": len(result.audit)})
    finally:
        view.close()
    return rows


_MEMORY_SCRIPT = r"""
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
steps = [("python", rss())]
import capstone
capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
steps.append(("+ capstone (libcapstone.so mapped)", rss()))
import elftools.elf.elffile
steps.append(("+ pyelftools", rss()))
import xfrmtrace.cli, xfrmtrace.output.jsonl, xfrmtrace.resolve.discovery, xfrmtrace.trace.tracer
steps.append(("+ xfrmtrace's own modules", rss()))
import pyroute2
steps.append(("+ pyroute2 (netlink follower)", rss()))
import xfrmtrace.session
from xfrmtrace.bpf.btf import Btf
btf = Btf.from_file(sys.argv[1])
from xfrmtrace.kernel.view import kernel_model
kernel_model(btf)
steps.append(("+ vmlinux BTF and counter model", rss()))
from xfrmtrace.kernel.kallsyms import Kallsyms
syms = Kallsyms.load(sys.argv[2])
steps.append(("+ the guest's kallsyms (%d text symbols)" % len(list(syms.functions())), rss()))
print(json.dumps(steps))
"""


def memory_steps(vmlinux: Path, kallsyms: Path) -> List[Any]:
    """Resident set (KiB) of a fresh interpreter after each part of the tool's start, on the
    host with the guest's kallsyms: where the tool's baseline RSS comes from."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(vmlinux), str(kallsyms)],
                          capture_output=True, text=True, check=True)
    return list(json.loads(proc.stdout))


def run(vmlinuz: Path, kallsyms: Path, work: Path, repeats: int = 3) -> Dict[str, Any]:
    xfrmtrace = str(Path(sys.executable).parent / "xfrmtrace")
    t0 = time.monotonic()
    vmlinux = extract_vmlinux(vmlinuz, work / f"vmlinux-{vmlinuz.name.replace('vmlinuz-', '')}")
    extract_seconds = time.monotonic() - t0
    sizes = stats.kallsyms_text_sizes(kallsyms.read_text(errors="replace"))
    return {
        "vmlinux": str(vmlinux),
        "vmlinux_bytes": os.path.getsize(vmlinux),
        "extract_seconds": round(extract_seconds, 2),
        "text_sizes": sizes,
        "cli": time_cli(xfrmtrace, vmlinux, kallsyms, repeats),
        "growth": time_growth(vmlinux, kallsyms, repeats),
        "memory": memory_steps(vmlinux, kallsyms),
    }
