"""Control-flow graph helpers both instruction sets' FunctionCode use (x86_code, arm64_code)."""

from __future__ import annotations

from typing import Iterable, Mapping


def reachable_blocks(entry: int, successors: Mapping[int, Iterable[int]]) -> set[int]:
    """The blocks some path of ``successors`` edges leads to from block ``entry`` (itself
    included)."""
    reachable = {entry}
    work = [entry]
    while work:
        for succ in successors[work.pop()]:
            if succ not in reachable:
                reachable.add(succ)
                work.append(succ)
    return reachable
