"""Guest side: a real Prometheus server scrapes the running tool and evaluates the chart's
alerts while a scenario drops packets.

Runs INSIDE the VM (from tests/guest/deploy_run.py, while the pod runs).  Debian's
``prometheus`` binary scrapes the tool every second and evaluates the rules the host
rendered from the chart (thresholds lowered so that a lab's few packets count).  A
counter series appears at the scrape after its first increment, and ``rate()`` sees only
what happens after that, as on a real node: so the lab drops packets once, waits until the
series is in Prometheus, then drops more and waits for the alert to fire.  Before any of
that, a few evaluations of the healthy node must fire nothing.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from tests.guest import scenarios
from vmlab.guest import ipsec
from vmlab.guest import tool as guest_tool

LISTEN = "127.0.0.1:9090"
ALERT = "XfrmtraceInboundNoSA"
TIMEOUT = 180.0  # Prometheus under TCG: start-up, then the rule evaluations
NODE = "vm"
BASELINE_SECONDS = 4.0  # scrape and evaluation every second: rate() has samples by then


def _api(path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://{LISTEN}/api/v1/{path}{query}", timeout=10) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus API {path}: {body}")
    return body["data"]


def _wait(what: str, check: Callable[[], Any], proc: subprocess.Popen) -> tuple[Any, float]:
    started = time.monotonic()
    while time.monotonic() - started < TIMEOUT:
        if proc.poll() is not None:
            raise RuntimeError(f"Prometheus exited ({proc.returncode}) while waiting for {what}")
        try:
            found = check()
        except (OSError, RuntimeError, ValueError):
            found = None
        if found:
            return found, round(time.monotonic() - started, 1)
        time.sleep(1.0)
    raise RuntimeError(f"timed out after {TIMEOUT:.0f} s waiting for {what}")


def _config(out: Path, target: str, rules: Path) -> Path:
    path = out / "prometheus.yml"
    path.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "xfrmtrace", "static_configs": [
            {"targets": [target], "labels": {"node": NODE}}]}],
    }))
    return path


def _target_up() -> bool:
    # activeTargets is empty until service discovery has run once: not up yet, not an error.
    return any(t.get("health") == "up" for t in _api("targets")["activeTargets"])


def _series(netns: int) -> Callable[[], List[Any]]:
    def check() -> List[Any]:
        return _api("query", query=f'xfrmtrace_xfrm_errors_total{{counter="XfrmInNoStates",'
                                   f'netns="{netns}"}}')["result"]  # type: ignore[no-any-return]
    return check


def _firing() -> List[Dict[str, Any]]:
    return [a for a in _api("alerts")["alerts"]
            if a["labels"].get("alertname") == ALERT and a["state"] == "firing"]


def alert_phase(target: str, rules: Path, out: Path, count: int) -> Dict[str, Any]:
    """Run Prometheus against the tool at ``target``; what it saw, for the host to assert."""
    record: Dict[str, Any] = {}
    binary = shutil.which("prometheus")
    if binary is None:
        return {"error": "no prometheus binary in the guest (Debian package prometheus)"}
    storage = Path("/tmp/prometheus-data")
    shutil.rmtree(storage, ignore_errors=True)
    log = open(out / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={_config(out, target, rules)}",
                             f"--storage.tsdb.path={storage}",
                             f"--web.listen-address={LISTEN}"],
                            stdout=log, stderr=subprocess.STDOUT)
    ctx: Optional[scenarios.Context] = None
    try:
        _, record["ready_seconds"] = _wait("the server to scrape the tool", _target_up, proc)
        # A few scrapes and evaluations of the healthy node first (the earlier scenarios'
        # series are there, constant): nothing may fire on them.
        time.sleep(BASELINE_SECONDS)
        record["firing_before"] = _firing()
        ctx = scenarios.Context("prom", count)
        record["scenario"] = scenarios.run_one(scenarios.SCENARIOS["in-no-states"], ctx,
                                               set(ipsec.parse_xfrm_stat(
                                                   Path("/proc/net/xfrm_stat").read_text())))
        lab = ctx.labs[0]
        netns_b = record["scenario"]["labs"][0]["netns"][lab.cfg.ns_b]
        record["netns_b"] = netns_b
        # The series is born with its first increments; whether rate() sees the scenario's
        # own drops depends on whether a scrape fell between its pings: more drops now.
        _, record["series_seconds"] = _wait("the error series", _series(netns_b), proc)
        ctx.ping(lab)  # the SA is still gone: more packets dropped, now seen by rate()
        record["alerts"], record["alert_seconds"] = _wait(f"{ALERT} to fire", _firing, proc)
        time.sleep(2.0)  # two more scrapes: the counter's final value is in Prometheus
        record["scraped_total"] = [float(s["value"][1]) for s in _series(netns_b)()]
        record["proc_total"] = ipsec.parse_xfrm_stat(
            ipsec.run(["ip", "netns", "exec", lab.cfg.ns_b, "cat", "/proc/net/xfrm_stat"])
            .stdout).get("XfrmInNoStates")
        record["other_alerts"] = [a for a in _api("alerts")["alerts"]
                                  if a["labels"].get("alertname") != ALERT]
    except (RuntimeError, OSError, KeyError, IndexError, ipsec.LabError) as err:
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        guest_tool.stop_process(proc, signal.SIGTERM)
        log.close()
        if ctx is not None:
            ctx.close()
    record["log"] = (out / "prometheus.log").read_text()[-4000:]
    return record
