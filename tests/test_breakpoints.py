"""Hardware breakpoints (kernel/breakpoints.py): the feature test and the CPU list.

Counting through a breakpoint is tested where it runs, in the arm64 VM lab
(tests/test_vm_trace.py: xfrm_input's two spin_locked increments are breakpoint sites on
Debian's arm64 6.12, and every scenario's counts must equal the kernel's).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from xfrmtrace.bpf.btf import Btf
from xfrmtrace.kernel import arch, breakpoints

needs_clang = pytest.mark.skipif(shutil.which("clang") is None,
                                 reason="clang (Debian clang) not installed")


def _btf_of(tmp_path, source: str) -> Btf:
    """The BTF clang writes for ``source`` (a BPF object's .BTF section)."""
    (tmp_path / "t.c").write_text(source)
    subprocess.run(["clang", "-g", "-O2", "-target", "bpf", "-c", "-o", tmp_path / "t.o",
                    tmp_path / "t.c"], check=True)
    return Btf.from_file(tmp_path / "t.o")


@needs_clang
@pytest.mark.parametrize("has_field, usable", [(True, False), (False, True)],
                         ids=["before-6.10", "6.10-on"])
def test_breakpoints_only_where_bpf_keeps_the_default_overflow_handler(tmp_path, has_field,
                                                                       usable) -> None:
    """A kernel whose struct perf_event still has orig_overflow_handler swaps in
    bpf_overflow_handler, and arm64 may then never step past the breakpoint."""
    field = "void *orig_overflow_handler;" if has_field else ""
    btf = _btf_of(tmp_path, f"struct perf_event {{ void *overflow_handler; {field} "
                  "void *prog; }; struct perf_event e; int unused(void) { return 0; }\n")
    try:
        reason = breakpoints.unsupported_reason(btf, arch.ARM64)
        assert (reason is None) == usable
        if not usable:
            assert reason and "6.10" in reason and "step" in reason
        assert "arm64 only" in (breakpoints.unsupported_reason(btf, arch.X86_64) or "")
    finally:
        btf.close()


def test_debian_arm64_6_12_can_count_through_breakpoints() -> None:
    """The committed arm64 vmlinux.h is Debian 6.12's BTF: no orig_overflow_handler."""
    from pathlib import Path

    header = (Path(__file__).parents[1] / "bpf" / "arm64" / "vmlinux.h").read_text()
    assert "struct perf_event {" in header and "orig_overflow_handler" not in header


@pytest.mark.parametrize("text, cpus", [("0\n", [0]), ("0-3\n", [0, 1, 2, 3]),
                                        ("0-1,4,6-7\n", [0, 1, 4, 6, 7])])
def test_online_cpus(tmp_path, text, cpus) -> None:
    path = tmp_path / "online"
    path.write_text(text)
    assert breakpoints.online_cpus(str(path)) == cpus


def test_perf_event_attr_is_the_kernels_version_1_layout() -> None:
    """PERF_ATTR_SIZE_VER1 (72 bytes) with bp_type, bp_addr and bp_len where
    include/uapi/linux/perf_event.h puts them."""
    attr = breakpoints.PerfEventAttr
    assert (attr.bp_type.offset, attr.bp_addr.offset, attr.bp_len.offset) == (52, 56, 64)
