"""The single-file tool: ``make dist`` -> ``dist/xfrmtrace.pyz`` (a shiv zipapp).

The zipapp is run with the system interpreter (not the venv): it must bring every
dependency itself, find its BPF object and libcapstone.so where shiv extracts it (SHIV_ROOT),
and reach the kernel checks.  Two builds must give the same bytes.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.distbuild import CONSTRAINTS, REPO, build_zipapp
from tests.support.require import not_applicable_if
from xfrmtrace import __version__

SYSTEM_PYTHON = "/usr/bin/python3"
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")
#: The BPF objects `make bpf` builds, one per machine: the zipapp runs on both.
BPF_OBJECTS = {name: REPO / "src" / "xfrmtrace" / "bpf" / name
               for name in ("xfrm.x86_64.bpf.o", "xfrm.aarch64.bpf.o")}


def read_pins(path: Path = CONSTRAINTS) -> Dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line}"
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def declared_requirements() -> List[Requirement]:
    """install_requires and the ``metrics`` extra of setup.cfg: what the pyz and image ship."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = (cfg["options"]["install_requires"].splitlines()
             + cfg["options.extras_require"]["metrics"].splitlines())
    return [Requirement(line.strip()) for line in lines if line.strip()]


def python39() -> Optional[str]:
    """A Python 3.9 (the oldest supported) if this machine has one, else None."""
    candidates = [shutil.which("python3.9"),
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))]
    for candidate in candidates:
        if not candidate:
            continue
        proc = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                              capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip() == "(3, 9)":
            return candidate
    return None


# --- without building ------------------------------------------------------------------------


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = read_pins()
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (setup.cfg) has no pin in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name]), \
            f"{CONSTRAINTS.name} pins {name}=={pins[name]}, outside setup.cfg's {req}"


# --- the built zipapp ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyz() -> Path:
    return build_zipapp()


@pytest.fixture(scope="module")
def shiv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shiv-root")


def run_pyz(pyz: Path, shiv_root: Path, *args: str, python: str = SYSTEM_PYTHON,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SHIV_ROOT": str(shiv_root), **(env or {})}
    # Nothing of the venv may help: no PYTHONPATH, no venv on PATH.
    full_env.pop("PYTHONPATH", None)
    full_env.pop("VIRTUAL_ENV", None)
    return subprocess.run([python, str(pyz), *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_version(pyz: Path, shiv_root: Path) -> None:
    proc = run_pyz(pyz, shiv_root, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"xfrmtrace {__version__}"
    # Extracted under SHIV_ROOT, not ~/.shiv.
    assert list(shiv_root.glob("xfrmtrace.pyz_*/site-packages/xfrmtrace/bpf/xfrm.*.bpf.o"))


def test_help_and_sites_help(pyz: Path, shiv_root: Path) -> None:
    proc = run_pyz(pyz, shiv_root, "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("trace", "sites", "report"):
        assert command in proc.stdout
    proc = run_pyz(pyz, shiv_root, "sites", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--vmlinux" in proc.stdout and "--audit" in proc.stdout


INSPECT = r"""
import json, sys, zipfile
path = sys.argv[1]
with open(path, "rb") as f:
    shebang = f.readline().decode()
with zipfile.ZipFile(path) as z:
    print(json.dumps({
        "shebang": shebang,
        "names": z.namelist(),
        "environment": json.loads(z.read("environment.json")),
        "bpf_sha256": {n.rsplit("/", 1)[1]: __import__("hashlib").sha256(z.read(n)).hexdigest()
                       for n in z.namelist() if n.endswith(".bpf.o")},
    }))
"""


def test_zip_contents(pyz: Path) -> None:
    proc = subprocess.run([SYSTEM_PYTHON, "-c", INSPECT, str(pyz)], capture_output=True,
                          text=True, check=True)
    info = json.loads(proc.stdout)
    names = set(info["names"])
    assert info["shebang"] == "#!/usr/bin/env python3\n"
    assert "site-packages/capstone/lib/libcapstone.so" in names
    assert "site-packages/prometheus_client/__init__.py" in names
    assert "site-packages/elftools/__init__.py" in names
    assert "site-packages/pyroute2/__init__.py" in names
    # The objects packed, one per machine, are the ones `make bpf` built from the current
    # sources.
    assert info["bpf_sha256"] == {name: hashlib.sha256(path.read_bytes()).hexdigest()
                                  for name, path in BPF_OBJECTS.items()}
    env = info["environment"]
    assert env["entry_point"] == "xfrmtrace.cli:main"
    assert env["reproducible"] is True
    # No build-machine paths: no pip-made scripts, no bytecode.
    assert not [n for n in names if n.startswith("site-packages/bin/") or n.endswith(".pyc")]


def test_capstone_library_for_each_machine(pyz: Path) -> None:
    """x86-64's libcapstone.so where capstone looks by default, arm64's where
    xfrmtrace/native.py points it on an arm64 host (the arm64 VM lab runs this file)."""
    import zipfile

    em_x86_64, em_aarch64 = 62, 183  # ELF e_machine
    with zipfile.ZipFile(pyz) as zf:
        machines = {name: int.from_bytes(zf.read(name)[18:20], "little")
                    for name in zf.namelist() if name.endswith("/libcapstone.so")}
    assert machines == {"site-packages/capstone/lib/libcapstone.so": em_x86_64,
                        "site-packages/capstone/lib/aarch64/libcapstone.so": em_aarch64}


def test_packed_distributions_are_exactly_the_pins(pyz: Path) -> None:
    import zipfile

    with zipfile.ZipFile(pyz) as z:
        dists = {}
        for name in z.namelist():
            m = re.fullmatch(r"site-packages/([^/]+)-([^/-]+)\.dist-info/METADATA", name)
            if m:
                dists[canonicalize_name(m.group(1))] = m.group(2)
    assert dists.pop("xfrmtrace") == __version__
    runtime_pins = {name for name in read_pins()
                    if name in {canonicalize_name(r.name) for r in declared_requirements()}}
    assert set(dists) == runtime_pins
    pins = read_pins()
    for name, version in dists.items():
        assert pins[name] == version, f"{name} {version} packed, {pins[name]} pinned"


CHECK_EXTRACTED = r"""
import importlib, os, pkgutil, sys
import capstone, xfrmtrace, xfrmtrace.trace.tracer as tracer
root = os.environ["SHIV_ROOT"]
assert tracer.BPF_OBJECT.is_file() and str(tracer.BPF_OBJECT).startswith(root), tracer.BPF_OBJECT
assert str(capstone._path).startswith(root), capstone._path
md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
assert [i.mnemonic for i in md.disasm(b"\x90\xc3", 0)] == ["nop", "ret"]
names = [m.name for m in pkgutil.walk_packages(xfrmtrace.__path__, "xfrmtrace.")
         if m.name != "xfrmtrace.__main__"]  # that one runs the tool
for name in names:
    importlib.import_module(name)
import elftools, prometheus_client, pyroute2
print(sys.version_info[0], sys.version_info[1], len(names))
"""

PYTHONS = [pytest.param(SYSTEM_PYTHON, id="system-python3"),
           pytest.param(python39(), id="python3.9",
                        marks=not_applicable_if(python39() is None,
                                                  "no Python 3.9 on this machine (the "
                                                  "system python3 run covers the zipapp)"))]


@pytest.mark.parametrize("python", PYTHONS)
def test_extracted_package_finds_its_files_and_imports_everything(
        pyz: Path, shiv_root: Path, python: str) -> None:
    # shiv's interpreter mode: the zipapp's environment, our code instead of the entry point.
    proc = run_pyz(pyz, shiv_root, "-c", CHECK_EXTRACTED, python=python,
                   env={"SHIV_INTERPRETER": "1"})
    assert proc.returncode == 0, proc.stderr
    major, minor, modules = map(int, proc.stdout.split())
    assert (major, minor) >= (3, 9) and modules >= 20
    proc = run_pyz(pyz, shiv_root, "--version", python=python)
    assert proc.returncode == 0 and proc.stdout.strip() == f"xfrmtrace {__version__}"


@not_applicable_if(KPROBE_PMU.exists(), "this kernel has kprobes: not the negative case")
def test_trace_on_this_kernel_gives_one_error_line(pyz: Path, shiv_root: Path) -> None:
    proc = run_pyz(pyz, shiv_root, "trace")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("xfrmtrace: error:"), lines[0]
    assert proc.stdout == ""


def test_two_builds_are_byte_identical(pyz: Path, tmp_path: Path) -> None:
    # Two fresh builds (files that do not exist yet, so make builds both), each in its own
    # staging directory.
    first = build_zipapp(tmp_path / "first" / "xfrmtrace.pyz")
    second = build_zipapp(tmp_path / "second" / "xfrmtrace.pyz")
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digests[0] == digests[1]
