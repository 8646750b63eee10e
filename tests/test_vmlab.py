"""The VM harness boots again when the guest kernel dies before the command starts.

Under TCG a kernel sometimes oopses on an int3 while it patches its own text during boot
(seen on 6.12: CI's deploy VM died at 2.2 s, before anything of ours ran).  A stand-in for
vng (``XFRMTRACE_VNG``) plays such a boot: it prints a panic and exits while its attempt
count is below ``DIE``, otherwise it runs the guest script the way virtme would, on this
machine.  What is under test is run_in_vm's retry rule, not qemu.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vmlab.host import extramodules, vm
from vmlab.host.kernels import Kernel

FAKE_VNG = """#!{python}
import pathlib, subprocess, sys
tries = pathlib.Path("tries")  # vng runs in rwdir
attempt = int(tries.read_text()) + 1 if tries.exists() else 1
tries.write_text(str(attempt))
if attempt <= {die}:
    print("[    2.165107] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI")
    print("[    2.165446] Kernel panic - not syncing: Fatal exception in interrupt")
    sys.exit(1)
command = sys.argv[sys.argv.index("--exec") + 1]
sys.exit(subprocess.run(["sh", "-c", command]).returncode)
"""


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, die: int, command: str
         ) -> vm.VmResult:
    fake = tmp_path / "vng"
    fake.write_text(FAKE_VNG.format(python=sys.executable, die=die))
    fake.chmod(0o755)
    monkeypatch.setenv("XFRMTRACE_VNG", str(fake))
    monkeypatch.setattr(vm, "missing_requirements", lambda: [])  # no qemu is started
    kernel = Kernel(series="test", version="6.12-test", vmlinuz=tmp_path / "vmlinuz",
                    modules_dir=tmp_path / "modules")
    return vm.run_in_vm(kernel, command, rwdir=tmp_path / "rw", cwd=tmp_path, timeout=60)


def test_a_boot_that_dies_is_retried_once(tmp_path: Path, monkeypatch, capsys) -> None:
    result = _run(tmp_path, monkeypatch, die=1, command="echo hello")
    assert result.ok and result.output.strip() == "hello", result.describe()
    assert result.boot_failures == 1 and result.boot_seconds is not None
    assert result.boot_note == " (after 1 failed boot)"
    kept = tmp_path / "rw" / "console.log.boot-failure-1"
    assert "Kernel panic" in kept.read_text()
    assert "Kernel panic" not in result.console_log.read_text()
    assert "died while booting" in capsys.readouterr().err


def test_a_kernel_that_never_boots_fails_after_the_retry(tmp_path: Path, monkeypatch) -> None:
    result = _run(tmp_path, monkeypatch, die=5, command="true")
    assert not result.ok and result.returncode is None and result.boot_seconds is None
    assert result.boot_failures == vm.BOOT_ATTEMPTS - 1
    assert (tmp_path / "rw" / "tries").read_text() == str(vm.BOOT_ATTEMPTS)
    assert "Kernel panic" in result.describe()


def test_a_command_that_fails_is_not_run_again(tmp_path: Path, monkeypatch) -> None:
    """Once the command started, its failure is the result: a retry could hide a bug."""
    result = _run(tmp_path, monkeypatch, die=0, command="echo ran >> runs; exit 3")
    assert result.returncode == 3 and result.boot_failures == 0 and result.boot_note == ""
    assert (tmp_path / "runs").read_text() == "ran\n"


def _kernel(tmp_path: Path, version: str) -> Kernel:
    modules = tmp_path / "lib" / "modules" / version
    (modules / "kernel").mkdir(parents=True)
    return Kernel(series="sid", version=version, vmlinuz=tmp_path / "vmlinuz",
                  modules_dir=modules, package_version="1.0-1")


def test_iptfs_module_not_applicable_before_6_14(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(extramodules, "_build_iptfs", _no_build)
    why = extramodules.provide_iptfs(_kernel(tmp_path, "6.12.117+deb13-amd64"))
    assert why == "Linux 6.12.117+deb13-amd64 predates IP-TFS (Linux 6.14)"


def test_iptfs_module_a_kernel_ships_is_used_as_it_is(tmp_path: Path, monkeypatch) -> None:
    """A kernel with xfrm_iptfs.ko of its own (other distributions' config) builds nothing."""
    monkeypatch.setenv("XFRMTRACE_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(extramodules, "_build_iptfs", _no_build)
    kernel = _kernel(tmp_path, "7.2.13+deb14-amd64")
    shipped = kernel.modules_dir / "kernel" / "net" / "xfrm" / "xfrm_iptfs.ko.xz"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"")
    assert extramodules.provide_iptfs(kernel) is None


def test_iptfs_module_build_failure_says_what_failed(tmp_path: Path, monkeypatch) -> None:
    """A build that fails is an error naming the kernel (the scenario test fails with it)."""
    monkeypatch.setenv("XFRMTRACE_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(extramodules.ExtraModuleError, match="mmdebstrap is missing.*7.2.13"):
        extramodules.provide_iptfs(_kernel(tmp_path, "7.2.13+deb14-amd64"))


def _no_build(kernel: Kernel, dest: Path) -> None:
    raise AssertionError("nothing should be built")
