"""Every time format of the outputs and logs, written and read in one place.

Events carry nanoseconds since the Unix epoch.  JSON logs hold them as RFC 3339 in UTC with
nanoseconds (``2026-11-28T14:47:49.123456789Z``); text lines as local (or UTC) time with
microseconds (``2026-11-28 14:47:49.123456``).  ``xfrmtrace report`` reads the JSON form back.
"""

from __future__ import annotations

import calendar
import re
import time

_RFC3339_NS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def rfc3339_ns(time_ns: int) -> str:
    """``2026-11-28T14:47:49.123456789Z`` from ns since the epoch."""
    seconds, ns = divmod(time_ns, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{ns:09d}Z"


def format_time(time_ns: int, *, utc: bool = False) -> str:
    """``2026-11-28 14:47:49.123456`` from ns since the epoch, local time unless ``utc``."""
    seconds, ns = divmod(time_ns, 1_000_000_000)
    moment = time.gmtime(seconds) if utc else time.localtime(seconds)
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', moment)}.{ns // 1000:06d}"


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch from :func:`rfc3339_ns`'s form (digits past 1 ns truncated);
    ValueError when ``text`` is not that form or not a real date."""
    if not _RFC3339_NS.fullmatch(text):
        raise ValueError(f"not an RFC 3339 UTC time: {text!r}")
    head, _, frac = text.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
    return seconds + float(f"0.{frac or 0}"[:11])
