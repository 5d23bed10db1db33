"""``tome demo``: a short offline tour of what ToMe does to a Vision Transformer."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Sequence

import torch
from torch import nn

import tome

__all__ = ["run_demo", "add_parser"]

DEFAULT_MODEL = "vit_small_patch16_224"


def _time_interleaved(model: nn.Module, x: torch.Tensor, schedules: Sequence[int], rounds: int) -> List[float]:
    """Median seconds per batch for each r, measured round-robin so noise hits all alike."""
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
    return [statistics.median(t) for t in times]


def run_demo(model_name: str = DEFAULT_MODEL, schedules: Sequence[int] = (0, 8, 13, 16), batch_size: int = 8,
             rounds: int = 5, pretrained: bool = False) -> List[dict]:
    """Patch a ViT, then print throughput and token counts for several r.

    Returns:
        One dict per r with keys ``r``, ``tokens``, ``images_per_s``, ``speedup``.
    """
    import timm

    torch.manual_seed(0)
    weights = "random weights"
    if pretrained:
        try:
            model = timm.create_model(model_name, pretrained=True)
            weights = "pretrained weights"
        except Exception as error:  # offline, or no weights for this name
            print(f"Could not fetch pretrained weights for {model_name} ({type(error).__name__}); using random weights.")
            model = timm.create_model(model_name, pretrained=False)
    else:
        model = timm.create_model(model_name, pretrained=False)
    model.eval()
    tome.apply_patch(model)
    cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.rand(batch_size, *cfg)
    print(f"Model: {model_name} ({weights}; timings do not depend on the weights)")
    print(f"Input: batch {batch_size} x {tuple(cfg)}, {torch.get_num_threads()} CPU threads, median of {rounds} interleaved runs")
    seconds = _time_interleaved(model, x, schedules, rounds)
    rows = []
    with torch.inference_mode():
        for r, sec in zip(schedules, seconds):
            model.r = r
            model(x)
            tokens = model._tome_info["size"].shape[1]
            rows.append({"r": r, "tokens": tokens, "images_per_s": batch_size / sec, "speedup": seconds[0] / sec})
    print(f"{'r':>4} {'tokens left':>12} {'img/s':>9} {'speed-up':>9}")
    for row in rows:
        print(f"{row['r']:>4} {row['tokens']:>12} {row['images_per_s']:>9.1f} {row['speedup']:>8.2f}x")
    return rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="offline tour: throughput and tokens left for a few r")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="timm model name (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pretrained", action="store_true", help="try to download pretrained weights")
    parser.set_defaults(func=lambda args: run_demo(args.model, batch_size=args.batch_size, pretrained=args.pretrained))
