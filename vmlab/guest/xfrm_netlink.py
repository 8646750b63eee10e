"""Install xfrm states and policies over raw NETLINK_XFRM, for what iproute2 cannot say.

bookworm's iproute2 6.1 predates SA directions (``XFRMA_SA_DIR``, Linux 6.10), which the
direction-error counters need, and IP-TFS (``mode iptfs``, Linux 6.14), whose SAs and policy
templates the IP-TFS counters need.  This builds ``XFRM_MSG_NEWSA`` / ``XFRM_MSG_NEWPOLICY``
by hand (layouts and numbers from include/uapi/linux/xfrm.h, x86-64; uapi numbers never
change) and reads the kernel's acknowledgement.
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
XFRM_MSG_NEWPOLICY = 0x13
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
XFRMA_TMPL = 5
XFRMA_ALG_AEAD = 18
XFRMA_MARK = 21
XFRMA_SA_DIR = 33
XFRMA_IPTFS_MAX_QSIZE = 40  # u32, out SAs: octets that may wait in the send queue
XFRM_SA_DIR = {"in": 1, "out": 2}
XFRM_MODE = {"transport": 0, "tunnel": 1, "iptfs": 5}
XFRM_POLICY_DIR = {"in": 0, "out": 1, "fwd": 2}
XFRM_INF = 0xFFFFFFFFFFFFFFFF
USERSA_INFO_SIZE = 224
USERPOLICY_INFO_SIZE = 168
USER_TMPL_SIZE = 64


def _addr(text: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(text)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, ip.packed.ljust(16, b"\0")


def _selector(family: int, src: bytes = b"", dst: bytes = b"", prefixlen: int = 0) -> bytes:
    """``struct xfrm_selector``: daddr, saddr, dport, dport_mask, sport, sport_mask, family,
    prefixlen_d, prefixlen_s, proto, (pad), ifindex, user."""
    return struct.pack("=16s16sHHHHHBBB3xiI", dst, src, 0, 0, 0, 0, family, prefixlen,
                       prefixlen, 0, 0, 0)


def _lifetime_cfg() -> bytes:
    """``struct xfrm_lifetime_cfg`` without limits."""
    return struct.pack("=8Q", XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)


def usersa_info(src: str, dst: str, spi: int, proto: int, reqid: int, mode: str) -> bytes:
    """``struct xfrm_usersa_info`` with an empty selector of the SA's family."""
    family, daddr = _addr(dst)
    saddr = _addr(src)[1]
    xfrm_id = struct.pack("=16sIB3x", daddr, socket.htonl(spi), proto)
    lifetime_cur = struct.pack("=4Q", 0, 0, 0, 0)
    stats = struct.pack("=3I", 0, 0, 0)
    tail = struct.pack("=IIHBBB7x", 0, reqid, family, XFRM_MODE[mode], 0, 0)
    info = _selector(family) + xfrm_id + saddr + _lifetime_cfg() + lifetime_cur + stats + tail
    assert len(info) == USERSA_INFO_SIZE, len(info)
    return info


def userpolicy_info(src: str, dst: str, direction: str) -> bytes:
    """``struct xfrm_userpolicy_info``: host-to-host selector, priority 0, action allow."""
    family, daddr = _addr(dst)
    saddr = _addr(src)[1]
    hostlen = 128 if family == socket.AF_INET6 else 32
    lifetime_cur = struct.pack("=4Q", 0, 0, 0, 0)
    # priority, index, dir, action (allow), flags, share, padding to 8 bytes
    tail = struct.pack("=IIBBBB4x", 0, 0, XFRM_POLICY_DIR[direction], 0, 0, 0)
    info = _selector(family, saddr, daddr, hostlen) + _lifetime_cfg() + lifetime_cur + tail
    assert len(info) == USERPOLICY_INFO_SIZE, len(info)
    return info


def user_tmpl(src: str, dst: str, proto: int, reqid: int, mode: str) -> bytes:
    """``struct xfrm_user_tmpl``: any SPI, every algorithm allowed (as iproute2 does)."""
    family, daddr = _addr(dst)
    saddr = _addr(src)[1]
    everything = 0xFFFFFFFF
    tmpl = struct.pack("=16sIB3xH2x16sIBBBxIII", daddr, 0, proto, family, saddr, reqid,
                       XFRM_MODE[mode], 0, 0, everything, everything, everything)
    assert len(tmpl) == USER_TMPL_SIZE, len(tmpl)
    return tmpl


def _attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _request(kind: int, body: bytes, seq: int) -> bytes:
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def new_sa_message(src: str, dst: str, spi: int, aead: str, key_hex: str, icv_bits: int,
                   mark: int, mask: int, direction: Optional[str], reqid: int = 1,
                   mode: str = "tunnel", seq: int = 1,
                   iptfs_max_qsize: Optional[int] = None) -> bytes:
    """The whole ``XFRM_MSG_NEWSA`` request for an ESP SA with an AEAD algorithm."""
    key = bytes.fromhex(key_hex.removeprefix("0x"))
    algo = struct.pack("=64sII", aead.encode(), len(key) * 8, icv_bits) + key
    body = usersa_info(src, dst, spi, socket.IPPROTO_ESP, reqid, mode)
    body += _attr(XFRMA_ALG_AEAD, algo) + _attr(XFRMA_MARK, struct.pack("=II", mark, mask))
    if direction is not None:
        body += _attr(XFRMA_SA_DIR, bytes([XFRM_SA_DIR[direction]]))
    if iptfs_max_qsize is not None:
        body += _attr(XFRMA_IPTFS_MAX_QSIZE, struct.pack("=I", iptfs_max_qsize))
    return _request(XFRM_MSG_NEWSA, body, seq)


def new_policy_message(src: str, dst: str, direction: str, mark: int, mask: int,
                       reqid: int = 1, mode: str = "tunnel", seq: int = 1) -> bytes:
    """``XFRM_MSG_NEWPOLICY`` for a host-to-host policy with one ESP template whose
    tunnel endpoints are the selector's addresses (what :class:`ipsec.Policy` installs)."""
    body = userpolicy_info(src, dst, direction)
    body += _attr(XFRMA_TMPL, user_tmpl(src, dst, socket.IPPROTO_ESP, reqid, mode))
    body += _attr(XFRMA_MARK, struct.pack("=II", mark, mask))
    return _request(XFRM_MSG_NEWPOLICY, body, seq)


def send(ns: str, message: bytes) -> None:
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
        what = {XFRM_MSG_NEWSA: "XFRM_MSG_NEWSA", XFRM_MSG_NEWPOLICY: "XFRM_MSG_NEWPOLICY"}
        kind = struct.unpack_from("=H", message, 4)[0]
        raise OSError(-error, f"{what.get(kind, kind)}: {os.strerror(-error)}")
