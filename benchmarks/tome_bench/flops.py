"""FLOP accounting: the compute model of ALGORITHM.md and torch's FlopCounterMode.

Per block with ``N`` tokens entering, width ``D`` and ``r`` tokens merged away
between attention and MLP:

    attention(N) = 2 * (4 * N * D**2 + 2 * N**2 * D)
    mlp(N - r)   = 2 * 8 * (N - r) * D**2

The speed-up ceiling of a schedule is the ratio of the blocks' FLOPs without and
with merging: a merged model cannot run faster than its arithmetic shrinks
(unless the unmerged model is bound by something that scales worse than FLOPs).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import tome
from tome.utils import tokens_per_layer  # re-exported for the suite's modules

__all__ = ["tokens_per_layer", "block_flops", "ceiling", "counted_flops"]


def block_flops(counts: Sequence[int], width: int) -> float:
    """FLOPs of all blocks for one image, from :func:`tokens_per_layer` counts."""
    total = 0.0
    for n_in, n_out in zip(counts[:-1], counts[1:]):
        total += 2 * (4 * n_in * width**2 + 2 * n_in**2 * width)  # attention sees N tokens
        total += 2 * 8 * n_out * width**2  # MLP sees N - r tokens
    return total


def ceiling(model: nn.Module, schedule_spec, num_tokens: int) -> dict:
    """Compute-model speed-up ceiling of ``schedule_spec`` on a timm ViT.

    Args:
        model: A timm ``VisionTransformer`` (patched or not).
        schedule_spec: Anything ``tome.parse_r`` accepts.
        num_tokens: Tokens entering the first block.

    Returns:
        ``{"schedule", "tokens", "block_gflops_base", "block_gflops", "ceiling"}`` per image.
    """
    depth = len(model.blocks)
    schedule = tome.parse_r(depth, schedule_spec)
    protected = model.num_prefix_tokens
    width = model.embed_dim
    base = block_flops(tokens_per_layer(num_tokens, [0] * depth, protected), width)
    counts = tokens_per_layer(num_tokens, schedule, protected)
    merged = block_flops(counts, width)
    return {
        "schedule": schedule,
        "tokens": counts,
        "block_gflops_base": base / 1e9,
        "block_gflops": merged / 1e9,
        "ceiling": base / merged,
    }


def counted_flops(model: nn.Module, image_size: int, device: torch.device) -> float:
    """Whole-model FLOPs of one image as ``torch.utils.flop_counter.FlopCounterMode`` counts them.

    Counts matmuls, convolutions and attention (the merge's own gathers and
    scatters are not FLOPs in its book). Runs one forward at batch 1.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, image_size, image_size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


