"""Sockets inside a lab namespace, created from the guest driver's own process.

``ip netns exec NS python ...`` would start a new interpreter per socket, which costs
several seconds under TCG.  setns(2) on the calling thread is instant, and a socket keeps
the namespace it was created in after the thread switches back.
"""

from __future__ import annotations

import socket
import struct

from xfrmtrace.kernel import nsenter

UDP_ENCAP = 100  # setsockopt(SOL_UDP, UDP_ENCAP, ...)
UDP_ENCAP_ESPINUDP = 2
IPPROTO_ESP = 50
IP_XFRM_POLICY = 17
XFRM_POLICY_IN, XFRM_POLICY_OUT = 0, 1
XFRM_POLICY_ALLOW = 0


def entered(ns: str):
    """Run the body with this thread in network namespace ``ns`` (a name in /run/netns)."""
    return nsenter.entered(f"/run/netns/{ns}")


def bypass_policy(direction: int, family: int = socket.AF_INET) -> bytes:
    """``struct xfrm_userpolicy_info`` for a per-socket "allow" policy in ``direction``."""
    # struct xfrm_selector: wildcard addresses and ports (40 bytes), the family, the rest 0.
    selector = bytes(40) + struct.pack("=H", family) + bytes(14)
    lifetimes = bytes(64 + 32)  # struct xfrm_lifetime_cfg + struct xfrm_lifetime_cur
    tail = struct.pack("=IIBBBB4x", 0, 0, direction, XFRM_POLICY_ALLOW, 0, 0)
    return selector + lifetimes + tail


def esp_in_udp_socket(ns: str, port: int = 4500) -> socket.socket:
    """The UDP socket an IKE daemon opens for NAT traversal.

    UDP_ENCAP makes the kernel hand ESP packets arriving on ``port`` to XFRM.  The socket
    also bypasses the SPD, as charon's does: UDP checks the inbound policy before looking
    at the encapsulation, and the lab's host-to-host policies cover UDP too.
    """
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for direction in (XFRM_POLICY_IN, XFRM_POLICY_OUT):
        sock.setsockopt(socket.IPPROTO_IP, IP_XFRM_POLICY, bypass_policy(direction))
    sock.setsockopt(socket.IPPROTO_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
    sock.bind(("0.0.0.0", port))
    return sock


def send_raw_esp(ns: str, dst: str, payload: bytes, count: int) -> None:
    """Send ``count`` IPv4 packets of protocol ESP carrying ``payload`` (unmarked, so the
    lab's marked policies leave them alone) from ``ns`` to ``dst``."""
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP)
    with sock:
        for _ in range(count):
            sock.sendto(payload, (dst, 0))
