/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The ABI shared by bpf/xfrm.bpf.c and src/xfrmtrace/abi.py.
 *
 * Every struct here is mirrored field by field in abi.py, and
 * tests/test_abi.py checks sizes and offsets against the BTF of the built
 * object.  Rules: fixed-width types only, no bitfields, fields ordered
 * large to small, explicit padding so both sides agree without relying on
 * compiler packing.
 */
#ifndef __XFRMTRACE_XFRM_H
#define __XFRMTRACE_XFRM_H

#define XT_MAX_SITES		1024	/* probe sites (kernel + modules) */
#define XT_MAX_FUNCS		512	/* functions whose arguments we record */
#define XT_MAX_FRAMES		8192	/* live function frames remembered */
#define XT_MAX_NETNS_COUNTS	16384	/* (site, netns) pairs counted */
#define XT_PKT_BYTES		256	/* packet bytes copied from the L3 header */
#define XT_IFNAMSIZ		16
#define XT_COMM_LEN		16
#define XT_MAX_STACK		32	/* kernel stack frames per event */
#define XT_NO_REG		0xff	/* "no register" in site/function info */
#define XT_NO_ARG		0xff	/* "no argument" in function info */
#define XT_ARG_IN_STACK		0xfe	/* site info arg_reg: the argument is in the stack */
#define XT_ARG_STACK_MAX	0xffff	/* largest xt_site_info.arg_sp_off */
#define XT_DEPTH_UNKNOWN	(-1)
#define XT_RINGBUF_DEFAULT	(4 << 20)	/* ring buffer bytes unless configured */

/* Registers, numbered as the 64-bit slots of x86-64 struct pt_regs. */
enum xt_reg {
	XT_REG_R15 = 0,
	XT_REG_R14 = 1,
	XT_REG_R13 = 2,
	XT_REG_R12 = 3,
	XT_REG_BP = 4,
	XT_REG_BX = 5,
	XT_REG_R11 = 6,
	XT_REG_R10 = 7,
	XT_REG_R9 = 8,
	XT_REG_R8 = 9,
	XT_REG_AX = 10,
	XT_REG_CX = 11,
	XT_REG_DX = 12,
	XT_REG_SI = 13,
	XT_REG_DI = 14,
};

/*
 * arm64 registers are numbered as struct pt_regs's regs[] (x0..x30): register xN is N.
 * XT_NUM_REGS_* is how many 64-bit slots of the machine's pt_regs the BPF side copies.
 */
#define XT_NUM_REGS_X86		15	/* XT_REG_R15 .. XT_REG_DI */
#define XT_NUM_REGS_ARM64	31	/* x0 .. x30 */

/* What the packet part of an event was taken from. */
enum xt_context {
	XT_CTX_NONE = 0,	/* no packet or flow could be found */
	XT_CTX_SKB = 1,		/* struct sk_buff argument of the function */
	XT_CTX_FLOW = 2,	/* struct flowi argument of the function */
};

/* Why an event has no (or partial) context: xt_event.context_note. */
enum xt_context_note {
	XT_NOTE_OK = 0,
	XT_NOTE_NO_ARGS = 1,		/* function has no skb/flowi argument */
	XT_NOTE_DEPTH_UNKNOWN = 2,	/* stack depth at the site unknown */
	XT_NOTE_FRAME_MISSING = 3,	/* entry of the function not seen */
	XT_NOTE_READ_FAILED = 4,	/* kernel memory read failed */
};

/* How the network namespace of an event was found: xt_event.netns_source. */
enum xt_netns_source {
	XT_NETNS_UNKNOWN = 0,
	XT_NETNS_SITE_REG = 1,	/* struct net register live at the site */
	XT_NETNS_NET_ARG = 2,	/* struct net * argument of the function */
	XT_NETNS_SKB_DEV = 3,	/* skb->dev */
	XT_NETNS_SKB_SK = 4,	/* skb->sk */
	XT_NETNS_STATE = 5,	/* struct xfrm_state * argument */
	XT_NETNS_TASK = 6,	/* current task's namespace */
	XT_NETNS_LEARNT = 7,	/* earlier event with the same MIB pointer */
};

/* Roles of recorded function arguments: index into xt_func_info.arg_slot. */
enum xt_arg_role {
	XT_ARG_SKB = 0,		/* struct sk_buff * */
	XT_ARG_FLOW = 1,	/* struct flowi * */
	XT_ARG_NET = 2,		/* struct net * */
	XT_ARG_STATE = 3,	/* struct xfrm_state * */
	XT_ARG_DST = 4,		/* struct dst_entry * (gives a flow's family) */
	XT_ARG_FAMILY = 5,	/* unsigned short family */
	XT_ARG_NUM = 8,
};

/*
 * Roles that only give a flow's address family: read (and needed in a frame) only when
 * the function also has a struct flowi * argument.
 */
#define XT_FLOW_ONLY_ROLES	((1U << XT_ARG_DST) | (1U << XT_ARG_FAMILY))

/* Value of map "sites", keyed by the probe address (u64). */
struct xt_site_info {
	__s32 stack_depth;	/* site sp + depth == sp at function entry */
	__u32 site_id;		/* index into site_counts */
	__u32 counter;		/* LINUX_MIB_XFRM* value */
	__u32 func_id;		/* enclosing function; matches xt_frame */
	/* mib_reg - mib_bias == net->mib.xfrm_statistics: arm64 adds the counter's offset
	 * before its atomic (which takes no displacement); 0 on x86 */
	__u32 mib_bias;
	__u8 mib_reg;		/* register holding net->mib.xfrm_statistics + mib_bias */
	__u8 net_reg;		/* register holding the struct net *, or XT_NO_REG */
	/* argument 0..5 of the function -> register holding it here; XT_ARG_IN_STACK: in
	 * the 8 bytes at sp + arg_sp_off[n] (a spill slot, arglocations.py); XT_NO_REG: from
	 * the function's recorded frame */
	__u8 arg_reg[6];
	__u16 arg_sp_off[6];
	/* a hardware-breakpoint site (arm64): register holding this CPU's per-CPU offset, so
	 * that mib + 8 * counter + it is the counter's address; XT_NO_REG elsewhere */
	__u8 cpu_reg;
	__u8 pad[3];
};

/* Value of map "funcs", keyed by func_id. */
struct xt_func_info {
	__u32 func_id;
	__u8 arg_slot[XT_ARG_NUM];	/* enum xt_arg_role -> 0..5 or XT_NO_ARG */
	__u8 pad[4];
};

/*
 * Value of map "entries", keyed by the address of a probe that records a function's
 * arguments: its entry, or a later point that dominates all its sites (argregs.py).
 */
struct xt_entry_info {
	__s32 depth;		/* sp here + depth == sp at function entry */
	__u32 func_id;
	__u8 arg_reg[6];	/* argument 0..5 -> register holding it here, or XT_NO_REG */
	__u8 pad[2];
};

/* Value of map "frames", keyed by the sp at function entry. */
struct xt_frame {
	__u64 args[6];		/* arguments 0..5 (x86: di, si, dx, cx, r8, r9 at entry; arm64: x0..x5) */
	__u32 func_id;
	__u32 pad;
};

/* Key of map "netns_counts". */
struct xt_netns_key {
	__u32 site_id;
	__u32 netns;
};

/* Indices of the per-CPU array "stats". */
enum xt_stat {
	XT_STAT_EVENTS = 0,		/* events submitted to the ring buffer */
	XT_STAT_LOST = 1,		/* ring buffer full: event dropped */
	XT_STAT_FILTERED = 2,		/* increments hidden by a filter */
	XT_STAT_UNKNOWN_SITE = 3,	/* probe hit at an unregistered address */
	XT_STAT_NETNS_FULL = 4,		/* netns_counts had no room */
	XT_STAT_SAMPLED = 5,		/* increments not sent: site rate limit */
	XT_STAT_BP_REPEAT = 6,		/* a breakpoint trapped again on one execution */
	XT_STAT_NUM = 8,
};

/* Bits of xt_event.flags. */
#define XT_F_NETNS_VERIFIED	(1U << 0) /* netns's MIB pointer matched */
#define XT_F_PKT_TRUNCATED	(1U << 1) /* packet longer than pkt[] */
#define XT_F_HAS_STACK		(1U << 2)
#define XT_F_PKT_FROM_DATA	(1U << 3) /* no L3 header offset: from skb->data */

/* One counter increment, as sent through the ring buffer. */
struct xt_event {
	__u64 time_ns;		/* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 site_addr;	/* probe address */
	__u64 mib_ptr;		/* net->mib.xfrm_statistics at the site */
	__u64 stack[XT_MAX_STACK];
	__u32 site_id;
	__u32 counter;
	__u32 netns;		/* inode of the network namespace, 0 unknown */
	__u32 cpu;
	__u32 pid;		/* thread id of current */
	__u32 tgid;
	__u32 flags;		/* XT_F_* */
	/* packet (XT_CTX_SKB) */
	__u32 skb_len;
	__u32 mark;
	__u32 ifindex;
	__u32 pkt_len;		/* bytes valid in pkt[] */
	/* flow (XT_CTX_FLOW) */
	__u32 flow_mark;
	__u32 flow_oif;
	__u32 flow_spi;		/* first 4 bytes of flowi uli (SPI of ESP/AH flows), network order */
	__u32 stack_len;	/* bytes valid in stack[] */
	__u8 flow_saddr[16];
	__u8 flow_daddr[16];
	__u16 skb_protocol;	/* skb->protocol, network byte order */
	__u16 flow_family;	/* AF_INET / AF_INET6 / 0 unknown */
	__u16 flow_sport;	/* network byte order, as in struct flowi */
	__u16 flow_dport;
	__u8 context;		/* enum xt_context */
	__u8 context_note;	/* enum xt_context_note */
	__u8 netns_source;	/* enum xt_netns_source */
	__u8 flow_proto;
	char ifname[XT_IFNAMSIZ];
	char comm[XT_COMM_LEN];
	__u8 pkt[XT_PKT_BYTES];
};

/*
 * Configuration, written into .rodata before load.  Zero means "off" for
 * every field, so an all-zero config traces everything.
 */
struct xt_config {
	__u64 counter_mask;	/* bit n set: report LINUX_MIB counter n; 0 all */
	__u32 netns;		/* report only this netns inode; 0 all */
	__u32 mark_value;	/* report when (mark & mark_mask) == mark_value */
	__u32 mark_mask;	/* 0: no mark filter */
	__u32 capture_stack;	/* 1: fill xt_event.stack */
	__u32 site_rate_limit;	/* max events per site per second; 0 no limit */
	__u32 pad;
};

#endif /* __XFRMTRACE_XFRM_H */
