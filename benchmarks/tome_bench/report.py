"""Markdown tables and the PNG plot."""

from __future__ import annotations

from typing import List, Optional, Sequence

__all__ = ["throughput_table", "compile_table", "memory_table", "plot"]


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def throughput_table(rows: Sequence[dict]) -> str:
    """One line per (model, batch, precision, variant)."""
    lines = [
        "| model | batch | prec | variant | img/s | ms/batch | speed-up [IQR] | FLOP ceiling (blocks) | FLOP ratio (counted) | speed-up / ceiling | merge share |",
        "|---|---:|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        speedup = f"{row['speedup']:.2f}x [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}]"
        share = None if row["merge_share"] is None else 100 * row["merge_share"]
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['precision']} | {row['variant']} | "
            f"{row['images_per_s']:.2f} | {1000 * row['median_s']:.0f} | {speedup} | {row['ceiling']:.2f}x | "
            f"{_fmt(row.get('counted_flop_ratio'), '.2f')}{'x' if row.get('counted_flop_ratio') else ''} | "
            f"{100 * row['efficiency']:.0f}% | {_fmt(share, '.1f')}{'' if share is None else '%'} |"
        )
    return "\n".join(lines)


def compile_table(results: Sequence[dict]) -> str:
    lines = [
        "| model | batch | prec | schedule | graphs / breaks (explain) | compile s | max abs diff vs eager | recompiled | variant | img/s | speed-up vs timm eager |",
        "|---|---:|---|---|---|---:|---:|---|---|---:|---:|",
    ]
    for res in results:
        head = (
            f"| {res['model']} | {res['batch']} | {res['precision']} | {res['schedule']} | "
            f"{res['explain_graphs']} / {res['explain_graph_breaks']} | {res['compile_s']:.0f} | "
            f"{res['max_abs_diff_vs_eager']:.1e} | {res['recompiled']} |"
        )
        for label, stats in res["timings"].items():
            lines.append(f"{head} {label} | {stats['images_per_s']:.2f} | {stats['speedup']:.2f}x |")
            head = "| | | | | | | | |"
    return "\n".join(lines)


def memory_table(result: dict) -> str:
    mib = 1024**2
    iso = result["isolated"]
    lines = [
        f"Geometry: {result['model']} ({result['tokens']} tokens, {result['depth']} blocks), batch {result['batch']}, "
        f"schedule {result['schedule']}; final tokens {iso['groups']['final_tokens']}.",
        "",
        "| source tracing | state kept per forward | measured peak while tracking | time | dense map built on read |",
        "|---|---:|---:|---:|---:|",
        f"| group index (library) | {iso['groups']['state_bytes'] / mib:.2f} MiB | {iso['groups']['track_peak_bytes'] / mib:.1f} MiB | "
        f"{1000 * iso['groups']['track_s']:.1f} ms | {iso['groups']['read_bytes'] / mib:.1f} MiB (peak {iso['groups']['read_peak_bytes'] / mib:.1f} MiB) |",
        f"| dense (batch, tokens, original) float map | {iso['dense']['state_bytes'] / mib:.1f} MiB | "
        f"{iso['dense']['track_peak_bytes'] / mib:.1f} MiB | {1000 * iso['dense']['track_s']:.1f} ms | - |",
    ]
    if "forward" in result:
        fwd = result["forward"]
        lines += [
            "",
            f"Whole forward, batch {fwd['batch']}:",
            "",
            "| source tracing | peak memory of the forward | forward time |",
            "|---|---:|---:|",
        ]
        for name, label in (("off", "off"), ("groups", "group index (library)"), ("dense", "dense map (emulated)")):
            lines.append(f"| {label} | {fwd[name]['forward_peak_bytes'] / mib:.0f} MiB | {fwd[name]['forward_s']:.1f} s |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], compile_results: Sequence[dict], path: str, title: str) -> None:
    """Left: measured speed-up against the FLOP ceiling. Right: images/s per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: List[tuple] = []
    for row in rows:
        key = (row["model"], row["batch"], row["precision"])
        if key not in groups:
            groups.append(key)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    top = 1.0
    markers = "osD^v<>ph*"
    for index, key in enumerate(groups):
        members = [r for r in rows if (r["model"], r["batch"], r["precision"]) == key and r["variant"] != "timm"]
        label = f"{key[0]} b{key[1]} {key[2]}"
        xs = [r["ceiling"] for r in members]
        ys = [r["speedup"] for r in members]
        errors = [[r["speedup"] - r["speedup_q1"] for r in members], [r["speedup_q3"] - r["speedup"] for r in members]]
        left.errorbar(xs, ys, yerr=errors, fmt=markers[index % len(markers)], capsize=3, label=label)
        for r in members:
            left.annotate(r["variant"].replace("tome ", "").replace("published ", "pub "), (r["ceiling"], r["speedup"]),
                          fontsize=7, xytext=(3, 3), textcoords="offset points")
        top = max([top] + xs + ys)
    left.plot([0.9, top * 1.05], [0.9, top * 1.05], "k--", lw=1, label="speed-up = FLOP ceiling")
    left.set_xlabel("FLOP ceiling (unmerged / merged block FLOPs)")
    left.set_ylabel("measured speed-up (median of per-round ratios, IQR bars)")
    left.set_title("speed-up vs ceiling")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    labels, values, colors = [], [], []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, key in enumerate(groups):
        for r in rows:
            if (r["model"], r["batch"], r["precision"]) == key:
                labels.append(f"{key[0]} b{key[1]} {key[2]}: {r['variant']}")
                values.append(r["images_per_s"])
                colors.append(palette[index % len(palette)])
    for res in compile_results:
        for name, stats in res["timings"].items():
            labels.append(f"{res['model']} b{res['batch']} {res['precision']}: {name}")
            values.append(stats["images_per_s"])
            colors.append("grey")
    right.barh(range(len(values)), values, color=colors)
    right.set_yticks(range(len(values)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("images / s (median)")
    right.set_title("throughput")
    right.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
