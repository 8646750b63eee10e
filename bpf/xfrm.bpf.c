// SPDX-License-Identifier: GPL-2.0
/*
 * xfrmtrace BPF side.
 *
 * xt_site runs at every instruction that increments an XFRM statistics
 * counter (found by the site resolver).  It counts the hit exactly in a
 * per-CPU map, works out the network namespace, and sends an event with
 * the packet or flow that caused it through a ring buffer.
 *
 * The site needs some arguments of its function (skb, flowi, net, ...).  Where the
 * resolver proved that a register holds one at the site, the site reads it there.
 * The others are recorded by xt_entry, at the function's entry or at a later point
 * that dominates all its sites, keyed by the stack pointer at entry.  The resolver
 * knows how deep the stack is at each point, so the site finds exactly its own
 * invocation's arguments: no thread ids, no guessing.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "xfrm.h"

#define AF_INET		2
#define AF_INET6	10
#define NSEC_PER_SEC	1000000000ULL

/*
 * What differs by architecture: how many registers of struct pt_regs are copied (x86-64:
 * r15..di, enum xt_reg; arm64: x0..x30, numbered as regs[]), and the address a kprobe
 * reports.  An x86 kprobe is an int3: the handler sees ip after it, and optimized (jump)
 * and ftrace-based probes set ip to the same addr + 1 so that handlers need not care
 * (arch/x86/kernel/kprobes/opt.c, ftrace.c).  An arm64 kprobe is a BRK that traps with pc
 * at the probed instruction itself (arch/arm64/kernel/probes/kprobes.c).
 */
#if defined(__TARGET_ARCH_x86)
#define XT_NUM_REGS		XT_NUM_REGS_X86
#define probe_address(ctx)	(PT_REGS_IP(ctx) - 1)
#elif defined(__TARGET_ARCH_arm64)
#define XT_NUM_REGS		XT_NUM_REGS_ARM64
#define probe_address(ctx)	PT_REGS_IP(ctx)
#else
#error "xfrmtrace builds for __TARGET_ARCH_x86 and __TARGET_ARCH_arm64"
#endif

char LICENSE[] SEC("license") = "GPL";

const volatile struct xt_config cfg = {};

/* Ring buffer records are untyped: this puts struct xt_event into the object's BTF. */
const struct xt_event *unused_xt_event __attribute__((unused));

/* probe address -> site */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XT_MAX_SITES);
	__type(key, __u64);
	__type(value, struct xt_site_info);
} sites SEC(".maps");

/* recording probe address -> function and where its arguments are there */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * XT_MAX_FUNCS);
	__type(key, __u64);
	__type(value, struct xt_entry_info);
} entries SEC(".maps");

/* func_id -> which arguments it has */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XT_MAX_FUNCS);
	__type(key, __u32);
	__type(value, struct xt_func_info);
} funcs SEC(".maps");

/* stack pointer at function entry -> that invocation's arguments */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XT_MAX_FRAMES);
	__type(key, __u64);
	__type(value, struct xt_frame);
} frames SEC(".maps");

/* site_id -> exact hit count */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XT_MAX_SITES);
	__type(key, __u32);
	__type(value, __u64);
} site_counts SEC(".maps");

/* (site_id, netns) -> hit count */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, XT_MAX_NETNS_COUNTS);
	__type(key, struct xt_netns_key);
	__type(value, __u64);
} netns_counts SEC(".maps");

/* enum xt_stat -> count */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XT_STAT_NUM);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* net->mib.xfrm_statistics -> netns inode, learnt from verified events */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} mib_netns SEC(".maps");

struct site_rate {
	__u64 window_start;
	__u64 sent;
};

/* site_id -> events sent in the current one-second window, shared by all CPUs */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XT_MAX_SITES);
	__type(key, __u32);
	__type(value, struct site_rate);
} site_rates SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, XT_RINGBUF_DEFAULT);	/* resized before load */
} events SEC(".maps");

static __always_inline void stat_inc(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);

	if (v)
		*v += 1;
}

/*
 * Registers are picked by number at run time.  The verifier refuses a
 * variable offset into the context, so the registers are copied into a
 * per-CPU map value first, where a bounded variable index is fine.
 */
struct saved_regs {
	__u64 r[XT_NUM_REGS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct saved_regs);
} regs_scratch SEC(".maps");

static __always_inline struct saved_regs *save_regs(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct saved_regs *saved = bpf_map_lookup_elem(&regs_scratch, &zero);

	if (saved && bpf_probe_read_kernel(saved, sizeof(*saved), ctx))
		return NULL;
	return saved;
}

static __always_inline __u64 reg_value(const struct saved_regs *saved, __u8 reg)
{
	if (!saved || reg >= XT_NUM_REGS)
		return 0;
	return saved->r[reg];
}

/*
 * Where a site's function arguments come from: its own registers or stack slots, else
 * the frame a recording probe filled.
 */
struct arg_source {
	const struct saved_regs *regs;
	const struct xt_site_info *si;
	const struct xt_func_info *fi;
	const struct xt_frame *frame;
	__u64 sp;	/* the site's stack pointer */
};

static __always_inline __u8 role_slot(const struct xt_func_info *fi, int role)
{
	return fi ? fi->arg_slot[role & (XT_ARG_NUM - 1)] : XT_NO_ARG;
}

static __always_inline __u64 site_arg(const struct arg_source *src, int role)
{
	__u8 slot = role_slot(src->fi, role);

	__u64 value = 0;

	if (slot >= 6)
		return 0;
	if (src->si->arg_reg[slot] == XT_ARG_IN_STACK) {
		/* a spill slot of the site's own frame: arglocations.py proved it holds the
		 * argument; a failed read leaves 0, as a missing frame does */
		bpf_probe_read_kernel(&value, sizeof(value),
				      (const void *)(src->sp + src->si->arg_sp_off[slot]));
		return value;
	}
	if (src->si->arg_reg[slot] != XT_NO_REG)
		return reg_value(src->regs, src->si->arg_reg[slot]);
	return src->frame ? src->frame->args[slot] : 0;
}

/*
 * True when an argument the site reads is neither in a register nor in a stack slot
 * there (XT_NO_REG).  The flow-only roles are never read without a flow
 * (FunctionArgs.slots, in Python, applies the same XT_FLOW_ONLY_ROLES to decide which
 * functions need a recording probe).
 */
static __always_inline bool needs_frame(const struct xt_site_info *si,
					const struct xt_func_info *fi)
{
	bool has_flow = fi->arg_slot[XT_ARG_FLOW] < 6;
	int role;

	for (role = 0; role < XT_ARG_NUM; role++) {
		__u8 slot = fi->arg_slot[role];

		if (!has_flow && (XT_FLOW_ONLY_ROLES >> role) & 1)
			continue;
		if (slot < 6 && si->arg_reg[slot] == XT_NO_REG)
			return true;
	}
	return false;
}

/* True, with the inode in *inum, if @net owns the MIB the site increments. */
static __always_inline bool net_owns_mib(struct net *net, __u64 mib, __u32 *inum)
{
	__u64 ptr;

	if (!net)
		return false;
	ptr = (__u64)BPF_CORE_READ(net, mib.xfrm_statistics);
	if (ptr != mib)
		return false;
	*inum = BPF_CORE_READ(net, ns.inum);
	return true;
}

struct netns_guess {
	__u32 inum;
	__u8 source;
	__u8 verified;
};

static __always_inline void try_net(struct netns_guess *g, struct net *net, __u64 mib,
				    __u8 source)
{
	__u32 inum = 0;

	if (g->verified || !net)
		return;
	if (net_owns_mib(net, mib, &inum)) {
		g->inum = inum;
		g->source = source;
		g->verified = 1;
	} else if (!g->inum) {
		g->inum = BPF_CORE_READ(net, ns.inum);
		g->source = source;
	}
}

/*
 * The namespace whose counter moved is the one whose net->mib.xfrm_statistics
 * equals the pointer the site increments through; every candidate is checked
 * against it, so a verified answer is exact.
 */
static __always_inline void find_netns(struct netns_guess *g, const struct saved_regs *regs,
				       const struct xt_site_info *si, __u64 mib,
				       struct sk_buff *skb, struct net *net_arg,
				       struct xfrm_state *x)
{
	struct task_struct *task;
	__u32 *learnt;

	if (si->net_reg != XT_NO_REG)
		try_net(g, (struct net *)reg_value(regs, si->net_reg), mib, XT_NETNS_SITE_REG);
	try_net(g, net_arg, mib, XT_NETNS_NET_ARG);
	if (skb) {
		struct net_device *dev = BPF_CORE_READ(skb, dev);
		struct sock *sk = BPF_CORE_READ(skb, sk);

		if (dev)
			try_net(g, BPF_CORE_READ(dev, nd_net.net), mib, XT_NETNS_SKB_DEV);
		if (sk)
			try_net(g, BPF_CORE_READ(sk, __sk_common.skc_net.net), mib, XT_NETNS_SKB_SK);
	}
	if (x)
		try_net(g, BPF_CORE_READ(x, xs_net.net), mib, XT_NETNS_STATE);
	task = (struct task_struct *)bpf_get_current_task();
	try_net(g, BPF_CORE_READ(task, nsproxy, net_ns), mib, XT_NETNS_TASK);
	if (g->verified) {
		bpf_map_update_elem(&mib_netns, &mib, &g->inum, BPF_ANY);
		return;
	}
	learnt = bpf_map_lookup_elem(&mib_netns, &mib);
	if (learnt) {
		g->inum = *learnt;
		g->source = XT_NETNS_LEARNT;
		g->verified = 1;
	}
}

static __always_inline void count_netns(__u32 site_id, __u32 netns)
{
	struct xt_netns_key key = { .site_id = site_id, .netns = netns };
	__u64 one = 1, *v;

	v = bpf_map_lookup_elem(&netns_counts, &key);
	if (v) {
		*v += 1;
		return;
	}
	if (bpf_map_update_elem(&netns_counts, &key, &one, BPF_NOEXIST) == 0)
		return;
	/* Another CPU inserted it first, or the map is full. */
	v = bpf_map_lookup_elem(&netns_counts, &key);
	if (v)
		*v += 1;
	else
		stat_inc(XT_STAT_NETNS_FULL);
}

/*
 * Per-site rate limit, in two steps: over_rate_limit() before anything is read or
 * reserved (an increment over the limit then costs two map lookups and takes no
 * ring-buffer space), take_rate_slot() once the event is known to pass the filters (a
 * filtered increment uses no slot).  The limit is per site across all CPUs: the slot count
 * is an atomic add (BPF_XADD, which 5.10 has; compare-and-swap came in 5.12), and CPUs that
 * race at the start of a window may each reset it, so a window can send a few events more
 * than the limit, never a multiple of it.
 */
static __always_inline struct site_rate *site_rate(__u32 site_id, __u64 now)
{
	struct site_rate *r;

	if (!cfg.site_rate_limit)
		return NULL;
	r = bpf_map_lookup_elem(&site_rates, &site_id);
	/* Signed: another CPU may have started the window a moment after our @now. */
	if (r && (__s64)(now - r->window_start) >= (__s64)NSEC_PER_SEC) {
		r->window_start = now;
		r->sent = 0;
	}
	return r;
}

static __always_inline bool over_rate_limit(__u32 site_id, __u64 now)
{
	struct site_rate *r = site_rate(site_id, now);

	return r && r->sent >= cfg.site_rate_limit;
}

static __always_inline void take_rate_slot(__u32 site_id, __u64 now)
{
	struct site_rate *r = site_rate(site_id, now);

	if (r)
		__sync_fetch_and_add(&r->sent, 1);
}

static __always_inline void read_skb(struct xt_event *e, struct sk_buff *skb)
{
	struct net_device *dev = BPF_CORE_READ(skb, dev);
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u16 network_header = BPF_CORE_READ(skb, network_header);
	__u32 tail = BPF_CORE_READ(skb, tail);
	unsigned char *start;
	long avail;
	__u32 n;

	e->context = XT_CTX_SKB;
	e->skb_len = BPF_CORE_READ(skb, len);
	e->mark = BPF_CORE_READ(skb, mark);
	e->skb_protocol = BPF_CORE_READ(skb, protocol);
	if (dev) {
		e->ifindex = BPF_CORE_READ(dev, ifindex);
		BPF_CORE_READ_STR_INTO(&e->ifname, dev, name);
	} else {
		e->ifindex = BPF_CORE_READ(skb, skb_iif);
	}

	/* Copy from the L3 header; skbs without one are copied from ->data. */
	if (network_header != (__u16)~0U) {
		start = head + network_header;
	} else {
		start = BPF_CORE_READ(skb, data);
		e->flags |= XT_F_PKT_FROM_DATA;
	}
	avail = (long)(head + tail - start);
	if (avail <= 0)
		return;
	if (avail > XT_PKT_BYTES) {
		e->flags |= XT_F_PKT_TRUNCATED;
		avail = XT_PKT_BYTES;
	}
	n = avail;
	n &= 2 * XT_PKT_BYTES - 1;
	if (n > XT_PKT_BYTES)
		n = XT_PKT_BYTES;
	if (bpf_probe_read_kernel(e->pkt, n, start) == 0)
		e->pkt_len = n;
	else
		e->context_note = XT_NOTE_READ_FAILED;
}

static __always_inline void read_flow(struct xt_event *e, const struct flowi *fl, __u16 family)
{
	e->context = XT_CTX_FLOW;
	e->flow_family = family;
	e->flow_oif = BPF_CORE_READ(fl, u.__fl_common.flowic_oif);
	e->flow_mark = BPF_CORE_READ(fl, u.__fl_common.flowic_mark);
	e->flow_proto = BPF_CORE_READ(fl, u.__fl_common.flowic_proto);
	if (family == AF_INET) {
		/* BPF_CORE_READ_INTO would copy sizeof(*dst) == 1 byte into the arrays. */
		bpf_core_read(e->flow_saddr, sizeof(fl->u.ip4.saddr), &fl->u.ip4.saddr);
		bpf_core_read(e->flow_daddr, sizeof(fl->u.ip4.daddr), &fl->u.ip4.daddr);
		e->flow_sport = BPF_CORE_READ(fl, u.ip4.uli.ports.sport);
		e->flow_dport = BPF_CORE_READ(fl, u.ip4.uli.ports.dport);
		e->flow_spi = BPF_CORE_READ(fl, u.ip4.uli.gre_key);
	} else if (family == AF_INET6) {
		bpf_core_read(e->flow_saddr, sizeof(fl->u.ip6.saddr), &fl->u.ip6.saddr);
		bpf_core_read(e->flow_daddr, sizeof(fl->u.ip6.daddr), &fl->u.ip6.daddr);
		e->flow_sport = BPF_CORE_READ(fl, u.ip6.uli.ports.sport);
		e->flow_dport = BPF_CORE_READ(fl, u.ip6.uli.ports.dport);
		e->flow_spi = BPF_CORE_READ(fl, u.ip6.uli.gre_key);
	}
}

static __always_inline __u16 flow_family(const struct arg_source *src)
{
	struct dst_entry *dst;

	if (role_slot(src->fi, XT_ARG_FAMILY) < 6)
		return (__u16)site_arg(src, XT_ARG_FAMILY);
	dst = (struct dst_entry *)site_arg(src, XT_ARG_DST);
	if (dst)
		return BPF_CORE_READ(dst, ops, family);
	return 0;
}

static __always_inline bool filtered_out(const struct xt_event *e)
{
	__u32 mark = e->context == XT_CTX_FLOW ? e->flow_mark : e->mark;

	if (cfg.counter_mask && !(cfg.counter_mask & (1ULL << (e->counter & 63))))
		return true;
	if (cfg.netns && e->netns != cfg.netns)
		return true;
	if (cfg.mark_mask && (e->context == XT_CTX_NONE || (mark & cfg.mark_mask) != cfg.mark_value))
		return true;
	return false;
}

SEC("kprobe")
int xt_entry(struct pt_regs *ctx)
{
	__u64 ip = probe_address(ctx);
	struct xt_entry_info *info = bpf_map_lookup_elem(&entries, &ip);
	struct xt_frame frame = {};
	struct saved_regs *regs;
	__u64 entry_sp;
	int slot;

	if (!info)
		return 0;
	regs = save_regs(ctx);
	if (!regs)
		return 0;
	frame.func_id = info->func_id;
	for (slot = 0; slot < 6; slot++)
		frame.args[slot] = reg_value(regs, info->arg_reg[slot]);
	entry_sp = PT_REGS_SP(ctx) + (__u64)(__s64)info->depth;
	bpf_map_update_elem(&frames, &entry_sp, &frame, BPF_ANY);
	return 0;
}

/*
 * One hit of the site at ip (si: its entry in map sites, NULL if none): ctx is the
 * program's context (for the stack), regs the registers saved from it, sp the stack
 * pointer there.
 */
static __always_inline int site_hit(void *ctx, const struct xt_site_info *si,
				    struct saved_regs *regs, __u64 ip, __u64 sp)
{
	struct arg_source args = {};
	struct netns_guess ns = {};
	struct sk_buff *skb = NULL;
	struct xt_event *e;
	__u64 mib, now, *count, entry_sp;
	__u32 site_id, fid;
	__u8 note = XT_NOTE_OK;

	if (!si) {
		stat_inc(XT_STAT_UNKNOWN_SITE);
		return 0;
	}
	site_id = si->site_id;
	count = bpf_map_lookup_elem(&site_counts, &site_id);
	if (count)
		*count += 1;

	args.si = si;
	args.sp = sp;
	args.regs = regs;
	mib = reg_value(args.regs, si->mib_reg) - si->mib_bias;
	fid = si->func_id;
	if (fid < XT_MAX_FUNCS)
		args.fi = bpf_map_lookup_elem(&funcs, &fid);
	if (!args.fi) {
		note = XT_NOTE_NO_ARGS;
	} else if (!needs_frame(si, args.fi)) {
		/* every argument is in a register here */
	} else if (si->stack_depth < 0) {
		note = XT_NOTE_DEPTH_UNKNOWN;
	} else {
		entry_sp = sp + (__u64)si->stack_depth;
		args.frame = bpf_map_lookup_elem(&frames, &entry_sp);
		if (!args.frame || args.frame->func_id != fid) {
			args.frame = NULL;
			note = XT_NOTE_FRAME_MISSING;
		}
	}
	skb = (struct sk_buff *)site_arg(&args, XT_ARG_SKB);

	find_netns(&ns, args.regs, si, mib, skb, (struct net *)site_arg(&args, XT_ARG_NET),
		   (struct xfrm_state *)site_arg(&args, XT_ARG_STATE));
	count_netns(site_id, ns.inum);

	now = bpf_ktime_get_ns();
	if (over_rate_limit(site_id, now)) {
		stat_inc(XT_STAT_SAMPLED);
		return 0;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		stat_inc(XT_STAT_LOST);
		return 0;
	}
	__builtin_memset(e, 0, offsetof(struct xt_event, pkt));
	e->time_ns = now;
	e->site_addr = ip;
	e->mib_ptr = mib;
	e->site_id = site_id;
	e->counter = si->counter;
	e->netns = ns.inum;
	e->netns_source = ns.source;
	if (ns.verified)
		e->flags |= XT_F_NETNS_VERIFIED;
	e->context_note = note;
	if (skb) {
		read_skb(e, skb);
	} else if (args.fi && note == XT_NOTE_OK) {
		const struct flowi *fl = (const struct flowi *)site_arg(&args, XT_ARG_FLOW);

		if (fl)
			read_flow(e, fl, flow_family(&args));
		else
			e->context_note = XT_NOTE_NO_ARGS;
	}
	if (filtered_out(e)) {
		stat_inc(XT_STAT_FILTERED);
		bpf_ringbuf_discard(e, 0);
		return 0;
	}
	take_rate_slot(site_id, now);
	e->cpu = bpf_get_smp_processor_id();
	e->pid = (__u32)bpf_get_current_pid_tgid();
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (cfg.capture_stack) {
		long n = bpf_get_stack(ctx, e->stack, sizeof(e->stack), 0);

		if (n > 0) {
			e->stack_len = n;
			e->flags |= XT_F_HAS_STACK;
		}
	}
	stat_inc(XT_STAT_EVENTS);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("kprobe")
int xt_site(struct pt_regs *ctx)
{
	__u64 ip = probe_address(ctx);

	return site_hit(ctx, bpf_map_lookup_elem(&sites, &ip), save_regs(ctx), ip,
			PT_REGS_SP(ctx));
}

#if defined(__TARGET_ARCH_arm64)
/* breakpoint site_id -> on this CPU, the counter's address and value at its last hit */
struct bp_last_hit {
	__u64 counter_addr;
	__u64 value;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XT_MAX_SITES);
	__type(key, __u32);
	__type(value, struct bp_last_hit);
} bp_last SEC(".maps");

/*
 * True when this trap repeats the last one at the site on this CPU for the same execution.
 * arm64 steps over a kernel breakpoint with its breakpoints off; an interrupt taken before
 * the step ends it early (the step exception comes in the handler, which turns them back
 * on: arch/arm64/kernel/hw_breakpoint.c, reinstall_suspended_bps), and the return traps
 * on the same instruction again.  The breakpoint sits just before the counter's atomic, so
 * between two real executions here the counter has grown; between a trap and its repeat
 * nothing has run on this CPU but that interrupt, which increments no XFRM counter.  So
 * the same counter value at the same address is a repeat.
 */
static __always_inline bool repeated_trap(const struct xt_site_info *si,
					  const struct saved_regs *regs, __u64 mib)
{
	__u32 site_id = si->site_id;
	struct bp_last_hit *last = bpf_map_lookup_elem(&bp_last, &site_id);
	__u64 addr, value;

	if (!last || si->cpu_reg >= XT_NUM_REGS)
		return false;
	addr = mib + 8 * (__u64)si->counter + reg_value(regs, si->cpu_reg);
	if (bpf_probe_read_kernel(&value, sizeof(value), (const void *)addr))
		return false;
	if (last->counter_addr == addr && last->value == value)
		return true;
	last->counter_addr = addr;
	last->value = value;
	return false;
}

/*
 * The same site, hit through a hardware execution breakpoint (a perf event per CPU): where
 * the kernel refuses a kprobe, inside what its text scan takes for an exclusive sequence
 * although an LSE casa (a spin_lock) opened it and no exclusive monitor is held (the
 * resolver, arm64_sites.py).  The breakpoint exception reports pc at the instruction.
 * perf_event programs see struct pt_regs through ctx->regs only by field (the verifier
 * rewrites those loads), so the registers are copied one by one.
 */
SEC("perf_event")
int xt_site_bp(struct bpf_perf_event_data *ctx)
{
	__u32 zero = 0;
	struct saved_regs *saved = bpf_map_lookup_elem(&regs_scratch, &zero);
	__u64 pc = ctx->regs.pc;
	struct xt_site_info *si = bpf_map_lookup_elem(&sites, &pc);
	int n;

	if (!saved)
		return 0;
#pragma unroll
	for (n = 0; n < XT_NUM_REGS; n++)
		saved->r[n] = ctx->regs.regs[n];
	if (si && repeated_trap(si, saved, reg_value(saved, si->mib_reg) - si->mib_bias)) {
		stat_inc(XT_STAT_BP_REPEAT);
		return 0;
	}
	return site_hit(ctx, si, saved, pc, ctx->regs.sp);
}
#endif
