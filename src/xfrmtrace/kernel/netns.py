"""Network namespace inode -> name, for namespaces created with ``ip netns add``.

``ip netns`` bind-mounts each namespace on /run/netns/NAME; stat() of that
file gives the namespace's inode, the number events carry.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Optional

NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))
_REFRESH_SECONDS = 2.0  # namespaces come and go: names are rescanned this often
# An inode not seen yet is most often a namespace made since the last scan (a pod that fails
# at once): a miss rescans, at most this often, so a storm of unnamed ones costs little.
_MISS_RESCAN_SECONDS = 0.1


class NetnsNames:
    """Caching resolver of netns names; unknown or unnamed namespaces give None."""

    def __init__(self, directories: Iterable[Path] = NETNS_DIRS) -> None:
        self._directories = tuple(directories)
        self._names: dict[int, str] = {}
        self._scanned_at = float("-inf")
        self.host_inode = _inode(Path("/proc/1/ns/net"))

    def name(self, inode: int) -> Optional[str]:
        # Rescan periodically even on hits: a deleted namespace's inode can be reused.
        age = time.monotonic() - self._scanned_at
        if age >= _REFRESH_SECONDS or (inode not in self._names and inode != self.host_inode
                                       and age >= _MISS_RESCAN_SECONDS):
            self.refresh()
        return self._names.get(inode)

    def refresh(self) -> None:
        self._names = named_netns(self._directories)
        self._scanned_at = time.monotonic()

    def lookup(self, text: str) -> Optional[int]:
        """Inode for a name or a decimal inode given on the command line."""
        if text.isdigit():
            return int(text)
        self.refresh()
        for inode, name in self._names.items():
            if name == text:
                return inode
        return None


def named_netns(directories: Iterable[Path] = NETNS_DIRS) -> dict[int, str]:
    """Inode -> name of every namespace ``ip netns`` pins under ``directories``."""
    names: dict[int, str] = {}
    for directory in directories:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            inode = _inode(directory / entry)
            if inode:
                names.setdefault(inode, entry)
    return names


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0
