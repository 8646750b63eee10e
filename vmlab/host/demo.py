"""`make demo`: boot a real Debian kernel and show xfrmtrace catching the classic case.

Two network namespaces run an ESP tunnel (aead rfc4106(gcm(aes)), SAs and
policies marked 0xd00/0xf00); the receiver's inbound SA is deleted and three
pings are sent.  xfrmtrace's own text output is printed as it appeared.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from vmlab.host import kernels, vm

REPO = Path(__file__).resolve().parents[2]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", default="6.1", help="kernel series (default 6.1)")
    args = parser.parse_args(argv)
    missing = vm.missing_requirements()
    if missing:
        print("demo: VM lab unavailable: missing " + "; ".join(missing), file=sys.stderr)
        return 1
    print(f"demo: fetching Debian's {args.kernel} kernel (cached after the first run)...",
          flush=True)
    kernel = kernels.fetch_kernel(args.kernel)
    with tempfile.TemporaryDirectory(prefix="xfrmtrace-demo-") as tmp:
        rwdir = Path(tmp)
        out = rwdir / "trace"
        command = shlex.join([sys.executable, "-m", "tests.guest.trace_run", "--out", str(out),
                              "--output", "text", "--quick", "--count", "3",
                              "in-no-states"])
        print(f"demo: booting {kernel.version} under qemu (TCG; takes a few minutes)...",
              flush=True)
        result = vm.run_in_vm(kernel, command, rwdir=rwdir, cwd=REPO, timeout=1200,
                              env={"PYTHONDONTWRITEBYTECODE": "1"})
        if not result.ok:
            print(result.describe(), file=sys.stderr)
            return 1
        data = json.loads((out / "results.json").read_text())
        scenario = data["scenarios"].get("in-no-states", {})
        if "error" in scenario:
            print(f"demo: the lab failed: {scenario['error']}", file=sys.stderr)
            return 1
        lab = scenario["labs"][0]
        cfg = lab["config"]
        moved = {ns: {k: v for k, v in counters.items() if v}
                 for ns, counters in lab["totals"].items()}
        print(f"\ndemo: namespaces {cfg['ns_a']} -> {cfg['ns_b']} "
              f"(netns inodes {lab['netns']}); inbound SA spi "
              f"{hex(cfg['spi_ab'])} deleted in {cfg['ns_b']}, 3 pings sent; "
              f"/proc/net/xfrm_stat: {moved}\n")
        print("$ xfrmtrace")
        sys.stdout.write(data.get("text", ""))
        if data["stderr"].strip():
            print(f"(stderr of xfrmtrace: {data['stderr'].strip()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
