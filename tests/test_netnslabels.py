"""Bounded netns label values for the metrics: the bound holds under any churn of namespaces,
namespaces with a label keep exact counts, "other" never goes down, gone namespaces give
their label back; the liveness scan reads the real /proc and /run/netns."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fixtures.eventdata import SITES
from xfrmtrace.output.metrics import UNKNOWN_NETNS, error_counts
from xfrmtrace.output.netnslabels import OTHER_NETNS, NetnsLabeller, live_netns

SITE_A, SITE_B = 7, 8  # SITES: XfrmInNoStates in xfrm_input, XfrmOutStateProtoError in esp_output


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _labeller(limit: int, alive: set[int], clock: Clock) -> NetnsLabeller:
    return NetnsLabeller(limit, alive=lambda: set(alive), clock=clock, check_every=30.0)


def test_first_namespaces_get_their_own_label_the_rest_share_other() -> None:
    labeller = _labeller(2, set(), Clock())
    labels = labeller.labels({(SITE_A, 101): 5, (SITE_A, 102): 3, (SITE_A, 103): 1,
                              (SITE_B, 103): 2})
    # The busiest two get the labels; 103 counts under "other" from its first increment.
    assert labels == {(SITE_A, "101"): 5, (SITE_A, "102"): 3, (SITE_A, OTHER_NETNS): 1,
                      (SITE_B, OTHER_NETNS): 2}


def test_a_gone_namespace_gives_its_label_back_after_two_quiet_checks() -> None:
    clock, alive = Clock(), {101, 102}
    labeller = _labeller(1, alive, clock)
    assert labeller.labels({(SITE_A, 101): 4, (SITE_A, 102): 1}) == {
        (SITE_A, "101"): 4, (SITE_A, OTHER_NETNS): 1}
    alive.discard(101)  # the pod went away
    clock.now = 31.0  # first check: 101's count is remembered, not yet known to be quiet
    assert labeller.labels({(SITE_A, 101): 4, (SITE_A, 102): 1})[(SITE_A, "101")] == 4
    clock.now = 62.0  # second check: still not alive and still 4: gone, label released
    labels = labeller.labels({(SITE_A, 101): 4, (SITE_A, 102): 1, (SITE_A, 104): 2})
    # 104 is new and takes the free label; 102 stays in "other" (no series jumps around).
    assert labels == {(SITE_A, "104"): 2, (SITE_A, OTHER_NETNS): 1}


def test_a_namespace_that_still_counts_is_never_released() -> None:
    clock = Clock()
    labeller = _labeller(1, set(), clock)  # nothing looks alive (no hostPID, say)
    for step in range(1, 6):
        clock.now = 31.0 * step
        labels = labeller.labels({(SITE_A, 101): step})
        assert labels == {(SITE_A, "101"): step}


def test_a_released_namespace_that_counts_again_comes_back() -> None:
    clock = Clock()
    labeller = _labeller(1, set(), clock)
    labeller.labels({(SITE_A, 101): 4})
    clock.now = 31.0
    labeller.labels({(SITE_A, 101): 4})
    clock.now = 62.0
    assert labeller.labels({(SITE_A, 101): 4}) == {}  # released: exported nowhere
    # Its inode counts again (a new namespace with the reused number, or one only an open
    # fd kept): a newcomer, with the map's count.
    assert labeller.labels({(SITE_A, 101): 6}) == {(SITE_A, "101"): 6}


def test_other_keeps_what_gone_members_counted() -> None:
    clock, alive = Clock(), {101, 102, 103}
    labeller = _labeller(1, alive, clock)
    labeller.labels({(SITE_A, 101): 1})
    assert labeller.labels({(SITE_A, 101): 1, (SITE_A, 102): 5, (SITE_A, 103): 2}) == {
        (SITE_A, "101"): 1, (SITE_A, OTHER_NETNS): 7}
    alive.clear()
    for clock.now in (31.0, 62.0):
        labels = labeller.labels({(SITE_A, 101): 1, (SITE_A, 102): 5, (SITE_A, 103): 2})
    assert labels == {(SITE_A, OTHER_NETNS): 7}
    # A new namespace joins "other" (101's label is free, but it takes the busiest newcomer)
    assert labeller.labels({(SITE_A, 101): 1, (SITE_A, 102): 5, (SITE_A, 103): 2,
                            (SITE_A, 105): 3}) == {(SITE_A, "105"): 3, (SITE_A, OTHER_NETNS): 7}


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(0, 4), steps=st.lists(
    st.tuples(st.lists(st.integers(0, 11), max_size=6),  # namespaces that count this scrape
              st.sets(st.integers(0, 11)),  # namespaces alive this scrape
              st.booleans()),  # a liveness check is due
    max_size=40))
def test_bound_and_monotonic_under_any_churn(limit: int, steps: list) -> None:
    """However namespaces come, count and go: at most limit + 1 label values per site,
    namespaces with a label report the map's exact count, and no series ever goes down
    while it is exported."""
    clock, alive = Clock(), set()
    labeller = _labeller(limit, alive, clock)
    counts: dict[tuple[int, int], int] = {}
    last: dict[tuple[int, str], int] = {}
    generation = 0  # each step's namespaces are new inodes: namespaces come and go
    for counting, living, check in steps:
        generation += 1
        alive.clear()
        alive.update(1000 * generation + n for n in living)
        for n in counting:
            key = (SITE_A if n % 2 else SITE_B, 1000 * generation + n % 3)
            counts[key] = counts.get(key, 0) + 1
        if check:
            clock.now += 31.0
        labels = labeller.labels(counts)
        for site in (SITE_A, SITE_B):
            assert len([k for k in labels if k[0] == site]) <= limit + 1
        for (site, label), value in labels.items():
            if label != OTHER_NETNS:
                assert value == counts[(site, int(label))]
            elif (site, label) in last:
                assert value >= last[(site, label)], "other went down"
        last = labels


def test_error_counts_with_a_labeller_bound_the_series() -> None:
    """Thousands of namespaces through error_counts: the series stay at limit + 2 per site
    ("other" and "unknown"), and "unknown" still takes what no namespace accounts for."""
    netns_counts = {(SITE_A, 4026540000 + i): 1 for i in range(5000)}
    netns_counts[(SITE_A, 0)] = 3
    counts = error_counts(SITES, {SITE_A: 5004}, netns_counts,
                          NetnsLabeller(16, alive=set, check_every=30.0))
    assert len(counts) == 16 + 2
    assert counts[("XfrmInNoStates", "xfrm_input", OTHER_NETNS)] == 5000 - 16
    assert counts[("XfrmInNoStates", "xfrm_input", UNKNOWN_NETNS)] == 3 + 1
    assert sum(counts.values()) == 5004


def test_live_netns_sees_this_process_and_a_real_ip_netns(tmp_path: Path) -> None:
    own = os.stat("/proc/self/ns/net").st_ino
    assert own in live_netns()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"xt-labels-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {created.stderr.strip()}")
    try:
        inode = os.stat(f"/run/netns/{name}").st_ino
        assert inode != own and inode in live_netns()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
    assert inode not in live_netns()


def test_live_netns_of_an_unreadable_proc_is_empty(tmp_path: Path) -> None:
    assert live_netns(tmp_path / "no-proc", [tmp_path / "no-netns"]) == set()
