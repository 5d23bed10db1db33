"""Throughput of unmerged vs merged timm ViTs, interleaved in one process."""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .flops import ceiling, counted_flops
from .models import Schedule, autocast, build_model, patched_twin, schedule_label
from .published import published_style
from .timing import Variant, summarize, time_variants

__all__ = ["run_group"]


class _OpLog(TorchDispatchMode):
    """Records the name of every aten op a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _sanity(base, patched, published_schedules, image_size, device) -> dict:
    """Checks before timing (fp32, batch 2).

    Max |difference| of logits between the patched model at r=0 and timm and
    between the published-style merge and the library's; and whether the
    patched model at r=0 dispatches exactly timm's sequence of aten ops (then
    anything it costs over timm is Python overhead).
    """
    x = torch.randn(2, 3, image_size, image_size, device=device)
    checks = {}
    with torch.inference_mode():
        reference = base(x)
        patched.r = 0
        checks["r=0 vs timm"] = (patched(x) - reference).abs().max().item()
        with _OpLog() as timm_ops:
            base(x)
        with _OpLog() as tome_ops:
            patched(x)
        checks["r=0 runs the same aten ops as timm"] = timm_ops.ops == tome_ops.ops
        for schedule in published_schedules:
            patched.r = schedule
            library = patched(x)
            with published_style():
                published = patched(x)
            checks[f"published-style vs library, {schedule_label(schedule)}"] = (published - library).abs().max().item()
    patched.r = 0
    return checks


def run_group(
    model_key: str,
    batch_size: int,
    precision: str,
    schedules: Sequence[Schedule],
    published_schedules: Sequence[Schedule],
    rounds: int,
    warmup: int,
    device: torch.device,
    count_flops: bool = True,
    control: bool = True,
    progress: Callable[[str], None] = print,
) -> List[dict]:
    """Time timm's model and the patched copy at each schedule, side by side.

    Args:
        model_key: Short model name (``vit_b16``) or a timm name.
        batch_size: Images per forward.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast).
        schedules: ToMe schedules to time (ints or ``(r, inflection)``).
        published_schedules: Schedules also timed with the published-style merge.
        rounds, warmup: Timed and untimed interleaved rounds.
        device: Where to run.
        count_flops: Also count whole-model FLOPs with FlopCounterMode (batch 1).
        control: Also time timm's model a second time in every round ("timm again"):
            its "speed-up" is the noise floor of the paired ratios.
        progress: Receives progress lines.

    Returns:
        One row (dict) per variant, the unmerged model first.
    """
    base, spec = build_model(model_key, device)
    patched = patched_twin(base)
    patch_h, patch_w = base.patch_embed.patch_size
    num_tokens = (spec.image_size // patch_h) * (spec.image_size // patch_w) + base.num_prefix_tokens
    checks = _sanity(base, patched, published_schedules, spec.image_size, device)
    progress("  sanity: " + ", ".join(f"{k}: {v:.2e}" if isinstance(v, float) else f"{k}: {v}" for k, v in checks.items()))

    x = torch.randn(batch_size, 3, spec.image_size, spec.image_size, device=device)

    def library(schedule: Schedule) -> Callable[[], object]:
        def forward():
            patched.r = schedule
            return patched(x)

        return forward


    variants = [Variant("timm", lambda: base(x), merges=False)]
    if control:
        variants.append(Variant("timm again", lambda: base(x), merges=False))
    variants += [Variant(f"tome {schedule_label(s)}", library(s)) for s in schedules]
    variants += [
        Variant(f"published {schedule_label(s)}", library(s), context=published_style) for s in published_schedules
    ]
    with torch.inference_mode(), autocast(precision, device):
        time_variants(variants, rounds, warmup, device, lambda line: progress("  " + line))
    stats = summarize(variants, batch_size)

    flops_base = counted_flops(base, spec.image_size, device) if count_flops else None
    rows = []
    for variant, schedule in zip(variants, [0] * (1 + control) + list(schedules) + list(published_schedules)):
        model_ceiling = ceiling(base, schedule, num_tokens)
        row = {
            "model": model_key,
            "timm_name": spec.timm_name,
            "image_size": spec.image_size,
            "batch": batch_size,
            "precision": precision,
            "variant": variant.label,
            "schedule": list(schedule) if isinstance(schedule, tuple) else schedule,
            "per_layer_r": model_ceiling["schedule"],
            "tokens": model_ceiling["tokens"],
            "block_gflops_per_image": model_ceiling["block_gflops"],
            "ceiling": model_ceiling["ceiling"],
            "sanity": checks if variant is variants[0] else None,
            **stats[variant.label],
        }
        row["efficiency"] = row["speedup"] / row["ceiling"]
        if count_flops:
            patched.r = schedule
            row["counted_gflops_per_image"] = counted_flops(patched, spec.image_size, device) / 1e9
            row["counted_flop_ratio"] = flops_base / 1e9 / row["counted_gflops_per_image"]
        rows.append(row)
    patched.r = 0
    return rows
