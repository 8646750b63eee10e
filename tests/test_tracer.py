"""Tracer bookkeeping on this machine's kernel: the real BPF object loads here, probes cannot
attach (no kprobes), so these check the maps and ids that module loads and unloads rely on."""

from __future__ import annotations

import pytest

from xfrmtrace.bpf.abi import XtArgRole
from xfrmtrace.errors import LibbpfError
from xfrmtrace.resolve.model import FunctionArgs, Site
from xfrmtrace.trace.tracer import BPF_OBJECT, TraceConfig, Tracer

ESP4_BASE = 0xFFFFFFFFC0A1B000


def _esp4(base: int) -> tuple[Site, FunctionArgs]:
    site = Site("esp4", "esp_output_done", 0x172, base + 0x172, "XfrmOutStateProtoError", 19,
                "rax", "rbx", 16, "esp_output_done", "inc qword ptr gs:[rax + 0x98]")
    return site, FunctionArgs("esp_output_done", base, "esp4", {XtArgRole.SKB: 1})


@pytest.fixture
def tracer():
    if not BPF_OBJECT.exists():
        pytest.skip(f"{BPF_OBJECT} not built (run `make bpf`)")
    tracer = Tracer(TraceConfig())
    try:
        tracer.load()
    except (LibbpfError, OSError) as err:
        pytest.skip(f"this kernel cannot load the BPF object: {err}")
    yield tracer
    tracer.close()


def _key(address: int) -> bytes:
    return address.to_bytes(8, "little")


def test_module_reload_keeps_site_ids_and_clears_old_addresses(tracer: Tracer) -> None:
    site, func = _esp4(ESP4_BASE)
    report = tracer.add([site], [func])
    # No kprobes on this kernel: every attach fails, and each failure is reported.
    assert report.sites_attached == 0 and len(report.sites_failed) == 1
    assert len(report.entries_failed) == 1
    assert tracer.sites == {0: site}
    sites_map, entries_map = tracer._obj.map("sites"), tracer._obj.map("entries")
    assert sites_map.lookup(_key(site.address)) is not None
    assert entries_map.lookup(_key(func.address)) is not None
    assert tracer.attached_addresses("esp4") == {site.address}

    tracer.remove_object("esp4")
    assert sites_map.lookup(_key(site.address)) is None
    assert entries_map.lookup(_key(func.address)) is None
    assert tracer.attached_addresses("esp4") == set()

    moved, moved_func = _esp4(ESP4_BASE + 0x100000)
    tracer.add([moved], [moved_func])
    assert tracer.sites == {0: moved}  # same site, same id, new address
    assert sites_map.lookup(_key(moved.address)) is not None
    assert tracer.site_counts() == {0: 0}


def test_removing_an_unknown_object_is_harmless(tracer: Tracer) -> None:
    assert tracer.remove_object("never_loaded") == 0


def test_follower_notices_a_site_that_now_belongs_to_another_module(tracer: Tracer,
                                                                   tmp_path) -> None:
    """A module's assumed last-function extent ran into a neighbour loaded meanwhile."""
    from types import SimpleNamespace

    from xfrmtrace.kernel.kallsyms import Kallsyms
    from xfrmtrace.kernel.modules import ModuleWatcher
    from xfrmtrace.trace.modulesites import ModuleFollower

    before = ("ffffffff81000000 T _stext\nffffffff81100000 T _etext\n"
              "ffffffffc0453000 t tcp_mt\t[xt_tcpudp]\n"
              "ffffffffc0453820 t cleanup_module\t[xt_tcpudp]\n")
    syms = Kallsyms.parse(before)
    wrong = Site("xt_tcpudp", "cleanup_module", 0x7f0, 0xFFFFFFFFC0454010,
                 "XfrmOutStateProtoError", 19, "rax")
    tracer.add([wrong], [])
    modules = tmp_path / "modules"
    modules.write_text("")
    follower = ModuleFollower(ModuleWatcher(modules), SimpleNamespace(syms=syms), None,
                              lambda line: None)
    assert follower.misplaced_objects(tracer) == set()
    # esp6 becomes visible right after xt_tcpudp's text: the site is esp6's code.
    path = tmp_path / "kallsyms"
    path.write_text(before + "ffffffffc0454000 t esp6_rcv_cb\t[esp6]\n")
    syms.refresh_modules(["esp6"], path, tmp_path / "no-sysfs")
    assert follower.misplaced_objects(tracer) == {"xt_tcpudp"}


@pytest.mark.parametrize("config", [
    TraceConfig(site_rate_limit=100),
    TraceConfig(site_rate_limit=1, counter_indices={2}, netns=4026531840, mark_value=0xD00,
                mark_mask=0xF00, capture_stack=True),
])
def test_every_configuration_passes_the_verifier(config: TraceConfig) -> None:
    """The configuration is read-only data: the verifier prunes what it turns off, so each
    feature must be loaded switched on to be checked at all (rate limit, filters, stacks)."""
    if not BPF_OBJECT.exists():
        pytest.skip(f"{BPF_OBJECT} not built (run `make bpf`)")
    with Tracer(config) as tracer:
        tracer.load()
