"""NETLINK_XFRM message classes for pyroute2's netlink framework.

Layouts follow include/uapi/linux/xfrm.h (x86-64 alignment).  pyroute2 field lists are
flat, so nested structs are spelled out with a prefix (``sel_`` for the selector,
``lft_``/``cur_`` for lifetimes ...); see :data:`SELECTOR` and friends.

Key material: the algorithm attributes (``XFRMA_ALG_*``) declare only the algorithm name
and key length as fields, so decoding never copies key bytes into a message object.  The
bytes stay in the receive buffer, reachable only through :func:`algorithm_key`, which only
``--show-keys`` and ``--key-fingerprint-secret`` make the model call.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

from pyroute2.netlink import nla, nlmsg
from pyroute2.netlink.nlsocket import Marshal

# Message types (enum starting at XFRM_MSG_BASE).
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F
XFRM_MSG_REPORT = 0x20
XFRM_MSG_MIGRATE = 0x21
XFRM_MSG_MAPPING = 0x26

# Multicast groups (enum xfrm_nlgroups).
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4
XFRMNLGRP_MAPPING = 8

XFRM_INF = (1 << 64) - 1

#: struct xfrm_selector (56 bytes).
SELECTOR = (
    ("sel_daddr", "16s"),
    ("sel_saddr", "16s"),
    ("sel_dport", ">H"),
    ("sel_dport_mask", ">H"),
    ("sel_sport", ">H"),
    ("sel_sport_mask", ">H"),
    ("sel_family", "H"),
    ("sel_prefixlen_d", "B"),
    ("sel_prefixlen_s", "B"),
    ("sel_proto", "B"),
    ("__pad", "3x"),
    ("sel_ifindex", "i"),
    ("sel_user", "I"),
)

#: struct xfrm_lifetime_cfg (64 bytes) and struct xfrm_lifetime_cur (32 bytes).
LIFETIMES = (
    ("lft_soft_byte_limit", "Q"),
    ("lft_hard_byte_limit", "Q"),
    ("lft_soft_packet_limit", "Q"),
    ("lft_hard_packet_limit", "Q"),
    ("lft_soft_add_expires_seconds", "Q"),
    ("lft_hard_add_expires_seconds", "Q"),
    ("lft_soft_use_expires_seconds", "Q"),
    ("lft_hard_use_expires_seconds", "Q"),
    ("cur_bytes", "Q"),
    ("cur_packets", "Q"),
    ("cur_add_time", "Q"),
    ("cur_use_time", "Q"),
)

#: struct xfrm_usersa_info (224 bytes).
USERSA_INFO = (
    *SELECTOR,
    ("id_daddr", "16s"),
    ("id_spi", ">I"),
    ("id_proto", "B"),
    ("__pad", "3x"),
    ("saddr", "16s"),
    *LIFETIMES,
    ("stats_replay_window", "I"),
    ("stats_replay", "I"),
    ("stats_integrity_failed", "I"),
    ("seq", "I"),
    ("reqid", "I"),
    ("family", "H"),
    ("mode", "B"),
    ("replay_window", "B"),
    ("flags", "B"),
    ("__pad", "7x"),
)

#: struct xfrm_userpolicy_info (168 bytes).
USERPOLICY_INFO = (
    *SELECTOR,
    *LIFETIMES,
    ("priority", "I"),
    ("index", "I"),
    ("dir", "B"),
    ("action", "B"),
    ("flags", "B"),
    ("share", "B"),
    ("__pad", "4x"),
)

#: struct xfrm_usersa_id (24 bytes).
USERSA_ID = (
    ("daddr", "16s"),
    ("spi", ">I"),
    ("family", "H"),
    ("proto", "B"),
    ("__pad", "1x"),
)


def _prefixed(prefix: str, fields: tuple) -> tuple:
    return tuple((name if name == "__pad" else prefix + name, fmt) for name, fmt in fields)


class xfrm_attrs(nlmsg):
    """Attributes shared by every XFRM message (enum xfrm_attr_type_t)."""

    nla_map = (
        ("XFRMA_UNSPEC", "none"),
        ("XFRMA_ALG_AUTH", "xfrm_algo"),
        ("XFRMA_ALG_CRYPT", "xfrm_algo"),
        ("XFRMA_ALG_COMP", "xfrm_algo"),
        ("XFRMA_ENCAP", "xfrm_encap_tmpl"),
        ("XFRMA_TMPL", "xfrm_user_tmpls"),
        ("XFRMA_SA", "xfrm_usersa_info_nla"),
        ("XFRMA_POLICY", "xfrm_userpolicy_info_nla"),
        ("XFRMA_SEC_CTX", "hex"),
        ("XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        ("XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        ("XFRMA_REPLAY_THRESH", "uint32"),
        ("XFRMA_ETIMER_THRESH", "uint32"),
        ("XFRMA_SRCADDR", "hex"),
        ("XFRMA_COADDR", "hex"),
        ("XFRMA_LASTUSED", "uint64"),
        ("XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        ("XFRMA_MIGRATE", "hex"),
        ("XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        ("XFRMA_KMADDRESS", "hex"),
        ("XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        ("XFRMA_MARK", "xfrm_mark"),
        ("XFRMA_TFCPAD", "uint32"),
        ("XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        ("XFRMA_SA_EXTRA_FLAGS", "uint32"),
        ("XFRMA_PROTO", "uint8"),
        ("XFRMA_ADDRESS_FILTER", "hex"),
        ("XFRMA_PAD", "none"),
        ("XFRMA_OFFLOAD_DEV", "xfrm_user_offload"),
        ("XFRMA_SET_MARK", "uint32"),
        ("XFRMA_SET_MARK_MASK", "uint32"),
        ("XFRMA_IF_ID", "uint32"),
        ("XFRMA_MTIMER_THRESH", "uint32"),
        ("XFRMA_SA_DIR", "uint8"),
        ("XFRMA_NAT_KEEPALIVE_INTERVAL", "uint32"),
        ("XFRMA_SA_PCPU", "uint32"),
        # IP-TFS SA options (Linux 6.14, "xfrm: netlink: add config (netlink) options")
        ("XFRMA_IPTFS_DROP_TIME", "uint32"),
        ("XFRMA_IPTFS_REORDER_WINDOW", "uint16"),
        ("XFRMA_IPTFS_DONT_FRAG", "flag"),
        ("XFRMA_IPTFS_INIT_DELAY", "uint32"),
        ("XFRMA_IPTFS_MAX_QSIZE", "uint32"),
        ("XFRMA_IPTFS_PKT_SIZE", "uint32"),
    )

    class xfrm_algo(nla):
        """struct xfrm_algo: the key that follows is deliberately not a field."""

        fields = (("alg_name", "64s"), ("alg_key_len", "I"))

    class xfrm_algo_auth(nla):
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))

    class xfrm_algo_aead(nla):
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))

    class xfrm_encap_tmpl(nla):
        fields = (
            ("encap_type", "H"),
            ("encap_sport", ">H"),
            ("encap_dport", ">H"),
            ("__pad", "2x"),
            ("encap_oa", "16s"),
        )

    class xfrm_user_tmpls(nla):
        """An array of struct xfrm_user_tmpl (64 bytes each), decoded into ``templates``."""

        fields = ()

        def decode(self) -> None:
            nla.decode(self)
            raw = bytes(self.data[self.offset + 4:self.offset + self.length])
            self["templates"] = [_decode_tmpl(raw[i:i + TMPL_SIZE])
                                 for i in range(0, len(raw) - TMPL_SIZE + 1, TMPL_SIZE)]

    class xfrm_usersa_info_nla(nla):
        fields = USERSA_INFO

    class xfrm_userpolicy_info_nla(nla):
        fields = USERPOLICY_INFO

    class xfrm_lifetime_cur(nla):
        fields = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))

    class xfrm_replay_state(nla):
        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))

    class xfrm_replay_state_esn(nla):
        fields = (
            ("bmp_len", "I"),
            ("oseq", "I"),
            ("seq", "I"),
            ("oseq_hi", "I"),
            ("seq_hi", "I"),
            ("replay_window", "I"),
        )

    class xfrm_userpolicy_type(nla):
        fields = (("type", "B"), ("__pad", "3x"))

    class xfrm_mark(nla):
        fields = (("v", "I"), ("m", "I"))

    class xfrm_user_offload(nla):
        fields = (("ifindex", "i"), ("flags", "B"), ("__pad", "3x"))


TMPL_SIZE = 64
_TMPL = struct.Struct("=16s4sB3xH2x16sIBBBxIII")
assert _TMPL.size == TMPL_SIZE


def _decode_tmpl(raw: bytes) -> dict:
    """struct xfrm_user_tmpl: xfrm_id, family, saddr, reqid, mode, share, optional and the
    allowed algorithm bitmaps."""
    (daddr, spi, proto, family, saddr, reqid, mode, share, optional, aalgos, ealgos,
     calgos) = _TMPL.unpack_from(raw)
    return {
        "daddr": daddr, "spi": int.from_bytes(spi, "big"), "proto": proto, "family": family,
        "saddr": saddr, "reqid": reqid, "mode": mode, "share": share, "optional": optional,
        "aalgos": aalgos, "ealgos": ealgos, "calgos": calgos,
    }


class xfrm_usersa_info(xfrm_attrs):
    """XFRM_MSG_NEWSA / UPDSA (and dump replies to GETSA)."""

    fields = USERSA_INFO


class xfrm_usersa_id(xfrm_attrs):
    """XFRM_MSG_DELSA (notification: the full SA follows in XFRMA_SA) and GETSA."""

    fields = USERSA_ID


class xfrm_userpolicy_info(xfrm_attrs):
    """XFRM_MSG_NEWPOLICY / UPDPOLICY (and dump replies to GETPOLICY)."""

    fields = USERPOLICY_INFO


class xfrm_userpolicy_id(xfrm_attrs):
    """XFRM_MSG_DELPOLICY (notification: the full policy follows in XFRMA_POLICY)."""

    fields = (*SELECTOR, ("index", "I"), ("dir", "B"), ("__pad", "3x"))


class xfrm_user_expire(xfrm_attrs):
    """XFRM_MSG_EXPIRE: an SA's soft or hard lifetime ran out."""

    fields = (*USERSA_INFO, ("hard", "B"), ("__pad", "7x"))


class xfrm_user_polexpire(xfrm_attrs):
    """XFRM_MSG_POLEXPIRE."""

    fields = (*USERPOLICY_INFO, ("hard", "B"), ("__pad", "7x"))


class xfrm_user_acquire(xfrm_attrs):
    """XFRM_MSG_ACQUIRE: the kernel asks the key manager for an SA."""

    fields = (
        ("id_daddr", "16s"),
        ("id_spi", ">I"),
        ("id_proto", "B"),
        ("__pad", "3x"),
        ("saddr", "16s"),
        *SELECTOR,
        *_prefixed("pol_", USERPOLICY_INFO),
        ("aalgos", "I"),
        ("ealgos", "I"),
        ("calgos", "I"),
        ("seq", "I"),
    )


class xfrm_usersa_flush(xfrm_attrs):
    """XFRM_MSG_FLUSHSA."""

    fields = (("proto", "B"), ("__pad", "3x"))


class xfrm_flushpolicy(xfrm_attrs):
    """XFRM_MSG_FLUSHPOLICY: no body, maybe XFRMA_POLICY_TYPE."""

    fields = ()


class xfrm_user_mapping(xfrm_attrs):
    """XFRM_MSG_MAPPING: a NAT mapping of an ESP-in-UDP SA changed."""

    fields = (
        *_prefixed("id_", USERSA_ID),
        ("reqid", "I"),
        ("old_saddr", "16s"),
        ("new_saddr", "16s"),
        ("old_sport", ">H"),
        ("new_sport", ">H"),
    )


class MarshalXfrm(Marshal):
    """Message type -> class, for parsing what an XFRM socket receives."""

    msg_map = {
        XFRM_MSG_NEWSA: xfrm_usersa_info,
        XFRM_MSG_UPDSA: xfrm_usersa_info,
        XFRM_MSG_DELSA: xfrm_usersa_id,
        XFRM_MSG_GETSA: xfrm_usersa_id,
        XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
        XFRM_MSG_EXPIRE: xfrm_user_expire,
        XFRM_MSG_POLEXPIRE: xfrm_user_polexpire,
        XFRM_MSG_ACQUIRE: xfrm_user_acquire,
        XFRM_MSG_FLUSHSA: xfrm_usersa_flush,
        XFRM_MSG_FLUSHPOLICY: xfrm_flushpolicy,
        XFRM_MSG_MAPPING: xfrm_user_mapping,
    }


def algorithm_key(attr: nla) -> Optional[bytes]:
    """The key bytes behind an ``XFRMA_ALG_*`` attribute: for ``--show-keys`` and the
    keyed fingerprint only (model.KeyPolicy)."""
    header = {"xfrm_algo": 68, "xfrm_algo_auth": 72, "xfrm_algo_aead": 72}.get(
        type(attr).__name__)
    if header is None:
        return None
    start = attr.offset + 4 + header
    return bytes(attr.data[start:start + (attr["alg_key_len"] + 7) // 8])


def attributes(msg: Any) -> dict[str, Any]:
    """Attribute name -> decoded attribute (an nla object) of a message."""
    return {slot.name: slot.nla for slot in msg.get("attrs", ())}
