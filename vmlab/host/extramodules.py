"""Kernel modules Debian does not build, built for the lab from the kernel's own source.

Debian leaves ``CONFIG_XFRM_IPTFS`` unset (bookworm to sid, 7.2: no ``xfrm_iptfs.ko`` in any
package, nothing built in), so on its kernels the IP-TFS counters (``XfrmOutNoQueueSpace``,
``XfrmInIptfsError``, Linux 6.14+) could never move.  Other distributions do ship the module,
and xfrmtrace must find and trace its sites there; the lab makes the same module for Debian's
kernel, from that kernel's source, built the way Debian builds its own modules:

- a throw-away chroot of the kernel's suite (mmdebstrap) with ``linux-headers-<release>`` at
  the kernel's package version, whose dependencies bring the compiler the kernel was built
  with (gcc-16 for 7.2) and its kbuild, and ``linux-source-<X.Y>`` at the same version;
- ``net/xfrm/xfrm_iptfs.c`` (with its two local headers) built out of tree against the
  headers' ``Module.symvers`` (symbol versions match the running kernel) and ``vmlinux``
  (the module's BTF is split BTF over the kernel's, as in-tree modules have);
- the result goes to ``<modules_dir>/updates/`` and depmod runs again, so ``modprobe
  xfrm_iptfs`` works in the guest.  The module is unsigned: the kernel loads it and marks
  itself tainted (the lab has no lockdown).

Built once per kernel release and kept in the lab cache with the kernel (about a minute and a
half: a chroot, a 160 MB source package, one compile).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from vmlab.host import kernels
from vmlab.host.kernels import Kernel

IPTFS_MODULE = "xfrm_iptfs"
# IP-TFS arrived in Linux 6.14 (net/xfrm/xfrm_iptfs.c).
IPTFS_SINCE = (6, 14)
IPTFS_SOURCES = ("xfrm_iptfs.c", "xfrm_inout.h", "trace_iptfs.h")
BUILD_TIMEOUT = 1200.0
# Written next to the module: which packages it was built from and with.
PROVENANCE = "xfrm_iptfs.built-with"


class ExtraModuleError(RuntimeError):
    """A module the lab needs could not be built."""


def _release(kernel: Kernel) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", kernel.version)
    if match is None:
        raise ExtraModuleError(f"cannot read a version from kernel release {kernel.version!r}")
    return int(match.group(1)), int(match.group(2))


def _installed(kernel: Kernel, module: str) -> Optional[Path]:
    """The kernel's own (or an earlier build's) file for ``module``, if any."""
    for path in kernel.modules_dir.rglob(f"{module}.ko*"):
        return path
    return None


def provide_iptfs(kernel: Kernel) -> Optional[str]:
    """Make ``xfrm_iptfs`` loadable in ``kernel``'s guest.

    Returns None when it is (the kernel ships it, or it was built now or earlier), or why it
    cannot be, for a kernel older than IP-TFS.  Raises :class:`ExtraModuleError` when a
    kernel that has IP-TFS in its source could not get the module.
    """
    if _release(kernel) < IPTFS_SINCE:
        return (f"Linux {kernel.version} predates IP-TFS (Linux "
                f"{IPTFS_SINCE[0]}.{IPTFS_SINCE[1]})")
    with kernels.locked(kernels.cache_dir() / ".lock"):
        if _installed(kernel, IPTFS_MODULE) is None:
            _build_iptfs(kernel, kernel.modules_dir / "updates")
            kernels.depmod(kernel.modules_dir, kernel.version, again=True)
    return None


def _build_script(kernel: Kernel, major_minor: str) -> str:
    """What runs inside the chroot: unpack the module's sources, build, note the versions."""
    tree = f"linux-source-{major_minor}"
    members = " ".join(f"{tree}/net/xfrm/{name}" for name in IPTFS_SOURCES)
    # trace_iptfs.h includes itself as "../../net/xfrm/trace_iptfs.h" (TRACE_INCLUDE_PATH),
    # relative to an include directory: the build directory must sit at <dir>/net/xfrm.
    return "\n".join([
        "set -e",
        "mkdir -p /build",
        f"tar -xJf /usr/src/{tree}.tar.xz -C /build --strip-components=1 {members}",
        "printf 'obj-m := xfrm_iptfs.o\\nccflags-y := -I$(src)\\n' > /build/net/xfrm/Kbuild",
        f"make -s -C /usr/src/linux-headers-{kernel.version} M=/build/net/xfrm modules",
        # Installed packages only (dpkg-query -W also lists known, uninstalled ones).
        "dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\\n' "
        f"linux-headers-{kernel.version} {tree} 'gcc-[0-9]*' | sed -n 's/^ii  *//p' "
        f"> /build/net/xfrm/{PROVENANCE}",
    ])


def _build_iptfs(kernel: Kernel, dest: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ExtraModuleError("mmdebstrap is missing (Debian package mmdebstrap): it builds "
                               f"{IPTFS_MODULE} for {kernel.version}")
    if not kernel.package_version:
        raise ExtraModuleError(f"the package version of {kernel.version} is not recorded")
    major, minor = _release(kernel)
    major_minor = f"{major}.{minor}"
    suite = kernels.SERIES[kernel.series].suite
    mirror = os.environ.get("XFRMTRACE_LAB_MIRROR", kernels.DEFAULT_MIRROR).rstrip("/")
    pin = kernel.package_version
    with tempfile.TemporaryDirectory(prefix="xfrmtrace-iptfs.") as tmp:
        out = Path(tmp)
        argv = [
            "mmdebstrap", "--quiet", "--variant=apt", "--mode=root",
            # The mirror may lag this machine's clock by weeks (sid's Release file then
            # reads as expired).  The host's apt.conf allows that, which apt-get in
            # kernels.py reads but mmdebstrap does not.
            "--aptopt=Acquire::Check-Valid-Until \"false\"",
            "--aptopt=Acquire::Check-Date \"false\"",
            f"--include=linux-headers-{kernel.version}={pin},"
            f"linux-source-{major_minor}={pin},make,xz-utils",
            "--customize-hook=chroot \"$1\" sh -c " + shlex.quote(
                _build_script(kernel, major_minor)),
            f"--customize-hook=copy-out /build/net/xfrm/{IPTFS_MODULE}.ko {out}",
            f"--customize-hook=copy-out /build/net/xfrm/{PROVENANCE} {out}",
            suite, "/dev/null", mirror,
        ]
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ExtraModuleError(f"building {IPTFS_MODULE} for {kernel.version} took more "
                                   f"than {BUILD_TIMEOUT:.0f} s") from None
        built = out / f"{IPTFS_MODULE}.ko"
        if proc.returncode != 0 or not built.is_file():
            tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
            raise ExtraModuleError(f"building {IPTFS_MODULE} for {kernel.version} failed "
                                   f"(mmdebstrap exit {proc.returncode}):\n{tail}")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / PROVENANCE, dest / PROVENANCE)
        # The module last: its presence is what marks the build done.
        shutil.copy(built, dest / f".{IPTFS_MODULE}.ko.tmp")
        os.replace(dest / f".{IPTFS_MODULE}.ko.tmp", dest / f"{IPTFS_MODULE}.ko")
