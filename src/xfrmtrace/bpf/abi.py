"""ctypes mirror of ``bpf/xfrm.h``, the ABI shared with the BPF program.

Every struct, enum and ``#define`` of the header has its counterpart here, with the C names
for struct fields and constants.  Enum members drop the C prefix that only exists because C
enums share one namespace (``XT_CTX_SKB`` is ``XtContext.SKB``); ``C_ENUMS`` records the
prefixes so tests can map one onto the other.  ``tests/test_abi.py`` compiles the header with
gcc and reads the BTF of the built BPF object to check that every size, offset, type and value
here matches.

The structs use native byte order: the BPF program and this process run on the same machine.
Fields that the header documents as network byte order (``skb_protocol``, ``flow_sport``,
``flow_dport``) therefore hold byte-swapped values on little-endian hosts; ``events`` converts
them.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from typing import Dict, Tuple, Type

# --- #defines -------------------------------------------------------------------------------

XT_MAX_SITES = 1024
XT_MAX_FUNCS = 512
XT_MAX_FRAMES = 8192
XT_MAX_NETNS_COUNTS = 16384
XT_PKT_BYTES = 256
XT_IFNAMSIZ = 16
XT_COMM_LEN = 16
XT_MAX_STACK = 32
XT_NO_REG = 0xFF
XT_NO_ARG = 0xFF
XT_ARG_IN_STACK = 0xFE
XT_ARG_STACK_MAX = 0xFFFF
XT_DEPTH_UNKNOWN = -1
XT_RINGBUF_DEFAULT = 4 << 20
XT_NUM_REGS_X86 = 15
XT_NUM_REGS_ARM64 = 31

XT_F_NETNS_VERIFIED = 1 << 0
XT_F_PKT_TRUNCATED = 1 << 1
XT_F_HAS_STACK = 1 << 2
XT_F_PKT_FROM_DATA = 1 << 3


# --- enums ----------------------------------------------------------------------------------


class XtReg(IntEnum):
    """``enum xt_reg``: registers, numbered as the 64-bit slots of x86-64 ``struct pt_regs``."""

    R15 = 0
    R14 = 1
    R13 = 2
    R12 = 3
    BP = 4
    BX = 5
    R11 = 6
    R10 = 7
    R9 = 8
    R8 = 9
    AX = 10
    CX = 11
    DX = 12
    SI = 13
    DI = 14


class XtContext(IntEnum):
    """``enum xt_context``: what the packet part of an event was taken from."""

    NONE = 0
    SKB = 1
    FLOW = 2


class XtContextNote(IntEnum):
    """``enum xt_context_note``: why an event has no (or partial) context."""

    OK = 0
    NO_ARGS = 1
    DEPTH_UNKNOWN = 2
    FRAME_MISSING = 3
    READ_FAILED = 4


class XtNetnsSource(IntEnum):
    """``enum xt_netns_source``: how the network namespace of an event was found."""

    UNKNOWN = 0
    SITE_REG = 1
    NET_ARG = 2
    SKB_DEV = 3
    SKB_SK = 4
    STATE = 5
    TASK = 6
    LEARNT = 7


class XtArgRole(IntEnum):
    """``enum xt_arg_role``: index into ``XtFuncInfo.arg_slot``; ``NUM`` is the array size."""

    SKB = 0
    FLOW = 1
    NET = 2
    STATE = 3
    DST = 4
    FAMILY = 5
    NUM = 8


XT_FLOW_ONLY_ROLES = (1 << XtArgRole.DST) | (1 << XtArgRole.FAMILY)


class XtStat(IntEnum):
    """``enum xt_stat``: indices of the per-CPU array ``stats``; ``NUM`` is its size."""

    EVENTS = 0
    LOST = 1
    FILTERED = 2
    UNKNOWN_SITE = 3
    NETNS_FULL = 4
    SAMPLED = 5
    BP_REPEAT = 6
    NUM = 8


# --- structs --------------------------------------------------------------------------------


class XtSiteInfo(ctypes.Structure):
    """``struct xt_site_info``: value of map ``sites``, keyed by the probe address."""

    _fields_ = [
        ("stack_depth", ctypes.c_int32),
        ("site_id", ctypes.c_uint32),
        ("counter", ctypes.c_uint32),
        ("func_id", ctypes.c_uint32),
        ("mib_bias", ctypes.c_uint32),
        ("mib_reg", ctypes.c_uint8),
        ("net_reg", ctypes.c_uint8),
        ("arg_reg", ctypes.c_uint8 * 6),
        ("arg_sp_off", ctypes.c_uint16 * 6),
        ("cpu_reg", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class XtFuncInfo(ctypes.Structure):
    """``struct xt_func_info``: value of map ``funcs``, keyed by func_id."""

    _fields_ = [
        ("func_id", ctypes.c_uint32),
        ("arg_slot", ctypes.c_uint8 * XtArgRole.NUM),
        ("pad", ctypes.c_uint8 * 4),
    ]


class XtEntryInfo(ctypes.Structure):
    """``struct xt_entry_info``: value of map ``entries``, keyed by a recording probe's
    address."""

    _fields_ = [
        ("depth", ctypes.c_int32),
        ("func_id", ctypes.c_uint32),
        ("arg_reg", ctypes.c_uint8 * 6),
        ("pad", ctypes.c_uint8 * 2),
    ]


class XtFrame(ctypes.Structure):
    """``struct xt_frame``: value of map ``frames``, keyed by the sp at function entry."""

    _fields_ = [
        ("args", ctypes.c_uint64 * 6),
        ("func_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class XtNetnsKey(ctypes.Structure):
    """``struct xt_netns_key``: key of map ``netns_counts``."""

    _fields_ = [
        ("site_id", ctypes.c_uint32),
        ("netns", ctypes.c_uint32),
    ]


class XtEvent(ctypes.Structure):
    """``struct xt_event``: one counter increment, as sent through the ring buffer."""

    _fields_ = [
        ("time_ns", ctypes.c_uint64),
        ("site_addr", ctypes.c_uint64),
        ("mib_ptr", ctypes.c_uint64),
        ("stack", ctypes.c_uint64 * XT_MAX_STACK),
        ("site_id", ctypes.c_uint32),
        ("counter", ctypes.c_uint32),
        ("netns", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("skb_len", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("pkt_len", ctypes.c_uint32),
        ("flow_mark", ctypes.c_uint32),
        ("flow_oif", ctypes.c_uint32),
        ("flow_spi", ctypes.c_uint32),
        ("stack_len", ctypes.c_uint32),
        ("flow_saddr", ctypes.c_uint8 * 16),
        ("flow_daddr", ctypes.c_uint8 * 16),
        ("skb_protocol", ctypes.c_uint16),
        ("flow_family", ctypes.c_uint16),
        ("flow_sport", ctypes.c_uint16),
        ("flow_dport", ctypes.c_uint16),
        ("context", ctypes.c_uint8),
        ("context_note", ctypes.c_uint8),
        ("netns_source", ctypes.c_uint8),
        ("flow_proto", ctypes.c_uint8),
        ("ifname", ctypes.c_char * XT_IFNAMSIZ),
        ("comm", ctypes.c_char * XT_COMM_LEN),
        ("pkt", ctypes.c_uint8 * XT_PKT_BYTES),
    ]


class XtConfig(ctypes.Structure):
    """``struct xt_config``: written into ``.rodata`` before load; zero means "off"."""

    _fields_ = [
        ("counter_mask", ctypes.c_uint64),
        ("netns", ctypes.c_uint32),
        ("mark_value", ctypes.c_uint32),
        ("mark_mask", ctypes.c_uint32),
        ("capture_stack", ctypes.c_uint32),
        ("site_rate_limit", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


# --- index of the mirror, for tests and tools -----------------------------------------------

C_STRUCTS: Dict[str, Type[ctypes.Structure]] = {
    "xt_site_info": XtSiteInfo,
    "xt_func_info": XtFuncInfo,
    "xt_entry_info": XtEntryInfo,
    "xt_frame": XtFrame,
    "xt_netns_key": XtNetnsKey,
    "xt_event": XtEvent,
    "xt_config": XtConfig,
}
"""C struct name -> ctypes mirror."""

C_ENUMS: Dict[str, Tuple[Type[IntEnum], str]] = {
    "xt_reg": (XtReg, "XT_REG_"),
    "xt_context": (XtContext, "XT_CTX_"),
    "xt_context_note": (XtContextNote, "XT_NOTE_"),
    "xt_netns_source": (XtNetnsSource, "XT_NETNS_"),
    "xt_arg_role": (XtArgRole, "XT_ARG_"),
    "xt_stat": (XtStat, "XT_STAT_"),
}
"""C enum name -> (IntEnum mirror, prefix that C member names carry and Python ones drop)."""

EVENT_SIZE = ctypes.sizeof(XtEvent)
"""Bytes in one ring-buffer record (``sizeof(struct xt_event)``)."""
