"""``xfrmtrace.bpf.abi`` against ``bpf/xfrm.h``: compiled by gcc, and as BTF of the built object.

The header is parsed here (names of structs, fields, enums and #defines), then a generated C
program prints what the compiler makes of each name.  Nothing is taken from abi.py's own
declarations, so a change on either side that is not made on the other fails a test.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type

import pytest

from xfrmtrace.bpf import abi
from xfrmtrace.errors import XfrmtraceError

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "bpf" / "xfrm.h"
# One object per machine (Makefile BPF_OBJS): both must carry the layout abi.py reads.
BPF_OBJECTS = {machine: ROOT / "src" / "xfrmtrace" / "bpf" / f"xfrm.{machine}.bpf.o"
               for machine in ("x86_64", "aarch64")}
INCLUDE_GUARD = "__XFRMTRACE_XFRM_H"

C_TO_CTYPES = {
    "__u8": ctypes.c_uint8,
    "__s8": ctypes.c_int8,
    "__u16": ctypes.c_uint16,
    "__s16": ctypes.c_int16,
    "__u32": ctypes.c_uint32,
    "__s32": ctypes.c_int32,
    "__u64": ctypes.c_uint64,
    "__s64": ctypes.c_int64,
    "char": ctypes.c_char,
}


@dataclass(frozen=True)
class CField:
    """One field declaration as written in the header."""

    ctype: str
    name: str
    dim: Optional[str]  # array dimension expression, None for scalars


@dataclass
class Header:
    """What the header declares, by name."""

    defines: List[str]
    enums: Dict[str, List[str]]  # enum name -> member names
    structs: Dict[str, List[CField]]


def parse_header(text: str) -> Header:
    """Names declared in xfrm.h; the values come from the compiler, not from this parser."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    defines = [
        name
        for name in re.findall(r"^#define\s+(\w+)", text, flags=re.M)
        if name != INCLUDE_GUARD
    ]
    enums = {
        name: re.findall(r"^\s*(\w+)\s*(?:=[^,]*)?,?\s*$", body, flags=re.M)
        for name, body in re.findall(r"enum\s+(\w+)\s*\{(.*?)\};", text, flags=re.S)
    }
    structs = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
        fields = [
            CField(ctype, fname, dim or None)
            for ctype, fname, dim in re.findall(r"(\w+)\s+(\w+)\s*(?:\[(\w+)\])?\s*;", body)
        ]
        assert len(fields) == body.count(";"), f"unparsed declaration in struct {name}"
        structs[name] = fields
    return Header(defines, enums, structs)


def c_program(header: Header) -> str:
    """A C program printing every size, offset and constant value of the header."""
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/types.h>",
        '#include "xfrm.h"',
        "int main(void)",
        "{",
    ]
    for struct, fields in header.structs.items():
        lines.append(f'\tprintf("size {struct} %zu\\n", sizeof(struct {struct}));')
        for f in fields:
            lines.append(
                f'\tprintf("field {struct} {f.name} %zu %zu\\n", '
                f"offsetof(struct {struct}, {f.name}), "
                f"sizeof(((struct {struct} *)0)->{f.name}));"
            )
    names = header.defines + [m for members in header.enums.values() for m in members]
    for name in names:
        lines.append(f'\tprintf("value {name} %lld\\n", (long long)({name}));')
    lines += ["\treturn 0;", "}"]
    return "\n".join(lines) + "\n"


@dataclass
class Compiled:
    """What gcc says about the header."""

    sizes: Dict[str, int]
    fields: Dict[str, Dict[str, Tuple[int, int]]]  # struct -> field -> (offset, size)
    values: Dict[str, int]


@pytest.fixture(scope="module")
def header() -> Header:
    return parse_header(HEADER.read_text())


@pytest.fixture(scope="module")
def compiled(header: Header, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (Debian package gcc)")
    work = tmp_path_factory.mktemp("abi")
    source = work / "layout.c"
    binary = work / "layout"
    source.write_text(c_program(header))
    build = subprocess.run(
        ["gcc", "-Wall", "-Wextra", "-Werror", f"-I{HEADER.parent}",
         "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    result = Compiled({}, {}, {})
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            result.sizes[rest[0]] = int(rest[1])
        elif kind == "field":
            result.fields.setdefault(rest[0], {})[rest[1]] = (int(rest[2]), int(rest[3]))
        else:
            result.values[rest[0]] = int(rest[1])
    return result


def test_header_has_no_implicit_padding(tmp_path: Path) -> None:
    """The header promises explicit padding: any padding the compiler adds is a bug."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (Debian package gcc)")
    source = tmp_path / "padded.c"
    source.write_text('#include <linux/types.h>\n#include "xfrm.h"\n')
    check = subprocess.run(
        ["gcc", "-fsyntax-only", "-Wpadded", "-Werror", f"-I{HEADER.parent}", str(source)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


def ctypes_layout(struct: Type[ctypes.Structure]) -> Dict[str, Tuple[int, int]]:
    """field -> (offset, size) of a ctypes Structure."""
    return {
        name: (getattr(struct, name).offset, getattr(struct, name).size)
        for name, *_ in struct._fields_
    }


def test_header_parse_finds_everything(header: Header) -> None:
    # Guards the parser itself: if it silently found nothing, the other tests would pass vacuously.
    assert "xt_event" in header.structs and len(header.structs["xt_event"]) > 30
    assert "XT_F_HAS_STACK" in header.defines
    assert "XT_CTX_FLOW" in header.enums["xt_context"]


def test_every_struct_is_mirrored(header: Header) -> None:
    assert set(abi.C_STRUCTS) == set(header.structs)


@pytest.mark.parametrize("struct", sorted(abi.C_STRUCTS))
def test_struct_layout_matches_gcc(struct: str, header: Header, compiled: Compiled) -> None:
    mirror = abi.C_STRUCTS[struct]
    assert [name for name, *_ in mirror._fields_] == [f.name for f in header.structs[struct]]
    assert ctypes.sizeof(mirror) == compiled.sizes[struct]
    assert ctypes_layout(mirror) == compiled.fields[struct]


@pytest.mark.parametrize("struct", sorted(abi.C_STRUCTS))
def test_struct_field_types_match_header(struct: str, header: Header, compiled: Compiled) -> None:
    # Sizes alone cannot tell __s32 from __u32 or char[16] from __u8[16].
    mirror = dict((name, ctype) for name, ctype, *_ in abi.C_STRUCTS[struct]._fields_)
    for f in header.structs[struct]:
        expected = C_TO_CTYPES[f.ctype]
        actual = mirror[f.name]
        if f.dim is None:
            assert actual is expected, f.name
        else:
            length = compiled.values.get(f.dim, None) if not f.dim.isdigit() else int(f.dim)
            assert length is not None, f"dimension {f.dim} of {f.name} is not a known constant"
            assert actual._type_ is expected and actual._length_ == length, f.name


def test_every_define_is_mirrored(header: Header, compiled: Compiled) -> None:
    for name in header.defines:
        assert getattr(abi, name, None) == compiled.values[name], name
    python_constants = {n for n in vars(abi) if n.startswith("XT_") and n.isupper()}
    assert python_constants == set(header.defines)


def test_every_enum_is_mirrored(header: Header, compiled: Compiled) -> None:
    assert set(abi.C_ENUMS) == set(header.enums)
    for enum_name, members in header.enums.items():
        mirror, prefix = abi.C_ENUMS[enum_name]
        expected = {m[len(prefix):]: compiled.values[m] for m in members}
        assert all(m.startswith(prefix) for m in members), enum_name
        assert {m.name: m.value for m in mirror} == expected, enum_name


def test_event_size_constant() -> None:
    assert abi.EVENT_SIZE == ctypes.sizeof(abi.XtEvent)


# --- BTF of the built BPF object -------------------------------------------------------------


def load_btf(machine: str) -> object:
    """The BTF of the built object, or a skip saying what is missing."""
    path = BPF_OBJECTS[machine]
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is not built yet (run `make bpf`)")
    try:
        from xfrmtrace.bpf.btf import Btf
    except ImportError as err:
        pytest.skip(f"xfrmtrace.bpf.btf is not available yet: {err}")
    return Btf.from_file(str(path))


@pytest.mark.parametrize("machine", sorted(BPF_OBJECTS))
@pytest.mark.parametrize("struct", sorted(abi.C_STRUCTS))
def test_struct_layout_matches_bpf_object_btf(struct: str, machine: str) -> None:
    """House rule 1: the layout the BPF program was compiled with is the one Python reads,
    in the object of every machine."""
    btf = load_btf(machine)
    try:
        layout = btf.struct_layout(struct)  # type: ignore[attr-defined]
    except XfrmtraceError as err:
        # clang emits BTF only for types that a global, map or function signature mentions.
        pytest.fail(f"{err}: anchor it in bpf/xfrm.bpf.c, e.g. "
                    f"`const struct {struct} *unused_{struct} __attribute__((unused));`")
    assert {name: tuple(v) for name, v in layout.items()} == ctypes_layout(abi.C_STRUCTS[struct])
    end = max(offset + size for offset, size in layout.values())
    assert end == ctypes.sizeof(abi.C_STRUCTS[struct])
