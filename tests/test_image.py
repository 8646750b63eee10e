"""The container image: the Dockerfile's consistency with the repository, and the image itself.

Building the image needs a working container engine (docker with its daemon, podman or
buildah); without one that test is skipped with the reason.  The consistency tests always
run: the runtime stage installs only what the tool needs at run time, the entrypoint is the
console script, the pins are the zipapp's, and every COPY source exists and is in the build
context.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Tuple

import pytest

from tests.support.distbuild import CONSTRAINTS, REPO
from tests.support.dockerfile import apt_installs, copy_sources, ignored, read_dockerfile
from tests.support.require import not_applicable
from xfrmtrace import __version__

RUNTIME_PACKAGES = {"python3", "libbpf1"}
NO_ENGINE = "make image: no working container engine (docker, podman or buildah) found: "


def make_variable(name: str) -> str:
    """A variable's value as the Makefile computes it."""
    proc = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "-s",
         "--eval", f"print-var-{name}: ; @echo '$({name})'", f"print-var-{name}"],
        capture_output=True, text=True, check=True,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")})
    return proc.stdout.strip()


# --- consistency: these need no engine ------------------------------------------------------


def test_dockerfile_reader_sees_two_stages() -> None:
    global_args, stages = read_dockerfile()
    assert [s.name for s in stages] == ["builder", None]
    # Both stages come from the same base: the builder's venv links to its /usr/bin/python3.
    assert stages[0].base == stages[1].base == "${BASE_IMAGE}"
    assert global_args["BASE_IMAGE"].startswith("debian:bookworm")


def test_runtime_stage_installs_only_python3_and_libbpf1() -> None:
    final = read_dockerfile()[1][-1]
    installs = apt_installs(final)
    assert len(installs) == 1 and sorted(installs[0]) == sorted(RUNTIME_PACKAGES), installs
    run = next(r.args for r in final.all("RUN") if "apt-get install" in r.args)
    assert "--no-install-recommends" in run
    assert "rm -rf /var/lib/apt/lists/*" in run
    # The tool itself comes from the builder, never from a compiler or pip here.
    copies = [c.args for c in final.all("COPY")]
    assert copies == ["--from=builder /opt/xfrmtrace /opt/xfrmtrace"]
    assert not re.search(r"\bpip\b|clang|make\b", " ".join(r.args for r in final.all("RUN")))


def test_builder_builds_the_bpf_object_and_the_wheel() -> None:
    builder = read_dockerfile()[1][0]
    packages = {p for install in apt_installs(builder) for p in install}
    assert {"clang", "llvm", "libbpf-dev", "make", "python3-pip", "python3-venv"} <= packages
    runs = " ".join(r.args for r in builder.all("RUN"))
    assert "make bpf" in runs
    assert "pip wheel" in runs and "--no-index" in runs


def test_entrypoint_is_the_console_script() -> None:
    final = read_dockerfile()[1][-1]
    entrypoints = final.all("ENTRYPOINT")
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0].args) == ["xfrmtrace"]
    env = " ".join(e.args for e in final.all("ENV"))
    assert re.search(r"\bPATH=/opt/xfrmtrace/bin:\$PATH\b", env), env
    assert re.search(r"\bPYTHONDONTWRITEBYTECODE=1\b", env), env
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert re.search(r"^\s*xfrmtrace\s*=\s*xfrmtrace\.cli:main\s*$", scripts, re.M)


def test_oci_labels() -> None:
    final = read_dockerfile()[1][-1]
    labels = " ".join(lab.args for lab in final.all("LABEL"))
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert f'org.opencontainers.image.licenses="{cfg["metadata"]["license"]}"' in labels
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert "org.opencontainers.image.source=" in labels


def test_image_and_zipapp_use_the_same_constraints_file() -> None:
    assert make_variable("DIST_CONSTRAINTS") == CONSTRAINTS.name
    builder = read_dockerfile()[1][0]
    assert CONSTRAINTS.name in copy_sources(builder)
    workdir = builder.all("WORKDIR")[-1].args
    env = " ".join(e.args for e in builder.all("ENV"))
    assert f"PIP_CONSTRAINT={workdir}/{CONSTRAINTS.name}" in env


def test_makefile_version_is_the_package_version() -> None:
    # `make image` tags xfrmtrace:$(VERSION) and labels the image with it.
    assert make_variable("VERSION") == __version__
    assert make_variable("IMAGE") == f"xfrmtrace:{__version__}"


def test_every_copied_path_exists_and_is_in_the_context() -> None:
    sources = [s for stage in read_dockerfile()[1] for s in copy_sources(stage)]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"Dockerfile copies {source}, which does not exist"
        assert not ignored(source), f"Dockerfile copies {source}, which .dockerignore excludes"
        if path.is_dir():  # at least the directory's tracked files are sent
            tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", source],
                                     capture_output=True, text=True).stdout.split()
            assert [t for t in tracked if not ignored(t)], f"nothing of {source} is sent"


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".git/config", ".venv/bin/python", "dist/xfrmtrace.pyz", "tests/fixtures",
                 "src/xfrmtrace/__pycache__/cli.cpython-311.pyc", "src/xfrmtrace.egg-info",
                 "src/xfrmtrace/bpf/xfrm.x86_64.bpf.o", ".pytest_cache/v"):
        assert ignored(path), f"{path} would be sent to the build context"
    # The reader itself: parents, globs, exceptions, last match wins.
    assert ignored("a/b/c.pyc", ["**/*.pyc"]) and ignored("x.pyc", ["**/*.pyc"])
    assert not ignored("tests/keep", ["tests", "!tests/keep"])
    assert not ignored("srcx/a", ["src"])


def test_make_image_without_an_engine_says_so_in_one_line(tmp_path: Path) -> None:
    # Engines that are installed but do not work (docker CLI without a daemon).
    for engine in ("docker", "podman", "buildah"):
        fake = tmp_path / engine
        fake.write_text(f"#!/bin/sh\necho 'Error: {engine} is a stub in this test' >&2\nexit 1\n")
        fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    env["PATH"] = f"{tmp_path}:{env.get('PATH', '/usr/bin:/bin')}"
    proc = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "image"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    # make adds its own "make: *** [Makefile:N: image] Error 1" line ("make[1]: ***" when
    # the tests run under `make test`).
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(NO_ENGINE), lines[0]
    for engine in ("docker", "podman", "buildah"):
        assert f"{engine} info: Error: {engine} is a stub in this test" in lines[0]
    assert proc.stdout == ""


def _recording_engine(tmp_path: Path, engine: str, buildx: bool = True) -> Path:
    """A stub ``engine`` whose ``info`` works and which writes every other command line it
    gets to ``calls`` (no image is built)."""
    calls = tmp_path / "calls"
    script = tmp_path / engine
    fail_buildx = "" if buildx else 'if [ "$1 $2" = "buildx version" ]; then exit 1; fi\n'
    script.write_text(f"#!/bin/sh\n{fail_buildx}if [ \"$1\" = info ]; then exit 0; fi\n"
                      f"echo \"$@\" >> {calls}\n")
    script.chmod(0o755)
    return calls


def _make_image(tmp_path: Path, *variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    env["PATH"] = f"{tmp_path}:{env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "image",
                           *variables], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("engine, expected", [
    ("docker", "--platform linux/amd64,linux/arm64 --output type=oci,dest=dist/x.oci.tar,"),
    ("podman", "--platform linux/amd64,linux/arm64 --manifest xt:t ."),
])
def test_make_image_builds_several_platforms_as_one_image(tmp_path: Path, engine: str,
                                                          expected: str) -> None:
    """IMAGE_PLATFORMS gives the engine every platform at once, and one name for all (the
    engine is a stub here: what is checked is the command make gives it)."""
    calls = _recording_engine(tmp_path, engine)
    proc = _make_image(tmp_path, "IMAGE_PLATFORMS=linux/amd64,linux/arm64", "IMAGE=xt:t",
                       "IMAGE_OCI=dist/x.oci.tar")
    assert proc.returncode == 0, proc.stderr
    (line,) = [c for c in calls.read_text().splitlines() if "--build-arg" in c]
    assert expected in line and "--build-arg VERSION=" in line, line


def test_make_image_several_platforms_without_buildx_says_so(tmp_path: Path) -> None:
    calls = _recording_engine(tmp_path, "docker", buildx=False)
    proc = _make_image(tmp_path, "IMAGE_PLATFORMS=linux/amd64,linux/arm64")
    assert proc.returncode != 0
    assert "IMAGE_PLATFORMS needs docker buildx" in proc.stderr
    assert not calls.exists() or "build " not in calls.read_text()


# --- the image, where an engine works --------------------------------------------------------


def working_engine() -> Tuple[Optional[str], str]:
    """The engine `make image` will use, or None and why there is none."""
    why = []
    for engine in ("docker", "podman", "buildah"):
        if shutil.which(engine) is None:
            why.append(f"{engine}: not installed")
            continue
        proc = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            return engine, ""
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
        why.append(f"{engine} info: {last[0] if last else 'failed'}")
    return None, "; ".join(why)


def test_image_builds_and_runs() -> None:
    engine, why = working_engine()
    if engine is None:
        not_applicable(f"no working container engine (docker, podman or buildah): {why}; "
                       "test_dockerfile_in_debian_chroots covers the Dockerfile")
    proc = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "image"],
                          capture_output=True, text=True, timeout=1800,
                          env={k: v for k, v in os.environ.items()
                               if k not in ("MAKEFLAGS", "MFLAGS")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    image = f"xfrmtrace:{__version__}"
    if engine == "buildah":
        container = subprocess.run(["buildah", "from", image], capture_output=True, text=True,
                                   check=True).stdout.strip()
        try:
            run = subprocess.run(["buildah", "run", container, "xfrmtrace", "--version"],
                                 capture_output=True, text=True, timeout=300)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)
    else:
        run = subprocess.run([engine, "run", "--rm", image, "--version"],
                             capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"xfrmtrace {__version__}"


# --- the Dockerfile run in Debian chroots, where no engine works -------------------------------

KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")


def _hash_based_pyc(path: Path) -> bool:
    # PEP 552: bit 0 of the flags word after the magic number.
    return bool(int.from_bytes(path.read_bytes()[4:8], "little") & 1)


def test_dockerfile_in_debian_chroots(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without a container engine: every stage on a mmdebstrap'd rootfs with the packages its
    apt-get line names, the other instructions emulated (tests/support/dockerfile.py); then the
    entrypoint runs in the final stage's rootfs, which has python3 and libbpf1 only."""
    from tests.support.dockerfile import ChrootBuild

    if working_engine()[0] is not None:
        not_applicable("a container engine works: test_image_builds_and_runs builds the image")
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap --mode=root, chroot)")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (make deps installs it)")
    epoch = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
                           capture_output=True, text=True).stdout.strip() or "315532800"
    workspace = tmp_path_factory.mktemp("chroot-build")
    try:
        build = ChrootBuild(workspace, {"SOURCE_DATE_EPOCH": epoch, "VERSION": __version__},
                            log=lambda msg: print(msg, flush=True))
        final = build.build()
        assert final.labels["org.opencontainers.image.version"] == __version__
        assert final.labels["org.opencontainers.image.licenses"] == "GPL-2.0-only"

        proc = build.run(final, [*final.entrypoint, "--version"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"xfrmtrace {__version__}"
        # libbpf.so.1 from the runtime stage's libbpf1, loaded by the tool's binding.
        proc = build.run(final, ["python3", "-c",
                                 "from xfrmtrace.bpf import ffi; print(*ffi.libbpf_version())"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[0] == "1"
        if not KPROBE_PMU.exists():
            proc = build.run(final, [*final.entrypoint, "trace"])
            assert proc.returncode != 0
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("xfrmtrace: error:"), proc.stderr

        site = next((final.root / "opt/xfrmtrace/lib").glob("python3*/site-packages"))
        # The BPF objects were built in the builder (the host's are not in the context), one
        # per machine: the same image layout serves x86-64 and arm64 nodes.
        for machine in ("x86_64", "aarch64"):
            assert (site / f"xfrmtrace/bpf/xfrm.{machine}.bpf.o").stat().st_size > 0
        # Compiled at build time (the image is read-only), hash-based thanks to
        # SOURCE_DATE_EPOCH, so the same from build to build.
        pycs = list((site / "xfrmtrace").glob("__pycache__/*.pyc"))
        assert pycs and all(_hash_based_pyc(p) for p in pycs)
        # No pip, no compiler in the runtime stage.
        assert not (site / "pip").exists()
        assert not (final.root / "usr/bin/clang").exists()
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
