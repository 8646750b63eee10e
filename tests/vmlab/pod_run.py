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

The host side turns the rendered DaemonSet into a :class:`LaunchSpec` (JSON) with
:func:`launch_spec`; the guest runs ``python -m tests.vmlab.pod_run SPEC`` under
``unshare --mount --propagation slave`` (see :func:`command`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
ROOT = Path("/tmp/podroot")
# What the image would hold, bound read-only from the VM (Debian's merged /usr: /bin, /lib
# and /sbin are symlinks into /usr and are recreated as such).
IMAGE_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64")
# Directories the chart creates on the node (hostPath DirectoryOrCreate) live here in the
# VM, whose root file system is the lab host's, read-only.
NODE_DIRS = Path("/tmp/node")
CAPSTONE_COPY = "/tmp/xfrmtrace-capstone"  # see trace_run.fast_capstone_env
CAPSTONE_IN_POD = "/opt/xfrmtrace-lab-capstone"


@dataclass
class Mount:
    host_path: str
    mount_path: str
    read_only: bool
    create: bool  # hostPath type DirectoryOrCreate


@dataclass
class LaunchSpec:
    argv: List[str]
    env: Dict[str, str]
    mounts: List[Mount]
    capabilities: List[str]  # added to an empty set (the chart drops ALL)
    no_new_privs: bool
    read_only_root: bool
    privileged: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)


def launch_spec(pod_spec: Dict[str, Any], field_values: Dict[str, str]) -> LaunchSpec:
    """The first container of a rendered pod spec, as this lab launches it.

    ``field_values`` gives the values of ``fieldRef`` env vars (``status.podIP``...).
    """
    container = pod_spec["containers"][0]
    env: Dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = field_values[path]
    argv = [_expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    mounts = []
    for vm in container.get("volumeMounts", []):
        volume = volumes[vm["name"]]
        if "hostPath" in volume:
            host = volume["hostPath"]
            mounts.append(Mount(host["path"], vm["mountPath"], bool(vm.get("readOnly")),
                                host.get("type") == "DirectoryOrCreate"))
        elif "emptyDir" in volume:
            mounts.append(Mount("", vm["mountPath"], False, True))
    security = container.get("securityContext", {})
    caps = security.get("capabilities", {})
    assert caps.get("drop") == ["ALL"], "the chart must drop all capabilities first"
    return LaunchSpec(
        argv=argv, env=env, mounts=mounts,
        capabilities=[c.lower() for c in caps.get("add", [])],
        no_new_privs=security.get("allowPrivilegeEscalation") is False,
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        privileged=bool(security.get("privileged")))


def _expand(text: str, env: Dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command and args (unknown names stay)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: env.get(m[1], m[0]), text)


def command(spec_path: Path) -> List[str]:
    """The guest command that runs the container of ``spec_path``."""
    return ["unshare", "--mount", "--propagation", "slave", "--",
            sys.executable, "-m", "tests.vmlab.pod_run", str(spec_path)]


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
    raw = json.loads(Path(args[0]).read_text())
    raw["mounts"] = [Mount(**m) for m in raw["mounts"]]
    exec_container(LaunchSpec(**raw))
    return 1  # not reached: exec


def write_spec(spec: LaunchSpec, path: Path) -> None:
    path.write_text(json.dumps(asdict(spec), indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
