"""One NETLINK_XFRM socket per network namespace: a dump of the SAD and SPD, then changes.

Messages are split and bounds-checked here before pyroute2's parser sees them, so a
truncated or odd message costs a warning, never the trace.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import Any, Container, Iterator, Optional

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, nlmsg

from xfrmtrace.context.xfrmnl import messages as m
from xfrmtrace.kernel.nsenter import entered

log = logging.getLogger("xfrmtrace.context.xfrmnl")

NETLINK_XFRM = 6
NLMSG_ERROR = 2
NLMSG_DONE = 3
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
GROUPS = (m.XFRMNLGRP_SA, m.XFRMNLGRP_POLICY, m.XFRMNLGRP_EXPIRE, m.XFRMNLGRP_ACQUIRE,
          m.XFRMNLGRP_MAPPING)
_HEADER = struct.Struct("=IHHII")
_RCVBUF = 4 << 20


def split_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, message bytes) for each whole netlink message in a datagram; stops at the
    first one whose length field does not fit, or at trailing bytes too short for a header
    (with a warning either way)."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, mtype, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            log.warning("netlink: message of %d bytes at offset %d overruns a %d-byte "
                        "datagram; ignoring the rest", length, offset, len(data))
            return
        yield mtype, data[offset:offset + length]
        offset += (length + 3) & ~3
    if offset < len(data):
        log.warning("netlink: %d bytes at offset %d of a %d-byte datagram are too short "
                    "for a message header; ignoring them", len(data) - offset, offset, len(data))


def decode_attributes(msg: Any, names: Optional[Container[str]] = None) -> None:
    """Decode the attributes of ``msg`` (those named in ``names``, default all) now, so a
    cut or odd one raises here.  Not through ``slot.nla``: that logs pyroute2's traceback
    and hands back an attribute whose fields all read as 0 (an algorithm name 0, say)."""
    for slot in msg.get("attrs", ()):
        attr = slot.cell[1]
        if (names is None or slot.name in names) and not attr.decoded:
            attr.decode()


def parse(data: bytes) -> Iterator[Any]:
    """Decoded XFRM messages of a datagram; undecodable ones are logged and skipped."""
    marshal = m.MarshalXfrm()
    for mtype, raw in split_messages(data):
        if mtype in (NLMSG_ERROR, NLMSG_DONE) or mtype not in marshal.msg_map:
            continue
        try:
            msg = next(iter(marshal.parse(raw)), None)
            if msg is not None:
                decode_attributes(msg)
                yield msg
        except Exception as err:  # noqa: BLE001 - one odd message must not stop the trace
            log.warning("netlink: cannot decode XFRM message type %#x (%d bytes): %s",
                        mtype, len(raw), err)


class NetlinkSubscriber:
    """A netlink socket in one namespace (``netns_path``: /run/netns/NAME, /proc/PID/ns/net,
    None for our own) that notifications arrive on."""

    def __init__(self, protocol: int, netns_path: Optional[str] = None, groups: int = 0) -> None:
        if netns_path is None:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        else:
            with entered(netns_path):
                self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            self.sock.bind((0, groups))
        except OSError:
            self.sock.close()
            raise
        self.lost = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive_raw(self) -> list[bytes]:
        """Whatever datagrams are waiting (non-blocking).  ``lost`` is set when the
        kernel dropped notifications because we fell behind."""
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(self.sock.recv(1 << 20, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return chunks
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                log.warning("netlink: notifications were lost (receive buffer full)")
                self.lost = True

    def close(self) -> None:
        self.sock.close()


class XfrmSocket(NetlinkSubscriber):
    """NETLINK_XFRM in one namespace."""

    def __init__(self, netns_path: Optional[str] = None) -> None:
        super().__init__(NETLINK_XFRM, netns_path)
        self._seq = 0

    def subscribe(self) -> None:
        """Join the SA, policy, expire, acquire and mapping groups."""
        for group in GROUPS:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def dump(self, mtype: int) -> list[Any]:
        """Every SA (``XFRM_MSG_GETSA``) or policy (``XFRM_MSG_GETPOLICY``), blocking."""
        self._seq += 1
        request = nlmsg()
        request["header"]["type"] = mtype
        request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        request["header"]["sequence_number"] = self._seq
        request.encode()
        # A policy dump request carries an (empty) xfrm_userpolicy_id; an SA dump request
        # carries only optional attributes (the kernel parses its body as attributes).
        body = bytes(64 if mtype == m.XFRM_MSG_GETPOLICY else 0)
        data = bytearray(request.data[:16]) + body
        struct.pack_into("=I", data, 0, len(data))
        self.sock.send(bytes(data))
        result: list[Any] = []
        while True:
            chunk = self._recv_blocking()
            done = False
            for kind, raw in split_messages(chunk):
                if kind == NLMSG_DONE:
                    done = True
                elif kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", raw, 16)
                    if error:
                        raise OSError(-error, f"XFRM dump: {os.strerror(-error)}")
                    done = True
            result.extend(parse(chunk))
            if done:
                return result

    def _recv_blocking(self) -> bytes:
        return self.sock.recv(1 << 20)

    def receive(self) -> list[Any]:
        """Whatever notifications are waiting (non-blocking), decoded."""
        return [msg for chunk in self.receive_raw() for msg in parse(chunk)]
