"""``tome demo``: a short offline tour of what ToMe does to a Vision Transformer.

Runs on the embedded default model (:func:`tome.tools.demo_model.load_demo_model`)
with no arguments and no network: a throughput table for a few r, and a picture
of the tokens merged in a procedurally drawn sample image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import tome

from ._common import (
    Schedule,
    non_negative_int,
    positive_int,
    prepare_output_dir,
    schedule_label,
)
from ._models import add_model_arguments, input_size_of, load_model, load_model_from_args
from ._runtime import resolve_device
from .benchmark import MIN_TIME, add_timing_arguments, measure_schedules, print_rows
from .sample_image import sample_image
from .visualize import render_merges

__all__ = ["run_demo", "demo_schedules", "add_parser"]

DEFAULT_OUTPUT_DIR = "tome_outputs"

DEMO_BATCH = 256
"""Images per timed forward. The demo model is small (64 patches of width 128): at batch 64
a forward lasted a few milliseconds, Python and thread scheduling set its time, and five
runs on a quiet machine gave 1.35-1.94x at the largest r. At 256 the matrix products set it."""

DEMO_RUNS = 7
"""Interleaved rounds; the speed-up shown is the median of the per-round ratios."""

DEMO_THREADS = 1
"""CPU threads for the timings. On a machine shared with other work, the threads of one
forward wait for each other whenever one is descheduled, and the merged model (more,
smaller operations) suffers more: on two busy cores the demo's largest r measured 0.87x
(0.61-1.25x over rounds) with two threads and 1.76x and 1.83x with one. Merging removes
arithmetic, so its speed-up does not need parallel threads to show."""


PAPER_SCHEDULES = (8, 13, 16)
"""The r values the paper shows for ViT-B/16 at 224 px: 196 patches, 12 blocks."""


def demo_schedules(num_tokens: int, protected_tokens: int, depth: int) -> List[int]:
    """r values worth showing: the paper's 0, 8, 13, 16, scaled to the model's patches and depth.

    Each of the paper's r for ViT-B/16 (196 patches, 12 blocks) is scaled so that it
    merges the same share of the patches over the whole network: ``r * (patches / 196)
    * (12 / depth)``. A 196-patch, 12-block model gets 0, 8, 13, 16 exactly; the
    64-patch, 6-block demo model gets 0, 5, 8, 10. No r is shown past the point where
    every layer is capped (more would merge nothing more).
    """
    from .tune import max_useful_r

    most = max_useful_r(num_tokens, protected_tokens, depth, "constant")
    patches = num_tokens - protected_tokens
    if most == 0 or depth == 0:
        return [0]
    scale = (patches / 196) * (12 / depth)
    return sorted({0, *(min(most, max(1, round(r * scale))) for r in PAPER_SCHEDULES)})


def _write_outputs(out: Path, model: Any, shown: Sequence[Schedule], report: Dict[str, Any]) -> Tuple[Path, Path]:
    """Write the merge picture for the schedules ``shown`` and the JSON ``report``; print where."""
    vis_path = out / "demo_merges.png"
    render_merges(sample_image(), model, shown).save(vis_path)
    json_path = out / "demo_benchmark.json"
    json_path.write_text(json.dumps(report, indent=2))
    print(f"Merged tokens of a sample image for r = {', '.join(schedule_label(s) for s in shown)}: {vis_path}")
    print(f"Benchmark results: {json_path}")
    return vis_path, json_path


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[int]:
    """Run the block with ``threads`` CPU threads (0: leave torch's setting); yields the
    number in use and restores the previous setting afterwards."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def run_demo(
    args: Optional[argparse.Namespace] = None,
    *,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    batch_size: int = DEMO_BATCH,
    rounds: int = DEMO_RUNS,
    min_time: float = MIN_TIME,
    threads: int = DEMO_THREADS,
) -> Dict[str, Any]:
    """Print a throughput table and write a visualisation of the merges.

    Args:
        args: Parsed ``tome demo`` arguments (model options, ``output_dir``,
            ``batch_size``, ``runs``, ``min_time``, ``threads``); None for the defaults.
        output_dir: Where the files go (when ``args`` is None).
        batch_size: Images per timed forward (when ``args`` is None).
        rounds: Timed rounds (when ``args`` is None).
        min_time: Least seconds behind each timing (when ``args`` is None).
        threads: CPU threads for the timings, 0 for torch's default (when ``args`` is None);
            the previous setting is restored afterwards.

    Returns:
        ``{"rows": benchmark rows, "visualization": path, "json": path}``.
    """
    if args is not None:
        output_dir, batch_size, rounds, min_time = args.output_dir, args.batch_size, args.runs, args.min_time
        threads = args.threads
    out = prepare_output_dir(output_dir, "--output-dir")
    if args is not None:
        loaded = load_model_from_args(args, default_to_demo=True)
    else:
        loaded = load_model(default_to_demo=True)
    torch.manual_seed(0)
    model = loaded.patch()
    device = resolve_device("cpu")
    size = input_size_of(model)

    # One forward to learn the token geometry, then pick r values that suit it.
    with torch.inference_mode(), tome.merging(model, 0):
        model(torch.rand(1, *size))
    report = tome.last_forward(model)
    depth = len(report.r)
    schedules: Sequence[Schedule] = demo_schedules(report.tokens, int(model._tome_info["protected_tokens"]), depth)

    with _threads(threads) as used:
        print(f"ToMe demo on {loaded.description}")
        print(f"Input {size[1]}x{size[2]}, batch {batch_size}, {used} CPU thread{'s' if used != 1 else ''}"
              f"{' (--threads)' if threads else ''}, {rounds} interleaved rounds of at least {min_time:g} s per r; "
              f"r = tokens merged away in each of {depth} blocks", flush=True)
        rows = measure_schedules(model, schedules, batch_size=batch_size, device=device, rounds=rounds, warmup=1,
                                 progress=True, min_time=min_time)
    print_rows(rows)

    shown = [s for s in schedules if s != 0] or [0]
    vis_path, json_path = _write_outputs(out, model, shown, {
        "model": loaded.description, "batch_size": batch_size, "input_size": list(size), "rounds": rounds,
        "min_time": min_time, "threads": used, "results": rows})
    print("Next: tome bench --model vit_base_patch16_224 | tome visualize IMAGE | tome eval --model NAME --data DIR "
          "| tome tune --model NAME --target-speedup 2")
    return {"rows": rows, "visualization": vis_path, "json": json_path}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="offline tour: throughput for a few r and a picture of the merged tokens",
        description="A short offline tour of token merging on the embedded demo model.",
    )
    add_model_arguments(parser, demo_default=True)
    parser.add_argument("-o", "--output-dir", default=DEFAULT_OUTPUT_DIR, help="where to write files (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=DEMO_BATCH,
                        help="images per timed forward (default: %(default)s)")
    add_timing_arguments(parser, runs=DEMO_RUNS)
    parser.add_argument("--threads", type=non_negative_int, default=DEMO_THREADS,
                        help="CPU threads for the timings, 0 for torch's default (default: %(default)s: steady "
                             "on a machine shared with other work)")
    parser.set_defaults(func=run_demo)
