"""The ToMe paper's ablations on the shipped model: regenerates docs/ablations.md's table and docs/ablations.png.

Off the shelf (no fine-tuning), one design choice of ToMe changed at a time, each at the
same merge schedules (so the same token counts and block FLOPs), through the research
setting ``tome.MergeMethod("ablation", ...)`` that every supported family gets from the
shared merge step:

- similarity feature: keys averaged over heads (ToMe), block input x, queries, values,
  keys of all heads concatenated;
- matching: bipartite (ToMe), k-th (every 4th token a destination), random sources,
  greedy pairs;
- combining: size-weighted average (ToMe), keep one, max pooling, plain average;
- proportional attention on (ToMe) / off;
- merging vs pruning: random token dropping, EViT (drop the tokens the class token
  attends to least), EViT with the dropped tokens fused into one token.

Top-1 on the first ``--val-size`` validation images of the generated shape task
(:mod:`tome.data`, the seed the model was trained with), every image's hit kept so that
differences against ToMe at the same schedule get a paired standard error. Random
rules draw from ``torch.manual_seed(0)`` at the start of every evaluation.

Usage (the command docs/ablations.md records):

    OMP_NUM_THREADS=1 uv run python benchmarks/ablations.py \\
        --model src/tome/assets/tome_shapes_vit.safetensors --val-size 2000 \\
        --json docs/ablations.json --plot docs/ablations.png --markdown docs/ablations.md

The table is written between the ``<!-- results:begin -->`` and ``<!-- results:end -->``
markers of the Markdown file (benchmarks/results.py's helper); the rest is left alone.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import block_flops, schedule_label, write_markdown  # noqa: E402

import tome  # noqa: E402
from tome import MergeMethod  # noqa: E402
from tome._schedule import RSchedule  # noqa: E402
from tome.data import SyntheticShapes  # noqa: E402
from tome.tools.train import load_model  # noqa: E402
from tome.utils import parse_r, tokens_per_layer  # noqa: E402

SHIPPED = Path(__file__).resolve().parent.parent / "src" / "tome" / "assets" / "tome_shapes_vit.safetensors"


@dataclass(frozen=True)
class Variant:
    """One row of the study: a merge setting and whether proportional attention is on."""

    name: str
    group: str
    method: MergeMethod
    prop_attn: bool = True


BASELINE = Variant("ToMe (keys, bipartite, size-weighted avg, prop. attn)", "ToMe", MergeMethod("tome"))


def _ablation(name: str, group: str, prop_attn: bool = True, **options: Any) -> Variant:
    return Variant(name, group, MergeMethod("ablation", **options), prop_attn)


VARIANTS: List[Variant] = [
    BASELINE,
    _ablation("x: block input", "feature", metric="x"),
    _ablation("q: queries, mean over heads", "feature", metric="q"),
    _ablation("v: values, mean over heads", "feature", metric="v"),
    _ablation("k: keys, heads concatenated", "feature", metric="k_cat"),
    _ablation("k-th: every 4th token a destination", "matching", match="kth"),
    _ablation("random sources", "matching", match="random"),
    _ablation("greedy pairs", "matching", match="greedy"),
    _ablation("keep one (destination)", "combining", combine="keep"),
    _ablation("max pooling", "combining", combine="amax"),
    _ablation("plain average", "combining", combine="mean"),
    Variant("proportional attention off", "prop. attention", MergeMethod("tome"), False),
    _ablation("pruning: random drop", "merging vs pruning", match="random_drop"),
    _ablation("pruning: EViT (class-token attention)", "merging vs pruning", match="evit"),
    _ablation("pruning: EViT + fuse, prop. attn", "merging vs pruning", match="evit_fuse"),
    _ablation("pruning: EViT + fuse, no prop. attn (as EViT)", "merging vs pruning", prop_attn=False, match="evit_fuse"),
]

GROUPS = ["feature", "matching", "combining", "prop. attention", "merging vs pruning"]


def sha256_prefix(path: Path, length: int = 12) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:length]


def _pack(hits: torch.Tensor) -> str:
    """Per-image hits (bool) as base64 of packed bits, so the JSON stays small."""
    bits = hits.to(torch.uint8).tolist() + [0] * (-len(hits) % 8)
    data = bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))
    return base64.b64encode(data).decode()


def _unpack(text: str, length: int) -> torch.Tensor:
    bits = "".join(f"{byte:08b}" for byte in base64.b64decode(text))
    return torch.tensor([c == "1" for c in bits[:length]])


def paired_delta(hits: torch.Tensor, reference: torch.Tensor) -> Dict[str, float]:
    """Accuracy difference (points) and its paired standard error: same images, so the
    error is that of the mean per-image difference, sqrt(var(d) / n)."""
    d = hits.double() - reference.double()
    n = len(d)
    return {"delta": 100 * float(d.mean()), "se": 100 * float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0}


def predict(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-image hits of ``model`` (bool, one per image)."""
    hits = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size])
            hits.append(logits.argmax(dim=-1) == labels[start:start + batch_size])
    return torch.cat(hits)


def configure(model: torch.nn.Module, variant: Variant, r: RSchedule) -> None:
    model.tome_method = variant.method
    model._tome_info["prop_attn"] = variant.prop_attn
    model.r = r


def time_variants(model: torch.nn.Module, variants: Sequence[Variant], r: RSchedule, input_size: Sequence[int],
                  batch_size: int, rounds: int) -> List[float]:
    """Images per second of each variant at schedule ``r``: median of interleaved rounds."""
    x = torch.rand(batch_size, *input_size)
    times: List[List[float]] = [[] for _ in variants]
    with torch.inference_mode():
        for variant in variants:  # warm-up
            configure(model, variant, r)
            model(x)
        for _ in range(rounds):
            for i, variant in enumerate(variants):
                configure(model, variant, r)
                torch.manual_seed(0)
                start = time.perf_counter()
                model(x)
                times[i].append(time.perf_counter() - start)
    return [batch_size / statistics.median(t) for t in times]


def measure(path: Path, constant: Sequence[int], decreasing: Sequence[int], val_size: int, batch_size: int,
            timing_batch: int, rounds: int, variants: Sequence[Variant] = VARIANTS) -> Dict[str, Any]:
    """Every measurement, as a JSON-ready dict."""
    model, info = load_model(path)
    depth, dim = len(model.blocks), model.embed_dim
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / dim
    prefix = model.num_prefix_tokens
    num_tokens = model.patch_embed.num_patches + prefix
    input_size = tuple(model.pretrained_cfg["input_size"])
    schedules: List[RSchedule] = [*constant, *[(r, -1.0) for r in decreasing]]
    base_flops = block_flops(num_tokens, depth, dim, mlp_ratio, parse_r(depth, 0), prefix)
    columns = []
    for r in schedules:
        per_layer = parse_r(depth, r)
        columns.append({"r": list(r) if isinstance(r, tuple) else r, "label": schedule_label(r),
                        "kind": "decreasing" if isinstance(r, tuple) else "constant", "per_layer": per_layer,
                        "tokens": tokens_per_layer(num_tokens, per_layer, prefix),
                        "flops_ratio": block_flops(num_tokens, depth, dim, mlp_ratio, per_layer, prefix) / base_flops})

    data_seed = info["training"]["data_seed"]
    val = SyntheticShapes("val", length=val_size, seed=data_seed, image_size=input_size[-1])
    start = time.perf_counter()
    items = [val[i] for i in range(val_size)]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items])
    print(f"{val_size} validation images generated in {time.perf_counter() - start:.0f}s; "
          f"{torch.get_num_threads()} threads", flush=True)

    tome.apply_patch(model)
    configure(model, BASELINE, 0)
    unmerged = predict(model, images, labels, batch_size)
    print(f"r = 0: {100 * unmerged.double().mean():.2f}%", flush=True)
    rows = []
    for variant in variants:
        row: Dict[str, Any] = {"name": variant.name, "group": variant.group, "method": str(variant.method),
                               "prop_attn": variant.prop_attn, "accuracy": [], "hits": []}
        for r in schedules:
            configure(model, variant, r)
            torch.manual_seed(0)
            start = time.perf_counter()
            hits = predict(model, images, labels, batch_size)
            row["accuracy"].append(float(hits.double().mean()))
            row["hits"].append(_pack(hits))
            print(f"{variant.name:>50} r={schedule_label(r):>8}: {100 * row['accuracy'][-1]:6.2f}%  "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
        rows.append(row)

    half = min(range(len(columns)), key=lambda i: (columns[i]["kind"] != "constant",
                                                   abs(columns[i]["flops_ratio"] - 0.5)))
    print(f"timing at {columns[half]['label']}, batch {timing_batch}, {rounds} rounds", flush=True)
    speeds = time_variants(model, variants, schedules[half], input_size, timing_batch, rounds)
    for row, speed in zip(rows, speeds):
        row["images_per_s"] = speed
    return {
        "model": os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path),
        "sha256": sha256_prefix(path),
        "val_images": val_size,
        "data_seed": data_seed,
        "architecture": {"name": info["architecture"], **info["model_kwargs"], "image_size": input_size[-1],
                         "tokens": num_tokens},
        "threads": torch.get_num_threads(),
        "unmerged_accuracy": float(unmerged.double().mean()),
        "columns": columns,
        "half_flops_column": half,
        "timing_batch_size": timing_batch,
        "rows": rows,
    }


def _hits(results: Dict[str, Any], row: Dict[str, Any], column: int) -> torch.Tensor:
    return _unpack(row["hits"][column], results["val_images"])


def markdown_table(results: Dict[str, Any]) -> str:
    """The study as a Markdown table: accuracy per schedule, change against ToMe with its paired error."""
    columns, rows = results["columns"], results["rows"]
    baseline = next(row for row in rows if row["group"] == "ToMe")
    header = ["ablation", "variant"] + [
        f"{c['label']}: {c['tokens'][-1]} tokens, {100 * c['flops_ratio']:.0f}% FLOPs" for c in columns
    ] + [f"img/s at {columns[results['half_flops_column']]['label']}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["group"], row["name"]]
        for index, _ in enumerate(columns):
            accuracy = 100 * row["accuracy"][index]
            if row is baseline:
                cells.append(f"**{accuracy:.2f}**")
                continue
            d = paired_delta(_hits(results, row, index), _hits(results, baseline, index))
            cells.append(f"{accuracy:.2f} ({d['delta']:+.2f} ± {d['se']:.2f})")
        cells.append(f"{row['images_per_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Top-1 in % on the first {results['val_images']} validation images of "
        f"`SyntheticShapes(seed={results['data_seed']})`, off the shelf, model `{results['model']}` "
        f"(sha256 `{results['sha256']}...`), unmerged (r = 0): {100 * results['unmerged_accuracy']:.2f}%. "
        "In brackets: the change against ToMe at the same schedule, in points, ± its paired standard "
        "error (same images; the standard error of an absolute accuracy is about "
        f"{100 * math.sqrt(0.25 / results['val_images']):.1f} points). Every variant removes the same "
        "tokens per block, so block FLOPs are equal along a column. img/s: batch "
        f"{results['timing_batch_size']}, {results['threads']} CPU thread(s) shared with other jobs, "
        "median of interleaved rounds: a rough cost of each rule, not a speed-up measurement."
    )
    return "\n".join(lines)


def plot(results: Dict[str, Any], path: Path) -> None:
    """Accuracy against block FLOPs, one panel per ablation group (ToMe in black in each), and
    the change against ToMe at the half-FLOPs schedule with paired standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns, rows = results["columns"], results["rows"]
    constant = sorted((i for i, c in enumerate(columns) if c["kind"] == "constant"),
                      key=lambda i: -columns[i]["flops_ratio"])
    decreasing = [i for i, c in enumerate(columns) if c["kind"] == "decreasing"]
    baseline = next(row for row in rows if row["group"] == "ToMe")
    unmerged = 100 * results["unmerged_accuracy"]
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange"]
    fig, grid = plt.subplots(2, 3, figsize=(16, 9.5), layout="constrained")
    axes = list(grid.flat)
    for ax, group in zip(axes, GROUPS):
        members = [baseline] + [row for row in rows if row["group"] == group]
        for index, row in enumerate(members):
            colour = "black" if row is baseline else colours[(index - 1) % len(colours)]
            xs = [100.0] + [100 * columns[i]["flops_ratio"] for i in constant]
            ys = [unmerged] + [100 * row["accuracy"][i] for i in constant]
            ax.plot(xs, ys, marker="o", markersize=3, color=colour, linewidth=1.2,
                    label=row["name"] if row is not baseline else "ToMe")
            ax.plot([100 * columns[i]["flops_ratio"] for i in decreasing],
                    [100 * row["accuracy"][i] for i in decreasing], marker="s", linestyle="none",
                    markersize=6, color=colour, markerfacecolor="none")
        ax.set_title(group)
        ax.axvline(50, color="grey", linewidth=0.8, linestyle="--")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.set_xlabel("transformer-block FLOPs, % of r = 0")
        ax.set_ylabel(f"top-1, % ({results['val_images']} val images)")
        ax.legend(fontsize=7, loc="lower left")
    ax = axes[len(GROUPS)]
    half = results["half_flops_column"]
    others = [row for row in rows if row is not baseline]
    deltas = [paired_delta(_hits(results, row, half), _hits(results, baseline, half)) for row in others]
    positions = list(range(len(others)))[::-1]
    ax.barh(positions, [d["delta"] for d in deltas], xerr=[d["se"] for d in deltas], color=[
        colours[GROUPS.index(row["group"]) % len(colours)] for row in others], alpha=0.8, capsize=2)
    ax.set_yticks(positions)
    ax.set_yticklabels([row["name"] for row in others], fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(f"change against ToMe at r = {columns[half]['label']} ({100 * columns[half]['flops_ratio']:.0f}% FLOPs)")
    ax.set_xlabel("points, ± paired standard error")
    arch = results["architecture"]
    fig.suptitle(f"ToMe ablations off the shelf: ViT {arch.get('embed_dim')} wide, depth {arch.get('depth')}, "
                 f"{arch['tokens']} tokens, SyntheticShapes; weights {results['model']} (sha256 "
                 f"{results['sha256']}...)\ncircles: constant r; squares: decreasing schedule", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=SHIPPED,
                        help="a model saved by tome train (default: the short shipped model shapes)")
    parser.add_argument("--constant", default="4,8,10,12", help="constant r values (default: %(default)s)")
    parser.add_argument("--decreasing", default="8", help="r of (r, -1) schedules (default: %(default)s)")
    parser.add_argument("--val-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=250, help="evaluation batch size")
    parser.add_argument("--timing-batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds")
    parser.add_argument("--json", type=Path, default=Path("docs/ablations.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/ablations.png"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/ablations.md"))
    parser.add_argument("--section", default="results",
                        help="write the table between <!-- SECTION:begin --> and <!-- SECTION:end --> "
                             "(default: %(default)s)")
    parser.add_argument("--from-json", action="store_true", help="only redraw the table and plot from --json")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.json.read_text())
    else:
        torch.manual_seed(0)
        results = measure(args.model, _ints(args.constant), _ints(args.decreasing), args.val_size,
                          args.batch_size, args.timing_batch_size, args.rounds)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    print(table)
    plot(results, args.plot)
    write_markdown(args.markdown, table, args.section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
