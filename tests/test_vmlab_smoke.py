"""Smoke test of the VM lab: boot a real Debian kernel and move XFRM counters in it.

Proves the whole chain the tracer's VM tests rely on: kernel download and unpack, virtme-ng
boot under TCG, the project's python running inside the guest, module autoloading (veth, esp4,
nf_tables), and the IPsec lab recipe.  Kernels come from $XFRMTRACE_KERNELS (comma or space
separated series, default 6.1), as set by `make test-vm KERNEL=...`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` (unlike `python -m pytest`) omits the repo root
    sys.path.insert(0, str(REPO))

from tests.vmlab import kernels, vm  # noqa: E402

KERNELS = os.environ.get("XFRMTRACE_KERNELS", "6.1").replace(",", " ").split()
PACKETS = 3
# The guest uses the host's root filesystem: the lab's tools must be installed on the host.
GUEST_TOOLS = ("ip", "iptables", "ping")


def _lab_missing() -> list[str]:
    missing = vm.missing_requirements()
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing += [f"{tool} (needed inside the guest)" for tool in GUEST_TOOLS
                if shutil.which(tool, path=search) is None]
    return missing


@pytest.mark.vm
@pytest.mark.parametrize("series", KERNELS)
def test_ipsec_counters_move_in_vm(series: str, tmp_path: Path) -> None:
    """In-guest lab: XfrmInNoStates moves once per packet, XfrmOutNoStates moves too."""
    missing = _lab_missing()
    if missing:
        pytest.skip("VM lab cannot run here: missing " + "; ".join(missing))
    # A failed download is not skipped: the lab needs Debian's archive (or a warm cache),
    # and CI must notice when it has neither.
    kernel = kernels.fetch_kernel(series)

    out = tmp_path / "results"
    command = shlex.join([sys.executable, "-m", "tests.vmlab.ipsec", "in-no-states",
                         "out-no-states", "--count", str(PACKETS), "--json-dir", str(out)])
    result = vm.run_in_vm(kernel, command, rwdir=tmp_path, cwd=REPO, timeout=600,
                          env={"PYTHONDONTWRITEBYTECODE": "1"})
    boot = "?" if result.boot_seconds is None else f"{result.boot_seconds:.1f}"
    print(f"{series} ({kernel.version}): boot {boot} s, total {result.seconds:.1f} s, "
          f"console {result.console_log}")
    assert result.ok, result.describe()

    inbound = json.loads((out / "in-no-states.json").read_text())
    assert inbound["healthy_before"], f"lab ping failed with all SAs in place: {inbound}"
    assert inbound["ns"] == "xt-b"
    assert inbound["delta"].get("XfrmInNoStates") == PACKETS, inbound["delta"]

    outbound = json.loads((out / "out-no-states.json").read_text())
    assert outbound["ns"] == "xt-a"
    # One increment per route lookup, and ping does a few at startup too (6.1: 3 + 1 per packet).
    assert outbound["delta"].get("XfrmOutNoStates", 0) >= PACKETS, outbound["delta"]
