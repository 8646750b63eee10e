"""Read kernel text: live from /proc/kcore, or offline from a vmlinux ELF file."""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import BinaryIO, Optional, Union

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile

from xfrmtrace.errors import InputError, KernelFeatureMissing, PermissionProblem
from xfrmtrace.kernel import arch

PROC_KCORE = Path("/proc/kcore")


class TextReader:
    """Reads bytes at kernel virtual addresses from the PT_LOAD segments of an ELF file.

    /proc/kcore and vmlinux are both ELF files whose program headers map
    virtual addresses to file offsets; only the source of the file and the
    KASLR slide differ.
    """

    def __init__(self, stream: BinaryIO, name: str, slide: int = 0) -> None:
        self._stream = stream
        self.name = name
        self.slide = slide  # added to the file's link addresses to get run-time ones
        try:
            elf = ELFFile(stream)
            segments = [
                (seg["p_vaddr"] + slide, seg["p_filesz"], seg["p_offset"])
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD" and seg["p_filesz"] > 0
            ]
        except (ELFError, OSError, ValueError) as err:
            raise InputError(f"{name} is not a readable ELF file: {err}") from err
        segments.sort()
        self._starts = [s[0] for s in segments]
        self._segments = segments

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at ``addr``; fewer if the mapping ends; b"" if unmapped."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return b""
        start, filesz, offset = self._segments[i]
        if addr >= start + filesz:
            return b""
        size = min(size, start + filesz - addr)
        self._stream.seek(offset + addr - start)
        return self._stream.read(size)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> TextReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_kcore(path: Union[str, Path] = PROC_KCORE) -> TextReader:
    """The running kernel's memory; needs root and CONFIG_PROC_KCORE."""
    try:
        stream = open(path, "rb")  # noqa: SIM115 - owned by the reader
    except FileNotFoundError as err:
        raise KernelFeatureMissing(
            f"{path} does not exist: kernel built without CONFIG_PROC_KCORE; "
            "resolve offline with --vmlinux FILE --kallsyms FILE"
        ) from err
    except PermissionError as err:
        raise PermissionProblem(f"cannot read {path}: run as root") from err
    if os.fstat(stream.fileno()).st_size == 0 and not stream.read(4):
        # A container runtime masks /proc/kcore with /dev/null; the real one has an ELF header.
        stream.close()
        raise PermissionProblem(
            f"{path} is masked (empty): in a container, mount the host's /proc elsewhere, "
            "e.g. /host/proc, and pass --host-proc /host/proc")
    return TextReader(stream, str(path))


def open_vmlinux(path: Union[str, Path], run_time_text: Optional[int] = None) -> TextReader:
    """An uncompressed vmlinux; ``run_time_text`` is ``_text`` from kallsyms (KASLR).

    The slide is run-time ``_text`` minus the link address of ``.text`` (the
    linker script puts ``_text`` at the start of ``.text``).
    """
    try:
        stream = open(path, "rb")  # noqa: SIM115 - owned by the reader
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from err
    slide = 0
    if run_time_text is not None:
        try:
            elf = ELFFile(stream)
            # _text is where the first code section starts: .text on x86-64, .head.text
            # on arm64 (.text begins at _stext there).
            executable = SH_FLAGS.SHF_ALLOC | SH_FLAGS.SHF_EXECINSTR
            code = [s["sh_addr"] for s in elf.iter_sections()
                    if s["sh_flags"] & executable == executable]
            has_text = elf.get_section_by_name(".text") is not None
        except (ELFError, OSError, ValueError) as err:
            stream.close()
            raise InputError(f"{path} is not a readable ELF file: {err}") from err
        if not has_text or not code:
            stream.close()
            raise InputError(f"{path} has no .text section: is it an uncompressed vmlinux?")
        slide = run_time_text - min(code)
    return TextReader(stream, str(path), slide)


def vmlinux_machine(path: Union[str, Path]) -> str:
    """The machine a vmlinux file is for (``x86_64``, ``aarch64``); InputError if it cannot
    be read, KernelFeatureMissing for one the resolver does not read."""
    try:
        with open(path, "rb") as stream:
            machine = arch.elf_machine(stream, str(path))
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from err
    arch.require_supported(machine)
    return machine


def vmlinux_has_btf(path: Union[str, Path]) -> bool:
    """Whether an ELF file carries a .BTF section (InputError if it cannot be read)."""
    try:
        with open(path, "rb") as stream:
            return ELFFile(stream).get_section_by_name(".BTF") is not None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from err
    except (ELFError, ValueError):
        return False
