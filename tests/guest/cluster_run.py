"""Guest side: two namespaces play two nodes, each traced by its own tool, for the report
across nodes (tests/test_vm_deploy.py runs `xfrmtrace report` on what this records).

Runs INSIDE the VM.  Namespace ``xn-a`` is node-a, ``xn-b`` node-b; each has its own
xfrmtrace (``--node-name``, ``--filter-netns``: that namespace's events and SA/policy
timeline only) and the same key fingerprint secret, writing one JSON log, as a DaemonSet
pod per node would.  A sends pings to
B while, in turn:

1. **rotation, old inbound SA removed too early**: B installs the new inbound SPI and
   deletes the old one at once; A still sends with the old one.  Then A switches.
2. **SA replaced under the sender**: A's outbound SA is replaced by one with a new SPI
   that B never learns.  Then B learns it.
3. **peer reboot**: B "reboots": its tracer stops, its SAs are gone, it comes back with
   its own new outbound SA only, and a new tracer (a new log, as after a node reboot)
   sees A's packets for an SPI it never had.

Each step's packets, SPIs and the receiver's /proc/net/xfrm_stat go to ``cluster.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List

from vmlab.guest import ipsec
from vmlab.guest import tool as guest_tool

NODES = {"node-a": "xn-a", "node-b": "xn-b"}
ROTATED_SPI, REPLACED_SPI, AFTER_REBOOT_SPI = 0x1001, 0x5000, 0x6000
CACHE = "/tmp/xfrmtrace-cache-pyz"  # warm from the zipapp phase: the same kernel's sites
PORTS = {"node-a": 9481, "node-b": 9482, "node-b-rebooted": 9483}  # one metrics port each
SECRET = "fingerprint-secret"  # shared by the tracers, as the chart's Secret is


def _tool(out: Path, node: str, log: str) -> guest_tool.Tool:
    directory = out / log
    directory.mkdir(parents=True, exist_ok=True)
    # The last --metrics-addr counts: Tool's default port is taken by the first one.
    return guest_tool.Tool(directory, ["--node-name", node, "--filter-netns", NODES[node],
                                       "--metrics-addr", f"127.0.0.1:{PORTS[log]}",
                                       "--key-fingerprint-secret", str(out / SECRET)],
                           cache_dir=CACHE)


def _start(out: Path, node: str, log: str) -> guest_tool.Tool:
    tool = _tool(out, node, log)
    if not tool.wait_ready():
        tool.stop()
        raise ipsec.LabError(f"{node}'s tracer did not start: {tool.stderr_path.read_text()}")
    return tool


def _step(lab: ipsec.Lab, name: str, steps: List[Dict[str, Any]], count: int) -> None:
    """A pings B ``count`` times; what B's counters did."""
    before = lab.xfrm_stat(lab.cfg.ns_b)
    lab.ping(lab.cfg.ns_a, lab.cfg.addr_b, count=count)
    time.sleep(0.5)
    moved = ipsec.counter_delta(before, lab.xfrm_stat(lab.cfg.ns_b))
    steps.append({"step": name, "sent": count, "moved": {k: v for k, v in moved.items() if v}})


def run(out: Path, count: int) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / SECRET).write_text("one secret for every node of this lab\n")
    lab = ipsec.Lab(ipsec.LabConfig(ns_a=NODES["node-a"], ns_b=NODES["node-b"],
                                    veth_a="xn-va", veth_b="xn-vb"))
    c = lab.cfg
    record: Dict[str, Any] = {"steps": [], "addresses": {"node-a": c.addr_a, "node-b": c.addr_b},
                              "spis": {"initial": c.spi_ab, "rotated": ROTATED_SPI,
                                       "replaced": REPLACED_SPI}}
    tools: Dict[str, guest_tool.Tool] = {}
    try:
        lab.setup()
        tools["node-a"] = _start(out, "node-a", "node-a")
        tools["node-b"] = _start(out, "node-b", "node-b")
        _step(lab, "healthy", record["steps"], 1)

        ab_in_b = lab.sa(c.ns_b, c.addr_a, c.addr_b)
        ab_in_a = lab.sa(c.ns_a, c.addr_a, c.addr_b)
        # 1. Rotation: B has the new SPI and drops the old one while A still sends with it.
        dataclasses.replace(ab_in_b, spi=ROTATED_SPI).install(c.mark, c.mask)
        lab.delete_state(c.ns_b, c.spi_ab, c.addr_b)
        _step(lab, "rotation-early-removal", record["steps"], count)
        dataclasses.replace(ab_in_a, spi=ROTATED_SPI).install(c.mark, c.mask)
        lab.delete_state(c.ns_a, c.spi_ab, c.addr_b)
        _step(lab, "rotation-done", record["steps"], 1)

        # 2. A's SA is replaced under it: a new SPI B never learns.
        lab.delete_state(c.ns_a, ROTATED_SPI, c.addr_b)
        dataclasses.replace(ab_in_a, spi=REPLACED_SPI).install(c.mark, c.mask)
        _step(lab, "replaced-under-sender", record["steps"], count)
        dataclasses.replace(ab_in_b, spi=REPLACED_SPI).install(c.mark, c.mask)
        lab.delete_state(c.ns_b, ROTATED_SPI, c.addr_b)
        _step(lab, "replaced-learned", record["steps"], 1)

        # 3. B reboots: tracer gone, SAs gone; back with its own new outbound SA only.
        record["node-b-returncode"] = tools.pop("node-b").stop()
        ipsec.run(["ip", "-n", c.ns_b, "xfrm", "state", "flush"])
        dataclasses.replace(lab.sa(c.ns_b, c.addr_b, c.addr_a),
                            spi=AFTER_REBOOT_SPI).install(c.mark, c.mask)
        tools["node-b-rebooted"] = _start(out, "node-b", "node-b-rebooted")
        _step(lab, "peer-reboot", record["steps"], count)
    except ipsec.LabError as err:
        record["error"] = str(err)
    finally:
        for name, tool in tools.items():
            record[f"{name}-returncode"] = tool.stop()
        lab.teardown()
    record["kprobes_after_exit"] = guest_tool.kprobes()
    (out / "cluster.json").write_text(json.dumps(record, indent=1))
    return record
