"""`xfrmtrace report`: a JSON log written by the tool's own formatters, summarised offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_xfrmnl import NETNS, changes
from xfrmtrace.context.explain import explain
from xfrmtrace.context.xfrmnl.database import XfrmDatabase
from xfrmtrace.decode.events import XfrmErrorEvent
from xfrmtrace.output import changes as changes_out
from xfrmtrace.output import jsonl

MINUTE = 60_000_000_000
BASE_NS = 1_795_000_000_000_000_000


def _event(spi: int, minute: int) -> XfrmErrorEvent:
    return XfrmErrorEvent(
        counter="XfrmInNoStates", netns=NETNS, netns_name="blue", context="skb",
        family="ipv4", src="10.9.0.1", dst="10.9.0.2", proto="esp", encap="esp", spi=spi,
        seq=minute, mark=0xD00, function="xfrm_input", offset=0x569,
        monotonic_ns=minute * MINUTE, time_ns=BASE_NS + minute * MINUTE)


def write_log(path: Path) -> None:
    """The classic investigation: SA 0x1000 deleted, 0x4000 installed, errors for 0x1000."""
    db = XfrmDatabase()
    lines = []
    for minute, name in enumerate(["sa-add-aead", "sa-delete", "sa-add-expiring"]):
        for change in changes(name, at=minute * MINUTE):
            db.apply(change)
            change.netns_name = "blue"
            lines.append(changes_out.format_change_json(change))
    for minute in (16, 17, 18):
        event = _event(0x1000, minute)
        event.explain = explain(event, db)
        lines.append(jsonl.format_event(event))
    lines.append(jsonl.format_event(_event(0x77, 19)))  # an SPI never seen, no explanation
    lines.append("not json at all")
    lines.append(json.dumps({"type": "summary", "counters": {}}))
    path.write_text("\n".join(lines) + "\n")


def run_report(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xfrmtrace", "report", *args],
                          capture_output=True, text=True)


def test_report_groups_errors_with_explanation_and_history(tmp_path: Path) -> None:
    log = tmp_path / "trace.jsonl"
    write_log(log)
    proc = run_report(str(log))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    first, second = text.split("\n\n")[:2]
    assert first.splitlines()[0] == ("XfrmInNoStates x3  trace  netns 4026532999 (blue)  "
                                     "10.9.0.1 > 10.9.0.2 esp spi 0x1000 mark 0xd00")
    assert "first 2026-11-18T" in first and "sites: xfrm_input+0x569 (3)" in first
    assert "why: SA spi 0x1000 dst 10.9.0.2 was deleted 17.0 min before" in first  # the last
    assert "installed since: spi 0x4000 dst 10.9.0.3" in first
    history = first.split("history:\n")[1].splitlines()
    assert [line.split("Z ", 1)[1] for line in history] == [
        "SA added: esp spi 0x1000 10.9.0.1 -> 10.9.0.2 reqid 7",
        "SA deleted: esp spi 0x1000 10.9.0.1 -> 10.9.0.2 reqid 7",
    ]
    assert second.startswith("XfrmInNoStates x1") and "spi 0x77" in second
    assert "(1 lines of the log were not xfrmtrace JSON and were skipped)" in text
    assert "5ec2e7" not in text and "c0ffee" not in text  # no key bytes


def test_report_json_and_bad_input(tmp_path: Path) -> None:
    log = tmp_path / "trace.jsonl"
    write_log(log)
    data = json.loads(run_report(str(log), "--output", "json").stdout)
    assert [g["count"] for g in data["groups"]] == [3, 1] and data["changes"] == 3
    missing = run_report(str(tmp_path / "absent.jsonl"))
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("xfrmtrace: error: cannot read")
    assert len(missing.stderr.strip().splitlines()) == 1


CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (Debian package "
                    "chromium-headless-shell, installed by `make deps`)")
def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    log, page = tmp_path / "trace.jsonl", tmp_path / "report.html"
    write_log(log)
    proc = run_report(str(log), "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    assert "c0ffee" not in page.read_text() and "<redacted>" not in page.read_text()
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    # The script ran: one dot per (counter, minute) with errors, one marker per change.
    assert 'data-rendered="4"' in dom
    assert dom.count('class="dot"') == 4 and dom.count('class="change"') == 3
    assert "SA spi 0x1000 dst 10.9.0.2 was deleted 17.0 min before" in dom
