"""The prose of bench/RESULTS.md: how each figure was measured and what the numbers say.

Every number in the text comes from the run's data; statements that depend on the outcome
(a target met or not, output stalling during a storm) are chosen from the data too.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional

from bench import report
from bench.stats import Spread, fmt

MIB = 1 << 20
_KPROBE_LINE = re.compile(r"^\S+\s+k\s+(\S+?)\+0x([0-9a-f]+)\s*(?:\[(\S+)\])?")
STEP_LABELS = {
    "interpreter": "Python start and imports",
    "kernel_view": "BTF, kallsyms, kcore",
    "sites": "sites (resolved or from cache)",
    "session_setup": "session set-up",
    "bpf_load": "netlink follower start, BPF load",
    "attach": "argument roles from BTF, attach",
    "rest": "metrics, ready file",
}


def entry_functions(kprobes_list: List[str]) -> List[str]:
    """Functions probed at their entry (offset 0, or 4 past an endbr64) in a kprobes list."""
    names = []
    for line in kprobes_list:
        match = _KPROBE_LINE.match(line)
        if match and int(match[2], 16) in (0, 4):
            label = match[1] if not match[3] or match[3] == "FTRACE" else \
                f"{match[1]} [{match[3]}]"
            if label not in names:
                names.append(label)
    return names


def _method(meta: Mapping[str, Any], guest: Mapping[str, Any]) -> str:
    phases = guest.get("phases", {})
    hot = phases.get("hotpath", {})
    storm = phases.get("storm", {})
    args = meta.get("args", {})
    runs = hot.get("runs", [])
    rounds = hot.get("rounds", "?")
    if any(run.get("config") == "tool-stopped" for run in runs):
        configs_text = (
            f"Four configurations per round, always in the order A B C D, for {rounds} "
            "rounds: **A** no tool; **B** `xfrmtrace trace --output json` as shipped "
            "(netlink SA/policy follower on, output to tmpfs); **C** the same process "
            "stopped with SIGSTOP, its probes still attached: what the probes cost without "
            "the tool's user space; **D** the same process running again, plus the *broad "
            "probe set* of earlier tracers.")
    else:
        configs_text = (
            f"Three configurations per round, always in the order A B D, for {rounds} "
            "rounds: **A** no tool; **B** `xfrmtrace trace --output json` as shipped "
            "(netlink SA/policy follower on, output to tmpfs); **D** the same tool process "
            "plus the *broad probe set* of earlier tracers.")
    cpu_text = (" During each run the tool's CPU time (`/proc/PID/stat`) and the guest's "
                "idle time (`/proc/stat`) are sampled too."
                if any("guest_idle_share" in run for run in runs) else "")
    return f"""## How the figures were measured

All of it runs in one boot of the kernel named above, under qemu TCG with 2 vCPUs: every
guest instruction is emulated, so absolute numbers are far below native ones (a Debian 6.12
guest runs Python about 20-50 times slower than this host does). Every figure is therefore a
ratio of configurations measured side by side in the same boot, in alternation.

1. **Hot path.** iperf3 (one TCP stream, {hot.get('seconds', '?')} s per run plus one
   omitted warm-up second, `-O 1`) from one namespace to another over a veth pair:
   through an ESP tunnel (tunnel-mode SAs with `rfc4106(gcm(aes))`, 128-bit, and in/out
   policies in both namespaces, no marks), and over a second veth pair with no XFRM state
   at all. {configs_text} D is built by a helper (`bench/broad.py`)
   that loads a second copy of the tool's own BPF object and attaches its `xt_site` program
   at every gs-relative 64-bit increment by one that the resolver classified as *not* an
   XFRM counter and whose displacement could be one (a positive multiple of 8, at most
   {hot.get('max_disp', 240):#x}: {hot.get('broad_addresses', '?')} addresses; the few the
   kernel refuses to probe are left out). Those addresses are not in that copy's `sites`
   map, so each hit costs the kprobe plus the cheapest possible run-time filter (one hash
   lookup and a per-CPU counter) and returns: "tool + helper" has the probe set of the
   broad approach at a lower bound of its per-hit cost, which makes the comparison fair to
   the broad approach. Each round's other configurations are divided by that round's A;
   the table shows the median of these per-round ratios and their range.{cpu_text}
2. **Error storm.** trafgen (netsniff-ng, {storm.get('trafgen_cpus', '?')} processes, one
   per vCPU) sends 106-byte Ethernet frames
   carrying IPv4 ESP with SPI 0xdead0001, which the receiver has no SA for, from one
   namespace to another over veth for {fmt(storm.get('seconds'))} s: each one moves
   `XfrmInNoStates` in the receiving namespace (esp4 loaded). The rate is the
   `/proc/net/xfrm_stat` delta of the receiver over the run ("steady": between 1 s in and
   1 s before the end). The tool is started and ready before the storm and stopped with
   SIGINT after it; its summary's per-namespace totals are compared with the /proc delta
   of the same namespace. Events decoded per second: `xfrm_error` objects the tool wrote
   from the storm's start until its output stopped growing, divided by that time. Peak RSS
   is the tool's VmHWM. One run per configuration: no tool, the tool, the tool with
   `--rate-limit {storm.get('rate_limit', args.get('rate_limit', 100))}`.
3. **Start-up.** Seconds from starting the process until the tool's ready file exists
   (written once every probe is attached) and until `bpftrace -e 'kprobe:xfrm_input {{}}'`
   prints `Attaching 1 probe...` (bpftrace prints it just before attaching). Cold: an
   empty `--cache-dir`; warm: the same directory again. Interleaved cold, warm, bpftrace,
   {len(phases.get('startup', {}).get('bpftrace', [])) or '?'} times, after one discarded
   start of each (the guest reads the host's files over 9p, and Python's bytecode is cached
   in tmpfs: the repository is read-only in the guest).
4. **Resolver.** `xfrmtrace sites --no-cache --audit` in the guest (live: /proc/kcore,
   vmlinux and every loaded module, with esp4, esp6, xfrm_interface, ip_vti and ip6_vti
   loaded), and `xfrmtrace sites --vmlinux F --kallsyms F` on the host (no TCG): F is the
   vmlinux decompressed from the Debian package's vmlinuz (it keeps `.BTF`) and the guest's
   `/proc/kallsyms`; offline only vmlinux is resolved. "Resolver" is the tool's own
   per-object time from its `-v` log, "whole command" the wall time including Python's
   start. Growth with text size: the resolver alone on the first 25, 50, 75 and 100 % of
   vmlinux text (`_stext` up to a cut), on the host.
"""


def _hot_findings(guest: Mapping[str, Any]) -> List[str]:
    hot = guest.get("phases", {}).get("hotpath")
    if not hot:
        return []
    summary = report.hot_path(hot)
    lines = ["### 1. Hot path", ""]
    verdicts = []
    for traffic, label in (("esp", "ESP tunnel"), ("plain", "plain veth")):
        rows = summary.get(traffic, {})
        base, tool = rows.get("baseline"), rows.get("tool")
        if not base or not tool or not tool["paired"]:
            continue
        stopped, broad = rows.get("tool-stopped"), rows.get("broad")
        paired: Spread = tool["paired"]
        noise = base["mbps"].relative_range
        parts = [f"{label}: throughput ratio {paired.median:.3f} with the tool (rounds "
                 f"{paired.low:.3f}-{paired.high:.3f})"]
        if stopped and stopped["paired"]:
            parts.append(f"{stopped['paired'].median:.3f} with the tool stopped (its probes "
                         "only)")
        if broad and broad["paired"]:
            parts.append(f"{broad['paired'].median:.3f} with the broad probe set added")
        parts.append(f"the baseline itself varied by {noise:.1%} between rounds")
        if tool.get("tool_cpu"):
            parts.append(f"the tool's process used {tool['tool_cpu'].median:.1%} of one vCPU "
                         "meanwhile")
        if base.get("guest_idle"):
            parts.append(f"the guest was {base['guest_idle'].median:.0%} idle without the tool")
        lines.append("- " + "; ".join(parts) + ".")
        verdicts.append((traffic, label, paired, stopped, noise, tool))
    configs = hot.get("configs", [])
    broad_stats = [c.get("broad", {}) for c in configs if c.get("broad")]
    attached = [b.get("attached") for b in broad_stats if b.get("attached") is not None]
    rates = [b["hits"] / b["seconds"] for b in broad_stats if b.get("seconds")]
    tool_probes = [c.get("kprobes_tool") for c in configs if c.get("kprobes_tool")]
    broad_probes = [c.get("kprobes_broad") for c in configs if c.get("kprobes_broad")]
    if tool_probes and broad_probes:
        lines.append(f"- Probes in place: {tool_probes[0]} kprobes with the tool (counter "
                     f"sites and argument probes), {broad_probes[0]} with the broad set "
                     f"({attached[0] if attached else '?'} of its "
                     f"{hot.get('broad_addresses', '?')} addresses attached). The broad "
                     f"probes fired {fmt(Spread.of(rates).median) if rates else '?'} times per "
                     "second on average while they were in place, every hit filtered out at "
                     "run time; the tool's counter-site probes fired 0 times on this healthy "
                     "traffic.")
    entries = entry_functions(hot.get("tool_kprobes", []))
    profile = hot.get("profile") or {}
    if entries:
        text = ("- On healthy traffic the tool pays for its argument probes: `xt_entry` "
                "records the arguments of each function whose counter sites do not find them "
                "in registers (`src/xfrmtrace/resolve/argregs.py`), every time the probe's "
                "point runs. "
                "Probes at a function's entry: " + ", ".join(f"`{e}`" for e in entries)
                + " (the others sit later in their function, after its early returns).")
        if "validate_xmit_xfrm" in entries:
            text += (" `validate_xmit_xfrm` is called from `validate_xmit_skb()` for every "
                     "packet any device transmits (Debian builds `CONFIG_XFRM_OFFLOAD`), so "
                     "plain traffic pays too.")
        lines.append(text)
    for traffic, label in (("esp", "ESP"), ("plain", "plain")):
        rec = profile.get(traffic)
        if not rec or not rec.get("packets"):
            continue
        entry, site = rec.get("xt_entry", {}), rec.get("xt_site", {})
        per_packet = entry.get("run_cnt", 0) / rec["packets"]
        ns = entry.get("run_time_ns", 0) / entry["run_cnt"] if entry.get("run_cnt") else 0
        lines.append(f"- Measured with BPF run-time statistics in one extra run: {label} "
                     f"traffic ran `xt_entry` {per_packet:.2f} times per packet on the veth "
                     f"({entry.get('run_cnt', 0):,} runs for {rec['packets']:,} packets, "
                     f"{fmt(ns / 1000)} µs each under TCG, not counting the kprobe "
                     f"dispatch around it) and `xt_site` {site.get('run_cnt', 0):,} times.")
    for _traffic, label, paired, stopped, noise, tool in verdicts:
        if paired.median >= report.HOT_TARGET:
            lines.append(f"- Target (at most 1 % of throughput) **met** for {label} traffic.")
            continue
        loss = 1 - paired.median
        text = (f"- Target (at most 1 % of throughput) **not met** for {label} traffic: "
                f"{loss:.1%} lost")
        if loss <= noise:
            text += (f", within the round-to-round noise of this TCG guest ({noise:.1%}), "
                     "so the size of the loss is uncertain")
        text += "."
        if stopped and stopped["paired"]:
            probes = 1 - stopped["paired"].median
            if probes > loss:
                text += (f" With the process stopped (probes only) {probes:.1%} was lost, more "
                         "than with it running: the split between probes and user space is "
                         "within the noise here.")
            else:
                text += (f" With the process stopped (probes only) {max(probes, 0):.1%} "
                         f"remains; the other {loss - max(probes, 0):.1%} appears only with "
                         "its user space running")
                if tool.get("tool_cpu"):
                    text += (f", which took {tool['tool_cpu'].median:.1%} of a vCPU (the poll "
                             "loop wakes every 0.2 s, compares /proc/modules every 0.25 s and "
                             "rescans /run/netns; Python under TCG)")
                text += f" (round-to-round noise {noise:.1%})."
        text += (" TCG inflates this: a kprobe hit, the BPF program behind it and the tool's "
                 "Python are emulated too and cost far more relative to the packet path than "
                 "on real hardware, so a native machine would lose a smaller share; the probes "
                 "that fire are the same.")
        lines.append(text)
    return lines + [""]


def _storm_findings(guest: Mapping[str, Any], offline: Optional[Mapping[str, Any]]
                    ) -> List[str]:
    storm_data = guest.get("phases", {}).get("storm")
    if not storm_data:
        return []
    s = report.storm(storm_data)
    base, tool, limited = s.get("baseline", {}), s.get("tool", {}), s.get("tool-rate-limit", {})
    lines = ["### 2. Error storm", ""]
    best = max((r.get("rate") or 0) for r in s.values())
    if best < report.STORM_RATE_TARGET:
        lines.append(
            f"- Rate: **{fmt(best)} errors/s at best, below the 100,000/s target**. Without "
            f"the tool the emulated path (trafgen's packet socket, veth, IP input, "
            f"`xfrm_input` failing the SA lookup) reached {fmt(base.get('rate'))}/s with "
            f"{storm_data.get('trafgen_cpus', '?')} trafgen processes on "
            f"{guest.get('cpus', '?')} vCPUs: that is the ceiling of this TCG guest. With the "
            f"tool's probe at the counter site it was {fmt(tool.get('rate'))}/s "
            f"({fmt(_r(tool.get('rate'), base.get('rate')))} of that), with the rate limit "
            f"{fmt(limited.get('rate'))}/s.")
    else:
        lines.append(f"- Rate: {fmt(best)} errors/s at best (target 100,000/s met).")
    exact = [n for n, r in s.items() if r.get("exact")]
    inexact = [n for n, r in s.items() if "exact" in r and not r.get("exact")]
    if exact and not inexact:
        lines.append("- Counts: in every run with the tool, its per-counter totals for the "
                     "receiving namespace equal the `/proc/net/xfrm_stat` delta exactly, with "
                     "and without the rate limit, although most events were dropped or "
                     "sampled out: counting happens in the kernel before the ring buffer.")
    elif inexact:
        lines.append("- Counts: **the tool's totals differ from /proc** in: "
                     + ", ".join(inexact) + " (see results.json).")
    if tool.get("events") is not None:
        lines.append(
            f"- Decoding: without a rate limit the tool decoded and wrote "
            f"{fmt(tool.get('decoded_per_second'))} events/s ({tool['events']:,} events); "
            f"{tool['lost']:,} of {tool.get('increments', 0):,} increments "
            f"({_share(tool['lost'], tool.get('increments'))}) found the 4 MiB ring buffer "
            "full and were lost as events (not as counts). Python decoding (ctypes struct, "
            "packet parsing, explanation from the SAD mirror, JSON) under TCG is the limit.")
        if tool.get("output_in_storm") == 0:
            lines.append(
                "- **The tool wrote nothing while the storm lasted**: its output came after "
                "the storm ended. libbpf's `ring_buffer__consume()` keeps calling back while "
                "the producer keeps adding records, so `Tracer.drain()` returns only when "
                "the storm stops; decoded events pile up in memory meanwhile (part of the "
                "higher RSS), and the poll loop (module and netlink follower) waits too.")
    if limited.get("events") is not None:
        limit = storm_data.get("rate_limit", 100)
        lines.append(
            f"- With `--rate-limit {limit}`: {limited['events']:,} "
            f"events written, {limited['sampled']:,} increments sampled out, "
            f"{limited['lost']:,} lost; output {fmt(limited['output_bytes'] / MIB)} MiB "
            f"against {fmt(tool.get('output_bytes', 0) / MIB)} MiB without the limit, and "
            "written as the storm went on: output stays bounded while counts stay exact.")
        per_second = limited["events"] / limited["seconds"] if limited.get("seconds") else 0
        cpus = guest.get("cpus") or 1
        if limit and per_second > 1.5 * limit:
            lines.append(
                f"- **Over the limit**: one site on {cpus} CPUs sent {fmt(per_second)} "
                f"events/s with a limit of {limit}. The limit is shared by all CPUs "
                "(`site_rates` in `bpf/xfrm.bpf.c`); only CPUs racing at a window's start "
                "may send a few more.")
        if limited.get("lost"):
            lines.append(
                f"- Even with the limit, {limited['lost']:,} events were lost: `xt_site` "
                "reserves ring-buffer space for every increment and discards it afterwards "
                "when the increment is over the limit (or filtered out); a discarded record "
                "holds its space until user space consumes past it, so at "
                f"{fmt(limited.get('rate'))} reservations/s the 4 MiB ring fills between two "
                "polls of the tool.")
        if tool.get("rate") and limited.get("rate") and limited["rate"] < 1.2 * tool["rate"]:
            lines.append(
                f"- The rate limit hardly makes the probe cheaper ({fmt(limited['rate'])}/s "
                f"with it, {fmt(tool['rate'])}/s without): every increment still traps into "
                "its kprobe and is counted exactly (registers saved, frame looked up, "
                "namespace verified, two per-CPU maps updated) before the limit can be "
                "checked. Against the run without the tool that costs about "
                f"{fmt(_probe_cost_us(base.get('rate'), limited.get('rate'), storm_data))} "
                "µs of emulated CPU per increment under TCG.")
    rss = [(n, r["peak_rss_mib"]) for n, r in s.items() if r.get("peak_rss_mib")]
    if rss:
        over = [n for n, v in rss if v * MIB >= report.RSS_TARGET_MIB * 1e6]
        text = ("- Peak RSS: " + ", ".join(f"{fmt(v)} MiB ({n})" for n, v in rss) + ". ")
        if over:
            text += "**Over the 100 MB target.** "
            memory = (offline or {}).get("memory")
            if memory:
                steps = [f"{label} {fmt((kib - prev) / 1024)} MiB" for (label, kib), (_p, prev)
                         in zip(memory[1:], memory)]
                text += ("Most of it is there before the first event: measured on the host "
                         f"with this guest's kallsyms, a fresh interpreter is "
                         f"{fmt(memory[0][1] / 1024)} MiB, then " + ", ".join(steps)
                         + f" (total {fmt(memory[-1][1] / 1024)} MiB). The symbol table "
                         "(every text symbol of vmlinux and the modules as Python tuples, "
                         "lists and a dict) and pyroute2's imports are the big parts; the "
                         "storm adds the events queued while the decoder is behind.")
        else:
            text += "Under the 100 MB target."
        lines.append(text)
    return lines + [""]


def _probe_cost_us(base: Optional[float], with_tool: Optional[float],
                   storm_data: Mapping[str, Any]) -> Optional[float]:
    """Extra CPU time per increment: every vCPU busy in both runs, so the difference of the
    per-increment times, times the number of generating CPUs."""
    if not base or not with_tool:
        return None
    cpus = storm_data.get("trafgen_cpus") or 1
    return (cpus / with_tool - cpus / base) * 1e6


def _r(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _share(part: Optional[int], whole: Optional[int]) -> str:
    return f"{part / whole:.1%}" if part is not None and whole else "n/a"


def _startup_findings(guest: Mapping[str, Any]) -> List[str]:
    data = guest.get("phases", {}).get("startup")
    if not data or not data.get("bpftrace"):
        return []
    bt = Spread.of(data["bpftrace"]).median
    lines = ["### 3. Start-up", ""]
    parts = []
    for kind in ("cold", "warm"):
        if data.get(kind):
            parts.append(f"{kind} {fmt(Spread.of(data[kind]).median)} s "
                         f"({fmt(Spread.of(data[kind]).median / bt)} x bpftrace)")
    lines.append("- The tool is ready after " + ", ".join(parts)
                 + f"; bpftrace prints its attach message after {fmt(bt)} s.")
    breakdown = report.startup_breakdown(data)
    warm = breakdown.get("warm") or {}
    cold = breakdown.get("cold") or {}
    if warm:
        rows = [f"{STEP_LABELS.get(k, k)} {fmt(v)} s" for k, v in warm.items()]
        lines.append("- Where a warm start goes (medians, from the arrival times of the "
                     "tool's `-v` log lines): " + "; ".join(rows) + ".")
        if cold.get("sites") is not None and warm.get("sites") is not None:
            lines.append(f"- Cold and warm differ only in the sites step: "
                         f"{fmt(cold['sites'])} s resolving against {fmt(warm['sites'])} s "
                         "from the cache. The gap to bpftrace is Python: starting the "
                         "interpreter and importing the tool and its dependencies "
                         "(pyroute2 is the largest) under TCG, then parsing kallsyms and BTF "
                         "in Python.")
    return lines + [""]


def _resolver_findings(guest: Mapping[str, Any], offline: Optional[Mapping[str, Any]]
                       ) -> List[str]:
    live = guest.get("phases", {}).get("resolver")
    lines = ["### 4. Resolver", ""]
    if live:
        objects = live["log"]["objects"]
        classes = live.get("classes", {})
        lines.append(f"- Live in the guest: {fmt(sum(objects.values()))} s for vmlinux and "
                     f"{len(objects) - 1} modules ({sum(live['log']['sites'].values())} "
                     f"sites among {sum(classes.values())} gs-relative increments), inside a "
                     f"command of {fmt(live['seconds'])} s.")
    if offline:
        sizes = offline.get("text_sizes", {})
        growth = offline.get("growth", [])
        if growth:
            first, full = growth[0], growth[-1]
            per_mib = Spread.of(full["seconds"]).median / (full["text_bytes"] / MIB)
            lines.append(
                f"- On the host: {fmt(Spread.of(full['seconds']).median * 1000)} ms for all "
                f"of vmlinux's {fmt(full['text_bytes'] / MIB)} MiB of text "
                f"({fmt(per_mib * 1000)} ms per MiB; modules hold "
                f"{fmt(sum(v for k, v in sizes.items() if k != 'vmlinux') / MIB)} MiB more). "
                f"The time follows the gs-relative increments found, not the bytes: the "
                f"first {first['fraction']:.0%} of text ({first['candidates']} candidates) "
                f"takes {fmt(Spread.of(first['seconds']).median * 1000)} ms. A regular "
                "expression over the raw bytes finds the candidates, and only functions "
                "that load `net->mib.xfrm_statistics` are disassembled, so growth is "
                "linear in text size with a small constant, plus a term per candidate "
                "function.")
    return lines + [""] if len(lines) > 2 else []


def _recommendations(guest: Mapping[str, Any], offline: Optional[Mapping[str, Any]]
                     ) -> List[str]:
    storm_data = guest.get("phases", {}).get("storm")
    lines = ["## What would close the gaps (changes to the tool, not made here)", ""]
    items = []
    if storm_data:
        s = report.storm(storm_data)
        limited = s.get("tool-rate-limit", {})
        if limited.get("lost"):
            items.append("In `xt_site`, decide sampling before the expensive part: count "
                         "(site and namespace), then check the rate limit and the filters that "
                         "need no packet data, and only then read the packet and reserve "
                         "ring-buffer space, so over-limit increments never take ring-buffer "
                         "space (no losses under a limit).")
        if s.get("tool", {}).get("output_in_storm") == 0:
            items.append("Bound each drain: consume at most N records per call (libbpf "
                         "1.3's `ring_buffer__consume_n()`, or stop from the callback) and "
                         "emit in between, so output, the module follower and netlink keep "
                         "going during a storm and pending events stay few.")
        if any((r.get("peak_rss_mib") or 0) * MIB >= report.RSS_TARGET_MIB * 1e6
               for r in s.values()):
            items.append("Keep the symbol table compact: addresses in an `array('Q')`, names "
                         "in one blob with offsets, and only the modules and functions "
                         "asked about decoded into objects; import pyroute2 only where "
                         "netlink is parsed (or parse the few XFRM messages directly).")
    hot = guest.get("phases", {}).get("hotpath", {})
    if entry_functions(hot.get("tool_kprobes", [])):
        items.append("Fewer argument probes: the functions listed above still record their "
                     "arguments with a kprobe on every call (their sites find the skb or flow "
                     "in no register). Tracking arguments spilled to the stack, or fentry "
                     "trampolines where the kernel allows them (5.11+ for module functions), "
                     "would leave healthy ESP traffic without any probe hit.")
    if guest.get("phases", {}).get("startup"):
        items.append("Start faster: Python's start and imports are most of it under TCG "
                     "(pyroute2 is the largest import; the few XFRM and tc messages could be "
                     "parsed directly), then kallsyms and BTF; a warm start already loads no "
                     "disassembler.")
    if not items:
        return []
    return lines + [f"{n}. {item}" for n, item in enumerate(items, 1)] + [""]


def notes_sections(meta: Mapping[str, Any], guest: Mapping[str, Any],
                   offline: Optional[Mapping[str, Any]]) -> List[str]:
    findings = (_hot_findings(guest) + _storm_findings(guest, offline)
                + _startup_findings(guest) + _resolver_findings(guest, offline))
    sections = [_method(meta, guest)]
    if findings:
        sections.append("\n".join(["## What the numbers say", "", *findings]))
    recs = _recommendations(guest, offline)
    if recs:
        sections.append("\n".join(recs))
    return sections


def readme_summary(raw: Dict[str, Any]) -> str:
    """One paragraph for the README (printed by ``python -m bench.run --summary``)."""
    guest, offline = raw["guest"], raw.get("offline")
    phases = guest.get("phases", {})
    parts = []
    if "hotpath" in phases:
        h = report.hot_path(phases["hotpath"])
        esp, plain = h["esp"], h["plain"]
        parts.append(f"throughput ratio with the tool {esp['tool']['paired'].median:.3f} "
                     f"through an ESP tunnel and {plain['tool']['paired'].median:.3f} over "
                     f"plain veth (broad probe set: {esp['broad']['paired'].median:.3f} / "
                     f"{plain['broad']['paired'].median:.3f})")
    if "storm" in phases:
        s = report.storm(phases["storm"])
        parts.append(f"error storm at {fmt(max((r.get('rate') or 0) for r in s.values()))}/s "
                     f"(the TCG ceiling), counts exact, peak RSS "
                     f"{fmt(s.get('tool', {}).get('peak_rss_mib'))} MiB")
    if "startup" in phases:
        st = phases["startup"]
        bt = Spread.of(st["bpftrace"]).median
        parts.append(f"start-up {fmt(Spread.of(st['cold']).median / bt)} x (cold) and "
                     f"{fmt(Spread.of(st['warm']).median / bt)} x (warm) bpftrace's")
    if offline and offline.get("growth"):
        full = offline["growth"][-1]
        parts.append(f"resolver {fmt(Spread.of(full['seconds']).median * 1000)} ms for "
                     f"{fmt(full['text_bytes'] / MIB)} MiB of vmlinux text on the host")
    return "; ".join(parts) + "."
