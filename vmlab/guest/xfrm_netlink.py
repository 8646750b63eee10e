"""Install an xfrm state over raw NETLINK_XFRM, for what the lab's iproute2 cannot say.

bookworm's iproute2 6.1 predates SA directions (``XFRMA_SA_DIR``, Linux 6.10), which the
direction-error counters need.  This builds one ``XFRM_MSG_NEWSA`` by hand (layouts from
include/uapi/linux/xfrm.h, x86-64) and reads the kernel's acknowledgement.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import Optional

from vmlab.guest import nsutil

NETLINK_XFRM = 6
XFRM_MSG_NEWSA = 0x10
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
XFRMA_ALG_AEAD = 18
XFRMA_MARK = 21
XFRMA_SA_DIR = 33
XFRM_SA_DIR = {"in": 1, "out": 2}
XFRM_MODE = {"transport": 0, "tunnel": 1}
XFRM_INF = 0xFFFFFFFFFFFFFFFF
USERSA_INFO_SIZE = 224


def _addr(text: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(text)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, ip.packed.ljust(16, b"\0")


def usersa_info(src: str, dst: str, spi: int, proto: int, reqid: int, mode: str) -> bytes:
    """``struct xfrm_usersa_info`` with an empty selector of the SA's family."""
    family, daddr = _addr(dst)
    saddr = _addr(src)[1]
    # struct xfrm_selector: daddr, saddr, dport, dport_mask, sport, sport_mask, family,
    # prefixlen_d, prefixlen_s, proto, (pad), ifindex, user
    selector = struct.pack("=16s16sHHHHHBBB3xiI", b"", b"", 0, 0, 0, 0, family, 0, 0, 0, 0, 0)
    xfrm_id = struct.pack("=16sIB3x", daddr, socket.htonl(spi), proto)
    lifetime_cfg = struct.pack("=8Q", XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)
    lifetime_cur = struct.pack("=4Q", 0, 0, 0, 0)
    stats = struct.pack("=3I", 0, 0, 0)
    tail = struct.pack("=IIHBBB7x", 0, reqid, family, XFRM_MODE[mode], 0, 0)
    info = selector + xfrm_id + saddr + lifetime_cfg + lifetime_cur + stats + tail
    assert len(info) == USERSA_INFO_SIZE, len(info)
    return info


def _attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def new_sa_message(src: str, dst: str, spi: int, aead: str, key_hex: str, icv_bits: int,
                   mark: int, mask: int, direction: Optional[str], reqid: int = 1,
                   mode: str = "tunnel", seq: int = 1) -> bytes:
    """The whole ``XFRM_MSG_NEWSA`` request for an ESP SA with an AEAD algorithm."""
    key = bytes.fromhex(key_hex.removeprefix("0x"))
    algo = struct.pack("=64sII", aead.encode(), len(key) * 8, icv_bits) + key
    body = usersa_info(src, dst, spi, socket.IPPROTO_ESP, reqid, mode)
    body += _attr(XFRMA_ALG_AEAD, algo) + _attr(XFRMA_MARK, struct.pack("=II", mark, mask))
    if direction is not None:
        body += _attr(XFRMA_SA_DIR, bytes([XFRM_SA_DIR[direction]]))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return struct.pack("=IHHII", 16 + len(body), XFRM_MSG_NEWSA, flags, seq, 0) + body


def add_sa(ns: str, message: bytes) -> None:
    """Send ``message`` in namespace ``ns``; raise OSError with the kernel's errno if refused."""
    with nsutil.entered(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    with sock:
        sock.bind((0, 0))
        sock.send(message)
        reply = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", reply)
    if kind != NLMSG_ERROR or length < 20:
        raise OSError(0, f"unexpected netlink reply type {kind}")
    (error,) = struct.unpack_from("=i", reply, 16)
    if error:
        raise OSError(-error, f"XFRM_MSG_NEWSA: {os.strerror(-error)}")
