"""Build the single-file tool (``make dist`` -> ``dist/xfrmtrace.pyz``) for the tests.

The Makefile is the one recipe: :func:`build_zipapp` runs ``make dist``, which rebuilds only
when the BPF object, the sources, the pins or the packaging files changed, so calling it
from several test modules costs one build.  The VM tests use it to run the packed tool on
real kernels.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
PYZ = REPO / "dist" / "xfrmtrace.pyz"
CONSTRAINTS = REPO / "dist-requirements.txt"
# pip downloads the pinned wheels (and the build backend) from PyPI on a cold cache.
BUILD_TIMEOUT = 900


class DistBuildError(RuntimeError):
    """``make dist`` failed; the message holds its output."""


def _make_env() -> dict:
    env = dict(os.environ)
    # Under `make test` the parent make's flags and command-line variables (DIST_PYZ=...,
    # -n, jobserver descriptors) would leak into this make.
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
        env.pop(name, None)
    return env


def build_zipapp(output: Optional[Path] = None) -> Path:
    """Run ``make dist`` and return the zipapp's path.

    ``output`` builds to another file (``make dist DIST_PYZ=output``); a file that does not
    exist yet is always built from scratch, which the reproducibility test relies on.
    """
    cmd = ["make", "-C", str(REPO), "--no-print-directory", "dist"]
    target = PYZ
    if output is not None:
        target = Path(output).resolve()
        cmd.append(f"DIST_PYZ={target}")
    try:
        proc = subprocess.run(cmd, env=_make_env(), capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        raise DistBuildError(f"make dist took more than {BUILD_TIMEOUT} s") from err
    if proc.returncode != 0 or not target.is_file():
        raise DistBuildError(f"make dist failed (exit {proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return target
