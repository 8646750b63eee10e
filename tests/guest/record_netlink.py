"""Record real NETLINK_XFRM traffic as test fixtures (run INSIDE a VM lab guest, as root).

    python -m tests.guest.record_netlink --out tests/fixtures/netlink

Each fixture is what a socket subscribed to the SA, policy, expire and acquire groups
received while one ``ip xfrm`` command ran (or a dump), one datagram per line in hex.
The SAs carry made-up keys (KEY_* below), which the redaction tests look for.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path
from typing import List, Optional

from xfrmtrace.context.xfrmnl import messages as m
from xfrmtrace.context.xfrmnl.socket import XfrmSocket

NS = "xtrec"
KEY_AEAD = "0x" + "c0ffee" * 6 + "c0ff"  # 20 bytes: AES-128 key + salt
KEY_ENC = "0x" + "5ec2e7" * 5 + "5e"  # 16 bytes
KEY_AUTH = "0x" + "a07a07" * 10 + "a0a0"  # 32 bytes

SA_AEAD = ("src 10.9.0.1 dst 10.9.0.2 proto esp spi 0x1000 reqid 7 mode tunnel "
           f"mark 0xd00 mask 0xf00 aead rfc4106(gcm(aes)) {KEY_AEAD} 128 replay-window 32")
SA_CBC = ("src 10.9.0.2 dst 10.9.0.1 proto esp spi 0x2000 reqid 7 mode tunnel "
          f"enc cbc(aes) {KEY_ENC} auth-trunc hmac(sha256) {KEY_AUTH} 128 "
          "encap espinudp 4500 4500 0.0.0.0 limit packet-hard 1000")
SA_V6 = ("src fd00:9::1 dst fd00:9::2 proto esp spi 0x3000 reqid 8 mode transport "
         f"aead rfc4106(gcm(aes)) {KEY_AEAD} 128")
SA_EXPIRING = ("src 10.9.0.1 dst 10.9.0.3 proto esp spi 0x4000 reqid 9 mode tunnel "
               f"aead rfc4106(gcm(aes)) {KEY_AEAD} 128 limit time-soft 1 limit time-hard 2")
POLICY_OUT = ("src 10.9.0.1/32 dst 10.9.0.2/32 dir out mark 0xd00 mask 0xf00 priority 100 "
              "tmpl src 10.9.0.1 dst 10.9.0.2 proto esp reqid 7 mode tunnel")
POLICY_BLOCK = "src 10.9.1.0/24 dst 10.9.2.0/24 proto udp dport 53 dir in action block"


class RecordingSocket(XfrmSocket):
    """Keeps every datagram a dump returned."""

    def __init__(self, netns_path: str) -> None:
        super().__init__(netns_path)
        self.raw: List[bytes] = []

    def _recv_blocking(self) -> bytes:
        data = super()._recv_blocking()
        self.raw.append(data)
        return data


def ip(args: str) -> None:
    subprocess.run(["ip", "-n", NS, "xfrm", *args.split()], check=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "netns", "del", NS], check=False, capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", NS, "addr", "add", "10.9.0.1/24", "dev", "lo"], check=True)
    sock = XfrmSocket(f"/run/netns/{NS}")
    sock.subscribe()

    def record(name: str, action: str, wait: float = 0.3) -> None:
        sock.receive_raw()  # drop leftovers
        if action:
            ip(action)
        time.sleep(wait)
        chunks = sock.receive_raw()
        (args.out / f"{name}.hex").write_text("".join(c.hex() + "\n" for c in chunks))
        print(f"{name}: {len(chunks)} datagrams", flush=True)

    record("sa-add-aead", f"state add {SA_AEAD}")
    record("sa-add-cbc-encap", f"state add {SA_CBC}")
    record("sa-add-ipv6", f"state add {SA_V6}")
    record("sa-update", f"state update {SA_AEAD.replace('replay-window 32', 'replay-window 64')}")
    record("policy-add", f"policy add {POLICY_OUT}")
    record("policy-add-block", f"policy add {POLICY_BLOCK}")
    record("policy-update", f"policy update {POLICY_OUT.replace('priority 100', 'priority 50')}")
    # Dumps, on a separate socket, as the watcher does.
    for name, mtype in (("dump-sa", m.XFRM_MSG_GETSA), ("dump-policy", m.XFRM_MSG_GETPOLICY)):
        dumper = RecordingSocket(f"/run/netns/{NS}")
        dumper.dump(mtype)
        dumper.close()
        (args.out / f"{name}.hex").write_text("".join(c.hex() + "\n" for c in dumper.raw))
        print(f"{name}: {len(dumper.raw)} datagrams", flush=True)
    record("sa-add-expiring", f"state add {SA_EXPIRING}")
    record("sa-expire", "", wait=3.0)
    record("sa-delete", "state delete src 10.9.0.1 dst 10.9.0.2 proto esp spi 0x1000 "
           "mark 0xd00 mask 0xf00")
    record("policy-delete", "policy delete src 10.9.1.0/24 dst 10.9.2.0/24 proto udp dport 53 "
           "dir in")
    record("sa-flush", "state flush")
    record("policy-flush", "policy flush")
    sock.close()
    subprocess.run(["ip", "netns", "del", NS], check=False)
    (args.out / "KERNEL").write_text(os.uname().release + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
