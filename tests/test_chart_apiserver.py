"""The Helm chart against a real API server: ``helm install``, read back, ``helm uninstall``.

tests/support/kubeapi.py builds kube-apiserver from Debian bookworm's ``kubernetes`` source package
(once, several minutes; cached in the lab cache) and runs it on etcd.  That source is
Kubernetes 1.20.2, **older than the chart's supported minimum** (``kubeVersion: >=1.25.0-0``),
so helm would refuse it: the tests install a copy of the chart whose Chart.yaml has only that
constraint widened.  What they check is therefore not version support (the offline schema
checks in tests/test_chart.py cover 1.25 and 1.34) but the API server's own validation and
admission of the objects, which is stricter than the OpenAPI schemas: hostPort equal to
containerPort under hostNetwork, securityContext and capability rules, volumes and mounts that
match, label selectors that select the template, quantities, and so on.

A 1.20 server silently drops fields it does not know.  The values used here render none (the
chart's only field newer than 1.20, the container's ``appArmorProfile``, is off unless set), and
every read-back object is compared with what ``helm template`` rendered: any field the server
dropped or changed fails the test; fields it only added (defaults) are allowed.

There is no kubelet, controller manager or scheduler, so nothing runs; ``kube-system/default``
(normally made by the controller manager) is created so the ``helm test`` Pod can be admitted
(server-side dry run), and the ServiceMonitor of the full scenario gets a minimal,
schema-less CRD for monitoring.coreos.com/v1: its own fields are not validated here.

When kube-apiserver cannot be built or started these tests fail rather than skip, so CI notices.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.support.k8stools import CHART, daemonset_pod_spec, helm
from tests.support.kubeapi import KUBE_VERSION, ApiError, ApiServer, api_server

NAMESPACE = "kube-system"
RELEASE = "xfrmtrace"
CI_DIR = CHART / "ci"
SCENARIOS = {p.name[: -len("-values.yaml")]: p for p in sorted(CI_DIR.glob("*-values.yaml"))}

def operator_crd(kind: str, plural: str) -> dict[str, Any]:
    """A stand-in for a Prometheus operator CRD: the kind is served, any content is kept."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind,
                      "listKind": f"{kind}List"},
            "versions": [{"name": "v1", "served": True, "storage": True,
                          "schema": {"openAPIV3Schema": {
                              "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }


OPERATOR_CRDS = [operator_crd("ServiceMonitor", "servicemonitors"),
                 operator_crd("PrometheusRule", "prometheusrules")]
# Namespaces the scenarios put objects in besides the release's (the full scenario's
# dashboard ConfigMap goes where Grafana's sidecar looks).
OTHER_NAMESPACES = ("monitoring",)

# (what is broken, text in templates/daemonset.yaml, its replacement, words of the error)
BREAKAGES = {
    "hostport-mismatch": (
        "(hostPort must equal it).\n            - name: metrics\n"
        "              containerPort: {{ .Values.metrics.port | int64 }}\n"
        "              hostPort: {{ .Values.metrics.port | int64 }}",
        "(hostPort must equal it).\n            - name: metrics\n"
        "              containerPort: {{ .Values.metrics.port | int64 }}\n"
        "              hostPort: {{ add1 (.Values.metrics.port | int64) }}",
        ("containerPort", "must match `hostPort` when `hostNetwork` is true")),
    "mount-without-volume": (
        "        - name: tmp\n          emptyDir:",
        "        - name: scratch\n          emptyDir:",
        ("volumeMounts", "Not found", '"tmp"')),
}


# --- helpers -------------------------------------------------------------------------------

def resource_path(obj: dict[str, Any]) -> str:
    """The REST path of an object of the kinds this chart renders."""
    group_version = obj["apiVersion"]
    plural = {"ServiceAccount": "serviceaccounts", "Service": "services", "Pod": "pods",
              "DaemonSet": "daemonsets", "ConfigMap": "configmaps", "Secret": "secrets",
              "ServiceMonitor": "servicemonitors", "PrometheusRule": "prometheusrules",
              "ClusterRole": "clusterroles",
              "ClusterRoleBinding": "clusterrolebindings"}[obj["kind"]]
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    meta = obj["metadata"]
    if obj["kind"].startswith("Cluster"):  # not namespaced
        return f"{prefix}/{plural}/{meta['name']}"
    return f"{prefix}/namespaces/{meta.get('namespace', NAMESPACE)}/{plural}/{meta['name']}"


def differences(rendered: Any, stored: Any, path: str = "") -> list[str]:
    """Where ``stored`` does not hold ``rendered``: dropped or changed fields.

    Keys only in ``stored`` are the server's defaults and allowed; an empty or null rendered
    value may be omitted.  Lists must match element by element.
    """
    if isinstance(rendered, dict) and isinstance(stored, dict):
        out = []
        for key, value in rendered.items():
            if key not in stored:
                if value not in (None, {}, []):
                    out.append(f"{path}.{key}: dropped by the server (rendered {value!r})")
            else:
                out += differences(value, stored[key], f"{path}.{key}")
        return out
    if isinstance(rendered, list) and isinstance(stored, list) and len(rendered) == len(stored):
        return [d for i, (r, s) in enumerate(zip(rendered, stored))
                for d in differences(r, s, f"{path}[{i}]")]
    if rendered != stored:
        return [f"{path}: rendered {rendered!r}, stored {stored!r}"]
    return []


def chart_for(server: ApiServer, dest: Path) -> Path:
    """The chart itself, or a copy in ``dest`` whose kubeVersion admits this (older) server."""
    copy = dest / "xfrmtrace"
    shutil.copytree(CHART, copy)
    chart_yaml = copy / "Chart.yaml"
    text, count = re.subn(r"(?m)^kubeVersion:.*$", f'kubeVersion: ">={server.version}-0"',
                          chart_yaml.read_text())
    assert count == 1, "Chart.yaml has no kubeVersion line to widen"
    chart_yaml.write_text(text)
    return copy


def helm_k(server: ApiServer, *args: str, check: bool = True) -> Any:
    return helm(*args, "--kubeconfig", str(server.kubeconfig), check=check)


def render(server: ApiServer, chart: Path, values: Path) -> list[dict[str, Any]]:
    """``helm template`` for this server's version: the objects helm install will send."""
    out = helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, "-f", str(values),
               "--kube-version", server.version).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def is_hook(obj: dict[str, Any]) -> bool:
    return "helm.sh/hook" in (obj["metadata"].get("annotations") or {})


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server() -> Iterator[ApiServer]:
    with api_server() as srv:
        srv.request("POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts",
                    {"apiVersion": "v1", "kind": "ServiceAccount",
                     "metadata": {"name": "default", "namespace": NAMESPACE}})
        for namespace in OTHER_NAMESPACES:
            srv.request("POST", "/api/v1/namespaces",
                        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        for crd in OPERATOR_CRDS:
            srv.request("POST", crds, crd)
        for crd in OPERATOR_CRDS:
            name = crd["metadata"]["name"]
            for _ in range(100):
                conditions = srv.get(f"{crds}/{name}").get("status", {}).get("conditions", [])
                if {"type": "Established", "status": "True"} in [
                        {k: c.get(k) for k in ("type", "status")} for c in conditions]:
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"CRD {name} not established")
        yield srv


@pytest.fixture(scope="module")
def chart(server: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chart_for(server, tmp_path_factory.mktemp("chart"))


# --- tests ---------------------------------------------------------------------------------

def test_server_is_older_than_chart_minimum(server: ApiServer) -> None:
    """Documents what this module checks: the server's validation, not version support."""
    minimum = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert server.version == KUBE_VERSION, server.version
    assert minimum == ">=1.25.0-0", "update this module's docstring and chart_for()"
    refused = helm_k(server, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--wait=false",
                     "--dry-run", check=False)
    assert refused.returncode != 0 and "kubeVersion" in refused.stderr, refused.stderr


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_install_read_back_uninstall(server: ApiServer, chart: Path, scenario: str) -> None:
    values = SCENARIOS[scenario]
    rendered = render(server, chart, values)
    installed = [o for o in rendered if not is_hook(o)]
    hooks = [o for o in rendered if is_hook(o)]
    assert "appArmorProfile" not in yaml.safe_dump(rendered), "a field newer than the server"

    helm_k(server, "install", RELEASE, str(chart), "-n", NAMESPACE, "-f", str(values),
           "--wait=false")
    try:
        # Every object as stored: the server may add defaults, but drops and changes nothing.
        for obj in installed:
            stored = server.get(resource_path(obj))
            if obj["kind"] == "Secret":  # random at each render: the same keys, its own value
                assert set(stored["data"]) == set(obj["data"])
                obj = {**obj, "data": stored["data"]}
            diff = differences(obj, stored)
            assert not diff, f"{obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(diff)

        (ds,) = [o for o in installed if o["kind"] == "DaemonSet"]
        stored_ds = server.get(resource_path(ds))
        want, got = daemonset_pod_spec([ds]), stored_ds["spec"]["template"]["spec"]
        assert got["hostNetwork"] is True and got["automountServiceAccountToken"] is False
        # Defaults the server adds (a projected volume's defaultMode, a fieldRef's apiVersion)
        # are allowed; nothing rendered may be dropped or changed.
        assert differences(want["volumes"], got["volumes"], ".volumes") == []
        assert [c["name"] for c in got["containers"]] == [c["name"] for c in want["containers"]]
        for want_ctr, got_ctr in zip(want["containers"], got["containers"]):
            for key in ("command", "args", "securityContext", "volumeMounts", "ports"):
                assert got_ctr.get(key) == want_ctr.get(key), (want_ctr["name"], key)

        # The `helm test` Pod is created only by `helm test`; the server admits it (dry run).
        for hook in hooks:
            stored = server.request("POST", resource_path(hook).rsplit("/", 1)[0], hook,
                                    params="dryRun=All")
            diff = differences(hook, stored)
            assert not diff, f"hook {hook['metadata']['name']}:\n" + "\n".join(diff)
    finally:
        helm_k(server, "uninstall", RELEASE, "-n", NAMESPACE)

    for obj in installed:
        assert not server.exists(resource_path(obj)), f"{obj['kind']} left after uninstall"
    assert helm_k(server, "list", "-n", NAMESPACE, "-q").stdout.strip() == ""


def test_differences_sees_dropped_and_changed_fields() -> None:
    rendered = {"spec": {"a": 1, "b": [{"c": "x"}], "empty": {}, "d": {"e": True}}}
    assert differences(rendered, {"spec": {"a": 1, "b": [{"c": "x", "default": 0}],
                                           "d": {"e": True}, "f": 2}}) == []
    assert differences(rendered, {"spec": {"a": 1, "b": [{"c": "y"}], "d": {}}}) == [
        ".spec.b[0].c: rendered 'x', stored 'y'",
        ".spec.d.e: dropped by the server (rendered True)"]
    assert differences({"l": [1, 2]}, {"l": [1]}) == [".l: rendered [1, 2], stored [1]"]


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_server_rejects_broken_chart(server: ApiServer, chart: Path, tmp_path: Path,
                                     breakage: str) -> None:
    """The server catches what the schemas cannot: so the tests above can fail."""
    old, new, words = BREAKAGES[breakage]
    broken = tmp_path / "xfrmtrace"
    shutil.copytree(chart, broken)
    template = broken / "templates" / "daemonset.yaml"
    text = template.read_text()
    assert text.count(old) == 1, f"templates/daemonset.yaml no longer has {old!r}"
    template.write_text(text.replace(old, new))
    values = SCENARIOS["lab"]
    render(server, broken, values)  # renders fine: only the server sees the problem

    proc = helm_k(server, "install", RELEASE, str(broken), "-n", NAMESPACE, "-f", str(values),
                  "--wait=false", check=False)
    try:
        assert proc.returncode != 0, "the API server accepted a broken DaemonSet"
        assert all(w in proc.stderr for w in words), proc.stderr
        assert "DaemonSet" in proc.stderr, proc.stderr
    finally:
        helm_k(server, "uninstall", RELEASE, "-n", NAMESPACE, check=False)
    with pytest.raises(ApiError) as err:
        server.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{RELEASE}")
    assert err.value.status == 404


def test_upgrade_keeps_the_key_fingerprint_secret(server: ApiServer, chart: Path) -> None:
    """Random at install, the same after `helm upgrade` (lookup): fingerprints in logs from
    before and after an upgrade stay comparable."""
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-key-fingerprint"
    helm_k(server, "install", RELEASE, str(chart), "-n", NAMESPACE, "--wait=false")
    try:
        first = server.get(path)["data"]["secret"]
        helm_k(server, "upgrade", RELEASE, str(chart), "-n", NAMESPACE, "--wait=false",
               "--set", "rateLimit=5")
        assert server.get(path)["data"]["secret"] == first
    finally:
        helm_k(server, "uninstall", RELEASE, "-n", NAMESPACE)
    assert not server.exists(path)
