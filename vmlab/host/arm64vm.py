"""Boot a Debian arm64 kernel under qemu-system-aarch64 (TCG) and run one shell command.

virtme-ng boots the host's own root filesystem, which is x86-64 here: an arm64 guest needs
its own user space.  This lab makes one, cached in the lab cache:

- a Debian arm64 root (``mmdebstrap --variant=extract``: packages unpacked, no maintainer
  script runs, so no arm64 emulation of the host is needed) with what the tool and the IPsec
  lab use (:data:`ROOT_PACKAGES`);
- the project's runtime dependencies as aarch64 wheels from PyPI, at the pins of
  dist-requirements.txt, unpacked into ``/opt/xfrmtrace/site`` (on ``PYTHONPATH``);
- per kernel, an initramfs of that root plus the kernel's modules (net, crypto, lib, fs,
  arch: what IPsec, veth, netfilter and 9p need) and :data:`INIT`.

The guest runs from the initramfs (a tmpfs: writable, thrown away at power-off).  The
directories given are shared over virtio-9p and mounted at the same paths as on the host,
so a command can use host paths; only ``rwdir`` and ``extra_rwdirs`` are writable.  The
command runs through the same script as on x86 (vm.py): output, exit status and the start
marker work the same, and so does :class:`vm.VmResult`.

Timings on this 2-core machine (TCG, Debian 6.12): boot to the command in about 30 s.
``-cpu max,pauth-impdef=on``: the architected pointer-authentication algorithm (QARMA) is
slow to emulate, and the kernel signs every return address; the implementation-defined one
is 4x faster here for the resolver, and the kernel cannot tell the difference.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

from vmlab.host import kernels, vm
from vmlab.host.kernels import Kernel, cache_dir, depmod, locked

SUITE = "trixie"
QEMU = "qemu-system-aarch64"
#: The user space the tool and the guest scripts need (python3's version is the suite's:
#: 3.13 in trixie, which :data:`PYTHON_VERSION` must match for the wheels).
ROOT_PACKAGES = ("python3", "libbpf1", "iproute2", "iptables", "kmod", "busybox-static",
                 "iputils-ping", "procps", "bpftool")
PYTHON_VERSION = "3.13"
WHEEL_PLATFORM = "manylinux2014_aarch64"
#: Module directories of the kernel copied into the initramfs (the rest: GPUs, storage...).
MODULE_DIRS = ("kernel/net", "kernel/crypto", "kernel/lib", "kernel/fs", "kernel/arch",
               "kernel/drivers/net")
SITE_DIR = "/opt/xfrmtrace/site"
ROOT_FORMAT = 4  # bump when ROOT_PACKAGES, the wheels or INIT change
REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "dist-requirements.txt"
RUNTIME_PACKAGES = ("capstone", "pyelftools", "pyroute2", "prometheus-client")

#: /init of the initramfs.  busybox's applets go last on PATH: its own ``ip`` must not
#: shadow iproute2's.  Shares come as ``vmlab.9p=<tag>:<path>[:ro]`` on the command line,
#: the command as ``vmlab.run=<script>``.
INIT = """#!/usr/bin/busybox sh
/usr/bin/busybox mkdir -p /bb
/usr/bin/busybox --install -s /bb
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/bb
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /dev/pts /run /tmp /sys/fs/bpf
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf
modprobe 9pnet_virtio
modprobe 9p
run=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
  vmlab.9p=*)
    spec=${arg#vmlab.9p=}
    tag=${spec%%:*}; rest=${spec#*:}; dir=${rest%%:*}
    opts=trans=virtio,version=9p2000.L,msize=512000
    [ "$rest" != "$dir" ] && opts=$opts,ro
    mkdir -p "$dir" && mount -t 9p -o "$opts" "$tag" "$dir" ||
      echo "vmlab: cannot mount $tag at $dir"
    ;;
  vmlab.run=*) run=${arg#vmlab.run=} ;;
  esac
done
ip link set lo up
hostname arm64-guest
[ -n "$run" ] && sh "$run"
sync
poweroff -f
"""


class Arm64LabError(RuntimeError):
    """The arm64 guest could not be prepared (a download, mmdebstrap or pip failed)."""


def missing_requirements() -> List[str]:
    """Why the arm64 lab cannot run here (empty list: it can)."""
    missing = []
    for tool, package in ((QEMU, "qemu-system-arm"), ("mmdebstrap", "mmdebstrap"),
                          ("cpio", "cpio")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package {package})")
    return missing


def _run(argv: Sequence[str], what: str, **kwargs) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise Arm64LabError(f"{what} failed (exit {proc.returncode}): " + " | ".join(tail))


def _pins() -> List[str]:
    wanted = set(RUNTIME_PACKAGES)
    pins = []
    for line in CONSTRAINTS.read_text().splitlines():
        name = line.split("==")[0].strip()
        if name in wanted:
            pins.append(line.strip())
    if len(pins) != len(wanted):
        raise Arm64LabError(f"{CONSTRAINTS} does not pin all of {', '.join(RUNTIME_PACKAGES)}")
    return pins


def root_tree() -> Path:
    """The cached arm64 root (built on first use: about two minutes)."""
    root = cache_dir() / "arm64" / f"root-{SUITE}-{ROOT_FORMAT}"
    if (root / ".complete").is_file():
        return root
    with locked(cache_dir() / ".lock"):
        if (root / ".complete").is_file():
            return root
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".root.", dir=root.parent) as tmp:
            tree = Path(tmp) / "tree"
            mirror = os.environ.get("XFRMTRACE_LAB_MIRROR", kernels.DEFAULT_MIRROR)
            kernels._log(f"building the arm64 {SUITE} root ({', '.join(ROOT_PACKAGES)})")
            _run(["mmdebstrap", "--quiet", "--variant=extract", "--architectures=arm64",
                  "--include=" + ",".join(ROOT_PACKAGES), SUITE, str(tree), mirror],
                 "mmdebstrap of the arm64 root", timeout=1800)
            _links_maintainer_scripts_make(tree)
            _install_wheels(tree / SITE_DIR.lstrip("/"), Path(tmp) / "wheels")
            (tree / "init").write_text(INIT)
            (tree / "init").chmod(0o755)
            (tree / ".complete").write_text("")
            if root.exists():
                shutil.rmtree(root)
            tree.rename(root)
    return root


def _links_maintainer_scripts_make(tree: Path) -> None:
    """What the skipped maintainer scripts would have linked: the merged-/usr links and
    the iptables alternatives (iptables-nft, Debian's default)."""
    for name, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        if not (tree / name).exists() and not (tree / name).is_symlink():
            (tree / name).symlink_to(target)
    sbin = tree / "usr" / "sbin"
    for family in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            link = sbin / f"{family}{suffix}"
            if not link.exists() and (sbin / "xtables-nft-multi").exists():
                link.symlink_to("xtables-nft-multi")


def _install_wheels(site: Path, wheels: Path) -> None:
    """The runtime pins as aarch64 wheels for the guest's Python, unpacked (a wheel is a
    zip of its site-packages files; these need no install step)."""
    kernels._log("downloading the aarch64 wheels: " + ", ".join(_pins()))
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
          "--platform", WHEEL_PLATFORM, "--python-version", PYTHON_VERSION,
          "--implementation", "cp", "--no-deps", "-d", str(wheels), *_pins()],
         "pip download of the aarch64 wheels", timeout=600)
    site.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)


def initramfs(kernel: Kernel) -> Path:
    """The cached initramfs for ``kernel``: two gzip'ed newc archives, back to back (the
    kernel unpacks one after the other): the root with /init, then the kernel's modules."""
    final = cache_dir() / "arm64" / f"initrd-{kernel.version}-{ROOT_FORMAT}.gz"
    if final.is_file():
        return final
    root = _root_archive()
    with locked(cache_dir() / ".lock"), tempfile.TemporaryDirectory(
            prefix=".initrd.", dir=final.parent) as tmp:
        if final.is_file():
            return final
        kernels._log(f"making the arm64 initramfs for {kernel.version}")
        stage = Path(tmp) / "stage"
        # usr/lib: the root's /lib is a link to it.
        modules = stage / "usr" / "lib" / "modules" / kernel.version
        for part in MODULE_DIRS:
            if (kernel.modules_dir / part).is_dir():
                shutil.copytree(kernel.modules_dir / part, modules / part, symlinks=True)
        for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if (kernel.modules_dir / meta).is_file():
                shutil.copy(kernel.modules_dir / meta, modules / meta)
        depmod(modules, kernel.version)
        out = Path(tmp) / "initrd.gz"
        with open(out, "wb") as archive:
            archive.write(root.read_bytes())
            archive.write(_cpio_gz(stage))
        out.rename(final)
    return final


def _root_archive() -> Path:
    """The root as one gzip'ed newc archive, cached beside the tree."""
    tree = root_tree()
    archive = tree.with_suffix(".cpio.gz")
    if not archive.is_file():
        tmp = archive.with_suffix(".tmp")
        tmp.write_bytes(_cpio_gz(tree))
        tmp.rename(archive)
    return archive


def _cpio_gz(tree: Path) -> bytes:
    """``find . | cpio -o -H newc | gzip -1`` of ``tree``."""
    names = subprocess.run(["find", ".", "-mindepth", "1", "!", "-name", ".complete"],
                           cwd=tree, capture_output=True, check=True).stdout
    proc = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=tree, input=names,
                          capture_output=True, check=True)
    return gzip.compress(proc.stdout, compresslevel=1)


def run_in_vm(
    kernel: Kernel,
    command: str,
    *,
    rwdir: Path,
    timeout: float = 900,
    memory: str = "3G",
    cpus: int = 2,
    env: Optional[Mapping[str, str]] = None,
    extra_rwdirs: Sequence[Path] = (),
    cwd: Optional[Path] = None,
    echo: bool = False,
) -> vm.VmResult:
    """:func:`vm.run_in_vm` for an arm64 ``kernel``: the same contract, the same result.

    ``cwd`` (default: the current directory) is shared read-only; ``PYTHONPATH`` is
    ``<cwd>/src`` and the wheels, so ``python3 -m xfrmtrace`` in a checkout works.
    """
    missing = missing_requirements()
    if missing:
        raise vm.VmLabUnavailable("arm64 VM lab unavailable: missing " + "; ".join(missing))
    rwdir = vm.prepare_rwdir(rwdir)
    workdir = Path(cwd or os.getcwd()).resolve()
    guest_env = {"PYTHONPATH": f"{workdir}/src:{SITE_DIR}", **dict(env or {})}
    script = rwdir / vm.SCRIPT_FILE
    script.write_text(vm._guest_script(command, rwdir, workdir, guest_env))
    initrd = initramfs(kernel)

    shares = [(rwdir, False), *((Path(d).resolve(), False) for d in extra_rwdirs)]
    if not any(workdir == d or d in workdir.parents for d, _ in shares):
        shares.append((workdir, True))
    argv = [QEMU, "-M", "virt", "-cpu", "max,pauth-impdef=on", "-smp", str(cpus),
            "-m", memory, "-nographic", "-no-reboot", "-kernel", str(kernel.vmlinuz),
            "-initrd", str(initrd)]
    cmdline = ["console=ttyAMA0", "rdinit=/init", "panic=-1", "quiet"]
    for n, (directory, read_only) in enumerate(shares):
        if any(c.isspace() or c == ":" for c in str(directory)):
            raise vm.VmLabUnavailable(f"cannot share {directory}: blanks or ':' in the path")
        tag = f"vmlab{n}"
        argv += ["-virtfs", f"local,path={directory},mount_tag={tag},security_model=none,"
                 f"id={tag}" + (",readonly=on" if read_only else "")]
        cmdline.append(f"vmlab.9p={tag}:{directory}" + (":ro" if read_only else ""))
    cmdline.append(f"vmlab.run={script}")
    argv += ["-append", " ".join(cmdline)]

    console = rwdir / vm.CONSOLE_FILE
    boot, seconds, timed_out = vm._boot(argv, dict(os.environ), rwdir, console, timeout, echo)
    return vm.collect_result(rwdir, console, boot, seconds, timed_out)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m vmlab.host.arm64vm 'uname -a'``: run one command on arm64 6.12."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vmlab.host.arm64vm")
    parser.add_argument("command")
    parser.add_argument("--series", default="arm64-6.12")
    parser.add_argument("--rwdir", type=Path, default=Path("/tmp/xfrmtrace-arm64-vm"))
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    result = run_in_vm(kernels.fetch_kernel(args.series), args.command, rwdir=args.rwdir,
                       timeout=args.timeout, cwd=REPO)
    sys.stdout.write(result.output)
    print(f"# exit {result.returncode}, {result.seconds:.1f}s, boot {result.boot_seconds}s, "
          f"console: {result.console_log}", file=sys.stderr)
    return result.returncode if result.returncode is not None else 255


if __name__ == "__main__":
    sys.exit(main())
