"""SAs and policies as plain data, built from decoded NETLINK_XFRM messages.

This is where key material is dropped: an :class:`Algorithm` carries the algorithm's name
and key length, its key only when the user asked for ``--show-keys``, and with
``--key-fingerprint-secret`` a keyed fingerprint of it (:class:`KeyPolicy`).  Nothing else
in xfrmtrace ever sees key bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from xfrmtrace.context.xfrmnl import messages as m

PROTOCOLS = {50: "esp", 51: "ah", 108: "comp", 43: "route2", 60: "hao"}
MODES = {0: "transport", 1: "tunnel", 2: "ro", 3: "in_trigger", 4: "beet", 5: "iptfs"}
DIRECTIONS = {0: "in", 1: "out", 2: "fwd"}
SA_DIRECTIONS = {1: "in", 2: "out"}
ENCAP_TYPES = {1: "espinudp-nonike", 2: "espinudp", 7: "espintcp"}
REDACTED = "<redacted>"


def address(raw: bytes, family: int) -> Optional[str]:
    """An xfrm_address_t as text; None for the all-zero wildcard."""
    addr: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
    if family == socket.AF_INET6:
        addr = ipaddress.IPv6Address(raw[:16])
    elif family == socket.AF_INET:
        addr = ipaddress.IPv4Address(raw[:4])
    else:
        return None
    return None if int(addr) == 0 else str(addr)


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _limit(value: int) -> Optional[int]:
    return None if value in (m.XFRM_INF, 0) else value


@dataclass(frozen=True)
class Algorithm:
    """One transform of an SA: ``aead``, ``auth``, ``crypt`` or ``comp``."""

    kind: str
    name: str
    key_bits: int
    icv_bits: Optional[int] = None  # AEAD ICV or truncated auth length
    key: str = REDACTED  # hex, only with --show-keys
    key_fingerprint: Optional[str] = None  # KeyPolicy.fingerprint, with a secret

    def describe(self) -> str:
        icv = f"/{self.icv_bits}" if self.icv_bits else ""
        fingerprint = f" fingerprint {self.key_fingerprint}" if self.key_fingerprint else ""
        return (f"{self.kind} {self.name} ({self.key_bits}-bit key{icv}) key {self.key}"
                f"{fingerprint}")


# Domain separation: a fingerprint is never a MAC of anything else keyed with that secret.
_FINGERPRINT_LABEL = b"xfrmtrace SA key fingerprint v1\0"
FINGERPRINT_SECRET_MIN = 16  # bytes


@dataclass(frozen=True)
class KeyPolicy:
    """What becomes of SA keys: ``<redacted>``, the key itself (``--show-keys``), and with a
    secret shared by every node's tracer (``--key-fingerprint-secret``) a fingerprint, so two
    nodes' logs tell the same key from a different one (a key changed on one side only: the
    receiver's XfrmInStateProtoError) without either log holding the key.  The fingerprint
    is HMAC-SHA-256 keyed with that secret, truncated to 128 bits: without the secret it
    says nothing of the key, and with it, still nothing a 128-bit key could be guessed from.
    """

    show: bool = False
    fingerprint_secret: Optional[bytes] = None

    def fingerprint(self, key: Optional[bytes]) -> Optional[str]:
        if self.fingerprint_secret is None or key is None:
            return None
        mac = hmac.new(self.fingerprint_secret, _FINGERPRINT_LABEL + key, hashlib.sha256)
        return mac.hexdigest()[:32]


REDACT = KeyPolicy()  # the default: keys redacted, no fingerprint


@dataclass(frozen=True)
class Selector:
    src: Optional[str]  # "10.0.0.0/24"; None: any
    dst: Optional[str]
    proto: int = 0
    sport: int = 0
    dport: int = 0
    family: int = 0
    ifindex: int = 0

    def describe(self) -> str:
        text = f"{self.src or 'any'} -> {self.dst or 'any'}"
        if self.proto:
            text += f" proto {self.proto}"
        if self.sport or self.dport:
            text += f" ports {self.sport}->{self.dport}"
        return text


@dataclass(frozen=True)
class Lifetime:
    """Hard and soft limits (None: unlimited) and what the SA/policy has used so far."""

    hard_bytes: Optional[int] = None
    hard_packets: Optional[int] = None
    hard_add_seconds: Optional[int] = None
    hard_use_seconds: Optional[int] = None
    soft_bytes: Optional[int] = None
    soft_packets: Optional[int] = None
    soft_add_seconds: Optional[int] = None
    soft_use_seconds: Optional[int] = None
    bytes: int = 0
    packets: int = 0
    add_time: int = 0


@dataclass(frozen=True)
class SA:
    """One xfrm state (SAD entry) of one network namespace."""

    src: Optional[str]
    dst: Optional[str]
    spi: int
    proto: str
    mode: str
    reqid: int
    family: int
    mark: int = 0
    mark_mask: int = 0
    if_id: int = 0
    direction: Optional[str] = None  # "in"/"out" (Linux 6.10+), None when unset
    replay_window: int = 0
    esn: bool = False
    encap: Optional[str] = None  # "espinudp 4500->4500"
    algorithms: tuple[Algorithm, ...] = ()
    selector: Optional[Selector] = None
    lifetime: Lifetime = field(default_factory=Lifetime)
    replay_errors: int = 0  # xfrm_stats.replay
    integrity_failed: int = 0
    seq: int = 0  # inbound: highest sequence number seen
    oseq: int = 0  # outbound: last sequence number sent
    iptfs_max_qsize: Optional[int] = None  # mode iptfs, out: octets its send queue may hold

    @property
    def key(self) -> tuple[Optional[str], int, str, int, int]:
        """What identifies an SA in the kernel's SAD (plus the mark it is looked up with)."""
        return (self.dst, self.spi, self.proto, self.mark, self.mark_mask)

    def describe(self) -> str:
        text = (f"{self.proto} spi {self.spi:#x} {self.src} -> {self.dst} {self.mode} "
                f"reqid {self.reqid}")
        if self.mark_mask:
            text += f" mark {self.mark:#x}/{self.mark_mask:#x}"
        if self.if_id:
            text += f" if_id {self.if_id:#x}"
        if self.direction:
            text += f" dir {self.direction}"
        if self.encap:
            text += f" encap {self.encap}"
        return text


@dataclass(frozen=True)
class Template:
    src: Optional[str]
    dst: Optional[str]
    spi: int
    proto: str
    mode: str
    reqid: int
    optional: bool

    def describe(self) -> str:
        spi = f" spi {self.spi:#x}" if self.spi else ""
        level = " (optional)" if self.optional else ""
        return (f"{self.proto} {self.mode} {self.src or 'any'} -> {self.dst or 'any'} "
                f"reqid {self.reqid}{spi}{level}")


@dataclass(frozen=True)
class Policy:
    """One xfrm policy (SPD entry) of one network namespace."""

    selector: Selector
    direction: str
    action: str  # "allow" or "block"
    priority: int
    index: int
    mark: int = 0
    mark_mask: int = 0
    if_id: int = 0
    templates: tuple[Template, ...] = ()
    lifetime: Lifetime = field(default_factory=Lifetime)
    sub: bool = False  # XFRM_POLICY_TYPE_SUB (MIPv6)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.index, self.direction) if self.index else (
            self.selector, self.direction, self.mark, self.mark_mask)

    def describe(self) -> str:
        text = f"{self.direction} {self.selector.describe()} {self.action}"
        if self.mark_mask:
            text += f" mark {self.mark:#x}/{self.mark_mask:#x}"
        if self.if_id:
            text += f" if_id {self.if_id:#x}"
        text += f" priority {self.priority} index {self.index}"
        for tmpl in self.templates:
            text += f" tmpl [{tmpl.describe()}]"
        return text


# ---- from messages ---------------------------------------------------------------------------


def _selector(msg: Any, prefix: str = "sel_") -> Selector:
    family = msg[prefix + "family"]

    def prefix_text(raw: bytes, length: int) -> Optional[str]:
        addr = address(raw, family)
        if addr is None and length == 0:
            return None
        full = 128 if family == socket.AF_INET6 else 32
        base = addr or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        return base if length == full else f"{base}/{length}"

    return Selector(
        src=prefix_text(msg[prefix + "saddr"], msg[prefix + "prefixlen_s"]),
        dst=prefix_text(msg[prefix + "daddr"], msg[prefix + "prefixlen_d"]),
        proto=msg[prefix + "proto"],
        sport=msg[prefix + "sport"],
        dport=msg[prefix + "dport"],
        family=family,
        ifindex=msg[prefix + "ifindex"],
    )


def _lifetime(msg: Any, prefix: str = "") -> Lifetime:
    def get(name: str) -> int:
        return int(msg[prefix + name])

    return Lifetime(
        hard_bytes=_limit(get("lft_hard_byte_limit")),
        hard_packets=_limit(get("lft_hard_packet_limit")),
        hard_add_seconds=_limit(get("lft_hard_add_expires_seconds")),
        hard_use_seconds=_limit(get("lft_hard_use_expires_seconds")),
        soft_bytes=_limit(get("lft_soft_byte_limit")),
        soft_packets=_limit(get("lft_soft_packet_limit")),
        soft_add_seconds=_limit(get("lft_soft_add_expires_seconds")),
        soft_use_seconds=_limit(get("lft_soft_use_expires_seconds")),
        bytes=get("cur_bytes"),
        packets=get("cur_packets"),
        add_time=get("cur_add_time"),
    )


_ALGORITHM_ATTRS = (
    ("XFRMA_ALG_AEAD", "aead", "alg_icv_len"),
    ("XFRMA_ALG_AUTH_TRUNC", "auth", "alg_trunc_len"),
    ("XFRMA_ALG_AUTH", "auth", None),
    ("XFRMA_ALG_CRYPT", "crypt", None),
    ("XFRMA_ALG_COMP", "comp", None),
)


def _algorithms(attrs: dict[str, Any], keys: KeyPolicy) -> tuple[Algorithm, ...]:
    found = []
    for attr, kind, icv_field in _ALGORITHM_ATTRS:
        nla = attrs.get(attr)
        if nla is None or (attr == "XFRMA_ALG_AUTH" and "XFRMA_ALG_AUTH_TRUNC" in attrs):
            continue
        raw = m.algorithm_key(nla) if keys.show or keys.fingerprint_secret else None
        key = "0x" + raw.hex() if keys.show and raw is not None else REDACTED
        found.append(Algorithm(kind=kind, name=_name(nla["alg_name"]),
                               key_bits=nla["alg_key_len"],
                               icv_bits=nla[icv_field] if icv_field else None, key=key,
                               key_fingerprint=keys.fingerprint(raw)))
        del raw  # the key's bytes go no further than this loop
    return tuple(found)


def sa_from(info: Any, attrs: dict[str, Any], keys: KeyPolicy = REDACT) -> SA:
    """An :class:`SA` from an ``xfrm_usersa_info`` (message or XFRMA_SA) and attributes."""
    family = info["family"]
    mark = attrs.get("XFRMA_MARK")
    encap = attrs.get("XFRMA_ENCAP")
    replay = attrs.get("XFRMA_REPLAY_ESN_VAL") or attrs.get("XFRMA_REPLAY_VAL")
    direction = attrs.get("XFRMA_SA_DIR")
    return SA(
        src=address(info["saddr"], family),
        dst=address(info["id_daddr"], family),
        spi=info["id_spi"],
        proto=PROTOCOLS.get(info["id_proto"], str(info["id_proto"])),
        mode=MODES.get(info["mode"], str(info["mode"])),
        reqid=info["reqid"],
        family=family,
        mark=mark["v"] if mark is not None else 0,
        mark_mask=mark["m"] if mark is not None else 0,
        if_id=_value(attrs.get("XFRMA_IF_ID")),
        direction=SA_DIRECTIONS.get(_value(direction)) if direction is not None else None,
        replay_window=(replay["replay_window"] if replay is not None and "bmp_len" in replay
                       else info["replay_window"]),
        esn=bool(info["flags"] & 128),
        encap=(f"{ENCAP_TYPES.get(encap['encap_type'], encap['encap_type'])} "
               f"{encap['encap_sport']}->{encap['encap_dport']}") if encap is not None else None,
        algorithms=_algorithms(attrs, keys),
        selector=_selector(info),
        lifetime=_lifetime(info),
        replay_errors=info["stats_replay"],
        integrity_failed=info["stats_integrity_failed"],
        seq=replay["seq"] if replay is not None else 0,
        oseq=replay["oseq"] if replay is not None else 0,
        iptfs_max_qsize=(_value(attrs["XFRMA_IPTFS_MAX_QSIZE"])
                         if "XFRMA_IPTFS_MAX_QSIZE" in attrs else None),
    )


def policy_from(info: Any, attrs: dict[str, Any], prefix: str = "") -> Policy:
    """A :class:`Policy` from an ``xfrm_userpolicy_info`` (message or XFRMA_POLICY; fields
    named ``prefix + name`` when it is embedded, as in ``xfrm_user_acquire``)."""
    mark = attrs.get("XFRMA_MARK")
    tmpls = attrs.get("XFRMA_TMPL")
    ptype = attrs.get("XFRMA_POLICY_TYPE")
    templates = tuple(
        Template(src=address(t["saddr"], t["family"]), dst=address(t["daddr"], t["family"]),
                 spi=t["spi"], proto=PROTOCOLS.get(t["proto"], str(t["proto"])),
                 mode=MODES.get(t["mode"], str(t["mode"])), reqid=t["reqid"],
                 optional=bool(t["optional"]))
        for t in (tmpls["templates"] if tmpls is not None else ()))
    return Policy(
        selector=_selector(info, prefix + "sel_"),
        direction=DIRECTIONS.get(info[prefix + "dir"], str(info[prefix + "dir"])),
        action="block" if info[prefix + "action"] == 1 else "allow",
        priority=info[prefix + "priority"],
        index=info[prefix + "index"],
        mark=mark["v"] if mark is not None else 0,
        mark_mask=mark["m"] if mark is not None else 0,
        if_id=_value(attrs.get("XFRMA_IF_ID")),
        templates=templates,
        lifetime=_lifetime(info, prefix),
        sub=bool(ptype is not None and ptype["type"] == 1),
    )


def _value(nla: Any) -> int:
    """The number inside a scalar attribute (uint8/uint32), 0 when absent."""
    if nla is None:
        return 0
    return int(nla.get("value", 0))
