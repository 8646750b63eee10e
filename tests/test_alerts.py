"""The chart's PrometheusRule and Grafana dashboard, checked with Prometheus' own promtool.

The rules are what `helm template` renders: `promtool check rules` parses them (PromQL and
the alert templates), `promtool test rules` plays series through them and expects each
alert, with its labels and expanded annotations, exactly when it should fire and never
when it should not.  The dashboard's queries are parsed by promtool too, and every metric
they use must be one the tool serves (a real scrape of its metrics server).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.k8stools import CHART, render_chart
from xfrmtrace.kernel.counters import KNOWN_NAMES

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool (Debian package prometheus, installed by `make deps`)")
DASHBOARD = CHART / "dashboards" / "xfrmtrace.json"
ERROR_ALERTS = ("XfrmtraceInboundNoSA", "XfrmtraceInboundSAError", "XfrmtraceOutboundNoSA",
                "XfrmtraceXfrmErrors")
NODE_A = {"node": "node-a", "instance": "10.0.0.1:9477"}
NODE_B = {"node": "node-b", "instance": "10.0.0.2:9477"}


@functools.cache
def rendered_objects(**set_values: str) -> list[dict[str, Any]]:
    return render_chart([], {"metrics.prometheusRule.enabled": "true",
                             "metrics.grafanaDashboard.enabled": "true", **set_values})


def rule_groups() -> list[dict[str, Any]]:
    (rule,) = [o for o in rendered_objects() if o["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return rule["spec"]["groups"]  # type: ignore[no-any-return]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for group in rule_groups() for r in group["rules"]}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=120)


def write_rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    return path


# --- the rules ----------------------------------------------------------------------------

def test_objects_only_when_asked() -> None:
    kinds = {o["kind"] for o in render_chart([])}
    assert "PrometheusRule" not in kinds and "ConfigMap" not in kinds
    off = render_chart([], {"metrics.enabled": "false", "metrics.prometheusRule.enabled": "true",
                            "metrics.grafanaDashboard.enabled": "true"})
    assert not {"PrometheusRule", "ConfigMap"} & {o["kind"] for o in off}  # nothing to alert on


def test_every_alert_is_described() -> None:
    found = alerts()
    assert set(ERROR_ALERTS) | {"XfrmtraceEventsLost", "XfrmtraceProbesMissing"} == set(found)
    for name, rule in found.items():
        annotations = rule["annotations"]
        assert rule["labels"]["severity"] == "warning", name
        assert "{{ $labels.node }}" in annotations["summary"], name
        assert "1. " in annotations["description"], f"{name}: no steps to follow"


def _selectors(expr: str) -> list[tuple[str, str]]:
    return re.findall(r'counter(=~|!~|=)"([^"]*)"', expr)


def _matches(op: str, value: str, counter: str) -> bool:
    hit = re.fullmatch(value, counter) is not None  # Prometheus regexes are anchored
    return {"=": counter == value, "=~": hit, "!~": not hit}[op]


def test_every_counter_has_exactly_one_error_alert() -> None:
    found = alerts()
    for counter in KNOWN_NAMES:
        owners = [name for name in ERROR_ALERTS
                  if all(_matches(op, v, counter) for op, v in _selectors(found[name]["expr"]))]
        assert len(owners) == 1, f"{counter}: {owners}"


@needs_promtool
def test_promtool_check_rules(tmp_path: Path) -> None:
    proc = promtool("check", "rules", str(write_rules(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout


def expand(template: str, labels: dict[str, str], value: str) -> str:
    """The annotation as Prometheus renders it, for the two forms the chart uses."""
    text = template.replace("{{ $value | humanize }}", value)
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)


def expected(alert: str, labels: dict[str, str], value: str) -> dict[str, Any]:
    rule = alerts()[alert]
    all_labels = {**labels, **rule["labels"]}
    return {"exp_labels": all_labels,
            "exp_annotations": {k: expand(v, all_labels, value)
                                for k, v in rule["annotations"].items()}}


def errors(counter: str, node: dict[str, str], values: str) -> dict[str, str]:
    labels = {**node, "counter": counter, "function": "xfrm_input", "netns": "4026531840",
              "job": "xfrmtrace"}
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"xfrmtrace_xfrm_errors_total{{{body}}}", "values": values}


def gauge(name: str, node: dict[str, str], values: str) -> dict[str, str]:
    body = ",".join(f'{k}="{v}"' for k, v in {**node, "job": "xfrmtrace"}.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def alert_cases() -> list[dict[str, Any]]:
    """Series per case, one minute apart, and what must fire when (defaults: rate over 5m,
    above 0.1/s, for 5m)."""
    no_sa = dict(NODE_A, counter="XfrmInNoStates")
    proto = dict(NODE_B, counter="XfrmInStateProtoError")
    return [
        {   # node-a drops 1 packet/s for want of an SA; node-b is healthy; node-b's
            # protocol errors, 3/s, start at minute 10.
            "interval": "1m",
            "input_series": [
                errors("XfrmInNoStates", NODE_A, "0+60x30"),
                errors("XfrmInNoStates", NODE_B, "0x30"),
                errors("XfrmInStateProtoError", NODE_B, "0x10 180+180x20"),
            ],
            "alert_rule_test": [
                # pending, not yet firing: the condition has held for less than 5m
                {"eval_time": "4m", "alertname": "XfrmtraceInboundNoSA", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "XfrmtraceInboundNoSA",
                 "exp_alerts": [expected("XfrmtraceInboundNoSA", no_sa, "1")]},
                {"eval_time": "12m", "alertname": "XfrmtraceInboundSAError", "exp_alerts": []},
                {"eval_time": "22m", "alertname": "XfrmtraceInboundSAError",
                 "exp_alerts": [expected("XfrmtraceInboundSAError", proto, "3")]},
                # each counter belongs to one alert only
                {"eval_time": "22m", "alertname": "XfrmtraceXfrmErrors", "exp_alerts": []},
            ],
        },
        {   # 0.05/s for half an hour: below the threshold, never fires; an unknown newer
            # counter at 1/s goes to the catch-all alert.
            "interval": "1m",
            "input_series": [
                errors("XfrmOutNoStates", NODE_A, "0+3x30"),
                errors("XfrmInIptfsError", NODE_A, "0+60x30"),
            ],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "XfrmtraceOutboundNoSA", "exp_alerts": []},
                {"eval_time": "30m", "alertname": "XfrmtraceXfrmErrors",
                 "exp_alerts": [expected("XfrmtraceXfrmErrors",
                                         dict(NODE_A, counter="XfrmInIptfsError"), "1")]},
            ],
        },
        {   # 7 events lost at minute 3 on node-b: fires at once, gone 5m later; node-a is
            # missing one probe for good, node-b has all of them.
            "interval": "1m",
            "input_series": [
                gauge("xfrmtrace_events_lost_total", NODE_B, "0 0 0 7x20"),
                gauge("xfrmtrace_probes_attached", NODE_A, "47x20"),
                gauge("xfrmtrace_probes_expected", NODE_A, "48x20"),
                gauge("xfrmtrace_probes_attached", NODE_B, "48x20"),
                gauge("xfrmtrace_probes_expected", NODE_B, "48x20"),
            ],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "XfrmtraceEventsLost",
                 "exp_alerts": [expected("XfrmtraceEventsLost", NODE_B, "7")]},
                {"eval_time": "12m", "alertname": "XfrmtraceEventsLost", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "XfrmtraceProbesMissing", "exp_alerts": []},
                {"eval_time": "10m", "alertname": "XfrmtraceProbesMissing",
                 "exp_alerts": [expected("XfrmtraceProbesMissing", NODE_A, "1")]},
            ],
        },
    ]


@needs_promtool
def test_promtool_test_rules(tmp_path: Path) -> None:
    write_rules(tmp_path)
    tests = tmp_path / "alerts-test.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                     "tests": alert_cases()}, sort_keys=False))
    proc = promtool("test", "rules", str(tests))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_promtool_fails_a_wrong_expectation(tmp_path: Path) -> None:
    """The harness above can fail: expecting the alert on the healthy node is refused."""
    write_rules(tmp_path)
    case = alert_cases()[0]
    case["alert_rule_test"] = [{"eval_time": "12m", "alertname": "XfrmtraceInboundNoSA",
                                "exp_alerts": [expected("XfrmtraceInboundNoSA",
                                                        dict(NODE_B, counter="XfrmInNoStates"),
                                                        "1")]}]
    tests = tmp_path / "alerts-test.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                     "tests": [case]}, sort_keys=False))
    assert promtool("test", "rules", str(tests)).returncode != 0


def test_thresholds_follow_values() -> None:
    objects = rendered_objects(**{"metrics.prometheusRule.errorsPerSecond": "2",
                                  "metrics.prometheusRule.window": "10m",
                                  "metrics.prometheusRule.for": "1m",
                                  "metrics.prometheusRule.severity": "page"})
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    no_sa = rule["spec"]["groups"][0]["rules"][0]
    assert no_sa["expr"].endswith("[10m])) > 2") and no_sa["for"] == "1m"
    assert no_sa["labels"] == {"severity": "page"}


# --- the dashboard ------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def test_dashboard_configmap_carries_the_file() -> None:
    (cm,) = [o for o in rendered_objects() if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["xfrmtrace.json"]) == dashboard()
    other = render_chart([], {"metrics.grafanaDashboard.enabled": "true",
                              "metrics.grafanaDashboard.namespace": "monitoring"})
    (cm,) = [o for o in other if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["namespace"] == "monitoring"


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["type"] in {"stat", "timeseries", "table"}, panel["title"]
        assert panel["title"] and panel["description"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs)
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert '{instance=~"$instance"' in target["expr"], target["expr"]
    for i, a in enumerate(panels):
        for b in panels[i + 1:]:
            assert not _overlap(a["gridPos"], b["gridPos"]), (a["title"], b["title"])


def dashboard_queries() -> list[str]:
    """Every query, with Grafana's variables replaced by what they stand for."""
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard()["templating"]["list"] if "definition" in v]
    return [e.replace("$__rate_interval", "2m").replace("$__range", "1h")
            .replace("$instance", ".*") for e in exprs]


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    queries = [q for q in dashboard_queries() if not q.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def served_metric_names() -> set[str]:
    """The sample names a real scrape of the tool's metrics server returns."""
    pytest.importorskip("prometheus_client", reason="prometheus-client (extra metrics)")
    from tests.test_metrics import _scrape
    from xfrmtrace.output.metrics import MetricsServer, MetricsSnapshot

    server = MetricsServer(("127.0.0.1", 0))
    snapshot = MetricsSnapshot(errors={("XfrmInNoStates", "xfrm_input", "1"): 1},
                               probes_attached=1, probes_expected=1, netns_names={1: "blue"})
    try:
        server.start(lambda: snapshot)
        families = _scrape(server.url)
    finally:
        server.close()
    return {sample.name for samples in families.values() for sample in samples}


def test_dashboard_and_alerts_use_only_served_metrics() -> None:
    served = served_metric_names()
    used = {name for text in dashboard_queries() + [r["expr"] for r in alerts().values()]
            for name in re.findall(r"\bxfrmtrace_\w+", text)}
    assert used and used <= served, used - served
