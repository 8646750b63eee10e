"""``bench/RESULTS.md`` from the guest's and the host's measurements (pure: dicts in, text out)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from bench.stats import Spread, fmt, fmt_percent, markdown_table, paired_ratios, ratio, yes_no

HEADERS = ("figure", "configuration", "median", "min–max", "ratio vs baseline", "target",
           "met?")
HOT_TARGET = 0.99  # the tool costs at most 1 % of throughput
CONFIGS = ("baseline", "tool", "tool-stopped", "broad")
STORM_RATE_TARGET = 100_000.0
RSS_TARGET_MIB = 100.0
MIB = 1 << 20


def _range(spread: Spread, scale: float = 1.0, digits: int = 3) -> str:
    return f"{fmt(spread.low / scale, digits)}–{fmt(spread.high / scale, digits)}"


# --- 1. hot path ---------------------------------------------------------------------------


def hot_path(data: Mapping[str, Any]) -> Dict[str, Any]:
    """Per traffic kind and configuration: throughput spread and per-round ratios."""
    runs = data["runs"]
    out: Dict[str, Any] = {}
    for traffic in ("esp", "plain"):
        by_config: Dict[str, Dict[int, float]] = {}
        for run in runs:
            if run["traffic"] == traffic:
                by_config.setdefault(run["config"], {})[run["round"]] = run["bps"]
        base = by_config.get("baseline", {})
        rows = {}
        for config, values in by_config.items():
            rounds = sorted(set(values) & set(base))
            ratios = paired_ratios([values[r] for r in rounds], [base[r] for r in rounds])
            cpu = [run["tool_cpu_share"] for run in runs if run["traffic"] == traffic
                   and run["config"] == config and "tool_cpu_share" in run]
            idle = [run["guest_idle_share"] for run in runs if run["traffic"] == traffic
                    and run["config"] == config and "guest_idle_share" in run]
            rows[config] = {
                "tool_cpu": Spread.of(cpu) if cpu else None,
                "guest_idle": Spread.of(idle) if idle else None,
                "mbps": Spread.of(v / 1e6 for v in values.values()),
                "ratio_of_medians": ratio(Spread.of(values.values()).median,
                                          Spread.of(base.values()).median) if base else None,
                "paired": Spread.of(ratios) if ratios else None,
            }
        out[traffic] = rows
    return out


def _hot_rows(data: Mapping[str, Any]) -> List[List[str]]:
    summary = hot_path(data)
    labels = {"esp": "TCP through ESP tunnel (AES-GCM)", "plain": "TCP over plain veth"}
    configs = {"baseline": "no tool", "tool": "xfrmtrace",
               "tool-stopped": "xfrmtrace stopped (probes only)",
               "broad": "xfrmtrace + broad set"}
    rows = []
    for traffic in ("esp", "plain"):
        for config in CONFIGS:
            row = summary[traffic].get(config)
            if row is None:
                continue
            paired: Optional[Spread] = row["paired"]
            if config == "baseline":
                ratio_text, target, met = "1", "", ""
            else:
                ratio_text = (f"{paired.median:.3f} ({paired.low:.3f}–{paired.high:.3f})"
                              if paired else "n/a")
                target = "≥ 0.99" if config == "tool" else "(comparison)"
                met = yes_no(paired.median >= HOT_TARGET) if config == "tool" and paired else ""
            rows.append([f"1. {labels[traffic]}, Mbit/s", configs[config],
                         fmt(row["mbps"].median), _range(row["mbps"]), ratio_text, target, met])
    return rows


# --- 2. storm ------------------------------------------------------------------------------


def storm(data: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, run in data.get("runs", {}).items():
        delta = sum(run.get("delta", {}).values())
        seconds = run.get("seconds") or 0
        rec: Dict[str, Any] = {"increments": delta, "seconds": seconds,
                               "rate": delta / seconds if seconds else None,
                               "steady_rate": run.get("steady_rate")}
        if "summary" in run:
            summary = run["summary"]
            proc = run.get("delta", {})
            tool = run.get("tool_counts", {})
            rec["exact"] = bool(proc) and tool == proc and not run.get("after_stop")
            rec["tool_counts"], rec["proc_delta"] = tool, proc
            rec["events"] = summary.get("events")
            rec["lost"] = summary.get("lost")
            rec["sampled"] = summary.get("sampled")
            written = run.get("events_written")
            last = run.get("output_last_growth")
            rec["decoded_per_second"] = written / last if written and last else None
            rec["decode_seconds"] = last
            rec["output_in_storm"] = run.get("output_in_storm")
            rec["output_bytes"] = run.get("tool", {}).get("output_bytes")
            rec["peak_rss_mib"] = run.get("tool", {}).get("peak_rss_kib", 0) / 1024
        out[name] = rec
    return out


def _storm_rows(data: Mapping[str, Any]) -> List[List[str]]:
    s = storm(data)
    names = {"baseline": "no tool", "tool": "xfrmtrace",
             "tool-rate-limit": f"xfrmtrace --rate-limit {data.get('rate_limit', 100)}"}
    base_rate = s.get("baseline", {}).get("rate")
    rows = []
    for name, rec in s.items():
        label = names.get(name, name)
        rate = rec["rate"]
        rows.append([f"2. XfrmInNoStates per second ({fmt(data.get('seconds'))} s storm)",
                     label, fmt(rate),
                     f"steady {fmt(rec['steady_rate'])}",
                     fmt(ratio(rate, base_rate), 3) if name != "baseline" and rate else "1",
                     "≥ 100,000/s", yes_no(rate >= STORM_RATE_TARGET) if rate else "n/a"])
    for name, rec in s.items():
        if "exact" not in rec:
            continue
        label = names.get(name, name)
        tool_total = sum(rec["tool_counts"].values())
        proc_total = sum(rec["proc_delta"].values())
        rows.append(["2. tool totals = /proc/net/xfrm_stat delta", label,
                     f"{tool_total:,} = {proc_total:,}", "", "", "exact", yes_no(rec["exact"])])
        rows.append(["2. events decoded per second", label, fmt(rec["decoded_per_second"]),
                     f"{rec['events']:,} events in {fmt(rec['decode_seconds'])} s", "", "", ""])
        lost_share = rec["lost"] / rec["increments"] if rec["increments"] else 0
        rows.append(["2. events lost (ring buffer full)", label, f"{rec['lost']:,}",
                     f"{lost_share:.1%} of increments; {rec['sampled']:,} sampled out", "",
                     "counts exact anyway", ""])
        rows.append(["2. output written", label, f"{fmt(rec['output_bytes'] / MIB)} MiB",
                     "", "", "bounded with a rate limit", ""])
        rows.append(["2. peak RSS (VmHWM), MiB", label, fmt(rec["peak_rss_mib"]), "", "",
                     "< 100 MB", yes_no(rec["peak_rss_mib"] * MIB < RSS_TARGET_MIB * 1e6)])
    return rows


# --- 3. start-up ---------------------------------------------------------------------------


def _startup_rows(data: Mapping[str, Any]) -> List[List[str]]:
    bpftrace = Spread.of(data["bpftrace"])
    rows = []
    for key, label in (("cold", "xfrmtrace, no site cache"), ("warm", "xfrmtrace, site cache"),
                       ("bpftrace", "bpftrace -e 'kprobe:xfrm_input {}'")):
        values = data.get(key) or []
        if not values:
            continue
        spread = Spread.of(values)
        rows.append(["3. seconds until ready / attach message", label, fmt(spread.median),
                     _range(spread), fmt(ratio(spread.median, bpftrace.median)), "", ""])
    return rows


def startup_breakdown(data: Mapping[str, Any]) -> Dict[str, Dict[str, float]]:
    """Median seconds per start-up step, cold and warm."""
    out = {}
    for kind in ("cold", "warm"):
        parts = data.get(f"{kind}_breakdown") or []
        keys = [k for k in parts[0]] if parts else []
        out[kind] = {k: Spread.of(p[k] for p in parts if k in p).median for k in keys}
    return out


# --- 4. resolver ---------------------------------------------------------------------------


def _resolver_rows(live: Optional[Mapping[str, Any]], offline: Optional[Mapping[str, Any]]
                   ) -> List[List[str]]:
    rows = []
    if live:
        objects = live["log"]["objects"]
        resolve = sum(objects.values())
        modules = len(objects) - 1
        rows.append(["4. seconds to resolve all sites (live, in the guest under TCG)",
                     f"vmlinux + {modules} modules: resolver / whole command",
                     f"{fmt(resolve)} / {fmt(live['seconds'])}",
                     f"vmlinux {fmt(objects.get('vmlinux'))}; kernel view "
                     f"{fmt(live['log'].get('open_seconds'))}", "", "", ""])
    if offline:
        cli = offline["cli"]
        wall, res = Spread.of(cli["wall"]), Spread.of(cli["resolve"])
        rows.append(["4. seconds to resolve all sites (offline on the host, no TCG)",
                     "vmlinux: resolver / whole command",
                     f"{fmt(res.median)} / {fmt(wall.median)}",
                     f"{_range(res)} / {_range(wall)}", "", "", ""])
        full = offline["growth"][-1]
        full_seconds = Spread.of(full["seconds"]).median
        for row in offline["growth"]:
            seconds = Spread.of(row["seconds"])
            rows.append([f"4. growth: first {row['fraction']:.0%} of vmlinux text",
                         f"{fmt(row['text_bytes'] / MIB)} MiB, {row['candidates']} "
                         f"gs-increments, {row['sites']} sites",
                         fmt(seconds.median), _range(seconds),
                         fmt(ratio(seconds.median, full_seconds)), "", ""])
    return rows


# --- the document --------------------------------------------------------------------------


def render(meta: Mapping[str, Any], guest: Mapping[str, Any],
           offline: Optional[Mapping[str, Any]]) -> str:
    phases = guest.get("phases", {})
    rows: List[List[str]] = []
    if "hotpath" in phases:
        rows += _hot_rows(phases["hotpath"])
    if "storm" in phases:
        rows += _storm_rows(phases["storm"])
    if "startup" in phases:
        rows += _startup_rows(phases["startup"])
    rows += _resolver_rows(phases.get("resolver"), offline)
    parts = [
        "# xfrmtrace benchmarks\n",
        f"Written by `make bench` (`bench/run.py`) on {meta['date']}. Raw numbers: "
        "`bench/results.json`.\n",
        _meta_table(meta, guest),
        *healthy_section(guest.get("healthy")),
        "## Results\n",
        markdown_table(HEADERS, rows),
    ]
    parts += [notes for notes in meta.get("notes_sections", [])]
    if guest.get("errors"):
        parts.append("## Phases that failed\n")
        for phase, trace in guest["errors"].items():
            parts.append(f"`{phase}`:\n\n```\n{trace.strip()[-1500:]}\n```\n")
    return "\n".join(parts)


#: Healthy traffic kinds (vmlab/guest/healthy.py), in the order the headline shows them.
HEALTHY_KINDS = ("esp-tcp", "esp6-tcp", "esp-udp", "esp-ping", "plain-tcp", "plain-udp",
                 "plain-ping")


def healthy_runs_per_packet(record: Mapping[str, Any]) -> Optional[float]:
    """Runs of both tool programs per packet of one kind of healthy traffic."""
    packets = record.get("packets") or 0
    if not packets:
        return None
    runs = sum(record.get(prog, {}).get("run_cnt", 0) for prog in ("xt_entry", "xt_site"))
    return runs / packets


def healthy_section(profiles: Optional[Mapping[str, Any]]) -> List[str]:
    """The headline: probe runs per healthy packet, per kernel and kind of traffic."""
    if not profiles:
        return []
    rows = []
    for series, record in profiles.items():
        kinds = record.get("kinds", {})
        row = [f"{series} ({record.get('kernel', '?')})"]
        for kind in HEALTHY_KINDS:
            value = healthy_runs_per_packet(kinds[kind]) if kind in kinds else None
            row.append("failed" if "error" in record else
                       "?" if value is None else f"{value:.2f}")
        rows.append(row)
    return ["## Headline: probe runs per healthy packet\n",
            "Runs of the tool's BPF programs (`xt_entry` + `xt_site`, the kernel's own "
            "`run_cnt` with `kernel.bpf_stats_enabled=1`) per packet on the lab's veth, one "
            "boot per kernel (`vmlab/guest/healthy.py`: 2 MiB of TCP, 500 UDP datagrams on "
            "connected sockets, 100 pings). ESP traffic pays only per output route lookup "
            "that finds a policy: once per connection, and per packet for ping, which "
            "looks the route up for every echo (README, \"Healthy path\").\n",
            markdown_table(("kernel", *HEALTHY_KINDS), rows)]


def _meta_table(meta: Mapping[str, Any], guest: Mapping[str, Any]) -> str:
    rows = [
        ["kernel", f"Debian {guest.get('kernel', '?')} (package {meta.get('package', '?')})"],
        ["host CPU", f"{meta['host_cpu']}, {meta['host_cores']} cores"],
        ["guest", f"{guest.get('cpus', '?')} vCPUs, {meta.get('memory', '?')} RAM, "
                  "qemu TCG (no KVM), virtme-ng"],
        ["machine otherwise idle", meta.get("idle_text", "?")],
        ["date", meta["date"]],
        ["`make bench` wall time", meta.get("total_text", "?")],
    ]
    return markdown_table(("", ""), rows)


def hot_summary_text(data: Mapping[str, Any]) -> Dict[str, str]:
    """Short phrases for the README paragraph: "-0.4 %" style changes per traffic/config."""
    summary = hot_path(data)
    out = {}
    for traffic, rows in summary.items():
        for config, row in rows.items():
            if config != "baseline" and row["paired"] is not None:
                out[f"{traffic}/{config}"] = fmt_percent(row["paired"].median)
    return out


def spread_text(values: Sequence[float]) -> str:
    s = Spread.of(values)
    return f"{fmt(s.median)} ({_range(s)})"
