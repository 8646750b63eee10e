"""Namespace names (kernel/netns.py): a namespace made just before its first event is named."""

from __future__ import annotations

import os
import time

from xfrmtrace.kernel import netns
from xfrmtrace.kernel.netns import NetnsNames


def test_a_namespace_made_after_the_last_scan_is_named_at_its_first_event(tmp_path):
    (tmp_path / "old").write_text("")
    names = NetnsNames([tmp_path])
    old = os.stat(tmp_path / "old").st_ino
    assert names.name(old) == "old"  # the first lookup scans
    # A pod's namespace appears, and its first error comes long before the periodic rescan.
    (tmp_path / "pod").write_text("")
    new = os.stat(tmp_path / "pod").st_ino
    time.sleep(netns._MISS_RESCAN_SECONDS)
    assert names.name(new) == "pod"


def test_unnamed_namespaces_do_not_rescan_on_every_event(tmp_path, monkeypatch):
    scans = []
    real = netns.named_netns
    monkeypatch.setattr(netns, "named_netns", lambda dirs: scans.append(1) or real(dirs))
    names = NetnsNames([tmp_path])
    for _ in range(1000):  # an error storm from a namespace nobody named
        assert names.name(4026539999) is None
    assert len(scans) == 1
