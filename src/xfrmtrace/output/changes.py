"""SA and policy changes, and the explanations under error events, in text and JSON.

Keys are whatever :mod:`xfrmtrace.context.xfrmnl.model` kept: ``<redacted>`` unless the user
asked for ``--show-keys``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

from xfrmtrace.context.explain import Explanation
from xfrmtrace.context.xfrmnl.changes import XfrmChange
from xfrmtrace.context.xfrmnl.model import SA, Policy
from xfrmtrace.output.safetext import json_line, printable
from xfrmtrace.output.timefmt import format_time, rfc3339_ns

# ---- text -------------------------------------------------------------------------------------


def format_change_text(change: XfrmChange, *, utc: bool = False) -> str:
    netns = f"netns={change.netns}" + (f"({change.netns_name})" if change.netns_name else "")
    what = {"sa": "SA", "policy": "policy"}.get(change.kind, change.kind)
    if change.kind == "tc" and change.detail:
        what = f"tc {change.detail.get('object')}"
    head = f"{format_time(change.time_ns, utc=utc)} {netns} {what} {change.action}"
    if change.action == "expired":
        head += " (hard)" if change.hard else " (soft)"
    body = ""
    if change.sa is not None:
        body = describe_sa(change.sa)
    elif change.policy is not None:
        body = change.policy.describe()
    elif change.action == "flushed":
        body = f"all {change.flushed_proto or ''} SAs".replace("  ", " ") \
            if change.kind == "sa" else "all policies"
    if change.detail:
        body += " " + " ".join(f"{k}={v}" for k, v in change.detail.items()
                               if k != "object" and v is not None)
    return printable(f"{head}: {body.strip()}")  # netns names and tc kinds: safetext


def describe_sa(sa: SA) -> str:
    text = sa.describe()
    if sa.algorithms:
        text += " [" + "; ".join(a.describe() for a in sa.algorithms) + "]"
    return text


# ---- JSON -------------------------------------------------------------------------------------


def change_to_dict(change: XfrmChange, node: Optional[str] = None) -> dict[str, Any]:
    return {
        "time": rfc3339_ns(change.time_ns),
        "type": change.kind,
        "node": node,
        "action": change.action,
        "netns": change.netns,
        "netns_name": change.netns_name,
        "sa": sa_to_dict(change.sa),
        "policy": policy_to_dict(change.policy),
        "hard": change.hard,
        "flushed_proto": change.flushed_proto,
        "detail": change.detail,
    }


def format_change_json(change: XfrmChange, node: Optional[str] = None) -> str:
    return json_line(change_to_dict(change, node))


def sa_to_dict(sa: Optional[SA]) -> Optional[dict[str, Any]]:
    return None if sa is None else asdict(sa)


def policy_to_dict(policy: Optional[Policy]) -> Optional[dict[str, Any]]:
    return None if policy is None else asdict(policy)


def explanation_to_dict(exp: Explanation) -> dict[str, Any]:
    return {
        "summary": exp.summary,
        "details": list(exp.details),
        "sas": [asdict(sa) for sa in exp.sas],
        "policies": [asdict(p) for p in exp.policies],
        "history": [{"time": rfc3339_ns(c.time_ns), "type": c.kind, "action": c.action,
                     "spi": c.sa.spi if c.sa else None, "dst": c.sa.dst if c.sa else None}
                    for c in exp.history],
    }
