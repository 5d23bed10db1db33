"""Find the r that meets a speed or FLOPs target on this machine: ``tome tune``.

The FLOPs target is met by binary search over r with FLOPs counted by
``FlopCounterMode`` (cheap and exact). The speed-up target is met by binary search
over r with measured timings, each candidate timed interleaved with r=0 so that
both see the same machine state (each timing repeats the forward for at least
``--min-time`` seconds; the speed-up is the median of the per-round ratios). The smallest r that meets the target is
chosen: it merges least and so keeps the most accuracy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import tome

from ._common import (
    Schedule,
    add_method_argument,
    non_negative_int,
    parse_dtype,
    positive_int,
    prepare_output_file,
    schedule_json,
    schedule_label,
)
from ._models import add_model_arguments, input_size_of, load_model_from_args
from ._runtime import resolve_device
from .benchmark import (
    add_timing_arguments,
    count_flops,
    default_batch_size,
    default_dtype,
    speedup_stats,
    time_interleaved,
)

__all__ = ["TuneResult", "make_schedule", "max_useful_r", "tune_flops", "tune_speedup", "measure_speedup", "add_parser"]

SCHEDULE_KINDS = ("constant", "decreasing")


def make_schedule(r: int, kind: str) -> Schedule:
    """``r`` for a constant schedule, ``(r, -1.0)`` for the paper's decreasing one.

    Raises:
        ValueError: quoting an unknown ``kind``.
    """
    if kind == "constant":
        return r
    if kind == "decreasing":
        return (r, -1.0)
    raise ValueError(f"schedule kind {kind!r} is unknown; expected one of {list(SCHEDULE_KINDS)}")


@dataclass
class TuneResult:
    """The setting ``tome tune`` found.

    Attributes:
        r: Tokens per layer (the base r of the schedule).
        kind: ``"constant"`` or ``"decreasing"``.
        reached: Whether the target was met (else this is the most merging possible).
        flops_ratio: FLOPs relative to r=0.
        speedup: Measured speed-up over r=0 on this machine.
        tokens_left: Tokens after the last block.
    """

    r: int
    kind: str
    reached: bool
    flops_ratio: float
    speedup: Optional[float] = None
    tokens_left: Optional[int] = None
    method: str = "tome"

    @property
    def schedule(self) -> Schedule:
        """What to pass as ``r`` to ``tome.apply_patch`` / ``model.r``."""
        return make_schedule(self.r, self.kind)

    def as_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["schedule"] = schedule_json(self.schedule)
        return data


def _token_geometry(model: nn.Module, x: torch.Tensor) -> Tuple[int, int, int]:
    """``(tokens, protected tokens, depth)`` from one forward at r=0."""
    with tome.merging(model, 0), torch.inference_mode():
        model(x)
    report = tome.last_forward(model)
    return report.tokens, int(model._tome_info["protected_tokens"]), len(report.r)


def max_useful_r(num_tokens: int, protected_tokens: int, depth: int, kind: str) -> int:
    """The smallest r beyond which a larger r merges nothing more (every layer is capped)."""

    def total(r: int) -> int:
        return sum(tome.utils.tokens_per_layer(num_tokens, tome.parse_r(depth, make_schedule(r, kind)), protected_tokens))

    floor = total(2 * num_tokens)
    lo, hi = 0, 2 * num_tokens  # total(lo) > floor unless nothing can merge; total(hi) == floor
    if total(lo) == floor:
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(mid) == floor:
            hi = mid
        else:
            lo = mid
    return hi


def _search(predicate: Callable[[int], bool], hi: int) -> int:
    """Smallest r in [1, hi] with ``predicate(r)``, given ``predicate(hi)`` holds and r=0 fails."""
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if predicate(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _flops_ratio(model: nn.Module, x: torch.Tensor, schedule: Schedule, base: int) -> Tuple[float, int]:
    with tome.merging(model, schedule):
        flops = count_flops(model, x)
    return flops / base, tome.last_forward(model).tokens


def tune_flops(
    model: nn.Module,
    max_flops_ratio: float,
    *,
    kind: str = "constant",
    device: torch.device = torch.device("cpu"),
    input_size: Optional[Sequence[int]] = None,
    verbose: bool = False,
) -> TuneResult:
    """Smallest r whose FLOPs are at most ``max_flops_ratio`` of r=0's.

    Args:
        model: A ToMe-patched model (``model.r`` is restored afterwards).
        max_flops_ratio: Target in (0, 1).
        kind: ``"constant"`` or ``"decreasing"`` schedule.
        device: Where to count.
        input_size: ``(channels, height, width)``; the model's own when None.
        verbose: Print each probe.

    Raises:
        ValueError: if the ratio is outside (0, 1) or ``kind`` is unknown.
    """
    if not 0 < max_flops_ratio < 1:
        raise ValueError(f"max_flops_ratio must lie in (0, 1), got {max_flops_ratio!r}")
    make_schedule(0, kind)
    model.eval().to(device)
    x = torch.rand(1, *(input_size or input_size_of(model)), device=device)
    base = _flops_at(model, x, 0)
    tokens, protected, depth = _token_geometry(model, x)
    hi = max_useful_r(tokens, protected, depth, kind)
    cache: Dict[int, Tuple[float, int]] = {}

    def ratio(r: int) -> Tuple[float, int]:
        if r not in cache:
            cache[r] = _flops_ratio(model, x, make_schedule(r, kind), base)
            if verbose:
                print(f"  r={schedule_label(make_schedule(r, kind))}: FLOPs ratio {cache[r][0]:.3f}")
        return cache[r]

    reached = hi > 0 and ratio(hi)[0] <= max_flops_ratio
    best = _search(lambda r: ratio(r)[0] <= max_flops_ratio, hi) if reached else hi
    flops_ratio, tokens_left = ratio(best)
    return TuneResult(best, kind, reached, flops_ratio, tokens_left=tokens_left)


def _flops_at(model: nn.Module, x: torch.Tensor, schedule: Schedule) -> int:
    with tome.merging(model, schedule):
        return count_flops(model, x)


def measure_speedup(
    model: nn.Module, x: torch.Tensor, schedule: Schedule, *, rounds: int = 5, warmup: int = 1,
    dtype: torch.dtype = torch.float32, min_time: float = 0.0,
) -> float:
    """Speed-up of ``schedule`` over r=0 on ``x``: the median of per-round ratios, timed interleaved.

    Each timing repeats the forward for at least ``min_time`` seconds (see
    :func:`tome.tools.benchmark.time_interleaved`).
    """
    times = time_interleaved(model, x, [0, schedule], rounds=rounds, warmup=warmup, dtype=dtype, min_time=min_time)
    return speedup_stats(times)[1][0]


def tune_speedup(
    model: nn.Module,
    target_speedup: float,
    *,
    kind: str = "constant",
    device: torch.device = torch.device("cpu"),
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    rounds: int = 5,
    warmup: int = 1,
    input_size: Optional[Sequence[int]] = None,
    verbose: bool = False,
    min_time: float = 0.0,
) -> TuneResult:
    """Smallest r whose measured speed-up over r=0 reaches ``target_speedup``.

    Args:
        model: A ToMe-patched model (``model.r`` is restored afterwards).
        target_speedup: Target above 1 (e.g. 2.0).
        kind: ``"constant"`` or ``"decreasing"`` schedule.
        device: Where to measure.
        batch_size: Images per timed forward.
        dtype: Autocast dtype.
        rounds: Timed rounds per candidate (each interleaves r=0 and the candidate).
        warmup: Untimed rounds per candidate.
        input_size: ``(channels, height, width)``; the model's own when None.
        verbose: Print each probe.
        min_time: Least seconds of forwards behind each timing.

    Raises:
        ValueError: if the target is not above 1 or ``kind`` is unknown.
    """
    if not target_speedup > 1:
        raise ValueError(f"target_speedup must be above 1, got {target_speedup!r}")
    make_schedule(0, kind)
    model.eval().to(device)
    size = tuple(input_size or input_size_of(model))
    single = torch.rand(1, *size, device=device)
    tokens, protected, depth = _token_geometry(model, single)
    hi = max_useful_r(tokens, protected, depth, kind)
    x = torch.rand(batch_size, *size, device=device)
    cache: Dict[int, float] = {}

    def speedup(r: int) -> float:
        if r not in cache:
            cache[r] = measure_speedup(model, x, make_schedule(r, kind), rounds=rounds, warmup=warmup, dtype=dtype,
                                       min_time=min_time)
            if verbose:
                print(f"  r={schedule_label(make_schedule(r, kind))}: {cache[r]:.2f}x")
        return cache[r]

    reached = hi > 0 and speedup(hi) >= target_speedup
    best = _search(lambda r: speedup(r) >= target_speedup, hi) if reached else hi
    base = _flops_at(model, single, 0)
    ratio, left = _flops_ratio(model, single, make_schedule(best, kind), base)
    return TuneResult(best, kind, reached, ratio, speedup(best) if best > 0 else 1.0, left)


def run_tune(args: argparse.Namespace) -> TuneResult:
    """``tome tune``: search, print the setting and how to use it."""
    device = resolve_device(args.device)
    dtype_name = args.dtype or default_dtype(device)
    dtype = parse_dtype(dtype_name)
    batch_size = args.batch_size or default_batch_size(device)
    _check_targets(args)
    json_path = prepare_output_file(args.json, "--json") if args.json else None
    loaded = load_model_from_args(args)
    model = loaded.patch()
    print(f"Model: {loaded.description}")
    print(f"Device: {device}, {dtype_name}, batch {batch_size}, {args.schedule} schedule, {args.runs} interleaved "
          f"rounds of at least {args.min_time:g} s per candidate and r=0", flush=True)
    results = []
    for method in args.method:
        model.tome_method = method
        if len(args.method) > 1:
            print(f"Method {method}:")
        results.append(_tune_one(model, args, device=device, dtype=dtype, batch_size=batch_size))
        results[-1].method = method
    target = (f"FLOPs ratio <= {args.max_flops_ratio:g}" if args.max_flops_ratio is not None
              else f"speed-up >= {args.target_speedup:g}x")
    report: Dict[str, Any] = {"model": loaded.description, "device": str(device), "target": target}
    result = results[0]
    if args.data:
        result = _pick_by_accuracy(model, loaded, results, args, report, device=device, dtype=dtype,
                                   batch_size=batch_size)
    model.tome_method = result.method
    _print_result(result, target, args, device)
    report.update(result.as_dict())
    if len(results) > 1:
        report["methods"] = [candidate.as_dict() for candidate in results]
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))
        print(f"Wrote {json_path}")
    if not result.reached:
        raise SystemExit(1)
    return result


def _check_targets(args: argparse.Namespace) -> None:
    """Refuse targets that cannot be met in principle, before loading anything."""
    if args.max_flops_ratio is not None and not 0 < args.max_flops_ratio < 1:
        raise ValueError(f"--max-flops-ratio must lie in (0, 1), got {args.max_flops_ratio!r}")
    if args.target_speedup is not None and not args.target_speedup > 1:
        raise ValueError(f"--target-speedup must be above 1, got {args.target_speedup!r}")
    if len(args.method) > 1 and not args.data:
        raise ValueError(f"--method {','.join(args.method)}: picking among several methods needs --data "
                         "(accuracy decides; their FLOPs at one r are the same)")


def _pick_by_accuracy(model: nn.Module, loaded: Any, results: List[TuneResult], args: argparse.Namespace,
                      report: Dict[str, Any], *, device: torch.device, dtype: torch.dtype,
                      batch_size: int) -> TuneResult:
    """Evaluate r=0 and each method's result on ``--data`` (into ``report``); the method to use.

    Among the methods meeting the target, the best top-1 (the earlier listed wins ties).
    """
    from .evaluate import evaluate, image_folder, print_report

    dataset = image_folder(args.data, model, loaded.data_overrides)
    schedules: List[Schedule] = [0] + [result.schedule for result in results if result.r]
    methods: List[Optional[str]] = [None] + [result.method for result in results if result.r]
    eval_report = evaluate(model, dataset, schedules, batch_size=batch_size, workers=args.workers,
                           device=device, dtype=dtype, methods=methods)
    print_report(eval_report)
    report["accuracy"] = eval_report.as_dict()
    top1 = {result.method: result.top1 for result in eval_report.results[1:]}
    return sorted(results, key=lambda result: (not result.reached, -top1.get(result.method, float("-inf"))))[0]


def _print_result(result: TuneResult, target: str, args: argparse.Namespace, device: torch.device) -> None:
    """The setting found, whether it meets the target, and how to use it."""
    label = repr(result.schedule)
    status = "meets" if result.reached else "CANNOT meet"
    method_note = f" with method {result.method}" if len(args.method) > 1 or result.method != "tome" else ""
    print(
        f"r={label}{method_note} {status} the target ({target}): measured speed-up {result.speedup:.2f}x, "
        f"FLOPs ratio {result.flops_ratio:.3f}, {result.tokens_left} tokens left, on {device}"
    )
    if result.reached:
        method_arg = f", method={result.method!r}" if result.method != "tome" else ""
        cli_method = f" --method {result.method}" if result.method != "tome" else ""
        print(f"Use it: tome.apply_patch(model, r={label}{method_arg})   or: --r {schedule_label(result.schedule)}"
              f"{cli_method}")
    else:
        print(f"That is the most merging this model allows ({args.schedule} schedule); relax the target.")


def _tune_one(model: nn.Module, args: argparse.Namespace, *, device: torch.device, dtype: torch.dtype,
              batch_size: int) -> TuneResult:
    """The search of ``tome tune`` for the model's current merge method."""
    if args.max_flops_ratio is not None:
        print(f"Searching the smallest r with FLOPs <= {args.max_flops_ratio:g} x r=0 ...")
        result = tune_flops(model, args.max_flops_ratio, kind=args.schedule, device=device, verbose=True)
        x = torch.rand(batch_size, *input_size_of(model), device=device)
        result.speedup = (measure_speedup(model, x, result.schedule, rounds=args.runs, dtype=dtype,
                                          min_time=args.min_time) if result.r else 1.0)
        return result
    print(f"Searching the smallest r with a measured speed-up >= {args.target_speedup:g}x ...")
    return tune_speedup(
        model, args.target_speedup, kind=args.schedule, device=device, batch_size=batch_size, dtype=dtype,
        rounds=args.runs, verbose=True, min_time=args.min_time,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome tune``."""
    parser = subparsers.add_parser(
        "tune",
        help="find the r that meets a speed-up or FLOPs target on this machine",
        description="Binary-search r for a target: measured speed-up (--target-speedup) or counted FLOPs "
        "(--max-flops-ratio). Exits with status 1 if the target cannot be met.",
    )
    add_model_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-speedup", type=float, metavar="X", help="wanted speed-up over r=0, e.g. 2.0")
    target.add_argument("--max-flops-ratio", type=float, metavar="F", help="FLOPs at most F times r=0's, e.g. 0.5")
    parser.add_argument("--schedule", choices=SCHEDULE_KINDS, default="constant",
                        help="constant r, or the paper's decreasing schedule (r, -1.0) (default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--batch-size", type=positive_int, help="images per timed forward (default: 64 on CUDA, 8 on CPU)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="autocast dtype (default: fp16 on CUDA, fp32 on CPU)")
    add_timing_arguments(parser, runs=5, what="timed rounds per candidate r (each also times r=0)")
    add_method_argument(parser, "with several, the r is searched for each and, with --data, the method with the "
                        "best top-1 at its r is picked (several need --data)")
    parser.add_argument("--data", help="image folder: also report accuracy at r=0 and at the r found")
    parser.add_argument("--workers", type=non_negative_int, default=2,
                        help="data loading processes with --data (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="write the result as JSON")
    parser.set_defaults(func=run_tune)
