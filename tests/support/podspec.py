"""The container a rendered Helm pod spec describes, as tests/guest/pod_run.py launches it.

Host side: the VM deploy test turns the chart's DaemonSet into a :class:`LaunchSpec` (JSON)
with :func:`launch_spec` and :func:`write_spec`; the guest runs :func:`command`.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


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


def launch_spec(pod_spec: Dict[str, Any], field_values: Dict[str, str],
                objects: Sequence[Dict[str, Any]] = (),
                secret_root: Optional[Path] = None) -> LaunchSpec:
    """The first container of a rendered pod spec, as this lab launches it.

    ``field_values`` gives the values of ``fieldRef`` env vars (``status.podIP``...).  A
    ``secret`` volume is what the kubelet makes of it: the rendered Secret of that name
    (among ``objects``), one file per key, under ``secret_root``, mounted read-only.
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
        elif "secret" in volume:
            directory = _project_secret(volume["secret"], objects, secret_root)
            mounts.append(Mount(str(directory), vm["mountPath"], True, False))
        else:
            raise ValueError(f"volume {vm['name']}: a kind this lab cannot provide: {volume}")
    security = container.get("securityContext", {})
    caps = security.get("capabilities", {})
    assert caps.get("drop") == ["ALL"], "the chart must drop all capabilities first"
    return LaunchSpec(
        argv=argv, env=env, mounts=mounts,
        capabilities=[c.lower() for c in caps.get("add", [])],
        no_new_privs=security.get("allowPrivilegeEscalation") is False,
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
        privileged=bool(security.get("privileged")))


def _project_secret(source: Dict[str, Any], objects: Sequence[Dict[str, Any]],
                    root: Optional[Path]) -> Path:
    name = source["secretName"]
    found = [o for o in objects if o.get("kind") == "Secret" and o["metadata"]["name"] == name]
    if not found or root is None:
        raise ValueError(f"secret volume {name}: no such Secret among the rendered objects")
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in (found[0].get("data") or {}).items():
        path = directory / key
        path.write_bytes(base64.b64decode(value))
        path.chmod(source.get("defaultMode", 0o644))
    return directory


def _expand(text: str, env: Dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command and args (unknown names stay)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: env.get(m[1], m[0]), text)


def command(spec_path: Path) -> List[str]:
    """The guest command that runs the container of ``spec_path``."""
    return ["unshare", "--mount", "--propagation", "slave", "--",
            sys.executable, "-m", "tests.guest.pod_run", str(spec_path)]


def write_spec(spec: LaunchSpec, path: Path) -> None:
    path.write_text(json.dumps(asdict(spec), indent=1))


def read_spec(path: Path) -> LaunchSpec:
    raw = json.loads(path.read_text())
    raw["mounts"] = [Mount(**m) for m in raw["mounts"]]
    return LaunchSpec(**raw)
