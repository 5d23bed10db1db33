"""Interleaved timing: every variant of a model is timed in the same rounds.

On a shared machine the speed of the same forward drifts by 2x within minutes.
Timing the unmerged model and each merged variant back to back inside one round,
rotating which goes first, and taking the median over rounds of the per-round
ratio ``t_unmerged / t_variant``, cancels most of that drift: both sides of every
ratio saw the same machine.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, Iterator, List, Sequence

import torch

from tome.patch import _shared

__all__ = ["Variant", "MergeTimer", "time_variants", "summarize", "synchronize"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MergeTimer:
    """Wall time spent in ToMe's own per-block work: matching, merging, attention bias.

    While active it wraps ``ToMeState.merge`` (bipartite matching, size-weighted
    merge, size and source bookkeeping) and ``ToMeState.attn_bias`` (the
    proportional-attention bias). The head-averaged keys used as the metric are
    computed inside the attention branch and are not included (one mean over
    heads, a few microseconds). On CUDA it synchronizes around each call, so use
    it on separate forwards there, not the timed ones.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def _wrap(self, fn: Callable) -> Callable:
        timer = self

        def wrapped(*args, **kwargs):
            synchronize(timer.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            synchronize(timer.device)
            timer.seconds += time.perf_counter() - start
            return out

        return wrapped

    @contextlib.contextmanager
    def active(self) -> Iterator["MergeTimer"]:
        merge, bias = _shared.ToMeState.merge, _shared.ToMeState.attn_bias
        _shared.ToMeState.merge = self._wrap(merge)  # type: ignore[method-assign]
        _shared.ToMeState.attn_bias = self._wrap(bias)  # type: ignore[method-assign]
        try:
            yield self
        finally:
            _shared.ToMeState.merge, _shared.ToMeState.attn_bias = merge, bias  # type: ignore[method-assign]


@dataclass
class Variant:
    """One thing to time: a label and a callable running one forward on the batch."""

    label: str
    forward: Callable[[], object]
    merges: bool = True  # whether ToMe's merge step runs (share of time is measured)
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around each forward, untimed
    times: List[float] = field(default_factory=list)
    merge_shares: List[float] = field(default_factory=list)  # fraction of each forward


def time_variants(
    variants: Sequence[Variant],
    rounds: int,
    warmup: int,
    device: torch.device,
    progress: Callable[[str], None] = lambda message: None,
) -> None:
    """Time every variant ``rounds`` times, interleaved, filling ``variant.times``.

    Args:
        variants: The first one is the reference (the unmerged model).
        rounds: Timed rounds; each round runs every variant once.
        warmup: Untimed rounds first.
        device: Where the forwards run (CUDA is synchronized around each).
        progress: Called with a line after each round.
    """
    inline_share = device.type != "cuda"
    for round_index in range(warmup + rounds):
        timed = round_index >= warmup
        # Rotate the order so no variant always runs right after the same neighbour.
        offset = round_index % len(variants)
        for variant in list(variants[offset:]) + list(variants[:offset]):
            timer = MergeTimer(device)
            context = timer.active() if (variant.merges and inline_share) else contextlib.nullcontext()
            with variant.context(), context:
                synchronize(device)
                start = time.perf_counter()
                variant.forward()
                synchronize(device)
                elapsed = time.perf_counter() - start
            if timed:
                variant.times.append(elapsed)
                if variant.merges and inline_share:
                    variant.merge_shares.append(timer.seconds / elapsed)
        if timed:
            progress(
                f"round {round_index - warmup + 1}/{rounds}: "
                + ", ".join(f"{v.label} {v.times[-1]:.3g}s" for v in variants)
            )
    if not inline_share:
        # Separate, synchronized forwards for the share of time spent merging.
        for variant in variants:
            if not variant.merges:
                continue
            for _ in range(max(3, rounds // 2)):
                timer = MergeTimer(device)
                with variant.context(), timer.active():
                    synchronize(device)
                    start = time.perf_counter()
                    variant.forward()
                    synchronize(device)
                    total = time.perf_counter() - start
                variant.merge_shares.append(timer.seconds / total)


def _quartiles(values: Sequence[float]) -> tuple:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(variants: Sequence[Variant], batch_size: int) -> Dict[str, dict]:
    """Per-variant medians and per-round ratios against the first (reference) variant."""
    reference = variants[0]
    out: Dict[str, dict] = {}
    for variant in variants:
        ratios = [t_ref / t for t_ref, t in zip(reference.times, variant.times)]
        median_time = statistics.median(variant.times)
        q1, q3 = _quartiles(ratios)
        out[variant.label] = {
            "times_s": variant.times,
            "median_s": median_time,
            "images_per_s": batch_size / median_time,
            "speedup": statistics.median(ratios),
            "speedup_q1": q1,
            "speedup_q3": q3,
            "speedup_of_medians": statistics.median(reference.times) / median_time,
            "merge_share": statistics.median(variant.merge_shares) if variant.merge_shares else None,
            "merge_shares": variant.merge_shares,
        }
    return out
