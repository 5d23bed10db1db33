"""Accuracy and speed of ToMe on the shipped model: regenerates docs/results.md's table and docs/results.png.

For every merge schedule (constant r, the paper's decreasing schedule ``(r, -1)``),
with proportional attention on and off, this measures on the generated shape task
(:mod:`tome.data`):

- top-1 accuracy on a fixed set of validation images, for each model given
  (``--model NAME=PATH``, e.g. the normally trained one and one fine-tuned with ToMe);
- the blocks' FLOPs relative to r = 0 (the compute model of ALGORITHM.md, from
  the token count each block sees);
- throughput (images/s, median of interleaved timing rounds, so that load from other
  processes hits every schedule alike).

Usage (the command docs/results.md records):

    uv run python benchmarks/results.py \\
        --model "off the shelf=src/tome/assets/tome_shapes_vit.safetensors" \\
        --model "fine-tuned with ToMe=outputs/shapes-tome/model.safetensors" \\
        --val-size 2000 --json docs/results.json --plot docs/results.png --markdown docs/results.md

The table is written between the ``<!-- results:begin -->`` and ``<!-- results:end -->``
markers of the Markdown file; the rest of that file is left alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import tome
from tome._schedule import RSchedule
from tome.data import SyntheticShapes
from tome.tools.train import evaluate, load_model
from tome.utils import parse_r, tokens_per_layer


def markers(section: str) -> Tuple[str, str]:
    """The Markdown comments that enclose the table of ``section`` (``"results"``: docs/results.md's main table)."""
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"




def block_flops(num_tokens: int, depth: int, dim: int, mlp_ratio: float, schedule: Sequence[int],
                protected_tokens: int = 1) -> float:
    """FLOPs of the transformer blocks for one image (attention on N_in tokens, MLP on N_out).

    Per block with width D: attention 2 * (4 N D^2 + 2 N^2 D), MLP 2 * (2 * mlp_ratio * N D^2).
    """
    counts = tokens_per_layer(num_tokens, list(schedule), protected_tokens)
    total = 0.0
    for n_in, n_out in zip(counts[:-1], counts[1:]):
        total += 2 * (4 * n_in * dim**2 + 2 * n_in**2 * dim) + 2 * (2 * mlp_ratio * n_out * dim**2)
    return total


def schedule_label(r: RSchedule) -> str:
    return f"({r[0]}, -1)" if isinstance(r, tuple) else str(r)


def time_schedules(model: torch.nn.Module, schedules: Sequence[RSchedule], input_size: Sequence[int],
                   batch_size: int, rounds: int) -> List[float]:
    """Images per second for each schedule: median over ``rounds`` interleaved rounds."""
    x = torch.rand(batch_size, *input_size)
    times: List[List[float]] = [[] for _ in schedules]
    with torch.inference_mode():
        for r in schedules:  # warm-up
            model.r = r
            model(x)
        for _ in range(rounds):
            for i, r in enumerate(schedules):
                model.r = r
                start = time.perf_counter()
                model(x)
                times[i].append(time.perf_counter() - start)
    return [batch_size / statistics.median(t) for t in times]


def measure(models: Dict[str, Path], constant: Sequence[int], decreasing: Sequence[int], val_size: int,
            batch_size: int, rounds: int, prop_off_for: Sequence[str]) -> Dict[str, Any]:
    """Every measurement, as a JSON-ready dict."""
    loaded = {name: load_model(path) for name, path in models.items()}
    first_model, first_info = next(iter(loaded.values()))
    depth = len(first_model.blocks)
    dim = first_model.embed_dim
    mlp_ratio = first_model.blocks[0].mlp.fc1.out_features / dim
    num_tokens = first_model.patch_embed.num_patches + first_model.num_prefix_tokens
    input_size = tuple(first_model.pretrained_cfg["input_size"])
    schedules: List[RSchedule] = [0, *constant, *[(r, -1.0) for r in decreasing]]

    base_flops = block_flops(num_tokens, depth, dim, mlp_ratio, parse_r(depth, 0), first_model.num_prefix_tokens)
    rows: List[Dict[str, Any]] = []
    for r in schedules:
        per_layer = parse_r(depth, r)
        counts = tokens_per_layer(num_tokens, per_layer, first_model.num_prefix_tokens)
        flops = block_flops(num_tokens, depth, dim, mlp_ratio, per_layer, first_model.num_prefix_tokens)
        rows.append({"r": list(r) if isinstance(r, tuple) else r, "label": schedule_label(r),
                     "kind": "decreasing" if isinstance(r, tuple) else "constant", "per_layer": per_layer,
                     "tokens": counts, "flops_ratio": flops / base_flops, "accuracy": {}})

    print(f"timing {len(schedules)} schedules, batch {batch_size}, {rounds} rounds, "
          f"{torch.get_num_threads()} threads", flush=True)
    timing_model, _ = load_model(models[next(iter(models))])
    tome.apply_patch(timing_model, prop_attn=True)
    for row, speed in zip(rows, time_schedules(timing_model, schedules, input_size, batch_size, rounds)):
        row["images_per_s"] = speed

    data_seed = first_info["training"]["data_seed"]
    val = SyntheticShapes("val", length=val_size, seed=data_seed, image_size=input_size[-1])
    for name, (model, _) in loaded.items():
        tome.apply_patch(model)
        for prop_attn in (True, False):
            if not prop_attn and name not in prop_off_for:
                continue
            model._tome_info["prop_attn"] = prop_attn
            for row, r in zip(rows, schedules):
                if r == 0 and not prop_attn:  # identical to prop_attn on: nothing is merged
                    row["accuracy"][f"{name}|off"] = row["accuracy"][f"{name}|on"]
                    continue
                model.r = r
                start = time.perf_counter()
                accuracy = evaluate(model, val, batch_size=250)
                row["accuracy"][f"{name}|{'on' if prop_attn else 'off'}"] = accuracy
                print(f"{name:>24} prop_attn={'on ' if prop_attn else 'off'} r={row['label']:>8}: "
                      f"{100 * accuracy:6.2f}%  ({time.perf_counter() - start:.0f}s)", flush=True)
    return {
        "models": {name: str(path) for name, path in models.items()},
        "val_images": val_size,
        "data_seed": data_seed,
        "architecture": {"name": first_info["architecture"], **first_info["model_kwargs"],
                         "image_size": input_size[-1], "tokens": num_tokens},
        "threads": torch.get_num_threads(),
        "timing_batch_size": batch_size,
        "rows": rows,
    }


def markdown_table(results: Dict[str, Any]) -> str:
    """The results as a Markdown table, plus the headline comparison at half the FLOPs."""
    names = list(results["models"])
    columns = [f"{name}|on" for name in names] + [
        f"{name}|off" for name in names if any(f"{name}|off" in row["accuracy"] for row in results["rows"])
    ]
    header = ["schedule", "r per layer", "tokens left", "block FLOPs", "img/s"] + [
        f"{c.split('|')[0]}, prop_attn {c.split('|')[1]}" for c in columns
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = results["rows"][0]
    for row in results["rows"]:
        cells = [row["label"], " ".join(map(str, row["per_layer"])), str(row["tokens"][-1]),
                 f"{100 * row['flops_ratio']:.0f}%", f"{row['images_per_s']:.0f}"]
        for column in columns:
            value = row["accuracy"].get(column)
            if value is None:
                cells.append("")
                continue
            delta = 100 * (value - base["accuracy"][f"{names[0]}|on"])
            cells.append(f"{100 * value:.2f}" + ("" if row is base and column.startswith(names[0]) else f" ({delta:+.2f})"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Accuracy in % on the first {results['val_images']} validation images of "
                 f"`SyntheticShapes(seed={results['data_seed']})`; in brackets the change against "
                 f"**{names[0]}** at r = 0. Block FLOPs relative to r = 0; img/s: batch "
                 f"{results['timing_batch_size']}, {results['threads']} CPU threads, median of interleaved rounds.")
    half = min((row for row in results["rows"] if row["kind"] == "constant" and row["r"] != 0),
               key=lambda row: abs(row["flops_ratio"] - 0.5))
    lines.append("")
    lines.append(f"Where the blocks' FLOPs halve (constant r = {half['label']}, {100 * half['flops_ratio']:.0f}% of the "
                 f"FLOPs, {half['images_per_s'] / base['images_per_s']:.2f}x the throughput):")
    reference = base["accuracy"][f"{names[0]}|on"]
    for name in names:
        value = half["accuracy"][f"{name}|on"]
        lines.append(f"- {name}: {100 * value:.2f}% ({100 * (value - reference):+.2f} points against "
                     f"{names[0]} at r = 0; its own r = 0 accuracy {100 * base['accuracy'][f'{name}|on']:.2f}%)")
    return "\n".join(lines)


def plot(results: Dict[str, Any], path: Path) -> None:
    """Accuracy against block FLOPs and against throughput, one line per model / schedule kind / prop_attn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = list(results["models"])
    colours = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for index, name in enumerate(names):
        for prop in ("on", "off"):
            key = f"{name}|{prop}"
            for kind, marker in (("constant", "o"), ("decreasing", "s")):
                points = [row for row in rows if key in row["accuracy"] and (row["kind"] == kind or row["r"] == 0)]
                if len(points) < 2:
                    continue
                points.sort(key=lambda row: -row["flops_ratio"])
                style = dict(color=colours[index % len(colours)], marker=marker,
                             linestyle="-" if prop == "on" else ":", markersize=4,
                             label=f"{name}, {kind} r, prop_attn {prop}")
                acc = [100 * row["accuracy"][key] for row in points]
                axes[0].plot([100 * row["flops_ratio"] for row in points], acc, **style)
                axes[1].plot([row["images_per_s"] for row in points], acc, **style)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].axvline(50, color="grey", linewidth=0.8, linestyle="--")
    axes[0].invert_xaxis()
    axes[0].set_xlabel("transformer-block FLOPs, % of r = 0")
    axes[1].set_xlabel(f"throughput, images/s (CPU, {results['threads']} threads, batch {results['timing_batch_size']})")
    axes[0].set_ylabel(f"top-1 accuracy, % ({results['val_images']} val images)")
    arch = results["architecture"]
    fig.suptitle(f"ToMe on a ViT ({arch['embed_dim'] if 'embed_dim' in arch else ''} wide, depth {arch.get('depth')}, "
                 f"{arch['tokens']} tokens) trained on tome.data.SyntheticShapes")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_curves(models: Dict[str, Path], path: Path) -> None:
    """Validation accuracy and training loss against images seen, from each model's training history.

    ``tome train`` stores one record per epoch in the model's description (the ``.json``
    beside its ``.safetensors``); a model trained for one epoch is one point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, model_path in models.items():
        _, info = load_model(model_path)
        history = info.get("history") or []
        if not history:
            raise ValueError(f"{model_path} has no training history in its description")
        batch = info["training"]["batch_size"]
        seen = [record["step"] * batch / 1000 for record in history]
        validated = [(n, 100 * r["val_accuracy"]) for n, r in zip(seen, history) if r["val_accuracy"] is not None]
        line, = acc_ax.plot(*zip(*validated), marker="o", label=name)
        loss_ax.plot(seen, [r["train_loss"] for r in history], marker="o", color=line.get_color(), label=name)
    acc_ax.set_ylabel("validation top-1, %")
    loss_ax.set_ylabel("training loss (epoch mean, label smoothing 0.1)")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("training images seen, thousands")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_markdown(path: Path, table: str, section: str = "results") -> None:
    begin, end = markers(section)
    text = path.read_text() if path.exists() else f"{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} markers for the table")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def _model_arg(text: str) -> Tuple[str, Path]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model {text!r} must be NAME=PATH (NAME without '=')")
    name, path = text.split("=", 1)
    return name, Path(path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", type=_model_arg, default=[],
                        help="NAME=PATH of a model saved by tome train; the first is the reference (repeatable)")
    parser.add_argument("--constant", default="2,4,6,8,10,12", help="constant r values (default: %(default)s)")
    parser.add_argument("--decreasing", default="2,4,6,8,10", help="r of (r, -1) schedules (default: %(default)s)")
    parser.add_argument("--prop-off-for", action="append", default=None,
                        help="models also measured with prop_attn off (default: the first)")
    parser.add_argument("--val-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64, help="timing batch size")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds")
    parser.add_argument("--json", type=Path, default=Path("docs/results.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/results.png"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--section", default="results",
                        help="write the table between <!-- SECTION:begin --> and <!-- SECTION:end --> "
                             "(default: %(default)s)")
    parser.add_argument("--curve", type=Path, default=None,
                        help="also plot each model's training curve (from its description) to this PNG")
    parser.add_argument("--from-json", action="store_true", help="only redraw the table and plot from --json")
    args = parser.parse_args(argv)
    models = dict(args.model)
    if not models and not args.from_json:
        parser.error("give at least one --model NAME=PATH (or --from-json)")
    if args.from_json:
        results = json.loads(args.json.read_text())
    else:
        torch.manual_seed(0)
        results = measure(models, [int(v) for v in args.constant.split(",") if v],
                          [int(v) for v in args.decreasing.split(",") if v], args.val_size, args.batch_size,
                          args.rounds, args.prop_off_for or [next(iter(models))])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    print(table)
    plot(results, args.plot)
    write_markdown(args.markdown, table, args.section)
    if args.curve is not None:
        plot_curves({name: Path(path) for name, path in results["models"].items()}, args.curve)
    return 0


if __name__ == "__main__":
    sys.exit(main())
