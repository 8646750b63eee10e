"""Notice kernel modules that load or unload while we trace.

esp4, esp6, xfrm_interface and vti hold counter sites of their own, and on
most hosts they are loaded on demand: by the first ``ip xfrm state add``, by
the IKE daemon, or by a CNI plugin long after xfrmtrace started.  The follower
polls /proc/modules (a few hundred bytes per module, cheap to read) and
attaches to a module's sites as soon as it appears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from xfrmtrace.errors import InputError

PROC_MODULES = Path("/proc/modules")


def read_modules(path: Union[str, Path] = PROC_MODULES) -> dict[str, int]:
    """Module name -> load address of every live module.

    A module that is still initialising ("Loading") does not count yet: while
    it is, /proc/kallsyms lists its init functions too, whose memory is freed
    and handed to the next module once init is done; symbols read then would
    later claim another module's code.  One being unloaded counts as gone.
    """
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from err
    modules = {}
    for line in text.splitlines():
        # name size refcount users state address [taint]
        parts = line.split()
        if len(parts) < 6 or parts[4] != "Live":
            continue
        try:
            modules[parts[0]] = int(parts[5], 16)
        except ValueError:
            continue
    return modules


@dataclass
class ModuleChanges:
    """What changed since the previous poll.  A module reloaded at a new address is in both."""

    unloaded: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.unloaded or self.loaded)


class ModuleWatcher:
    """Compares successive reads of /proc/modules."""

    def __init__(self, path: Union[str, Path] = PROC_MODULES) -> None:
        self._path = path
        self._known = read_modules(path)

    def poll(self) -> ModuleChanges:
        current = read_modules(self._path)
        changes = ModuleChanges()
        for name, address in self._known.items():
            if current.get(name) != address:
                changes.unloaded.append(name)
        for name, address in current.items():
            if self._known.get(name) != address:
                changes.loaded.append(name)
        self._known = current
        return changes
