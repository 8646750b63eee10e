"""The command line on this machine: help, bad input, and the kernel's missing features.

This machine's own kernel has no kprobes: it is the "negative kernel" and the
tool must say so in one line, without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.require import not_applicable_if

TOOL = [sys.executable, "-m", "xfrmtrace"]
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")


def run_tool(*args: str, prefix: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *TOOL, *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_commands_and_works_without_privileges() -> None:
    proc = run_tool("--help")
    assert proc.returncode == 0
    assert "trace" in proc.stdout and "sites" in proc.stdout and "report" in proc.stdout
    trace_help = run_tool("trace", "--help").stdout
    for option in ("--output", "--output-stack", "--filter-counter", "--filter-netns",
                   "--filter-mark", "--duration", "--no-xfrm-state", "--show-keys",
                   "--output-file", "--output-file-size", "--output-file-count", "--output-pcap",
                   "--metrics-addr", "--host-proc"):
        assert option in trace_help
    assert "--html" in run_tool("report", "--help").stdout
    assert "--ready-file" not in trace_help  # hidden: for tests and orchestration


@not_applicable_if(KPROBE_PMU.exists(), "this kernel has kprobes: not the negative case")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to get past the privilege check")
def test_kernel_without_kprobes_gives_one_line() -> None:
    proc = run_tool()
    assert_one_line_error(proc, "kprobes", "CONFIG_KPROBES")
    assert proc.stdout == ""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_missing_capabilities_gives_one_line() -> None:
    drop = ("setpriv", "--bounding-set=-all", "--inh-caps=-all", "--")
    proc = run_tool("trace", prefix=drop)
    assert_one_line_error(proc, "needs root", "CAP_BPF")


def test_bad_mark_is_a_usage_error() -> None:
    proc = run_tool("--filter-mark", "0xzz")
    assert proc.returncode == 2
    assert "invalid mark" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (("--metrics-addr", "localhost:http"), "invalid metrics address"),
    (("--metrics-addr", "0"), "invalid metrics port"),
    (("--output-file-size", "0"), "must be positive"),
    (("--output-file-count", "-1"), "must not be negative"),
    (("--ringbuf-size", "2K"), "below one page"),
    (("--ringbuf-size", "4G"), "invalid size"),
])
def test_bad_output_options_are_usage_errors(args: tuple, needle: str) -> None:
    proc = run_tool("trace", *args)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to get past the privilege check")
def test_masked_kcore_names_the_container_fix(tmp_path: Path) -> None:
    """A container runtime masks /proc/kcore with /dev/null: say how to mount the host's."""
    (tmp_path / "kallsyms").write_text(Path("/proc/kallsyms").read_text())
    (tmp_path / "kcore").write_bytes(b"")
    proc = run_tool("sites", "--no-cache", "--host-proc", str(tmp_path))
    assert_one_line_error(proc, "kcore is masked", "--host-proc")


def test_offline_sites_needs_both_files(tmp_path: Path) -> None:
    assert_one_line_error(run_tool("sites", "--vmlinux", str(tmp_path / "v")), "--kallsyms")


def test_offline_sites_unreadable_files(tmp_path: Path) -> None:
    proc = run_tool("sites", "--vmlinux", str(tmp_path / "missing"),
                    "--kallsyms", str(tmp_path / "missing2"))
    assert_one_line_error(proc, "cannot read", "missing")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF" + os.urandom(200))
    proc = run_tool("sites", "--vmlinux", str(garbage), "--kallsyms", str(garbage))
    assert_one_line_error(proc)


# ---- bad command lines and unreadable files: one clear line, non-zero exit ----------------

USAGE_ERRORS = [
    ("report",), ("report", "a.jsonl", "--bogus"), ("trace", "--node-name", "a b"),
    ("trace", "--node-name", ""), ("trace", "--node-name", "x\x1b[2J"),
    ("trace", "--key-fingerprint-secret", "/nonexistent/secret"),
    ("trace", "--key-fingerprint-secret", "/dev/null"),
    ("report", "a.jsonl", "--output", "xml"), ("report", "a.jsonl", "--html"),
    ("sites", "--output", "xml"), ("sites", "--bogus"), ("sites", "--vmlinux"),
    ("--bogus",), ("bogus-command",), ("trace", "--output"), ("trace", "--duration", "soon"),
    ("trace", "--rate-limit", "-5"), ("trace", "--filter-mark", "0xd00/0"),
    ("trace", "--output-file-count", "many"), ("trace", "--cache-dir"),
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=" ".join)
def test_bad_command_lines_are_usage_errors(args: tuple) -> None:
    proc = run_tool(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("usage: xfrmtrace"), proc.stderr
    assert all(line.startswith(" ") for line in lines[1:-1]), proc.stderr  # usage, wrapped
    assert re.match(r"xfrmtrace( \w+)?: error: \S", lines[-1]), proc.stderr


def _elf_with_btf(directory: Path, btf: bytes) -> Path:
    """An ELF object whose .BTF section holds ``btf``: passes the "has .BTF" check."""
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        pytest.skip("GNU as/objcopy (Debian binutils) not installed")
    (directory / "empty.s").write_text("\n")
    (directory / "btf.bin").write_bytes(btf)
    subprocess.run(["as", "--64", "-o", directory / "empty.o", directory / "empty.s"],
                   check=True)
    elf = directory / "vmlinux"
    subprocess.run(["objcopy", "--add-section", f".BTF={directory / 'btf.bin'}",
                    directory / "empty.o", elf], check=True)
    return elf


JUNK = b"\xff\x00\x7fELF" + bytes(range(256)) * 4
KALLSYMS = "ffffffff81000000 T _stext\nffffffff81000010 T xfrm_input\nffffffff81001000 T _etext\n"


def _input_case(name: str, d: Path) -> tuple[list, list[str]]:
    """(arguments, words the one error line must hold) for ``name``, its files under ``d``."""
    (d / "junk").write_bytes(JUNK)
    (d / "log.jsonl").write_text('{"type": "summary"}\n')
    (d / "kallsyms").write_text(KALLSYMS)
    (d / "zeros").write_text(re.sub("^[0-9a-f]+", "0" * 16, KALLSYMS, flags=re.M))
    log, missing = d / "log.jsonl", d / "absent"
    (d / "empty").mkdir()
    if name.startswith("sites --kallsyms") or name == "sites: junk BTF":
        elf = _elf_with_btf(d, b"\x9f\xeb\x01\x00" + JUNK)
    cases = {
        "report: missing": (["report", missing], ["cannot read", "No such file"]),
        "report: empty directory": (["report", d / "empty"], ["no log files in"]),
        "report --html: missing directory": (["report", log, "--html", missing / "r.html"],
                                             ["cannot write", "No such file"]),
        "report --html: directory": (["report", log, "--html", d], ["cannot write",
                                                                    "Is a directory"]),
        "sites --vmlinux: directory": (["sites", "--vmlinux", d, "--kallsyms", d],
                                       ["cannot read", "Is a directory"]),
        "sites --vmlinux: junk": (["sites", "--vmlinux", d / "junk", "--kallsyms",
                                   d / "kallsyms"], ["is not an ELF file"]),
        "sites: junk BTF": (["sites", "--vmlinux", "ELF", "--kallsyms", d / "kallsyms"],
                            ["cannot read BTF from"]),
        "sites --kallsyms: missing": (["sites", "--vmlinux", "ELF", "--kallsyms", missing],
                                      ["cannot read", "No such file"]),
        "sites --kallsyms: directory": (["sites", "--vmlinux", "ELF", "--kallsyms", d],
                                        ["cannot read", "Is a directory"]),
        "sites --kallsyms: junk": (["sites", "--vmlinux", "ELF", "--kallsyms", d / "junk"],
                                   ["has no text symbols"]),
        "sites --kallsyms: zero addresses": (["sites", "--vmlinux", "ELF", "--kallsyms",
                                              d / "zeros"], ["only zero addresses"]),
    }
    args, needles = cases[name]
    return [str(elf) if a == "ELF" else str(a) for a in args], needles


INPUT_CASES = ["report: missing", "report: empty directory", "report --html: missing directory",
               "report --html: directory", "sites --vmlinux: directory",
               "sites --vmlinux: junk", "sites: junk BTF", "sites --kallsyms: missing",
               "sites --kallsyms: directory", "sites --kallsyms: junk",
               "sites --kallsyms: zero addresses"]


@pytest.mark.parametrize("name", INPUT_CASES)
def test_unreadable_or_junk_input_gives_one_line(tmp_path: Path, name: str) -> None:
    args, needles = _input_case(name, tmp_path)
    proc = run_tool(*args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_line_error(proc, "xfrmtrace: error: ", *needles)
    assert proc.stderr.startswith("xfrmtrace: error: ")


# Root without the capabilities that bypass file permissions: the owner's mode bits apply,
# and the checkout (wherever CI cloned it, readable by root only, say) stays importable.
UNPRIVILEGED = ("setpriv", "--inh-caps=-all",
                "--bounding-set=-dac_override,-dac_read_search", "--")


@pytest.fixture
def shared_dir():
    """A directory made read-only (mode 555) by the test; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="xfrmtrace-cli-"))
    yield path
    path.chmod(0o755)
    shutil.rmtree(path)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop its capabilities")
@pytest.mark.parametrize("name", ["report", "report --html", "sites --vmlinux",
                                  "sites --kallsyms"])
def test_file_without_permission_gives_one_line(shared_dir: Path, name: str) -> None:
    secret, public = shared_dir / "secret", shared_dir / "public.jsonl"
    secret.write_text('{"type": "summary"}\n')
    secret.chmod(0o000)
    public.write_text('{"type": "summary"}\n')
    public.chmod(0o644)
    if name.startswith("sites"):
        elf = _elf_with_btf(shared_dir, b"\x9f\xeb\x01\x00")
        elf.chmod(0o644)
    args = {
        "report": ["report", secret],
        "report --html": ["report", public, "--html", shared_dir / "report.html"],
        "sites --vmlinux": ["sites", "--vmlinux", secret, "--kallsyms", public],
        "sites --kallsyms": ["sites", "--vmlinux", shared_dir / "vmlinux", "--kallsyms", secret],
    }[name]
    shared_dir.chmod(0o555)  # nothing can be created in it
    proc = run_tool(*map(str, args), prefix=UNPRIVILEGED)
    word = "cannot write" if name == "report --html" else "cannot read"
    assert_one_line_error(proc, "xfrmtrace: error: ", word, "Permission denied")
    assert proc.returncode == 1 and proc.stdout == ""


def test_report_of_binary_junk_counts_the_lines_it_skipped(tmp_path: Path) -> None:
    log = tmp_path / "junk.jsonl"
    lines = [b"\xff" + JUNK.replace(b"\n", b"").replace(b"\r", b"")[i:] for i in range(5)]
    log.write_bytes(b"\n".join(lines) + b"\n")
    proc = run_tool("report", str(log), "--html", str(tmp_path / "r.html"))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == ("no counter events in the log (0 SA/policy changes)\n"
                           "(5 lines of the log were not xfrmtrace JSON and were skipped)\n")
    assert "0 errors in 0 distinct streams" in (tmp_path / "r.html").read_text()


def test_report_skips_lines_that_only_look_like_xfrmtrace_json(tmp_path: Path) -> None:
    """Right ``type``, wrong field types: skipped and counted, not an internal error."""
    good = {"time": "2026-11-28T14:47:49.123456789Z", "type": "xfrm_error",
            "counter": "XfrmInNoStates", "netns": 4026532999, "src": "10.9.0.1",
            "dst": "10.9.0.2", "encap": "esp", "spi": 4096, "mark": 3328,
            "function": "xfrm_input", "offset": 1385}
    bad: list[dict[str, object]] = [
        {"spi": "0x1000"}, {"mark": [1]}, {"offset": "0x569"}, {"time": "yesterday"},
        {"src": {"ip": 1}}, {"explain": "because"}, {"explain": {"details": [1]}},
        {"counter": None}]
    changes = [{"type": "sa", "time": good["time"], "netns": 1, "sa": {"spi": "x"}},
               {"type": "policy", "time": good["time"], "netns": 1, "policy": {"selector": 5}},
               {"type": "sa", "time": 5, "netns": 1}]
    log = tmp_path / "trace.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in
                             [good, *({**good, **b} for b in bad), *changes]) + "\n")
    for output in ("text", "json"):
        proc = run_tool("report", str(log), "--output", output, "--html",
                        str(tmp_path / "r.html"))
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    data = json.loads(proc.stdout)
    assert [g["count"] for g in data["groups"]] == [1]
    assert data["skipped_lines"] == len(bad) + len(changes) and data["changes"] == 0


def test_unknown_filter_counter_is_one_line_naming_the_known_ones() -> None:
    """``trace --filter-counter`` stops at the kernel check on this machine, so the check
    itself is run here."""
    from xfrmtrace.cli import _counter_filter
    from xfrmtrace.errors import InputError

    counters = {2: "XfrmInNoStates", 1: "XfrmInError"}
    assert _counter_filter(" xfrminnostates, ,XfrmInError", counters) == {1, 2}
    with pytest.raises(InputError) as err:
        _counter_filter("XfrmInNoStates,XfrmInBogus", counters)
    assert str(err.value) == ("unknown counter 'XfrmInBogus'; this kernel has: XfrmInError, "
                              "XfrmInNoStates")


# ---- architectures -------------------------------------------------------------------------

def _as_machine(machine: str, *args: str) -> subprocess.CompletedProcess:
    """The tool with ``os.uname().machine`` reporting ``machine``."""
    code = ("import os, sys; real = os.uname(); "
            "os.uname = lambda: os.uname_result((*real[:4], sys.argv[1])); "
            "from xfrmtrace.cli import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.run([sys.executable, "-c", code, machine, *args], capture_output=True,
                          text=True, timeout=120)


def test_trace_on_a_machine_it_cannot_trace_gives_one_line() -> None:
    proc = _as_machine("riscv64", "trace")
    assert_one_line_error(proc, "unsupported architecture riscv64", "x86-64 and arm64")
    assert proc.stdout == ""


def test_live_sites_on_an_unknown_machine_gives_one_line() -> None:
    assert_one_line_error(_as_machine("riscv64", "sites"), "unsupported architecture riscv64")


def test_vmlinux_of_another_architecture_gives_one_line(tmp_path: Path) -> None:
    riscv = tmp_path / "vmlinux"
    # ELF64, little-endian, version 1, ET_EXEC, e_machine 243 (EM_RISCV)
    riscv.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + (2).to_bytes(2, "little")
                      + (243).to_bytes(2, "little") + bytes(44))
    proc = run_tool("sites", "--vmlinux", str(riscv), "--kallsyms", str(riscv))
    assert_one_line_error(proc, "unsupported architecture", "ELF machine 243")
