"""Names chosen by someone else, made harmless to show.

Whoever runs a pod chooses its interface names, its processes' names (``prctl``), the tc
qdisc kinds it installs and, through the CNI or ``ip netns add``, namespace names; Linux
accepts almost any byte in them.  A name holding ``ESC ] 0 ;`` would retitle, recolour or
clear the operator's terminal, U+202E would make the line read backwards, and a name
holding ``<script>`` would run in the report page.  So:

* text (events, SA/policy changes, the summary, ``report``, log lines): :func:`printable`
  writes every character ``str.isprintable()`` refuses (C0 and C1 controls, DEL, format
  characters such as the bidi overrides, line and paragraph separators, unassigned code
  points), other than the space, as a backslash escape; a byte that was not UTF-8 (kept as a
  lone surrogate by ``surrogateescape``) comes out as ``\\xNN`` of that byte;
* JSON lines: :func:`json_line`, the same values for a JSON reader, but with those same
  characters written as ``\\uNNNN`` (``json`` itself escapes only C0 controls, and leaves
  DEL, CSI U+009B or U+202E raw), so ``kubectl logs`` of the JSON output is safe too;
* HTML: :mod:`xfrmtrace.report.html` escapes markup on top of :func:`printable`.

A backslash is left as it is: an escape can be imitated by a name, but it cannot act.
"""

from __future__ import annotations

import json
from typing import Any


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character that is not printable (space aside) escaped."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(char if char == " " or char.isprintable() else _escape(char)
                   for char in text)


def printable_lines(text: str) -> str:
    """:func:`printable` for each line of a text the tool built line by line."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _json_escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON spells a character beyond the BMP as a UTF-16 surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_line(value: Any) -> str:
    """One line of JSON (no trailing newline): UTF-8 kept, what :func:`printable` would
    escape written as ``\\u`` escapes, which a JSON reader decodes to the same value."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if text.isprintable():
        return text
    # Outside strings json.dumps writes only ASCII punctuation, digits and names, so every
    # character replaced here is inside a string.
    return "".join(char if char == " " or char.isprintable() else _json_escape(char)
                   for char in text)
