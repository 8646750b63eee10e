"""Tests of btf.Btf against the running kernel's BTF and our own test BPF object.

Answers are cross-checked against sources that share no code with btf.py: a small raw-BTF
parser written here, and (where bpftool is installed) clang compiling static assertions
against bpftool's C dump of the same BTF.
"""

from __future__ import annotations

import ctypes
import errno
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import pytest

from tests.bpf import selftest
from tests.support.require import not_applicable
from xfrmtrace.bpf import btf as btf_mod
from xfrmtrace.bpf.btf import Btf, BtfKind, Param, VarLocation
from xfrmtrace.errors import BtfLookupError, InputError, KernelFeatureMissing, LibbpfError

VMLINUX = Path(btf_mod.VMLINUX_BTF_PATH)


def _why_no_kernel_btf() -> Optional[str]:
    if not VMLINUX.exists():
        return f"{VMLINUX} missing: this kernel has no BTF"
    try:
        from xfrmtrace.bpf.objects import api
        api()
    except LibbpfError as exc:
        return str(exc)
    return None


needs_kernel_btf = pytest.mark.skipif(_why_no_kernel_btf() is not None,
                                      reason=str(_why_no_kernel_btf()))


@pytest.fixture(scope="module")
def kernel() -> Iterator[Btf]:
    reason = _why_no_kernel_btf()
    if reason:
        pytest.skip(reason)
    btf = Btf.vmlinux()
    yield btf
    btf.close()


@pytest.fixture(scope="module")
def obj_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/bpf/selftest.bpf.o, freshly built."""
    reason = selftest.why_not_buildable() or _why_no_kernel_btf()
    if reason:
        pytest.skip(reason)
    return selftest.build(tmp_path_factory.mktemp("bpf"))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def obj_btf(obj_path: Path) -> Iterator[Btf]:
    """BTF of tests/bpf/selftest.bpf.o, read from the ELF file."""
    btf = Btf.from_file(obj_path)
    yield btf
    btf.close()


# --- an independent reader of raw BTF (uapi/linux/btf.h), for cross-checks ---------------------

class RawType(NamedTuple):
    kind: int
    name: str
    kflag: bool
    ref: int  # the size/type union
    records: list[tuple[Any, ...]]


def _parse_raw_btf(data: bytes) -> list[Optional[RawType]]:
    """Every type of a little-endian raw BTF blob, indexed by type id (0 is void)."""
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    assert magic == 0xEB9F
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    strings = data[hdr_len + str_off:hdr_len + str_off + str_len]

    def name(off: int) -> str:
        return strings[off:strings.index(b"\0", off)].decode()

    # kind -> (bytes per record, struct format, count is vlen?) of the trailing data
    trailing = {1: ("<I", False), 3: ("<III", False), 4: ("<III", True), 5: ("<III", True),
                6: ("<Ii", True), 13: ("<II", True), 14: ("<I", False), 15: ("<III", True),
                17: ("<i", False), 19: ("<III", True)}
    types: list[Optional[RawType]] = [None]
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    while pos < end:
        name_off, info, ref = struct.unpack_from("<III", data, pos)
        pos += 12
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        fmt, per_member = trailing.get(kind, ("", False))
        count = (vlen if per_member else 1) if fmt else 0
        records = [struct.unpack_from(fmt, data, pos + i * struct.calcsize(fmt))
                   for i in range(count)]
        pos += count * struct.calcsize(fmt) if fmt else 0
        if kind in (4, 5, 6, 13, 19):
            records = [(name(r[0]), *r[1:]) for r in records]
        types.append(RawType(kind, name(name_off), bool(info >> 31), ref, records))
    return types


@pytest.fixture(scope="module")
def raw_kernel() -> list[Optional[RawType]]:
    if not VMLINUX.exists():
        pytest.skip(f"{VMLINUX} missing")
    return _parse_raw_btf(VMLINUX.read_bytes())


def _raw_find(types: list[Optional[RawType]], name: str, kind: int) -> RawType:
    return next(t for t in types if t is not None and t.kind == kind and t.name == name)


def _raw_member_bits(types: list[Optional[RawType]], composite: RawType,
                     member: str) -> tuple[int, RawType]:
    for m_name, m_type, m_offset in composite.records:
        if m_name == member:
            target = types[m_type]
            while target is not None and target.kind in (8, 9, 10, 11, 18):
                target = types[target.ref]
            assert target is not None
            return (m_offset & 0xFFFFFF if composite.kflag else m_offset), target
    raise AssertionError(f"{composite.name} has no {member}")


# --- kernel BTF ---------------------------------------------------------------------------------

def test_member_offset_of_xfrm_statistics_matches_raw_btf(
        kernel: Btf, raw_kernel: list[Optional[RawType]]) -> None:
    net = _raw_find(raw_kernel, "net", 4)
    mib_bits, netns_mib = _raw_member_bits(raw_kernel, net, "mib")
    stats_bits, _ = _raw_member_bits(raw_kernel, netns_mib, "xfrm_statistics")
    assert kernel.member_offset("net", "mib.xfrm_statistics") == (mib_bits + stats_bits) // 8
    assert kernel.member_offset("struct net", "mib") == mib_bits // 8


def test_enum_values_of_xfrm_counters(kernel: Btf, raw_kernel: list[Optional[RawType]]) -> None:
    values = kernel.enum_values(containing="LINUX_MIB_XFRMNUM")
    raw_enum = next(t for t in raw_kernel if t is not None and t.kind in (6, 19)
                    and any(r[0] == "LINUX_MIB_XFRMNUM" for r in t.records))
    assert values == {r[0]: r[1] for r in raw_enum.records}
    # Stable since the counters were introduced (2.6.24); later kernels only append.
    assert values["LINUX_MIB_XFRMNUM"] == 0
    assert values["LINUX_MIB_XFRMINERROR"] == 1
    assert values["LINUX_MIB_XFRMINNOSTATES"] == 4
    assert values["LINUX_MIB_XFRMOUTNOSTATES"] == 18
    assert len(values) >= 29  # 28 counters (6.1) + the __LINUX_MIB_XFRMMAX sentinel
    assert all(n.startswith(("LINUX_MIB_XFRM", "__LINUX_MIB_XFRMMAX")) for n in values)
    assert sorted(values.values()) == list(range(len(values)))


def test_func_params_of_xfrm_input(kernel: Btf, raw_kernel: list[Optional[RawType]]) -> None:
    assert kernel.func_params("xfrm_input") == [
        ("skb", "struct sk_buff *"),
        ("nexthdr", "int"),
        ("spi", "__be32"),
        ("encap_type", "int"),
    ]
    proto = raw_kernel[_raw_find(raw_kernel, "xfrm_input", 12).ref]
    assert proto is not None
    params = kernel.func_params("xfrm_input")
    assert params is not None and [p.name for p in params] == [r[0] for r in proto.records]
    assert isinstance(params[0], Param)


def test_func_params_of_xfrm_lookup_with_ifid(kernel: Btf) -> None:
    params = kernel.func_params("xfrm_lookup_with_ifid")
    if params is None:
        not_applicable("xfrm_lookup_with_ifid is not in this kernel's BTF (added in 5.10)")
    assert params == [
        ("net", "struct net *"),
        ("dst_orig", "struct dst_entry *"),
        ("fl", "const struct flowi *"),
        ("sk", "const struct sock *"),
        ("flags", "int"),
        ("if_id", "u32"),
    ]


def test_func_params_normalizes_integer_and_function_pointer_types(kernel: Btf) -> None:
    params = kernel.func_params("__xfrm_policy_check")
    assert params is not None
    assert params[-1] == ("family", "unsigned short")
    walk = kernel.func_params("xfrm_state_walk")
    assert walk is not None
    assert ("func", "int (*)(struct xfrm_state *, int, void *)") in walk


def test_func_params_of_unknown_function_is_none(kernel: Btf) -> None:
    assert kernel.func_params("no_such_function_xfrmtrace") is None


def test_member_offset_through_anonymous_unions(kernel: Btf,
                                                raw_kernel: list[Optional[RawType]]) -> None:
    # sk_buff.dev sits inside `union { struct { next; prev; union { dev; ... }; }; ... }`.
    offset = kernel.member_offset("sk_buff", "dev")
    assert offset == 16
    skb = _raw_find(raw_kernel, "sk_buff", 4)
    assert "dev" not in [r[0] for r in skb.records], "dev should be in an anonymous member"


def test_struct_layout_and_size_of_known_structs(kernel: Btf) -> None:
    assert kernel.struct_layout("list_head") == {"next": (0, 8), "prev": (8, 8)}
    assert kernel.struct_layout("udphdr") == {
        "source": (0, 2), "dest": (2, 2), "len": (4, 2), "check": (6, 2)}
    assert kernel.struct_layout("struct xfrm_id") == {
        "daddr": (0, 16), "spi": (16, 4), "proto": (20, 1)}
    assert kernel.type_size("xfrm_id") == 24
    assert kernel.type_size("u32") == 4
    assert kernel.type_size("xfrm_address_t") == 16


def test_missing_names_raise_typed_lookup_errors(kernel: Btf) -> None:
    with pytest.raises(BtfLookupError, match="^struct net has no mib.no_such_counter$"):
        kernel.member_offset("net", "mib.no_such_counter")
    with pytest.raises(BtfLookupError, match="struct net has no mib.xfrm_statistics.x"):
        kernel.member_offset("net", "mib.xfrm_statistics.x")  # through a pointer: not a member
    with pytest.raises(BtfLookupError, match="no_such_struct"):
        kernel.member_offset("no_such_struct", "a")
    with pytest.raises(LookupError):
        kernel.enum_values(containing="NO_SUCH_ENUMERATOR_XFRMTRACE")
    with pytest.raises(BtfLookupError):
        kernel.struct_layout("no_such_struct")
    with pytest.raises(BtfLookupError):
        kernel.type_size("no_such_type")
    with pytest.raises(BtfLookupError, match="bitfield"):
        kernel.struct_layout("iphdr")  # ihl:4, version:4


def test_cross_check_with_clang_on_bpftool_c_dump(kernel: Btf, tmp_path: Path) -> None:
    bpftool, clang = shutil.which("bpftool"), shutil.which("clang")
    if bpftool is None or clang is None:
        pytest.skip("needs bpftool and clang (Debian packages bpftool, clang)")
    header = tmp_path / "kernel.h"
    with header.open("w") as out:
        subprocess.run([bpftool, "btf", "dump", "file", str(VMLINUX), "format", "c"],
                       stdout=out, check=True)
    checks = [
        ("__builtin_offsetof(struct net, mib.xfrm_statistics)",
         kernel.member_offset("net", "mib.xfrm_statistics")),
        ("__builtin_offsetof(struct sk_buff, dev)", kernel.member_offset("sk_buff", "dev")),
        ("sizeof(struct net)", kernel.type_size("net")),
        ("sizeof(struct xfrm_state)", kernel.type_size("xfrm_state")),
    ]
    for member, (offset, size) in kernel.struct_layout("xfrm_id").items():
        checks.append((f"__builtin_offsetof(struct xfrm_id, {member})", offset))
        checks.append((f"sizeof(((struct xfrm_id *)0)->{member})", size))
    checks += list(kernel.enum_values(containing="LINUX_MIB_XFRMNUM").items())
    source = [f'#include "{header}"']
    source += [f'_Static_assert({expr} == {value}, "{expr}");' for expr, value in checks]
    (tmp_path / "check.c").write_text("\n".join(source) + "\n")
    result = subprocess.run([clang, "-fsyntax-only", "-target", "bpf", str(tmp_path / "check.c")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def test_vmlinux_without_btf_is_kernel_feature_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_btf() -> int:
        raise OSError(errno.ESRCH, "btf__load_vmlinux_btf(): No such process")

    monkeypatch.setattr(btf_mod, "_load_vmlinux_handle", no_btf)
    with pytest.raises(KernelFeatureMissing, match=r"^kernel has no BTF \(CONFIG_DEBUG_INFO_BTF\)"):
        Btf.vmlinux()


@needs_kernel_btf
def test_raw_btf_file_and_module_lookup() -> None:
    with Btf.from_file(VMLINUX) as raw:
        assert raw.find("net", BtfKind.STRUCT) is not None
        assert Btf.module("no_such_module_xfrmtrace", raw) is None
        assert Btf.module("../vmlinux", raw) is None
    with pytest.raises(LibbpfError, match="closed"):
        raw.find("net", BtfKind.STRUCT)
    raw.close()  # twice is fine


def test_closing_a_base_closes_its_split_btf(obj_path: Path) -> None:
    # Any BTF parses as split on a base; what matters is that the split dies with its base.
    with Btf.from_file(VMLINUX) as base:
        split = Btf.from_file(obj_path, base=base)
        assert split.type_count > base.type_count
    with pytest.raises(LibbpfError, match="closed"):
        split.find("selftest_event", BtfKind.STRUCT)


@needs_kernel_btf
def test_from_file_errors_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        Btf.from_file(tmp_path / "missing")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF not really")
    with pytest.raises(InputError, match="cannot read BTF"):
        Btf.from_file(garbage)
    without_btf = shutil.which("true") or "/bin/true"
    with pytest.raises(InputError, match="without a .BTF section"):
        Btf.from_file(without_btf)


# --- our own BPF object --------------------------------------------------------------------------

def _ctypes_layout(cls: Any) -> dict[str, tuple[int, int]]:
    names = [field[0] for field in cls._fields_]
    return {name: (getattr(cls, name).offset, getattr(cls, name).size) for name in names}


def test_python_mirrors_match_object_btf(obj_btf: Btf) -> None:
    for c_name, mirror in (("selftest_event", selftest.SelftestEvent),
                           ("selftest_cfg", selftest.SelftestCfg)):
        assert obj_btf.struct_layout(c_name) == _ctypes_layout(mirror), c_name
        assert obj_btf.type_size(f"struct {c_name}") == ctypes.sizeof(mirror), c_name


def test_anonymous_members_are_flattened(obj_btf: Btf) -> None:
    assert obj_btf.struct_layout("selftest_anon") == {
        "first": (0, 8), "as_u32": (8, 4), "as_u16": (8, 2), "inner_a": (12, 4), "named": (16, 2)}
    assert obj_btf.member_offset("selftest_anon", "named.deep") == 16
    assert obj_btf.member_offset("selftest_anon", "inner_a") == 12


def test_bitfields_are_refused(obj_btf: Btf) -> None:
    with pytest.raises(BtfLookupError, match="bitfield"):
        obj_btf.struct_layout("selftest_bits")
    with pytest.raises(BtfLookupError, match="bitfield"):
        obj_btf.member_offset("selftest_bits", "high")
    with pytest.raises(BtfLookupError, match="bitfield"):
        obj_btf.member_offset("selftest_bits", "low")  # byte-aligned, but still a bitfield


def test_find_var_in_rodata(obj_btf: Btf) -> None:
    location = obj_btf.find_var("cfg", section_prefix=".rodata")
    assert location == VarLocation(".rodata", 0, ctypes.sizeof(selftest.SelftestCfg))
    with pytest.raises(BtfLookupError):
        obj_btf.find_var("btf_anchor_event", section_prefix=".rodata")  # it is in .bss


def test_ctypes_mirrors_match_uapi_header(tmp_path: Path) -> None:
    clang = shutil.which("clang")
    if clang is None or not Path("/usr/include/linux/btf.h").exists():
        pytest.skip("needs clang and /usr/include/linux/btf.h (linux-libc-dev)")
    mirrors = {"btf_type": btf_mod.BtfType, "btf_member": btf_mod.BtfMember,
               "btf_enum": btf_mod.BtfEnum, "btf_enum64": btf_mod.BtfEnum64,
               "btf_param": btf_mod.BtfParam, "btf_array": btf_mod.BtfArray,
               "btf_var_secinfo": btf_mod.BtfVarSecinfo}
    lines = ["#include <stddef.h>", "#include <linux/btf.h>"]
    for c_name, mirror in mirrors.items():
        lines.append(f'_Static_assert(sizeof(struct {c_name}) == {ctypes.sizeof(mirror)}, '
                     f'"{c_name}");')
        for field in (f[0] for f in mirror._fields_):
            c_field = "size" if field == "size_or_type" else field
            lines.append(f"_Static_assert(offsetof(struct {c_name}, {c_field}) == "
                         f'{getattr(mirror, field).offset}, "{c_name}.{field}");')
    lines += [f'_Static_assert(BTF_KIND_{kind.name} == {kind.value}, "{kind.name}");'
              for kind in BtfKind]
    (tmp_path / "mirror.c").write_text("\n".join(lines) + "\n")
    result = subprocess.run([clang, "-fsyntax-only", str(tmp_path / "mirror.c")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
