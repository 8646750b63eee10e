"""Run the container the Helm chart renders, for real, inside a VM of the lab.

There is no kubelet here, so this module does what one would do with the DaemonSet's pod
spec, as far as the tool can tell:

* a mount namespace whose propagation from the VM is one-way (``HostToContainer``), with a
  fresh root (tmpfs) holding the "image" (``/usr``, ``/etc``, the repository and its venv,
  read-only), ``/proc`` with ``/proc/kcore`` masked by ``/dev/null`` as container runtimes
  do, ``/sys`` read-only, an emptyDir ``/tmp``, and every hostPath volume at its
  ``mountPath`` (read-only where the chart says so);
* the root made read-only (``readOnlyRootFilesystem``);
* exactly the chart's capabilities (bounding set; uid 0), and ``no_new_privs`` when
  ``allowPrivilegeEscalation`` is false (``setpriv``);
* the chart's command, args and environment, with ``$(VAR)`` expanded as the kubelet does.

Not reproduced: the seccomp/AppArmor profiles and the pid namespace (the tool does not use
either: it sees the host's /proc through ``--host-proc``).

The host side turns the rendered DaemonSet into a launch spec (tests/support/podspec.py);
the guest runs ``python -m tests.guest.pod_run SPEC`` under
``unshare --mount --propagation slave`` (``podspec.command``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from tests.support.podspec import LaunchSpec, read_spec

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/tmp/podroot")
# What the image would hold, bound read-only from the VM (Debian's merged /usr: /bin, /lib
# and /sbin are symlinks into /usr and are recreated as such).
IMAGE_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64")
# Directories the chart creates on the node (hostPath DirectoryOrCreate) live here in the
# VM, whose root file system is the lab host's, read-only.
NODE_DIRS = Path("/tmp/node")
CAPSTONE_COPY = "/tmp/xfrmtrace-capstone"  # see guest_tool.fast_capstone_env
CAPSTONE_IN_POD = "/opt/xfrmtrace-lab-capstone"


# ---- inside the new mount namespace (guest, root) -----------------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _bind(source: str, target: Path, read_only: bool, recursive: bool = False) -> None:
    target.mkdir(parents=True, exist_ok=True)
    _mount("--rbind" if recursive else "--bind", source, str(target))
    if read_only:
        _mount("-o", "remount,bind,ro", str(target))


def _at(path: str) -> Path:
    return ROOT / path.lstrip("/")


def node_dir(path: str) -> Path:
    """Where a writable hostPath (DirectoryOrCreate) lives in the VM: under NODE_DIRS, as
    the VM shares the lab host's root file system and must not write to it."""
    moved = NODE_DIRS / path.lstrip("/")
    moved.mkdir(parents=True, exist_ok=True)
    return moved


def build_root(spec: LaunchSpec) -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", "mode=755", "podroot", str(ROOT))
    for path in IMAGE_PATHS:
        if os.path.islink(path):
            os.symlink(os.readlink(path), _at(path))
        elif os.path.isdir(path):
            _bind(path, _at(path), read_only=True)
    _bind("/dev", _at("/dev"), read_only=False, recursive=True)
    _at("/proc").mkdir()
    _mount("-t", "proc", "proc", str(_at("/proc")))
    _mount("--bind", "/dev/null", str(_at("/proc/kcore")))  # as runc's maskedPaths
    _bind("/sys", _at("/sys"), read_only=True, recursive=True)
    for mount in spec.mounts:
        target = _at(mount.mount_path)
        if not mount.host_path:  # emptyDir
            target.mkdir(parents=True, exist_ok=True)
            _mount("-t", "tmpfs", "emptydir", str(target))
            continue
        writable = mount.create and not mount.read_only
        source = str(node_dir(mount.host_path)) if writable else mount.host_path
        _bind(source, target, mount.read_only, recursive=True)
    # The package and its venv come last: the checkout may live under a path the chart
    # mounts over (a clone in /tmp, where the chart puts an emptyDir).
    _bind(str(REPO), _at(str(REPO)), read_only=True)
    if not sys.base_prefix.startswith("/usr"):  # the venv's interpreter, e.g. under pyenv
        _bind(sys.base_prefix, _at(sys.base_prefix), read_only=True)
    if os.path.isdir(CAPSTONE_COPY):
        _bind(CAPSTONE_COPY, _at(CAPSTONE_IN_POD), read_only=True)
    if spec.read_only_root:
        _mount("-o", "remount,ro", str(ROOT))


def exec_container(spec: LaunchSpec) -> None:
    build_root(spec)
    os.chroot(ROOT)
    os.chdir("/")
    caps = ",".join(["-all", *(f"+{c}" for c in spec.capabilities)])
    setpriv = ["setpriv", f"--bounding-set={caps}", "--inh-caps=-all"]
    if spec.no_new_privs:
        setpriv.append("--no-new-privs")
    env = {"PATH": f"{REPO}/.venv/bin:/usr/sbin:/usr/bin:/sbin:/bin", **spec.env}
    if os.path.isdir(CAPSTONE_COPY):
        env["LIBCAPSTONE_PATH"] = CAPSTONE_IN_POD  # test speed only: 9p mmap is slow
    os.execvpe("setpriv", [*setpriv, "--", *spec.argv], env)


def main(argv: Optional[List[str]] = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    exec_container(read_spec(Path(args[0])))
    return 1  # not reached: exec


if __name__ == "__main__":
    raise SystemExit(main())
