"""The Helm chart charts/xfrmtrace, checked on the host without a cluster.

For every scenario in charts/xfrmtrace/ci/ (helm's convention): ``helm lint --strict``, the
rendered objects against the Kubernetes 1.25 (the chart's minimum) and 1.34 schemas
(kubernetes-validate, offline), least privilege on the DaemonSet, and the tool's command line
implied by the values.  Then the values schema, NOTES.txt and ``helm package``.

helm comes from tests/support/k8stools.py (downloaded once into the lab cache); when it cannot be
fetched these tests fail rather than skip, so CI notices.
"""

from __future__ import annotations

import base64
import copy
import functools
import http.server
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any, Optional

import kubernetes_validate
import pytest
import yaml

from tests.support.k8stools import CHART, daemonset_pod_spec, helm, render_chart, template_args
from xfrmtrace.bpf import abi

CI_DIR = CHART / "ci"
SCENARIOS = {p.name[: -len("-values.yaml")]: p for p in sorted(CI_DIR.glob("*-values.yaml"))}
KUBE_VERSIONS = ("1.25", "1.34")  # the chart's kubeVersion minimum, and the current release

# Always added; NET_ADMIN and SYS_ADMIN depend on xfrmState (see expected_capabilities).
BASE_CAPABILITIES = {"BPF", "PERFMON", "SYS_RAWIO", "SYSLOG", "SYS_RESOURCE"}
# hostPath mounts the tool writes to; every other hostPath mount must be read-only.
WRITABLE_HOST_MOUNTS = {"/var/cache/xfrmtrace", "/var/log/xfrmtrace", "/sys/kernel/tracing"}
EXPECTED_KINDS = {"ServiceAccount", "DaemonSet", "Service", "ServiceMonitor", "Pod",
                  "PrometheusRule", "ConfigMap", "Secret", "ClusterRole", "ClusterRoleBinding"}


# --- helpers -------------------------------------------------------------------------------

def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's values merge: maps merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def scenario_values(name: str) -> dict[str, Any]:
    """The chart's values.yaml with the scenario's file on top."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return _merge(defaults, yaml.safe_load(SCENARIOS[name].read_text()) or {})


@functools.cache
def rendered(name: str) -> tuple[list[dict[str, Any]], str]:
    """(parsed objects, raw YAML text) of one scenario, rendered once per session."""
    raw = helm(*template_args([SCENARIOS[name]])).stdout
    return [doc for doc in yaml.safe_load_all(raw) if doc], raw


def container(name: str) -> dict[str, Any]:
    """The tracer's container (the first; kube-rbac-proxy, if any, comes after it)."""
    ctr = daemonset_pod_spec(rendered(name)[0])["containers"][0]
    assert ctr["name"] == "xfrmtrace"
    return ctr


def flag_value(args: list[str], flag: str) -> Optional[str]:
    """The argument after ``flag``, or None when the flag is absent."""
    return args[args.index(flag) + 1] if flag in args else None


def expected_capabilities(values: dict[str, Any]) -> set[str]:
    caps = set(BASE_CAPABILITIES)
    if values["xfrmState"]["enabled"]:
        caps.add("NET_ADMIN")
        if values["xfrmState"]["allNamespaces"]:
            caps.add("SYS_ADMIN")
    return caps


@pytest.fixture(scope="session", autouse=True)
def _helm_available() -> None:
    """Fetch helm before any test, so a download failure errors once, clearly (never skips)."""
    helm("version", "--short")


scenario = pytest.mark.parametrize("name", sorted(SCENARIOS))


def test_required_scenarios_exist() -> None:
    assert {"default", "minimal", "full", "lab", "localhost", "rbacproxy"} <= set(SCENARIOS)


# --- 1. helm lint ------------------------------------------------------------------------

def test_lint_defaults() -> None:
    proc = helm("lint", "--strict", str(CHART), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@scenario
def test_lint_scenario(name: str) -> None:
    proc = helm("lint", "--strict", str(CHART), "-f", str(SCENARIOS[name]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- 2. Kubernetes schemas ---------------------------------------------------------------

def check_service_monitor(monitor: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    """kubernetes-validate has no schema for the Prometheus operator's CRD: check by hand
    the fields the operator needs, and that the monitor really selects our Service's port."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] and monitor["metadata"]["namespace"]
    (service,) = [o for o in objects if o["kind"] == "Service"]
    match = monitor["spec"]["selector"]["matchLabels"]
    assert match.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [
        service["metadata"]["namespace"]]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", endpoint["interval"])


def check_prometheus_rule(rule: dict[str, Any]) -> None:
    """The fields the operator's CRD requires (promtool checks the rules: test_alerts.py)."""
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] and rule["metadata"]["namespace"]
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert set(item) <= {"alert", "expr", "for", "labels", "annotations"}
            assert item["alert"] and isinstance(item["expr"], str)


@scenario
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_objects_validate(name: str, kube_version: str) -> None:
    objects = rendered(name)[0]
    assert {o["kind"] for o in objects} <= EXPECTED_KINDS
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            check_service_monitor(obj, objects)
            continue
        if obj["kind"] == "PrometheusRule":
            check_prometheus_rule(obj)
            continue
        # strict: unknown fields fail.  A kind without a schema raises SchemaNotFoundError,
        # which fails the test too: only the operator's kinds are allowed to be unknown.
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} is not valid "
                        f"Kubernetes {kube_version}: {where}: {e.message}")


def test_service_only_with_monitor_or_asked() -> None:
    kinds = {n: {o["kind"] for o in rendered(n)[0]} for n in SCENARIOS}
    assert "Service" not in kinds["default"] and "ServiceMonitor" not in kinds["default"]
    assert {"Service", "ServiceMonitor", "PrometheusRule", "ConfigMap"} <= kinds["full"]
    assert not {"PrometheusRule", "ConfigMap"} & kinds["default"]
    assert "Pod" not in kinds["minimal"]  # the helm test needs metrics


# --- 3. least privilege --------------------------------------------------------------------

@scenario
def test_least_privilege(name: str) -> None:
    values = scenario_values(name)
    pod = daemonset_pod_spec(rendered(name)[0])
    ctr = container(name)
    sc = ctr["securityContext"]
    assert not sc.get("privileged", False)
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == expected_capabilities(values)
    assert len(sc["capabilities"]["add"]) == len(set(sc["capabilities"]["add"]))
    assert sc["seccompProfile"] == values["seccompProfile"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    assert pod["automountServiceAccountToken"] is False
    assert pod["tolerations"]
    assert pod["nodeSelector"]["kubernetes.io/os"] == "linux"
    assert pod["terminationGracePeriodSeconds"] == 30

    host_paths = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    for mount in ctr["volumeMounts"]:
        if mount["name"] not in host_paths:
            continue
        assert host_paths[mount["name"]].get("type"), f"{mount['name']}: hostPath without type"
        writable = mount["mountPath"] in WRITABLE_HOST_MOUNTS
        assert mount.get("readOnly", False) is not writable, mount
    assert host_paths["host-proc"]["path"] == "/proc" and "/host/proc" in mounts
    assert "/sys/kernel/btf" in mounts
    netns = mounts.get("/run/netns")
    if values["xfrmState"]["allNamespaces"]:
        assert netns and netns["mountPropagation"] == "HostToContainer"
    else:
        assert netns is None
    assert ("/sys/kernel/tracing" in mounts) == values["tracefs"]["enabled"]
    log_dir = values["output"]["file"]["enabled"] or values["output"]["pcap"]["enabled"]
    assert ("/var/log/xfrmtrace" in mounts) == log_dir
    if log_dir:
        assert host_paths["logs"]["path"] == values["output"]["file"]["hostPath"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


@scenario
def test_every_capability_has_a_reason(name: str) -> None:
    """In the rendered manifest each added capability sits on its own line with a comment."""
    raw = rendered(name)[1]
    block = re.search(r"\n( +)add:\n((?:\1  - .*\n)+)", raw)
    assert block, "no capabilities add: block"
    lines = block.group(2).splitlines()
    assert len(lines) == len(container(name)["securityContext"]["capabilities"]["add"])
    for line in lines:
        assert re.fullmatch(r" +- [A-Z_]+ +# \S.{10,}", line), line


# --- 4. the tool's command line ------------------------------------------------------------

@scenario
def test_args_follow_values(name: str) -> None:
    values = scenario_values(name)
    ctr = container(name)
    args = ctr["args"]
    assert ctr["command"] == ["xfrmtrace"] and args[0] == "trace"
    assert flag_value(args, "--output") == values["output"]["format"]
    assert ("--output-stack" in args) == values["output"]["stack"]
    assert ("--no-xfrm-state" in args) == (not values["xfrmState"]["enabled"])
    assert flag_value(args, "--rate-limit") == str(values["rateLimit"])
    assert flag_value(args, "--ringbuf-size") == str(values["ringbufSizeMiB"])
    if "ringbufSizeMiB" not in (yaml.safe_load(SCENARIOS[name].read_text()) or {}):
        # The chart's default is the tool's (XT_RINGBUF_DEFAULT, declared once in bpf/xfrm.h).
        assert values["ringbufSizeMiB"] << 20 == abi.XT_RINGBUF_DEFAULT
    assert flag_value(args, "--host-proc") == "/host/proc"
    assert flag_value(args, "--cache-dir") == "/var/cache/xfrmtrace"
    counters = values["filters"]["counters"]
    assert flag_value(args, "--filter-counter") == (",".join(counters) if counters else None)
    assert flag_value(args, "--filter-netns") == (str(values["filters"]["netns"]) or None)
    assert flag_value(args, "--filter-mark") == (str(values["filters"]["mark"]) or None)

    env = {e["name"]: e for e in ctr["env"]}
    assert env["PYTHONDONTWRITEBYTECODE"]["value"] == "1"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    metrics = values["metrics"]
    if metrics["enabled"]:
        port = metrics["port"]
        assert flag_value(args, "--metrics-netns-limit") == str(metrics["netnsLimit"])
        if metrics["exposure"] != "kubeRbacProxy":
            assert ctr["ports"] == [{"name": "metrics", "containerPort": port,
                                     "hostPort": port, "protocol": "TCP"}]
        probe: dict[str, Any] = {"path": "/metrics", "port": "metrics"}
        if metrics["exposure"] == "kubeRbacProxy":
            # The tool behind the proxy, on loopback; the proxy has the node's port.
            internal = metrics["kubeRbacProxy"]["internalPort"]
            assert flag_value(args, "--metrics-addr") == f"127.0.0.1:{internal}"
            assert "POD_IP" not in env and "ports" not in ctr
            probe.update(host="127.0.0.1", port=internal)
        elif metrics["exposure"] == "localhost":
            # Not on the node IP at all; the kubelet (host network namespace) still probes it.
            assert flag_value(args, "--metrics-addr") == f"127.0.0.1:{port}"
            assert "POD_IP" not in env
            probe["host"] = "127.0.0.1"
        else:
            assert flag_value(args, "--metrics-addr") == f"$(POD_IP):{port}"
            assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert ctr["readinessProbe"]["httpGet"] == probe
    else:
        assert "--metrics-addr" not in args and "POD_IP" not in env
        assert "ports" not in ctr and "readinessProbe" not in ctr

    file_out = values["output"]["file"]
    if file_out["enabled"]:
        assert flag_value(args, "--output-file") == "/var/log/xfrmtrace/events.log"
        assert flag_value(args, "--output-file-size") == str(file_out["maxSizeMiB"])
        assert flag_value(args, "--output-file-count") == str(file_out["count"])
    else:
        assert "--output-file" not in args
    assert (flag_value(args, "--output-pcap") == "/var/log/xfrmtrace/events.pcapng") == \
        values["output"]["pcap"]["enabled"]
    extra = values["extraArgs"]
    assert args[len(args) - len(extra):] == extra


def test_args_of_named_scenarios() -> None:
    """The examples of the issue, spelled out."""
    full = container("full")["args"]
    assert flag_value(full, "--filter-counter") == \
        "XfrmInNoStates,XfrmOutNoStates,XfrmInStateProtoError"
    assert flag_value(full, "--output") == "text" and "--output-stack" in full
    assert flag_value(full, "--filter-mark") == "0xd00/0xf00"
    assert full[-1] == "--verbose"

    minimal = container("minimal")["args"]
    assert "--no-xfrm-state" in minimal and "--metrics-addr" not in minimal
    caps = set(container("minimal")["securityContext"]["capabilities"]["add"])
    assert not caps & {"SYS_ADMIN", "NET_ADMIN"}

    lab = container("lab")["args"]
    assert flag_value(lab, "--metrics-addr") == "$(POD_IP):9477"
    assert flag_value(lab, "--output-file-size") == "1"
    assert flag_value(lab, "--output-file-count") == "3"
    assert flag_value(lab, "--output-pcap") == "/var/log/xfrmtrace/events.pcapng"
    assert flag_value(lab, "--rate-limit") == "0"

    localhost = rendered("localhost")[0]
    assert flag_value(container("localhost")["args"], "--metrics-addr") == "127.0.0.1:9477"
    assert "prometheus.io/scrape" not in yaml.safe_dump(localhost)  # nothing to scrape remotely
    [test_pod] = [o for o in localhost if o["kind"] == "Pod"]
    assert {"name": "HOST_IP", "value": "127.0.0.1"} in test_pod["spec"]["containers"][0]["env"]

    default = container("default")
    assert flag_value(default["args"], "--metrics-netns-limit") == "64"
    assert flag_value(default["args"], "--output") == "json"
    assert flag_value(default["args"], "--rate-limit") == "100"
    assert "SYS_ADMIN" in default["securityContext"]["capabilities"]["add"]


def test_numbers_in_values_files_stay_integers(tmp_path: Path) -> None:
    """YAML reads 0xd00 and big inodes as numbers; helm must not print them as floats."""
    values = tmp_path / "numbers.yaml"
    values.write_text("filters: {mark: 0xd00, netns: 4026531840}\nrateLimit: 1000000\n"
                      "output: {file: {enabled: true, maxSizeMiB: 2048}}\n")
    (ctr,) = daemonset_pod_spec(render_chart([values]))["containers"]
    args = ctr["args"]
    assert flag_value(args, "--filter-mark") == "3328"
    assert flag_value(args, "--filter-netns") == "4026531840"
    assert flag_value(args, "--rate-limit") == "1000000"
    assert flag_value(args, "--output-file-size") == "2048"
    values.write_text("output: {file: {enabled: true, maxSizeMiB: 0.5}}\n")
    (ctr,) = daemonset_pod_spec(render_chart([values]))["containers"]
    assert flag_value(ctr["args"], "--output-file-size") == "0.5"


def test_render_chart_set_values() -> None:
    """--set as the VM lab uses it: a fraction arrives as a string and passes unchanged."""
    objects = render_chart([SCENARIOS["lab"]], {"output.file.maxSizeMiB": "0.01",
                                                "output.file.count": "50"})
    (ctr,) = daemonset_pod_spec(objects)["containers"]
    assert flag_value(ctr["args"], "--output-file-size") == "0.01"
    assert flag_value(ctr["args"], "--output-file-count") == "50"
    with pytest.raises(ValueError, match="one DaemonSet"):
        daemonset_pod_spec([o for o in objects if o["kind"] != "DaemonSet"])


def test_apparmor_profile() -> None:
    """Only rendered when set (the field is Kubernetes >= 1.30), and then valid there."""
    assert "appArmorProfile" not in container("default")["securityContext"]
    objects = render_chart([], {"appArmorProfile.type": "Unconfined"})
    (ctr,) = daemonset_pod_spec(objects)["containers"]
    assert ctr["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    kubernetes_validate.validate(daemonset, "1.34", strict=True)


def test_helm_test_pod() -> None:
    """The `helm test` hook fetches the node-local metrics and greps the build info."""
    (pod,) = [o for o in rendered("lab")[0] if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    assert spec["hostNetwork"] is True and spec["restartPolicy"] == "Never"
    (ctr,) = spec["containers"]
    assert ctr["image"] == container("lab")["image"]
    assert ctr["command"][0] == "python3" and "xfrmtrace_build_info" in ctr["command"][-1]
    env = {e["name"]: e for e in ctr["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["METRICS_PORT"]["value"] == "9477"
    assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    compile(ctr["command"][-1], "test-metrics", "exec")  # the script is valid Python


def _helm_test_script(name: str) -> str:
    (pod,) = [o for o in rendered(name)[0] if o["kind"] == "Pod"]
    script: str = pod["spec"]["containers"][0]["command"][-1]
    return script


def test_helm_test_script_reads_the_real_endpoint() -> None:
    """The hook's script, run here against the tool's real metrics server: it passes on
    xfrmtrace metrics, and fails on an endpoint that serves something else."""
    metrics = pytest.importorskip("xfrmtrace.output.metrics")
    server = metrics.MetricsServer(("127.0.0.1", 0))
    server.start(lambda: None)
    port = server.url.rsplit(":", 1)[1].split("/")[0]
    env = {"HOST_IP": "127.0.0.1", "METRICS_PORT": port, "METRICS_SCHEME": "http",
           "PATH": "/usr/bin:/bin"}
    try:
        ran = subprocess.run([sys.executable, "-c", _helm_test_script("default")], env=env,
                             capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "serves xfrmtrace_build_info" in ran.stdout

    with socket.socket() as other:  # an HTTP server that is not xfrmtrace
        other.bind(("127.0.0.1", 0))
        other.listen()
        env["METRICS_PORT"] = str(other.getsockname()[1])
        script = subprocess.Popen([sys.executable, "-c", _helm_test_script("default")], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        conn, _ = other.accept()
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        conn.close()
        out, _ = script.communicate(timeout=60)
    assert script.returncode != 0 and "has no xfrmtrace_build_info" in out, out


class _Endpoint(http.server.BaseHTTPRequestHandler):
    """What the hook meets behind kube-rbac-proxy: 401 without the token (when ``token`` is
    set), metrics with it."""

    token: Optional[str] = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.token is not None and \
                self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_error(401)
            return
        body = b'xfrmtrace_build_info{version="x"} 1.0\n'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass


def test_helm_test_script_over_https_with_the_token(tmp_path: Path) -> None:
    """The rbacproxy hook's script against an HTTPS endpoint with a self-signed certificate
    that wants the token: it sends the token and checks that a request without it gets 401;
    an endpoint that serves without a token fails it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (Debian package openssl) for a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=kube-rbac-proxy", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    token = tmp_path / "token"
    token.write_text("sekrit-token\n")

    def run(wanted_token: Optional[str]) -> subprocess.CompletedProcess:
        handler = type("Handler", (_Endpoint,), {"token": wanted_token})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {"HOST_IP": "127.0.0.1", "METRICS_PORT": str(server.server_address[1]),
               "METRICS_SCHEME": "https", "TOKEN_FILE": str(token), "PATH": "/usr/bin:/bin"}
        try:
            return subprocess.run([sys.executable, "-c", _helm_test_script("rbacproxy")],
                                  env=env, capture_output=True, text=True, timeout=60)
        finally:
            server.shutdown()
            server.server_close()

    guarded = run("sekrit-token")
    assert guarded.returncode == 0, guarded.stdout + guarded.stderr
    assert "refuses a request without a token (401)" in guarded.stdout
    wide_open = run(None)
    assert wide_open.returncode != 0
    assert "served metrics without a token" in wide_open.stdout + wide_open.stderr


def test_kube_rbac_proxy() -> None:
    """exposure=kubeRbacProxy: the proxy owns the node's port over HTTPS, the tool listens on
    loopback only, only the proxy gets an API token, and the RBAC is exactly what it needs."""
    objects = rendered("rbacproxy")[0]
    pod = daemonset_pod_spec(objects)
    tool, proxy = pod["containers"]
    assert proxy["name"] == "kube-rbac-proxy"
    assert proxy["image"] == "quay.io/brancz/kube-rbac-proxy:v0.19.1"
    assert proxy["args"] == ["--secure-listen-address=$(POD_IP):9477",
                             "--upstream=http://127.0.0.1:9476/", "--allow-paths=/metrics"]
    assert flag_value(tool["args"], "--metrics-addr") == "127.0.0.1:9476"
    assert proxy["ports"] == [{"name": "metrics", "containerPort": 9477, "hostPort": 9477,
                               "protocol": "TCP"}]
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    # The token: projected for the proxy alone, never for the tracer.
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert pod["automountServiceAccountToken"] is False
    assert [m["mountPath"] for m in proxy["volumeMounts"]] == [token_path]
    assert all(not m["mountPath"].startswith("/var/run/secrets/kubernetes.io")
               for m in tool["volumeMounts"])
    (token,) = [v for v in pod["volumes"] if v["name"] == "kube-rbac-proxy-token"]
    assert token["projected"]["sources"][0]["serviceAccountToken"]["path"] == "token"

    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    bindings = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRoleBinding"}
    assert roles["xfrmtrace-kube-rbac-proxy"]["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
         "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
         "verbs": ["create"]}]
    assert roles["xfrmtrace-metrics-reader"]["rules"] == [
        {"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    own = {"kind": "ServiceAccount", "name": "xfrmtrace", "namespace": "kube-system"}
    assert bindings["xfrmtrace-kube-rbac-proxy"]["subjects"] == [own]
    assert bindings["xfrmtrace-metrics-reader"]["subjects"] == [
        own, {"kind": "ServiceAccount", "name": "prometheus-k8s", "namespace": "monitoring"}]
    for name, binding in bindings.items():
        assert binding["roleRef"]["name"] == name and name in roles

    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {"insecureSkipVerify": True}
    assert endpoint["bearerTokenFile"] == f"{token_path}/token"
    (daemonset,) = [o for o in objects if o["kind"] == "DaemonSet"]
    assert daemonset["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/scheme"] == "https"
    # helm test scrapes with the release's token (bound to the reader role above).
    (test_pod,) = [o for o in objects if o["kind"] == "Pod"]
    assert test_pod["spec"]["serviceAccountName"] == "xfrmtrace"
    env = {e["name"]: e.get("value") for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["METRICS_SCHEME"] == "https" and env["TOKEN_FILE"]
    # Nothing of it without the proxy.
    assert not {"ClusterRole", "ClusterRoleBinding"} & {o["kind"] for o in rendered("default")[0]}
    assert len(daemonset_pod_spec(rendered("default")[0])["containers"]) == 1


# --- 5. values schema --------------------------------------------------------------------

def _undescribed(schema: dict[str, Any], where: str) -> list[str]:
    missing = []
    for key, prop in schema.get("properties", {}).items():
        path = f"{where}.{key}"
        if not prop.get("description"):
            missing.append(path)
        missing += _undescribed(prop, path)
        if isinstance(prop.get("items"), dict):
            missing += _undescribed(prop["items"], path + "[]")
    return missing


def test_schema_describes_every_value() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert _undescribed(schema, "") == []
    # Every key of values.yaml is in the schema (and so described).
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def keys(values: dict[str, Any], node: dict[str, Any], where: str) -> list[str]:
        out = []
        for key, value in values.items():
            prop = node.get("properties", {}).get(key)
            if prop is None:
                out.append(f"{where}.{key}")
            elif isinstance(value, dict) and "properties" in prop:
                out += keys(value, prop, f"{where}.{key}")
        return out

    assert keys(defaults, schema, "") == []


@pytest.mark.parametrize("setting, named", [
    ("output.format=xml", "/output/format"),
    ("rateLimit=-1", "/rateLimit"),
    ("noSuchValue=1", "noSuchValue"),
    ("metrics.port=70000", "/metrics/port"),
    ("filters.counters={XfrmInNoStates,bogus}", "/filters/counters/1"),
    ("filters.mark=0xd00/", "/filters/mark"),
    ("output.file.count=0", "/output/file/count"),
    ("output.file.maxSizeMiB=0.0", "/output/file/maxSizeMiB"),
    ("xfrmState.allNamespces=false", "allNamespces"),
    ("metrics.exposure=0.0.0.0", "/metrics/exposure"),
    ("metrics.netnsLimit=-1", "/metrics/netnsLimit"),
    # 127.0.0.1 cannot be reached through a Service: refused, not rendered broken.
    ("metrics.exposure=localhost,metrics.serviceMonitor.enabled=true",
     "metrics.exposure=localhost"),
    ("metrics.exposure=kubeRbacProxy,metrics.kubeRbacProxy.internalPort=9477", "internalPort"),
    ("metrics.kubeRbacProxy.readers[0].name=prometheus", "/metrics/kubeRbacProxy/readers/0"),
])
def test_bad_value_fails_naming_it(setting: str, named: str) -> None:
    proc = helm("template", "x", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"--set {setting} rendered"
    assert named in proc.stderr, proc.stderr


# --- 6. NOTES.txt -------------------------------------------------------------------------

def render_notes(values_file: Path, tmp_path: Path) -> str:
    """NOTES.txt rendered by helm's own engine, offline.

    ``helm install --dry-run=client`` would print it, but helm 3 still contacts the cluster
    in that mode (helm/helm#13144, #31112) and ``helm template`` never renders NOTES.txt.  So a
    copy of the chart gets one more template that runs NOTES.txt through ``tpl`` with the
    same values and helpers, and ``--show-only`` prints just that.
    """
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data: {notes: {{ tpl (.Files.Get "notes.txt") . | quote }}}\n')
    proc = helm("template", "xfrmtrace", str(chart), "-n", "kube-system", "-f", str(values_file),
                "--show-only", "templates/zz-notes.yaml")
    notes: str = yaml.safe_load(proc.stdout)["data"]["notes"]
    return notes


@scenario
def test_notes(name: str, tmp_path: Path) -> None:
    values = scenario_values(name)
    notes = render_notes(SCENARIOS[name], tmp_path)
    assert "kubectl logs -n kube-system -l app.kubernetes.io/name=xfrmtrace" in notes
    granted = set(re.findall(r"^  ([A-Z_]+) {2,}\S", notes, re.M))
    assert granted == expected_capabilities(values), notes
    port = values["metrics"]["port"]
    assert (f":{port}/metrics" in notes) == values["metrics"]["enabled"]
    if values["metrics"]["enabled"]:  # who can read them is said, with what to do about it
        exposure = values["metrics"]["exposure"]
        assert ("Every pod and host that reaches a node's IP can read them" in notes) == \
            (exposure == "node")
        assert (f"http://127.0.0.1:{port}/metrics" in notes) == (exposure == "localhost")
        assert (f"https://<node IP>:{port}/metrics" in notes) == (exposure == "kubeRbacProxy")
    assert ("events.pcapng" in notes) == values["output"]["pcap"]["enabled"]
    assert ("instead of stdout" in notes) == values["output"]["file"]["enabled"]


# --- 7. helm package ------------------------------------------------------------------------

def test_package(tmp_path: Path) -> None:
    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("*.tgz")
    assert archive.name == "xfrmtrace-0.1.0.tgz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for member in ("Chart.yaml", "values.yaml", "values.schema.json", "templates/NOTES.txt",
                   "templates/daemonset.yaml", "templates/tests/test-metrics.yaml"):
        assert f"xfrmtrace/{member}" in names
    assert not any(n.startswith("xfrmtrace/ci/") for n in names)  # .helmignore


def test_key_fingerprint_secret() -> None:
    """One secret per release, mounted read-only, passed as --key-fingerprint-secret; a
    Secret of the user's instead when named; nothing without keyFingerprint."""
    objects = render_chart([])
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    assert len(base64.b64decode(secret["data"]["secret"])) >= 16
    spec = daemonset_pod_spec(objects)
    (ctr,) = spec["containers"]
    path = flag_value(ctr["args"], "--key-fingerprint-secret")
    (mount,) = [m for m in ctr["volumeMounts"] if m["name"] == "key-fingerprint"]
    assert mount["readOnly"] is True and path == mount["mountPath"] + "/secret"
    (volume,) = [v for v in spec["volumes"] if v["name"] == "key-fingerprint"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert volume["secret"]["defaultMode"] == 0o400

    mine = render_chart([], {"keyFingerprint.existingSecret": "ipsec-fingerprint"})
    assert not [o for o in mine if o["kind"] == "Secret"]
    (volume,) = [v for v in daemonset_pod_spec(mine)["volumes"] if v["name"] == "key-fingerprint"]
    assert volume["secret"]["secretName"] == "ipsec-fingerprint"

    off = render_chart([], {"keyFingerprint.enabled": "false"})
    assert not [o for o in off if o["kind"] == "Secret"]
    (ctr,) = daemonset_pod_spec(off)["containers"]
    assert "--key-fingerprint-secret" not in ctr["args"]
    assert all(m["name"] != "key-fingerprint" for m in ctr["volumeMounts"])
