"""Following module loads: /proc/modules diffs and the symbol table's per-module refresh.

The end-to-end proof (a module loaded after start gets probes, unloading drops them) is in
tests/test_vm_trace.py; these cover the bookkeeping on recorded files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xfrmtrace.errors import InputError
from xfrmtrace.kernel.kallsyms import Kallsyms
from xfrmtrace.kernel.modules import ModuleWatcher, read_modules

MODULES = """\
veth 36864 0 - Live 0xffffffffc0300000
esp4 28672 2 - Live 0xffffffffc0a1b000
xfrm_interface 40960 0 - Loading 0xffffffffc0b00000 (E)
ip_vti 20480 0 - Unloading 0xffffffffc0c00000
"""

KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81001000 T xfrm_input
ffffffff81002000 t xfrm_rcv_cb
ffffffff81003000 T _etext
ffffffffc0a1b000 t esp_output_done\t[esp4]
ffffffffc0a1b400 t esp_input\t[esp4]
ffffffffc0300000 t veth_xmit\t[veth]
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_modules_keeps_only_live_modules(tmp_path: Path) -> None:
    modules = read_modules(_write(tmp_path / "modules", MODULES))
    assert modules == {"veth": 0xFFFFFFFFC0300000, "esp4": 0xFFFFFFFFC0A1B000}


def test_unreadable_modules_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        read_modules(tmp_path / "missing")


def test_watcher_reports_loads_unloads_and_reloads(tmp_path: Path) -> None:
    path = _write(tmp_path / "modules", MODULES)
    watcher = ModuleWatcher(path)
    assert not watcher.poll()  # nothing changed
    # esp4 reloaded at another address, veth gone, esp6 new.
    _write(path, MODULES.replace("0xffffffffc0a1b000", "0xffffffffc0d00000")
           .replace("veth 36864 0 - Live 0xffffffffc0300000\n", "")
           + "esp6 28672 0 - Live 0xffffffffc0e00000\n")
    changes = watcher.poll()
    assert sorted(changes.unloaded) == ["esp4", "veth"]
    assert sorted(changes.loaded) == ["esp4", "esp6"]
    assert not watcher.poll()


def test_refresh_modules_replaces_only_those_modules(tmp_path: Path) -> None:
    syms = Kallsyms.parse(KALLSYMS)
    assert syms.find("esp_input", "esp4") is not None
    reloaded = (KALLSYMS.replace("ffffffffc0a1b", "ffffffffc0d00")
                .replace("ffffffffc0300000 t veth_xmit\t[veth]\n", "")
                + "ffffffffc0e00000 t esp6_input\t[esp6]\n")
    path = _write(tmp_path / "kallsyms", reloaded)
    # Only esp4 and esp6 are refreshed: veth's (stale) symbols stay as they were.
    syms.refresh_modules(["esp4", "esp6"], path)
    assert syms.address("esp_input", "esp4") == 0xFFFFFFFFC0D00400
    assert syms.address("esp6_input", "esp6") == 0xFFFFFFFFC0E00000
    assert syms.address("veth_xmit", "veth") == 0xFFFFFFFFC0300000
    assert syms.lookup(0xFFFFFFFFC0A1B400) is None  # the old esp4 text is gone
    assert syms.symbolize(0xFFFFFFFFC0D00410) == "esp_input+0x10 [esp4]"
    assert syms.address("xfrm_input") == 0xFFFFFFFF81001000
    # A module that is gone loses its symbols.
    syms.refresh_modules(["veth"], path)
    assert syms.find("veth_xmit", "veth") is None
    assert "veth" not in syms.objects()


def test_pseudo_modules_are_not_objects_to_resolve() -> None:
    """kprobe slots and ftrace trampolines of earlier runs, and BPF JIT images, are listed in
    kallsyms like modules; they hold no kernel code to resolve."""
    syms = Kallsyms.parse(KALLSYMS
                          + "ffffffffc0400000 t kprobe_insn_page\t[__builtin__kprobes]\n"
                          + "ffffffffc0401000 t ftrace_trampoline\t[__builtin__ftrace]\n"
                          + "ffffffffc0402000 t bpf_prog_6deef7357e7b4530_xt_site\t[bpf]\n")
    assert syms.objects() == ["vmlinux", "veth", "esp4"]
    # Still symbols: a stack through a trampoline is symbolized.
    assert syms.symbolize(0xFFFFFFFFC0401010) == "ftrace_trampoline+0x10 [__builtin__ftrace]"


def test_refresh_drops_init_symbols_of_a_module_just_gone_live(tmp_path: Path) -> None:
    """Right after init, kallsyms still lists init functions whose memory is freed (and
    reused by the next module); /sys/module/NAME/sections says which section is init."""
    syms = Kallsyms.parse(KALLSYMS)
    sections = tmp_path / "module" / "esp6" / "sections"
    sections.mkdir(parents=True)
    for name, start in ((".text", 0xFFFFFFFFC0E00000), (".exit.text", 0xFFFFFFFFC0E00800),
                        (".init.text", 0xFFFFFFFFC0F00000), (".data", 0xFFFFFFFFC0F10000)):
        (sections / name).write_text(f"{start:#x}\n")
    path = _write(tmp_path / "kallsyms", KALLSYMS
                  + "ffffffffc0e00000 t esp6_input\t[esp6]\n"
                  + "ffffffffc0e00800 t esp6_fini\t[esp6]\n"
                  + "ffffffffc0f00010 T esp6_init\t[esp6]\n")
    syms.refresh_modules(["esp6"], path, tmp_path / "module")
    assert syms.find("esp6_input", "esp6") is not None
    assert syms.find("esp6_fini", "esp6") is not None
    assert syms.find("esp6_init", "esp6") is None
    # Without sysfs (not root, or no such module) nothing is filtered.
    syms.refresh_modules(["esp6"], path, tmp_path / "nowhere")
    assert syms.find("esp6_init", "esp6") is not None
    # The same filter applies when the whole table is read.
    full = Kallsyms.load(path, sysfs=tmp_path / "module")
    assert full.find("esp6_init", "esp6") is None and full.find("esp6_input", "esp6")
