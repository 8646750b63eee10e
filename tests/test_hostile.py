"""Hostile names: whoever runs a pod chooses interface, process, namespace names and tc kinds.

Each is fed through every output format (event text and JSON, SA/policy/tc change text and
JSON, the summary, log lines, `report` text and JSON, and the HTML page opened in headless
Chromium): no control or format character reaches a terminal, JSON readers still get the
exact name, and no markup from a name becomes part of the page.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.eventdata import decoder, packet, raw_event
from tests.test_report import CHROMIUM, run_report
from xfrmtrace import cli
from xfrmtrace.context.xfrmnl.changes import XfrmChange
from xfrmtrace.output import changes as changes_out
from xfrmtrace.output import jsonl, text
from xfrmtrace.output.safetext import json_line, printable
from xfrmtrace.output.summary import SiteTotal, Summary, format_json, format_text
from xfrmtrace.resolve.model import Site

# What a terminal, a text viewer or a browser would act on.
HOSTILE = [
    "\x1b]0;owned\x07",            # OSC: sets the terminal's title
    "\x1b[2J\x1b[H",               # CSI: clears the screen
    "\x9b31m",                     # 8-bit CSI (C1)
    "ab\x7f\x08\x08cd",            # DEL and backspaces: hide what came before
    "eth0\u202e1nsv",              # RIGHT-TO-LEFT OVERRIDE: the line reads backwards
    "zero\u200bwidth\u2066",       # zero-width space, bidi isolate
    "line\nbreak\rreturn\u2028",   # a fake second line
    "tag\U000e0041",               # TAG LATIN CAPITAL LETTER A (format, beyond the BMP)
    "bad\udcffbyte",               # a byte that was not UTF-8 (surrogateescape)
    "<script>document.body.dataset.pwned='1'</script>",
    "</script><img src=x onerror=\"document.body.dataset.pwned='1'\">",
    "<!--<script>",
]
NETNS = 4026532999


def inert(output: str) -> bool:
    """True when every character of ``output`` is printable, the line breaks aside."""
    return all(char == "\n" or char == " " or char.isprintable() for char in output)


@pytest.mark.parametrize("name", HOSTILE)
def test_printable_escapes_and_json_round_trips(name: str) -> None:
    shown = printable(name)
    assert inert(shown) and "\n" not in shown
    assert printable("plain eth0 käse") == "plain eth0 käse"
    line = json_line({"name": name})
    assert inert(line) and "\n" not in line
    assert json.loads(line)["name"] == name  # a JSON reader gets the exact name


def test_escapes_say_which_character_it_was() -> None:
    assert printable("a\x1bb") == "a\\x1bb"
    assert printable("bad\udcff") == "bad\\xff"  # the byte as it was
    assert printable("\u202e") == "\\u202e"
    assert printable("\U000e0041") == "\\U000e0041"


def _event(name: str):  # -> XfrmErrorEvent
    pkt = packet("ipv4-esp")
    event = decoder().decode(raw_event(pkt=pkt, skb_len=len(pkt), ifindex=2,
                                       ifname=name.encode("utf-8", "surrogateescape")[:15],
                                       comm=name.encode("utf-8", "surrogateescape")[:15]))
    return dataclasses.replace(event, netns_name=name)


@pytest.mark.parametrize("name", HOSTILE)
def test_event_text_and_json(name: str) -> None:
    event = _event(name)
    shown = text.format_event(event, utc=True)
    assert inert(shown) and len(shown.splitlines()) == 1
    assert f"netns={event.netns}({printable(name)})" in shown
    record = jsonl.format_event(event)
    assert inert(record) and "\n" not in record
    assert json.loads(record)["netns_name"] == name
    assert json.loads(record)["comm"] == event.comm and json.loads(record)["ifname"] == event.ifname


@pytest.mark.parametrize("name", HOSTILE)
def test_tc_change_text_and_json(name: str) -> None:
    change = XfrmChange(kind="tc", action="added", netns=NETNS, monotonic_ns=1,
                        time_ns=1_795_000_000_000_000_000, netns_name=name,
                        detail={"object": "qdisc", "ifindex": 3, "kind": name,
                                "parent": "root", "handle": "1:"})
    shown = changes_out.format_change_text(change, utc=True)
    assert inert(shown) and "\n" not in shown and f"kind={printable(name)}" in shown
    record = changes_out.format_change_json(change)
    assert inert(record) and json.loads(record)["detail"]["kind"] == name


@pytest.mark.parametrize("name", HOSTILE)
def test_summary_text_and_json(name: str) -> None:
    site = Site(object="vmlinux", function="xfrm_input", offset=0x12, address=0xFFFF0012,
                counter="XfrmInNoStates", counter_index=2, mib_reg="rax")
    summary = Summary(sites=[SiteTotal(site, 3, {NETNS: 3})], events=3, stats={}, duration=1.0)
    shown = format_text(summary, lambda inode: name)
    assert inert(shown) and f"netns {NETNS}({printable(name)}): 3" in shown
    record = format_json(summary, lambda inode: name)
    assert inert(record) and json.loads(record)["netns_names"] == {str(NETNS): name}


def test_log_lines_are_printable(capsys: pytest.CaptureFixture[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(cli._PrintableFormatter("xfrmtrace: %(levelname)s: %(message)s"))
    logger = logging.getLogger("xfrmtrace.test_hostile")
    logger.addHandler(handler)
    try:
        for name in HOSTILE:
            logger.warning("netns %s appeared", name)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert inert(err) and len(err.splitlines()) == len(HOSTILE)


def test_error_line_of_a_hostile_path_is_printable(tmp_path: Path) -> None:
    proc = run_report(str(tmp_path / "\x1b]0;owned\x07.jsonl"))
    assert proc.returncode == 1 and inert(proc.stderr)
    assert len(proc.stderr.splitlines()) == 1 and "\\x1b]0;owned\\x07" in proc.stderr


def write_hostile_log(path: Path) -> None:
    """A log as the tool writes it, with every hostile name in every string field the
    report shows, and one SA change per name."""
    lines = []
    for i, name in enumerate(HOSTILE):
        event = dataclasses.replace(_event(name), src=name, spi=0x1000 + i, dst="10.9.0.2",
                                    counter="XfrmInNoStates",
                                    time_ns=1_795_000_000_000_000_000 + i * 60_000_000_000)
        record = jsonl.event_to_dict(event)
        record["explain"] = {"summary": name, "details": [name], "sas": [], "policies": [],
                             "history": []}
        record["function"] = name
        lines.append(json_line(record))
        lines.append(json_line({"time": record["time"], "type": "sa", "action": name,
                                "netns": record["netns"], "netns_name": name,
                                "sa": {"spi": 0x1000 + i, "dst": "10.9.0.2", "src": name,
                                       "proto": name, "reqid": name}, "policy": None}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")


def test_report_text_and_json(tmp_path: Path) -> None:
    log = tmp_path / "hostile.jsonl"
    write_hostile_log(log)
    proc = run_report(str(log))
    assert proc.returncode == 0, proc.stderr
    assert inert(proc.stdout)
    assert len(re.findall("^XfrmInNoStates x1 ", proc.stdout, re.M)) == len(HOSTILE)
    assert printable(HOSTILE[0]) in proc.stdout
    as_json = run_report(str(log), "--output", "json")
    assert as_json.returncode == 0 and inert(as_json.stdout)
    assert {g["netns_name"] for g in json.loads(as_json.stdout)["groups"]} >= set(HOSTILE[:8])


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (Debian package "
                    "chromium-headless-shell, installed by `make deps`)")
def test_html_report_runs_no_injected_script(tmp_path: Path) -> None:
    log, page = tmp_path / "hostile.jsonl", tmp_path / "report.html"
    write_hostile_log(log)
    proc = run_report(str(log), "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    assert inert(page.read_text(encoding="utf-8"))
    dom = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    # The page's own script ran to the end (one dot per error minute) ...
    assert f'data-rendered="{len(HOSTILE)}"' in dom
    # ... and nothing a name carried: no injected attribute, element or handler.
    assert "data-pwned" not in dom
    assert "<img" not in dom and dom.count("<script") == 2
    assert "&lt;script&gt;document.body.dataset.pwned" in dom  # shown as text instead


def test_metrics_netns_name_label() -> None:
    pytest.importorskip("prometheus_client", reason="prometheus-client (extra metrics)")
    from tests.test_metrics import _scrape
    from xfrmtrace.output.metrics import MetricsServer, MetricsSnapshot

    names = {NETNS + i: name for i, name in enumerate(HOSTILE)}
    server = MetricsServer(("127.0.0.1", 0))
    try:
        server.start(lambda: MetricsSnapshot(netns_names=names))
        with urllib.request.urlopen(server.url, timeout=10) as response:
            exposition = response.read().decode("utf-8", "surrogateescape")
        families = _scrape(server.url)
    finally:
        server.close()
    assert inert(exposition)
    assert {s.labels["netns"]: s.labels["name"] for s in families["xfrmtrace_netns_info"]} == {
        str(inode): printable(name) for inode, name in names.items()}
