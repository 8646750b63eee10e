// SPDX-License-Identifier: GPL-2.0
/*
 * Test-only BPF object for tests/test_libbpf.py and tests/test_btf.py.
 *
 * on_sys_enter reports every syscall entered by the process whose tgid is
 * in cfg.tgid (0 = every process) into a ring buffer and counts it in a
 * per-CPU array.  Two more programs are loaded only on request (the "?"
 * in the section name turns autoload off): one the verifier must reject,
 * one kprobe for the "no kprobes on this kernel" case.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* Written from Python before load; zero means "off". */
struct selftest_cfg {
	__u64 tag;		/* copied into every event */
	__u32 tgid;		/* only this process (0: every process) */
	__u32 pad;
};

struct selftest_event {
	__u64 tag;
	__s64 syscall_nr;
	__u32 tgid;
	__u32 pid;
};

const volatile struct selftest_cfg cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} syscall_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} scratch SEC(".maps");

/* Shapes for tests/test_btf.py: anonymous members and a bitfield. */
struct selftest_anon {
	__u64 first;
	union {
		__u32 as_u32;
		__u16 as_u16;
	};
	struct {
		__u32 inner_a;
		struct {
			__u16 deep;
		} named;
	};
};

struct selftest_bits {
	__u32 low:4;
	__u32 high:28;
};

/* Globals keep these types in the object's BTF for the layout tests. */
struct selftest_event *btf_anchor_event;
struct selftest_anon *btf_anchor_anon;
struct selftest_bits *btf_anchor_bits;

static __always_inline void count_syscall(void)
{
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&syscall_counts, &zero);

	if (count)
		*count += 1;
}

SEC("raw_tp/sys_enter")
int on_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct selftest_event *event;

	if (cfg.tgid && (pid_tgid >> 32) != cfg.tgid)
		return 0;
	count_syscall();
	event = bpf_ringbuf_reserve(&events, sizeof(*event), 0);
	if (!event)
		return 0;
	event->tag = cfg.tag;
	event->syscall_nr = (__s64)ctx->args[1];
	event->tgid = pid_tgid >> 32;
	event->pid = (__u32)pid_tgid;
	bpf_ringbuf_submit(event, 0);
	return 0;
}

/* Dereferences a random number: the verifier must refuse this program. */
SEC("?raw_tp/sys_enter")
int rejected_by_verifier(void *ctx)
{
	return *(volatile int *)(long)bpf_get_prandom_u32();
}

SEC("?kprobe/xfrm_input")
int on_xfrm_input(void *ctx)
{
	count_syscall();
	return 0;
}
