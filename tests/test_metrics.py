"""Prometheus metrics: address parsing, exact per-netns attribution, a real HTTP scrape."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.eventdata import SITES
from xfrmtrace import __version__
from xfrmtrace.errors import InputError
from xfrmtrace.output.metrics import (
    MetricsServer,
    MetricsSnapshot,
    error_counts,
    parse_listen_address,
)


@pytest.mark.parametrize("text, expected", [
    ("9477", ("127.0.0.1", 9477)),
    (":9477", ("127.0.0.1", 9477)),
    ("0.0.0.0:9477", ("0.0.0.0", 9477)),
    ("[::1]:9477", ("::1", 9477)),
    ("fd00::1:9477", ("fd00::1", 9477)),
])
def test_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:http", "1.2.3.4:0", "70000"])
def test_bad_listen_address(text: str) -> None:
    with pytest.raises(InputError, match="metrics"):
        parse_listen_address(text)


def test_error_counts_attribute_every_increment() -> None:
    """Per-netns entries plus "unknown" add up to the exact per-site count."""
    counts = error_counts(
        SITES,
        site_counts={7: 10, 8: 4},
        netns_counts={(7, 4026532285): 6, (7, 4026532290): 1, (7, 0): 2, (8, 4026532285): 4},
    )
    assert counts == {
        ("XfrmInNoStates", "xfrm_input", "4026532285"): 6,
        ("XfrmInNoStates", "xfrm_input", "4026532290"): 1,
        ("XfrmInNoStates", "xfrm_input", "unknown"): 3,  # netns 0 (2) + not in the map (1)
        ("XfrmOutStateProtoError", "esp_output", "4026532285"): 4,
    }


def _scrape(url: str, timeout: float = 5.0) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_scrape_serves_the_snapshot() -> None:
    server = MetricsServer(("127.0.0.1", 0))
    snapshot = MetricsSnapshot(
        errors={("XfrmInNoStates", "xfrm_input", "4026532285"): 3},
        stats={"lost": 2, "sampled": 5, "filtered": 1}, probes_attached=47, probes_expected=48,
        netns_names={4026532285: "blue"})
    try:
        server.start(lambda: snapshot)
        families = _scrape(server.url)
    finally:
        server.close()
    [errors] = families["xfrmtrace_xfrm_errors"]
    assert errors.name == "xfrmtrace_xfrm_errors_total" and errors.value == 3
    assert errors.labels == {"counter": "XfrmInNoStates", "function": "xfrm_input",
                             "netns": "4026532285"}
    assert families["xfrmtrace_events_lost"][0].value == 2
    assert families["xfrmtrace_events_sampled"][0].value == 5
    assert families["xfrmtrace_probes_attached"][0].value == 47
    assert families["xfrmtrace_probes_expected"][0].value == 48
    assert families["xfrmtrace_build_info"][0].labels["version"] == __version__
    assert families["xfrmtrace_netns_info"][0].labels == {"netns": "4026532285", "name": "blue"}


def test_not_tracing_serves_build_info_only() -> None:
    server = MetricsServer(("127.0.0.1", 0))
    try:
        server.start(lambda: None)
        families = _scrape(server.url)
    finally:
        server.close()
    assert set(families) == {"xfrmtrace_build_info"}


def test_no_answer_before_start() -> None:
    """The port is bound early, but a scrape gets an answer only once tracing started."""
    server = MetricsServer(("127.0.0.1", 0))
    try:
        with pytest.raises((socket.timeout, TimeoutError, OSError)):
            _scrape(server.url, timeout=0.5)
    finally:
        server.close()


def test_taken_port_is_one_clear_error() -> None:
    first = MetricsServer(("127.0.0.1", 0))
    port = int(first.url.rsplit(":", 1)[1].split("/")[0])
    try:
        with pytest.raises(InputError, match=f"cannot serve metrics on 127.0.0.1:{port}: "
                                             "Address already in use"):
            MetricsServer(("127.0.0.1", port))
    finally:
        first.close()
