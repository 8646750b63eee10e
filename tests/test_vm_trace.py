"""End to end on a real kernel: xfrmtrace runs in a VM while real IPsec traffic moves counters.

The guest (tests/vmlab/trace_run.py) starts the tool once, runs the scenarios
in fresh pairs of network namespaces, and records the tool's JSON output plus
/proc/net/xfrm_stat deltas; these tests assert on that record.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.vmlab import kernels, vm  # noqa: E402

KERNELS = os.environ.get("XFRMTRACE_KERNELS", "6.1").replace(",", " ").split()
PACKETS = 3
SCENARIOS = ("in-no-states", "out-no-states")
GUEST_TOOLS = ("ip", "iptables", "ping")

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", params=KERNELS)
def run(request, tmp_path_factory) -> dict:
    missing = vm.missing_requirements()
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing += [t for t in GUEST_TOOLS if shutil.which(t, path=search) is None]
    if missing:
        pytest.skip("VM lab cannot run here: missing " + "; ".join(missing))
    series = request.param
    kernel = kernels.fetch_kernel(series)
    rwdir = tmp_path_factory.mktemp(f"vm-{series}")
    out = rwdir / "trace"
    command = shlex.join([sys.executable, "-m", "tests.vmlab.trace_run", "--out", str(out),
                          "--count", str(PACKETS), "--tool-arg=--output-stack", *SCENARIOS])
    result = vm.run_in_vm(kernel, command, rwdir=rwdir, cwd=REPO, timeout=1200,
                          env={"PYTHONDONTWRITEBYTECODE": "1"})
    print(f"{series} ({kernel.version}): total {result.seconds:.1f} s")
    assert result.ok, result.describe()
    data = json.loads((out / "results.json").read_text())
    data["kernel"] = kernel.version
    print(f"tool ready after {data['ready_seconds']} s; stderr: {data['stderr'][:500]}")
    for name in SCENARIOS:
        assert "error" not in data["scenarios"].get(name, {"error": "not run"}), \
            data["scenarios"].get(name)
    return data


def _events(data: dict, counter: str, netns: int) -> list[dict]:
    return [e for e in data["events"] if e["counter"] == counter and e["netns"] == netns]


def test_tool_ran_and_stopped_cleanly(run: dict) -> None:
    assert run["returncode"] == 0, run["stderr"]
    assert "Attached" in run["stderr"]
    attached = run["stderr"].split("Attached ", 1)[1].split()[0]
    done, expected = (int(x) for x in attached.split("/"))
    assert done == expected > 20
    assert run["summary"] is not None, "no summary printed on SIGINT"
    assert run["summary"]["lost"] == 0


def test_a_in_no_states_reports_packet(run: dict) -> None:
    scenario = run["scenarios"]["in-no-states"]
    assert scenario["healthy_before"], "lab broken: ping failed with all SAs in place"
    cfg = scenario["config"]
    netns_b = scenario["netns"][cfg["ns_b"]]
    events = _events(run, "XfrmInNoStates", netns_b)
    assert len(events) == PACKETS, run["events"]
    seqs = []
    for e in events:
        assert e["type"] == "xfrm_error"
        assert e["function"] == "xfrm_input", e
        assert e["netns_name"] == cfg["ns_b"]
        assert e["netns_verified"] is True
        assert e["context"] == "skb", e
        assert e["mark"] == cfg["mark"], e
        assert e["ifindex"] == scenario["ifindex"][cfg["veth_b"]]
        assert e["ifname"] == cfg["veth_b"]
        assert e["family"] == "ipv4"
        assert (e["src"], e["dst"]) == (cfg["addr_a"], cfg["addr_b"])
        assert e["proto"] == "esp"
        assert e["spi"] == cfg["spi_ab"]
        assert isinstance(e["seq"], int) and e["seq"] > 0
        assert e["time"].endswith("Z") and "T" in e["time"]
        seqs.append(e["seq"])
    assert seqs == sorted(seqs) and len(set(seqs)) == PACKETS  # one event per ESP packet
    # --output-stack: the probed instruction is the innermost frame.
    for e in events:
        assert e["stack"] and e["stack"][0].startswith(f"xfrm_input+{e['offset']:#x}"), e["stack"]


def test_b_out_no_states_reports_flow(run: dict) -> None:
    scenario = run["scenarios"]["out-no-states"]
    cfg = scenario["config"]
    netns_a = scenario["netns"][cfg["ns_a"]]
    events = _events(run, "XfrmOutNoStates", netns_a)
    assert len(events) >= PACKETS, run["events"]
    for e in events:
        assert e["netns_name"] == cfg["ns_a"]
        assert e["context"] in ("flow", "skb"), e
        assert e["family"] == "ipv4", e
        assert (e["src"], e["dst"]) == (cfg["addr_a"], cfg["addr_b"]), e
        assert e["mark"] == cfg["mark"], e


def test_c_event_counts_equal_proc_deltas(run: dict) -> None:
    """For every counter that moved in every namespace, events == /proc delta, exactly.

    The tool runs for the whole life of each namespace, whose counters start at zero, so
    the delta is the namespace's final /proc/net/xfrm_stat.
    """
    checked = 0
    for scenario in run["scenarios"].values():
        for ns, delta in scenario["totals"].items():
            inode = scenario["netns"][ns]
            seen = Counter(e["counter"] for e in run["events"] if e["netns"] == inode)
            moved = {name: n for name, n in delta.items() if n}
            assert dict(seen) == moved, f"netns {ns}: events {dict(seen)} vs /proc {moved}"
            checked += len(moved)
    assert checked >= 2  # both scenarios moved something


def test_summary_counts_match_events(run: dict) -> None:
    events_per_counter = Counter(e["counter"] for e in run["events"])
    summary = run["summary"]["counters"]
    for counter, n in events_per_counter.items():
        assert summary.get(counter) == n, (counter, summary)
