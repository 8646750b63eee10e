"""Names of the XFRM statistics counters.

The counter index comes from the kernel's BTF enum (``LINUX_MIB_XFRM*``), so a
counter added by a newer kernel is known by index.  BTF names are upper case;
the /proc/net/xfrm_stat spelling ("XfrmInNoStates") is recovered by matching
the names /proc shows case-insensitively, never by their line order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

ENUM_PREFIX = "LINUX_MIB_XFRM"
ENUM_SENTINEL = "LINUX_MIB_XFRMNUM"
PROC_XFRM_STAT = Path("/proc/net/xfrm_stat")

# Spellings of every counter up to Linux 6.14, for offline use (no /proc).
KNOWN_NAMES = (
    "XfrmInError", "XfrmInBufferError", "XfrmInHdrError", "XfrmInNoStates",
    "XfrmInStateProtoError", "XfrmInStateModeError", "XfrmInStateSeqError",
    "XfrmInStateExpired", "XfrmInStateMismatch", "XfrmInStateInvalid",
    "XfrmInTmplMismatch", "XfrmInNoPols", "XfrmInPolBlock", "XfrmInPolError",
    "XfrmOutError", "XfrmOutBundleGenError", "XfrmOutBundleCheckError",
    "XfrmOutNoStates", "XfrmOutStateProtoError", "XfrmOutStateModeError",
    "XfrmOutStateSeqError", "XfrmOutStateExpired", "XfrmOutPolBlock",
    "XfrmOutPolDead", "XfrmOutPolError", "XfrmFwdHdrError", "XfrmOutStateInvalid",
    "XfrmAcquireError", "XfrmOutStateDirError", "XfrmInStateDirError",
    "XfrmInIptfsError", "XfrmOutNoQueueSpace",
)

# Enumerators /proc does not spell after their own name (net/xfrm/xfrm_proc.c,
# xfrm_mib_list: SNMP_MIB_ITEM("XfrmOutNoQueueSpace", LINUX_MIB_XFRMOUTNOQSPACE), Linux 6.14).
# Found by the lab's IP-TFS scenario: spelled from the enumerator it read "XfrmOutNoQspace".
ENUM_SPELLINGS = {"XFRMOUTNOQSPACE": "XfrmOutNoQueueSpace"}

# Words that make up counter names, longest first, to spell unknown future ones.
_WORDS = sorted(
    {w for name in KNOWN_NAMES for w in re.findall(r"[A-Z][a-z]*", name)}, key=len, reverse=True
)


def read_proc_names(path: Path = PROC_XFRM_STAT) -> list[str]:
    """Counter names as /proc spells them; [] when the file is absent."""
    try:
        text = path.read_text()
    except OSError:
        return []
    return [line.split()[0] for line in text.splitlines() if line.split()]


def counter_names(enum: dict[str, int], proc_names: Iterable[str] = ()) -> dict[int, str]:
    """Map counter index -> /proc name, for every ``LINUX_MIB_XFRM*`` enumerator.

    ``enum`` is the BTF enum holding ``LINUX_MIB_XFRMNUM`` (name -> value).
    """
    spelled = {name.upper(): name for name in (*KNOWN_NAMES, *proc_names)}
    names: dict[int, str] = {}
    for enumerator, value in enum.items():
        if not enumerator.startswith(ENUM_PREFIX) or enumerator == ENUM_SENTINEL:
            continue
        if enumerator.startswith("__") or enumerator.endswith("_MAX"):
            continue
        key = "XFRM" + enumerator[len(ENUM_PREFIX):]
        names[value] = ENUM_SPELLINGS.get(key) or spelled.get(key) or _spell(key)
    return names


def _spell(upper: str) -> str:
    """Best-effort CamelCase for a counter no known list has: XFRMINFOOERROR -> XfrmInFooError."""
    rest = upper[len("XFRM"):]
    out = ["Xfrm"]
    while rest:
        word: Optional[str] = next((w for w in _WORDS if rest.startswith(w.upper())), None)
        if word is None:
            out.append(rest.capitalize())
            break
        out.append(word)
        rest = rest[len(word):]
    return "".join(out)


def parse_xfrm_stat(text: str) -> dict[str, int]:
    """/proc/net/xfrm_stat content -> {name: value}."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats
