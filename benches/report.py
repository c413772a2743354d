#!/usr/bin/env python3
"""Writes weft's performance report from the figures the benchmarks saved.

Usage: report.py RESULTS_DIR  (reads RESULTS_DIR/raw/*.json, writes
RESULTS_DIR/REPORT.md and RESULTS_DIR/*.png). benches/report.sh runs the
benchmarks first. Every figure is put next to a baseline measured in the same
run; absolute times are labelled with the machine they came from.
"""

import datetime
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(raw, name):
    p = raw / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"


def latency_chart(rows_by_mode, title, path):
    fig, axes = plt.subplots(1, len(rows_by_mode), figsize=(6 * len(rows_by_mode), 4.2), squeeze=False)
    for ax, (mode, rows) in zip(axes[0], rows_by_mode.items()):
        names = [r["path"] for r in rows]
        p50 = [r["p50_us"] for r in rows]
        p99 = [r["p99_us"] for r in rows]
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], p50, height=0.4, label="p50", color="#4477aa")
        ax.barh([i - 0.2 for i in y], p99, height=0.4, label="p99", color="#cc6677")
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("µs per request")
        ax.set_title(mode)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    out = Path(sys.argv[1])
    raw = out / "raw"
    md = ["# weft performance report", ""]
    machine = None
    dp, l7, flows, cp = (load(raw, n) for n in ("datapath", "l7_paths", "flows", "control_plane"))
    for f in (dp, l7, flows, cp):
        if f:
            machine = f["machine"]
    md += [
        f"Measured on: **{machine}**. Regenerate with `sudo ./benches/report.sh`.",
        "Every row is put next to a baseline measured in the same run; absolute times are this machine's.",
        "",
    ]
    runs = [
        f"{n} {datetime.datetime.fromtimestamp((raw / f'{n}.json').stat().st_mtime, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
        for n in ("datapath", "l7_paths", "flows", "control_plane")
        if (raw / f"{n}.json").exists()
    ]
    md += [f"Benchmarks finished: {'; '.join(runs)}.", ""]

    if l7:
        md += ["## Request latency by path", ""]
        labels = {"keepalive": "keep-alive", "new": "new connection per request"}
        for mode in ("keepalive", "new"):
            rows = l7.get(mode, [])
            if not rows:
                continue
            base = rows[0]["p50_us"]
            tproxy = next((r["p50_us"] for r in rows if "TPROXY" in r["path"]), None)
            chain = next((r["p50_us"] for r in rows if "sidecar chain" in r["path"]), None)
            md += [
                f"### {labels[mode]} ({rows[0]['n']} requests per path, client process in pod n1-p1, backend n1-p2)",
                "",
                "| path | p50 µs | p99 µs | p50 / direct | p50 / TPROXY | p50 / sidecar chain |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for r in rows:
                md.append(
                    f"| {r['path']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {ratio(r['p50_us'], base)} | "
                    f"{ratio(r['p50_us'], tproxy)} | {ratio(r['p50_us'], chain)} |"
                )
            md.append("")
        latency_chart({labels[m]: l7[m] for m in ("keepalive", "new") if l7.get(m)}, "Request latency by path", out / "latency.png")
        md += ["![Request latency by path](latency.png)", ""]

    if dp:
        md += ["## Datapath programs (BPF_PROG_TEST_RUN, established connection)", "", "| program | p50 ns | / no-op |", "|---|---:|---:|"]
        base = dp["programs"][0]["p50_ns"]
        for r in dp["programs"]:
            md.append(f"| {r['program']} | {r['p50_ns']} | {ratio(r['p50_ns'], base)} |")
        md.append("")
        for mode, rows in dp.get("latency", {}).items():
            base = rows[0]["p50_us"]
            md += [f"### Datapath request latency, {mode}", "", "| path | p50 µs | p99 µs | p50 / direct |", "|---|---:|---:|---:|"]
            for r in rows:
                md.append(f"| {r['path']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {ratio(r['p50_us'], base)} |")
            md.append("")

    if flows:
        tp = flows["throughput"]
        md += [
            "## Flow pipeline",
            "",
            "| stage (one core) | records/s | / drain only |",
            "|---|---:|---:|",
            f"| drain the ring buffer only (baseline) | {tp['drain_per_s']:,.0f} | 1.00 |",
            f"| drain + decode + enrich + join + filter + metrics | {tp['pipeline_per_s']:,.0f} | {ratio(tp['pipeline_per_s'], tp['drain_per_s'])} |",
            "",
            "Kernel record to a following gRPC client, default sizes:",
            "",
            "| rate/s | emitted | received | lost kernel / queue / store | p50 ms | p99 ms | pipeline CPU % |",
            "|---:|---:|---:|---|---:|---:|---:|",
        ]
        for r in flows["rates"]:
            md.append(
                f"| {r['rate']:,} | {r['emitted']:,} | {r['received']:,} | {r['lost_kernel']} / {r['lost_queue']} / {r['lost_store']} "
                f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['pipeline_cpu_pct']:.0f} |"
            )
        md += ["", f"Highest rate tried with zero loss: {flows['zero_loss_max']:,} records/s.", ""]
        a = flows.get("agent")
        if a:
            md += [
                "A real agent, one `weft observe -f` following:",
                "",
                "| state | flows/s | CPU % of one core | RSS MiB | lost |",
                "|---|---:|---:|---:|---:|",
                f"| idle (baseline) | 0 | {a['idle_cpu_pct']:.1f} | {a['idle_rss_mib']:.0f} | 0 |",
                f"| loaded | {a['flows_per_s']:,.0f} | {a['load_cpu_pct']:.1f} | {a['load_rss_mib']:.0f} | {a['lost']:.0f} |",
                "",
            ]
        fig, ax1 = plt.subplots(figsize=(7, 4))
        rates = [r["rate"] for r in flows["rates"]]
        ax1.plot(rates, [r["received"] / r["emitted"] * 100 for r in flows["rates"]], "o-", color="#4477aa", label="delivered to the client %")
        ax1.set_xscale("log")
        ax1.set_xlabel("records/s generated")
        ax1.set_ylabel("% delivered")
        ax2 = ax1.twinx()
        ax2.plot(rates, [r["p99_ms"] for r in flows["rates"]], "s--", color="#cc6677", label="p99 latency ms")
        ax2.set_ylabel("p99 kernel -> client, ms")
        fig.legend(loc="lower left", fontsize=8)
        fig.suptitle("Flow pipeline: delivery and latency by rate")
        fig.tight_layout()
        fig.savefig(out / "flows.png", dpi=110)
        plt.close(fig)
        md += ["![Flow pipeline by rate](flows.png)", ""]

    if cp:
        rows = cp["configs"]
        base = rows[0]["ack_s"] if rows else 0
        md += [
            "## Control plane",
            "",
            f"Open-file limit the agent and Envoy ran with: {cp.get('open_files', 'unknown')}. Each listener takes a socket",
            "per Envoy worker and one more; configs that would not fit in three quarters of the limit are refused",
            "by the agent (so Envoy never aborts on 'Too many open files').",
            "",
            "| EnvoyConfigs written at once | acknowledged | refused | time s | / 1 config | agent RSS MiB | Envoy RSS MiB | Envoy restarts |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            md.append(
                f"| {r['configs']:,} | {r.get('acked', r['configs']):,} | {r.get('refused', 0):,} | {r['ack_s']:.2f} |"
                f" {ratio(r['ack_s'], base)} | {r['agent_rss_kib'] / 1024:.0f} | {r['envoy_rss_kib'] / 1024:.0f} |"
                f" {r.get('envoy_restarts', 0)} |"
            )
        for r in rows:
            if r.get("refused_because"):
                md += ["", f"{r['configs']:,} configs, first refused: {r['refused_because']}"]
        e = cp["endpoint_change_ms"]
        md += [
            "",
            "| one endpoint change, 1000 configs loaded | p50 ms | max ms | p50 / state of the world |",
            "|---|---:|---:|---:|",
            f"| state of the world | {e['sotw_p50']:.1f} | {e['sotw_max']:.1f} | 1.00 |",
            f"| delta | {e['delta_p50']:.1f} | {e['delta_max']:.1f} | {ratio(e['delta_p50'], e['sotw_p50'])} |",
            "",
        ]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([r.get("acked", r["configs"]) for r in rows], [r["ack_s"] for r in rows], "o-", color="#4477aa")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("EnvoyConfigs acknowledged (written at once)")
        ax.set_ylabel("seconds until all were settled")
        ax.set_title("Control plane: configs to ACK")
        fig.tight_layout()
        fig.savefig(out / "control_plane.png", dpi=110)
        plt.close(fig)
        md += ["![Configs to ACK](control_plane.png)", ""]

    (out / "REPORT.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'REPORT.md'}")


if __name__ == "__main__":
    main()
