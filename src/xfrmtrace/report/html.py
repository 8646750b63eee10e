"""``xfrmtrace report --html FILE``: one self-contained page, no network needed to view it.

The page embeds the report as JSON and draws it with a few lines of plain JavaScript
into SVG: one row per counter with a dot per minute bucket (size = errors in it), and a
marker per SA/policy change on a shared time axis; below, the per-error table.  When
drawing is done the script sets ``data-rendered`` on <body> to the number of dots, so a
headless browser can check that the page really rendered.

Every string on the page comes from a log file and may hold a name chosen by whoever runs a
pod: table cells are escaped (:func:`_h`), the embedded JSON carries no markup
(:func:`_script_json`), and the script writes only ``textContent`` and attributes.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from typing import Any, TextIO

from xfrmtrace.output.safetext import printable
from xfrmtrace.output.timefmt import parse_rfc3339
from xfrmtrace.report import cluster
from xfrmtrace.report.cluster import ClusterReport
from xfrmtrace.report.reader import Report

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>xfrmtrace report</title>
<style>
body {{ font: 14px sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
.why {{ color: #444; }} .hist {{ font-family: monospace; font-size: 12px; }}
svg text {{ font-size: 11px; }}
</style></head>
<body data-rendered="no">
<h1>xfrmtrace report</h1>
<p>{summary}</p>
<svg id="timeline" width="1000" height="100" role="img"
 aria-label="errors per counter over time"></svg>
<table><tr><th>count</th><th>counter</th><th>node</th><th>namespace</th><th>packets</th>
<th>first / last</th><th>why</th><th>SA/policy history</th></tr>
{rows}
</table>
{cluster}
<script id="data" type="application/json">{data}</script>
<script>
(function () {{
  const data = JSON.parse(document.getElementById("data").textContent);
  const svg = document.getElementById("timeline");
  const ns = "http://www.w3.org/2000/svg";
  const counters = [...new Set(data.points.map(p => p.counter))];
  const times = data.points.map(p => p.t).concat(data.changes.map(c => c.t));
  const t0 = Math.min(...times), t1 = Math.max(...times, t0 + 1);
  const left = 200, width = 760, rowH = 24;
  svg.setAttribute("height", String(40 + rowH * (counters.length + 1)));
  const x = t => left + (t - t0) / (t1 - t0) * width;
  function add(tag, attrs, text) {{
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    svg.appendChild(el); return el;
  }}
  counters.forEach((c, i) => add("text", {{x: 4, y: 30 + rowH * i}}, c));
  let dots = 0;
  for (const p of data.points) {{
    const row = counters.indexOf(p.counter);
    add("circle", {{cx: x(p.t), cy: 26 + rowH * row, r: 2 + Math.min(8, Math.log2(1 + p.n)),
                    fill: "#c33", "class": "dot"}}).appendChild(
      Object.assign(document.createElementNS(ns, "title"), {{textContent: p.n + " errors"}}));
    dots += 1;
  }}
  const markerY = 26 + rowH * counters.length;
  add("text", {{x: 4, y: markerY + 4}}, "SA/policy changes");
  for (const c of data.changes) {{
    add("line", {{x1: x(c.t), x2: x(c.t), y1: 12, y2: markerY + 6, stroke: "#36c",
                  "stroke-dasharray": "2,3", "class": "change"}}).appendChild(
      Object.assign(document.createElementNS(ns, "title"), {{textContent: c.label}}));
  }}
  add("text", {{x: left, y: markerY + 22}}, data.start);
  add("text", {{x: left + width - 160, y: markerY + 22}}, data.end);
  document.body.setAttribute("data-rendered", String(dots));
}})();
</script>
</body></html>
"""


def _h(value: Any) -> str:
    """A value from the log as HTML text: controls escaped (safetext), then markup."""
    return html.escape(printable(str(value)), quote=True)


def _row(group: Any) -> str:
    explain = group.explain or {}
    why = _h(explain.get("summary") or "")
    details = "<br>".join(_h(d) for d in explain.get("details") or [])
    history = "<br>".join(_h(f"{c.get('time')} {c.get('type')} {c.get('action')} "
                             f"{(c.get('sa') or {}).get('spi', '')}")
                          for c in group.history)
    netns = _h(group.netns) + (f" ({_h(group.netns_name)})" if group.netns_name else "")
    return (f"<tr><td>{_h(group.count)}</td><td>{_h(group.counter)}</td><td>{_h(group.node)}</td>"
            f"<td>{netns}</td>"
            f"<td>{_h(group.stream)}</td><td>{_h(group.first)}<br>{_h(group.last)}</td>"
            f"<td class='why'>{why}<br>{details}</td><td class='hist'>{history}</td></tr>")


def _script_json(value: Any) -> str:
    """JSON to embed in a <script> element: ASCII only, and no <, > or & left, so no
    "</script>" or "<!--" in a name from the log can end the element or change its parsing."""
    text = json.dumps(value)  # ensure_ascii: U+2028 and the like come out escaped
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _cluster_section(nodes: ClusterReport) -> str:
    """Per node pair (sender -> receiver): the joined errors and the flags."""
    pairs = cluster.to_dict(nodes)["pairs"]
    if not nodes.joined:
        return ""
    parts = [f"<h2>Across nodes</h2><p>{_h(len(nodes.endpoints))} endpoints with SAs: "
             f"{_h(', '.join(nodes.endpoints))}</p>"]
    for pair in pairs:
        rows = [f"<tr><td>{_h(e['counter'])} x{_h(e['count'])}</td><td>{_h(e['stream'])}</td>"
                f"<td>{_h(e['first'])}</td><td class='why'>{_h(e['summary'])}</td></tr>"
                for e in pair["errors"]]
        rows += [f"<tr><td>flag {_h(f['kind'])}</td><td>spi {_h(hex(f['spi']))} "
                 f"{_h(f['dst'])}</td><td></td><td class='why'>{_h(f['text'])}</td></tr>"
                 for f in pair["flags"]]
        parts.append(f"<h3 class='pair'>{_h(pair['sender'])} &rarr; {_h(pair['receiver'])}</h3>"
                     "<table><tr><th>what</th><th>packets</th><th>first</th><th>the two sides"
                     "</th></tr>" + "".join(rows) + "</table>")
    return "\n".join(parts)


def write_html(report: Report, nodes: ClusterReport, out: TextIO) -> None:
    times, changes = report.event_times, report.change_records
    buckets: Counter[tuple[str, int]] = Counter(
        (counter, int(parse_rfc3339(t) // 60) * 60) for counter, t in times)
    # Labels go through printable() too: a lone surrogate (a byte that was not UTF-8) in an
    # SVG title crashed Chromium 156 (SIGILL), so a bad name would have hidden the report.
    points = [{"counter": printable(c), "t": t, "n": n}
              for (c, t), n in sorted(buckets.items())]
    marks = [{"t": parse_rfc3339(str(c["time"])),
              "label": printable(f"{c.get('time')} {c.get('type')} {c.get('action')}")}
             for c in changes]
    all_times = sorted(t for _c, t in times) + sorted(str(c["time"]) for c in changes)
    data = {"points": points, "changes": marks,
            "start": min(all_times) if all_times else "", "end": max(all_times) if all_times
            else ""}
    summary = (f"{sum(g.count for g in report.groups)} errors in {len(report.groups)} distinct "
               f"streams; {report.changes} SA/policy changes")
    out.write(_PAGE.format(
        summary=_h(summary),
        rows="\n".join(_row(g) for g in report.groups),
        cluster=_cluster_section(nodes),
        data=_script_json(data)))
