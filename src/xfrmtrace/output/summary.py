"""The end-of-run summary: exact per-counter and per-site totals, and what was lost."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

from xfrmtrace.output.safetext import json_line, printable
from xfrmtrace.resolve.model import Site

NetnsName = Callable[[int], Optional[str]]


@dataclass
class SiteTotal:
    site: Site
    count: int
    by_netns: dict[int, int] = field(default_factory=dict)


@dataclass
class Summary:
    """Exact in-kernel counts plus what reached user space."""

    sites: list[SiteTotal]
    events: int
    stats: dict[str, int]
    duration: float

    def by_counter(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for total in self.sites:
            totals[total.site.counter] += total.count
        return dict(totals)


def _netns_label(inode: int, name: NetnsName) -> str:
    if not inode:
        return "unknown"
    label = name(inode)
    return f"{inode}({label})" if label else str(inode)


def format_text(summary: Summary, netns_name: NetnsName) -> str:
    """Human-readable summary, counters with the most increments first."""
    lines = []
    total = sum(t.count for t in summary.sites)
    lost = summary.stats.get("lost", 0)
    lines.append(f"Summary: {total} increments in {summary.duration:.1f}s, "
                 f"{summary.events} events shown, {lost} lost"
                 + (f", {summary.stats['sampled']} over the rate limit"
                    if summary.stats.get("sampled") else ""))
    by_counter = summary.by_counter()
    for counter, count in sorted(by_counter.items(), key=lambda kv: (-kv[1], kv[0])):
        if not count:
            continue
        lines.append(f"  {counter:26s} {count}")
        for t in sorted((t for t in summary.sites if t.site.counter == counter and t.count),
                        key=lambda t: -t.count):
            per_ns = ", ".join(f"netns {_netns_label(ns, netns_name)}: {n}"
                               for ns, n in sorted(t.by_netns.items(), key=lambda kv: -kv[1]))
            lines.append(f"    {t.site.label:44s} {t.count:>8}   {per_ns}")
    return "\n".join(printable(line) for line in lines) + "\n"  # netns names: safetext


def format_json(summary: Summary, netns_name: NetnsName, node: Optional[str] = None) -> str:
    """One JSON object (type "summary") with the same content as the text form."""
    return json_line({
        "type": "summary",
        "node": node,
        "duration": round(summary.duration, 3),
        "counters": summary.by_counter(),
        "sites": [
            {
                "counter": t.site.counter,
                "object": t.site.object,
                "function": t.site.function,
                "offset": t.site.offset,
                "count": t.count,
                "netns": {str(ns): n for ns, n in t.by_netns.items()},
            }
            for t in summary.sites if t.count
        ],
        "events": summary.events,
        "lost": summary.stats.get("lost", 0),
        "filtered": summary.stats.get("filtered", 0),
        "sampled": summary.stats.get("sampled", 0),
        "netns_names": {str(ns): netns_name(ns) for t in summary.sites for ns in t.by_netns
                        if ns and netns_name(ns)},
    })
