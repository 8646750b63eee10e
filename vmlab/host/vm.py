"""Boot a kernel under qemu with virtme-ng and run one shell command in the guest.

The guest sees the host's root filesystem (read-only 9p, with throw-away overlays on /etc,
/usr, /var, /tmp ...), so the project's ``.venv`` python and the repository work inside the
guest at the same paths.  Only ``rwdir`` (and ``extra_rwdirs``) are shared read-write: that is
where the guest leaves its results.

Why the wrapping:

- virtme-ng's own exit status is useless here (255 even when the command succeeded, because
  virtme-ng-init falls back to the serial console for the script), so the guest command writes
  its exit status into ``rwdir/vm-exit-status``.
- The command is written into ``rwdir/vm-run.sh`` instead of being passed inline: ``--exec``
  travels on the kernel command line (limited to 2048 bytes, already half full with virtme's
  own parameters).
- ``--verbose`` is needed or the command's output never reaches us; the full console (kernel
  log included) is kept in ``rwdir/console.log``.
- ``--force-9p``: without virtiofsd installed, vng first waits several seconds for it.
- ``--rodir`` for the kernel tree: the guest mounts a fresh tmpfs over /var/cache, which hides
  the default lab cache, so modprobe would find no modules.
- TCG only (``--disable-kvm``): KVM guests hang on this kind of machine (see ENVIRONMENT.md).
- A kernel that dies before the command starts is booted once more (``BOOT_ATTEMPTS``):
  under TCG a kernel now and then oopses on an int3 while patching its own text at boot.

What the guest looks like (checked on 5.10, 6.1, 6.12 and 7.2 Debian kernels, virtme-ng 1.42):

- Root user; PATH is /sbin:/usr/sbin:/bin:/usr/bin:... without any venv: use absolute paths
  (``sys.executable``).  The host environment is not inherited (pass ``env``).
- Writable but thrown away at power-off: /etc, /usr (and /lib), /var, /tmp, /home, /opt, /srv
  (overlays); /run, /dev/shm, /var/tmp, /var/log, /var/cache (tmpfs).  ``ip netns add`` works
  (/run/netns).  Read-only: everything else on the host root, e.g. /root and the repository.
  Only ``rwdir`` / ``extra_rwdirs`` write through to the host.
- /proc/kcore, /proc/kallsyms (real addresses), /sys/kernel/btf/vmlinux, debugfs
  (/sys/kernel/debug) and tracefs (/sys/kernel/tracing, kprobe_events works) are there;
  lockdown is "none".  bpffs is not mounted: ``mount -t bpf bpf /sys/fs/bpf`` before pinning.
- Module autoloading works (veth, esp4, nf_tables ...).
- Python is slow: startup 2-12 s, CPU-bound code 5-25x slower than on the host, depending on
  how busy the host is.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, List, Mapping, Optional, Sequence

from vmlab.host import kernels
from vmlab.host.kernels import Kernel

#: Printed by the guest script first thing: its arrival on the console ends the boot phase.
START_MARKER = "@@vmlab: guest command starting"
OUTPUT_FILE = "vm-output.txt"
STATUS_FILE = "vm-exit-status"
SCRIPT_FILE = "vm-run.sh"
#: Boots tried when the kernel dies before the command starts (nothing of ours ran then).
BOOT_ATTEMPTS = 2
CONSOLE_FILE = "console.log"


class VmLabUnavailable(RuntimeError):
    """This machine cannot run the VM lab (missing qemu, virtme-ng, busybox ...)."""


@dataclass
class VmResult:
    """What one guest run produced.

    ``returncode`` is the guest command's exit status, or None if the guest never reported one
    (timeout, kernel panic, the VM failed to start: see ``console_log``).  ``output`` is the
    command's stdout and stderr only; ``seconds`` the wall time of the whole run (failed
    boots included) and ``boot_seconds`` the time until the command started (None if it
    never did).
    """

    returncode: Optional[int]
    output: str
    seconds: float
    boot_seconds: Optional[float]
    timed_out: bool
    console_log: Path
    boot_failures: int = 0  # boots that died before the command started, then retried

    @property
    def ok(self) -> bool:
        """True if the guest command ran and exited 0."""
        return self.returncode == 0

    @property
    def boot_note(self) -> str:
        """For the matrix report: a boot retried is said, never hidden."""
        return f" (after {self.boot_failures} failed boot)" if self.boot_failures else ""

    def describe(self, tail: int = 40) -> str:
        """A summary for assertion messages: status, timings and the end of the console."""
        try:
            lines = self.console_log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        return (
            f"guest exit status {self.returncode}, timed out {self.timed_out}, "
            f"{self.seconds:.1f}s (boot {self.boot_seconds}s, "
            f"{self.boot_failures} failed boots retried)\n"
            f"--- guest output ---\n{self.output}\n"
            f"--- last {tail} console lines ({self.console_log}) ---\n" + "\n".join(lines[-tail:])
        )


def find_vng() -> Optional[Path]:
    """The ``vng`` to use: $XFRMTRACE_VNG, else next to sys.executable (the venv), else PATH.

    sys.executable is deliberately not resolved: in a venv it is a symlink whose directory,
    not its target's, holds the console scripts.
    """
    override = os.environ.get("XFRMTRACE_VNG")
    if override:
        return Path(override) if os.access(override, os.X_OK) else None
    beside = Path(sys.executable).parent / "vng"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("vng")
    return Path(found) if found else None


def guest_python(kernel: Kernel) -> str:
    """The Python to run in ``kernel``'s guest: this one (x86 guests share the host's root
    and venv), or the arm64 root's python3 (this checkout on its PYTHONPATH)."""
    return "python3" if kernels.debian_arch(kernel) == "arm64" else sys.executable


def missing_requirements() -> List[str]:
    """Why the VM lab cannot run here (empty list: it can)."""
    missing = []
    if find_vng() is None:
        missing.append("virtme-ng's `vng` (pip install virtme-ng; it is in the dev extra)")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (Debian package qemu-system-x86)")
    if shutil.which("busybox") is None:
        missing.append("busybox (Debian package busybox-static), used for virtme's initramfs")
    if shutil.which("depmod") is None and not Path("/usr/sbin/depmod").exists():
        missing.append("depmod (Debian package kmod)")
    return missing


def _guest_script(command: str, rwdir: Path, cwd: Path, env: Mapping[str, str]) -> str:
    """The POSIX sh script the guest runs: marker, then the command with output and status saved.

    Output goes through tee so it is in the console log too (useful when the guest hangs).
    """
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return (
        "#!/bin/sh\n"
        "# generated by vmlab/host/vm.py\n"
        f"echo {shlex.quote(START_MARKER)}\n"
        "{\n"
        "  (\n"
        f"    cd {shlex.quote(str(cwd))} || exit 125\n"
        f"{exports}"
        f"{command}\n"
        "  ) 2>&1 </dev/null\n"
        f"  echo $? > {shlex.quote(str(rwdir / STATUS_FILE))}\n"
        f"}} | tee {shlex.quote(str(rwdir / OUTPUT_FILE))}\n"
        "sync\n"
    )


def _pump(stream: IO[bytes], log: IO[bytes], started: Dict[str, float], t0: float,
          echo: bool) -> None:
    """Copy the console to the log file, noting when the start marker shows up."""
    marker = START_MARKER.encode()
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        if "boot" not in started and line.strip() == marker:
            started["boot"] = time.monotonic() - t0
        if echo:
            sys.stderr.write(line.decode(errors="replace"))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop vng and everything it started (virtme-run, qemu): they share vng's process group.

    Returns once the group is empty: SIGTERM first (qemu exits cleanly), SIGKILL after 10 s.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            proc.poll()  # reap vng itself, or its zombie keeps the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_in_vm(
    kernel: Kernel,
    command: str,
    *,
    rwdir: Path,
    timeout: float = 900,
    memory: str = "2G",
    cpus: int = 2,
    env: Optional[Mapping[str, str]] = None,
    extra_rwdirs: Sequence[Path] = (),
    cwd: Optional[Path] = None,
    echo: bool = False,
) -> VmResult:
    """Boot ``kernel`` and run the shell ``command`` as root in the guest.

    ``rwdir`` is created if needed and shared read-write (same path in the guest); the console
    log, the script and the command's output and exit status are written there.  ``cwd``
    (default: the current directory) is where the command starts; it is read-only in the guest
    unless it is inside ``rwdir`` or ``extra_rwdirs``.  ``env`` is exported before the command
    (the guest does not inherit the host environment).  ``echo`` copies the console to stderr.
    On timeout the whole VM process group is killed.

    An arm64 kernel boots under qemu-system-aarch64 with the lab's own arm64 user space
    (vmlab/host/arm64vm.py), same contract; run :func:`guest_python` there, not
    sys.executable.
    """
    if kernels.debian_arch(kernel) == "arm64":
        from vmlab.host import arm64vm  # it imports this module

        return arm64vm.run_in_vm(kernel, command, rwdir=rwdir, timeout=timeout, cpus=cpus,
                                 env=env, extra_rwdirs=extra_rwdirs, cwd=cwd, echo=echo)
    missing = missing_requirements()
    if missing:
        raise VmLabUnavailable("VM lab unavailable: missing " + "; ".join(missing))
    vng = find_vng()
    assert vng is not None
    rwdir = prepare_rwdir(rwdir)
    script = rwdir / SCRIPT_FILE
    script.write_text(_guest_script(command, rwdir, Path(cwd or os.getcwd()).resolve(),
                                    dict(env or {})))

    argv = [
        str(vng), "--run", str(kernel.vmlinuz),
        "--disable-kvm", "--force-9p",
        "--memory", memory, "--cpus", str(cpus),
        "--verbose",
        "--rwdir", str(rwdir),
        # virtme links the guest's /lib/modules/<version> to the unpacked modules, but they
        # may sit under the guest's fresh /var/cache tmpfs: export the kernel tree explicitly.
        "--rodir", os.path.commonpath([kernel.vmlinuz, kernel.modules_dir]),
    ]
    for extra in extra_rwdirs:
        argv += ["--rwdir", str(Path(extra).resolve())]
    argv += ["--exec", f"sh {shlex.quote(str(script))}"]

    # vng runs virtme-run by name: it must be on PATH even when vng came from a venv
    # that is not activated.
    host_env = dict(os.environ)
    host_env["PATH"] = f"{vng.parent}{os.pathsep}{host_env.get('PATH', '')}"

    console = rwdir / CONSOLE_FILE
    boot_failures, seconds = 0, 0.0
    while True:
        boot, run_seconds, timed_out = _boot(argv, host_env, rwdir, console, timeout, echo)
        seconds += run_seconds
        if boot is not None or timed_out or boot_failures + 1 >= BOOT_ATTEMPTS:
            break
        # The kernel died before the command started, so nothing of ours ran yet: boot
        # again, keeping the console.  Seen under TCG: an int3 oops while the kernel
        # patched its own text during boot.
        boot_failures += 1
        kept = console.with_name(f"{CONSOLE_FILE}.boot-failure-{boot_failures}")
        console.replace(kept)
        sys.stderr.write(f"vmlab: the {kernel.version} guest died while booting "
                         f"(console in {kept}); booting it again\n")

    return collect_result(rwdir, console, boot, seconds, timed_out, boot_failures)


def prepare_rwdir(rwdir: Path) -> Path:
    """``rwdir`` resolved and created, without a previous run's output and exit status."""
    rwdir = Path(rwdir).resolve()
    rwdir.mkdir(parents=True, exist_ok=True)
    for name in (OUTPUT_FILE, STATUS_FILE):
        (rwdir / name).unlink(missing_ok=True)
    return rwdir


def collect_result(rwdir: Path, console: Path, boot: Optional[float], seconds: float,
                   timed_out: bool, boot_failures: int = 0) -> VmResult:
    """What the guest script left in ``rwdir``, with the run's timings."""
    status_text = _read(rwdir / STATUS_FILE).strip()
    return VmResult(
        returncode=int(status_text) if status_text.lstrip("-").isdigit() else None,
        output=_read(rwdir / OUTPUT_FILE),
        seconds=seconds,
        boot_seconds=boot,
        timed_out=timed_out,
        console_log=console,
        boot_failures=boot_failures,
    )


def _boot(argv: Sequence[str], host_env: Mapping[str, str], rwdir: Path, console: Path,
          timeout: float, echo: bool) -> tuple[Optional[float], float, bool]:
    """One VM run: (seconds until the command started or None, seconds in all, timed out)."""
    started: Dict[str, float] = {}
    timed_out = False
    t0 = time.monotonic()
    with open(console, "wb") as log:
        log.write(f"# {shlex.join(argv)}\n".encode())
        proc = subprocess.Popen(
            argv, cwd=rwdir, env=host_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group to kill: vng, virtme-run, qemu
        )
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, started, t0, echo),
                                daemon=True)
        pump.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Also on KeyboardInterrupt: never leave a qemu behind.
            _kill_group(proc)
            pump.join(timeout=30)
        seconds = time.monotonic() - t0
        if timed_out:
            log.write(f"\n# vmlab: killed after {timeout:.0f}s timeout\n".encode())
    return started.get("boot"), seconds, timed_out


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def main(argv: Optional[List[str]] = None) -> int:
    """CLI for poking at a kernel: ``python -m vmlab.host.vm 6.1 'uname -a'``."""
    import argparse

    from .kernels import fetch_kernel

    parser = argparse.ArgumentParser(prog="python -m vmlab.host.vm")
    parser.add_argument("series")
    parser.add_argument("command")
    parser.add_argument("--rwdir", type=Path, default=Path("/tmp/xfrmtrace-vm"))
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    result = run_in_vm(fetch_kernel(args.series), args.command, rwdir=args.rwdir,
                       timeout=args.timeout)
    sys.stdout.write(result.output)
    print(f"# exit {result.returncode}, {result.seconds:.1f}s, boot {result.boot_seconds}s, "
          f"console: {result.console_log}", file=sys.stderr)
    return result.returncode if result.returncode is not None else 255


if __name__ == "__main__":
    sys.exit(main())
