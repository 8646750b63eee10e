"""Stage 7, outputs: one module per format.  Formatters return text; only the CLI and the
session write it.

- :mod:`.text`, :mod:`.jsonl`: event lines; :mod:`.changes`: SA/policy/tc changes and
  explanations; :mod:`.summary`: the end-of-run totals; :mod:`.timefmt`: every time format.
- :mod:`.pcapng`: packets for Wireshark; :mod:`.rotating`: size-rotated files;
  :mod:`.metrics`: Prometheus metrics read from the BPF maps at scrape time.

Line formats turn one ``XfrmErrorEvent`` into one line (the text format adds indented stack
lines below it); ``line_formatter`` picks one by the name used on the command line.
"""

from __future__ import annotations

from typing import Callable, Dict

from xfrmtrace.decode.events import XfrmErrorEvent
from xfrmtrace.errors import InputError
from xfrmtrace.output import jsonl, text

LineFormatter = Callable[[XfrmErrorEvent], str]

LINE_FORMATS: Dict[str, LineFormatter] = {
    "text": text.format_event,
    "json": jsonl.format_event,
}
"""Format name -> formatter, for ``--output-format``."""


def line_formatter(name: str) -> LineFormatter:
    """The formatter called ``name``; InputError naming the choices when there is none."""
    try:
        return LINE_FORMATS[name]
    except KeyError:
        choices = ", ".join(sorted(LINE_FORMATS))
        raise InputError(f"unknown output format {name!r}: choose one of {choices}") from None
