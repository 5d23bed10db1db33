"""Timing several merge settings fairly: interleaved rounds, per-round speed-ups, FLOPs, memory.

The measuring core of ``tome bench``, ``tome demo``, ``tome tune``, ``tome export`` and the
diffusion bench (:mod:`tome.tools._denoisers`); one call is timed by
:func:`tome._benchmark.time_calls`, below the tools.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from ._common import progress_bar

__all__ = ["time_rounds", "speedup_stats", "add_timings", "peak_memory_mib", "count_call_flops"]


def time_rounds(run: Callable[[int, int], float], settings: int, *, rounds: int, warmup: int, min_time: float,
                progress: bool = False) -> List[List[float]]:
    """Seconds per call of each of ``settings`` settings, measured round-robin (see :func:`time_interleaved`).

    Args:
        run: ``run(setting index, count)`` makes ``count`` calls at that setting and returns their seconds.
        settings: How many settings there are.
        rounds: Timed rounds; each times every setting once.
        warmup: Untimed rounds first.
        min_time: Least seconds behind each timing: the calls per timing are doubled until a
            timing lasts this long, before the timed rounds.
        progress: Show a progress bar over the rounds (on a terminal only).

    Returns:
        One list of ``rounds`` timings (seconds per call) per setting.
    """
    times: List[List[float]] = [[] for _ in range(settings)]
    repeats = [1] * settings
    for _ in range(warmup):
        for i in range(settings):
            run(i, 1)
    if min_time > 0:
        # Double the calls until they last min_time: that many stand behind each timing.
        for i in range(settings):
            while run(i, repeats[i]) < min_time:
                repeats[i] *= 2
    for round_index in progress_bar(range(rounds), enabled=progress, desc="timing", unit="round", leave=False):
        # Rotate which setting goes first, so none always runs just after the same neighbour.
        offset = round_index % settings
        for i in [*range(offset, settings), *range(offset)]:
            times[i].append(run(i, repeats[i]) / repeats[i])
    return times


def speedup_stats(times: Sequence[Sequence[float]], base: int = 0) -> List[Tuple[float, float, float]]:
    """``(median, lowest, highest)`` speed-up of each setting over setting ``base``, round by round.

    The speed-up of a round is ``base time / setting time`` within that round (both
    saw the same machine state); the median and the range are over rounds.

    Args:
        times: What :func:`time_interleaved` returns.
        base: Index of the reference setting (r=0).
    """
    stats = []
    for setting in times:
        ratios = [b / t for b, t in zip(times[base], setting)]
        stats.append((statistics.median(ratios), min(ratios), max(ratios)))
    return stats


def add_timings(rows: Sequence[Dict[str, Any]], times: Sequence[Sequence[float]], base: int, batch_size: int) -> None:
    """Fill each row's ``seconds_per_batch``, ``images_per_s``, ``speedup`` (with its range),
    ``flops_ratio`` and ``noisy`` from :func:`time_interleaved`'s ``times`` (``base``: the r=0 row)."""
    base_flops = rows[base]["gflops"]
    for row, seconds, (speedup, low, high) in zip(rows, times, speedup_stats(times, base)):
        median = statistics.median(seconds)
        row["seconds_per_batch"] = median
        row["images_per_s"] = batch_size / median
        row["speedup"], row["speedup_low"], row["speedup_high"] = speedup, low, high
        row["flops_ratio"] = row["gflops"] / base_flops if base_flops else float("nan")
        row["noisy"] = bool(row["flops_ratio"] > 0 and speedup > 1 / row["flops_ratio"])


def peak_memory_mib(call: Callable[[], Any], device: torch.device) -> float:
    """Peak CUDA memory of one ``call``, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def count_call_flops(call: Callable[[], Any]) -> int:
    """FLOPs of ``call()`` (any forward, e.g. with keyword inputs), counted as :func:`count_flops` does."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        call()
    return int(counter.get_total_flops())
