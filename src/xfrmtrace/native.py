"""The one native library xfrmtrace needs besides libbpf, in a bundle for two machines.

capstone (the disassembler of the site resolver) loads ``libcapstone.so`` from its package's
``lib/`` directory, or from ``$LIBCAPSTONE_PATH`` first.  A pip install on either machine
puts the right library there.  The single-file tool (``make dist``) is built once for both:
its ``capstone/lib/`` holds the x86-64 library, and ``capstone/lib/aarch64/`` the arm64 one
from the same capstone release.  :func:`use_bundled_capstone` points capstone at the
running machine's copy, before anything imports capstone.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from xfrmtrace.kernel import arch


def use_bundled_capstone() -> None:
    """Set ``LIBCAPSTONE_PATH`` to ``capstone/lib/<machine>/`` when the package holds a
    library for this machine there (the zipapp on arm64); otherwise leave it alone."""
    if "LIBCAPSTONE_PATH" in os.environ:
        return
    spec = importlib.util.find_spec("capstone")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return
    for location in spec.submodule_search_locations:
        own = Path(location) / "lib" / arch.running_machine()
        if (own / "libcapstone.so").is_file():
            os.environ["LIBCAPSTONE_PATH"] = str(own)
            return
