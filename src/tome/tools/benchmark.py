"""Throughput and FLOPs of a ToMe model: ``tome.utils.benchmark`` and ``tome bench``.

``benchmark`` is the original release's ``tome.utils.benchmark`` (kept in ``tome._benchmark``,
below the tools, with the timing core these measurements share).
``tome bench`` measures several r values on one model: throughput from rounds
interleaved across r values (so that slow drifts of the machine hit every r alike),
each timing repeating the forward for at least ``--min-time`` seconds; the speed-up
is the median of the per-round ratios to r=0, shown with its range, and flagged as
noisy when it exceeds the FLOP ceiling. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode``; also tokens left after the last block,
and peak memory on CUDA.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import tome
from tome._benchmark import autocast, benchmark, resolve_device, time_calls

from ._common import (
    SCHEDULE_HELP,
    Schedule,
    add_method_argument,
    expand_settings,
    format_table,
    non_negative_float,
    non_negative_int,
    parse_dtype,
    parse_schedules,
    positive_int,
    prepare_output_file,
    schedule_json,
    schedule_label,
    schedules_arg,
)
from ._denoisers import ratios_arg
from ._models import add_model_arguments, input_size_of, load_model_from_args, model_form
from ._timing import add_timings, count_call_flops, peak_memory_mib, speedup_stats, time_rounds

MIN_TIME = 0.3
"""Default least seconds of forwards behind one timing (``--min-time``)."""

__all__ = [
    "benchmark",
    "resolve_device",
    "count_flops",
    "count_call_flops",
    "time_interleaved",
    "time_rounds",
    "speedup_stats",
    "measure_schedules",
    "save_plot",
    "add_parser",
]


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward on ``x``, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Matrix products count 2 FLOPs per multiply-add (half of that is the "MACs"
    figure many papers call GFLOPs). Merging's own bookkeeping (scatter, gather,
    sort) is not counted; its similarity matmul is.
    """
    return count_call_flops(lambda: model(x))


def time_interleaved(
    model: nn.Module,
    x: torch.Tensor,
    schedules: Sequence[Schedule],
    *,
    rounds: int = 10,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    min_time: float = 0.0,
    methods: Optional[Sequence[Optional[str]]] = None,
) -> List[List[float]]:
    """Seconds per forward for each merge setting, measured round-robin.

    Each round times every setting once, in an order rotated from round to round, so
    slow changes of the machine (other jobs, clocks, heat) affect all settings alike:
    compare settings round by round
    (:func:`speedup_stats`) or take the median of each list. One measurement
    repeats the forward until it has run for at least ``min_time`` seconds (the
    number of repeats per setting is found before the timed rounds, by doubling),
    so a fast forward is not at the mercy of one scheduler tick.

    Args:
        model: A ToMe-patched model (``model.r`` is set for each setting and restored).
        x: ``(batch, channels, height, width)`` input on the model's device.
        schedules: Merge settings (anything ``model.r`` accepts).
        rounds: Timed rounds.
        warmup: Untimed rounds first (sizing the repeats for ``min_time`` adds untimed forwards).
        dtype: Autocast dtype (``torch.float32``: none).
        progress: Show a progress bar over the rounds (on a terminal only).
        min_time: Least seconds of forwards behind each measurement.
        methods: Merge method of each setting, parallel to ``schedules`` (None: the model's own).

    Returns:
        One list of ``rounds`` timings (seconds per forward) per setting.
    """
    _check_patched(model)
    if min_time < 0:
        raise ValueError(f"min_time must not be negative, got {min_time!r}")
    settings = list(zip(schedules, methods if methods is not None else [None] * len(schedules)))

    def run(index: int, count: int) -> float:
        with tome.merging(model, *settings[index]):
            return time_calls(lambda: model(x), x.device, count)

    with torch.inference_mode(), autocast(x.device, dtype):
        return time_rounds(run, len(settings), rounds=rounds, warmup=warmup, min_time=min_time, progress=progress)


def _check_patched(model: nn.Module) -> None:
    if not hasattr(model, "_tome_info"):
        raise TypeError(f"{type(model).__name__} is not patched for token merging; call tome.apply_patch(model) first")


def measure_schedules(
    model: nn.Module,
    schedules: Sequence[Schedule],
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    input_size: Optional[Sequence[int]] = None,
    rounds: int = 10,
    warmup: int = 2,
    progress: bool = False,
    min_time: float = 0.0,
    methods: Optional[Sequence[Optional[str]]] = None,
) -> List[Dict[str, Any]]:
    """Throughput, speed-up, FLOPs, tokens left and peak memory for each merge setting.

    Args:
        model: A ToMe-patched model; moved to ``device`` and put in eval mode.
        schedules: Merge settings; r=0 is measured as the baseline even if absent.
        batch_size: Images per timed forward.
        device: Where to run.
        dtype: Autocast dtype for the timed runs (FLOPs are counted in fp32).
        input_size: ``(channels, height, width)``; the model's own when None.
        rounds: Timed rounds (each round times every setting once).
        warmup: Untimed rounds.
        progress: Show progress bars (on a terminal only).
        min_time: Least seconds of forwards behind each timing (see :func:`time_interleaved`).
        methods: Merge method of each setting, parallel to ``schedules`` (None: the model's own).

    Returns:
        One dict per setting (r=0 first if it was added): ``r`` (JSON form),
        ``label``, ``method`` (as given, None for the model's own), ``schedule`` (r per layer), ``tokens_left``, ``images_per_s``
        and ``seconds_per_batch`` (medians over rounds), ``speedup`` (median over
        rounds of the per-round speed-up) with its range ``speedup_low`` /
        ``speedup_high``, ``gflops`` (per image), ``flops_ratio``, ``noisy`` (the
        speed-up exceeds the FLOP ceiling ``1 / flops_ratio``: the machine, not
        merging, made the difference) and ``peak_memory_mib`` (None off CUDA).
    """
    _check_patched(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    schedules = list(schedules)
    methods = list(methods) if methods is not None else [None] * len(schedules)
    if 0 not in schedules:
        schedules.insert(0, 0)
        methods.insert(0, None)
    model.eval().to(device)
    size = tuple(input_size) if input_size is not None else input_size_of(model)
    rows = _flop_rows(model, schedules, methods, torch.rand(1, *size, device=device))
    x = torch.rand(batch_size, *size, device=device)
    times = time_interleaved(model, x, schedules, rounds=rounds, warmup=warmup, dtype=dtype, progress=progress,
                             min_time=min_time, methods=methods)
    add_timings(rows, times, schedules.index(0), batch_size)
    for schedule, method, row in zip(schedules, methods, rows):
        row["peak_memory_mib"] = None
        if device.type == "cuda":
            with torch.inference_mode(), autocast(device, dtype), tome.merging(model, schedule, method):
                row["peak_memory_mib"] = peak_memory_mib(lambda: model(x), device)
    return rows


def _flop_rows(model: nn.Module, schedules: Sequence[Schedule], methods: Sequence[Optional[str]],
               single: torch.Tensor) -> List[Dict[str, Any]]:
    """One row per setting: its labels, per-layer r, tokens left and GFLOPs per image (on ``single``)."""
    rows = []
    for schedule, method in zip(schedules, methods):
        with tome.merging(model, schedule, method):
            flops = count_flops(model, single)
        report = tome.last_forward(model)
        rows.append({
            "r": schedule_json(schedule),
            "label": schedule_label(schedule),
            "method": method,
            "schedule": report.r,
            "tokens_left": report.tokens,
            "gflops": flops / 1e9,
        })
    return rows


def save_plot(rows: Sequence[Dict[str, Any]], path: Union[str, Path], title: str = "",
              xlabel: str = "r (tokens merged per layer)") -> Path:
    """Throughput and GFLOPs against the merge setting (each row's ``label``), side by side, as a PNG
    (1000 x 400 pixels).

    Uses matplotlib's Agg canvas directly, so no global backend is changed.

    Raises:
        ImportError: if matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'token-merging[plot]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    positions = list(range(len(rows)))
    labels = [row["label"] for row in rows]
    for index, (key, ylabel, color) in enumerate(
        (("images_per_s", "throughput (images/s)", "tab:blue"), ("gflops", "GFLOPs per image", "tab:orange"))
    ):
        axis = figure.add_subplot(1, 2, index + 1)
        values = [row[key] for row in rows]
        axis.plot(positions, values, marker="o", color=color)
        for position, row, value in zip(positions, rows, values):
            note = f"{row['speedup']:.2f}x" if key == "images_per_s" else f"{row['flops_ratio']:.2f}"
            axis.annotate(note, (position, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        axis.set_xticks(positions)
        axis.set_xticklabels(labels)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def print_rows(rows: Sequence[Dict[str, Any]]) -> None:
    """The ``tome bench`` / ``tome demo`` table, with a note under it for noisy rows."""
    with_memory = any(row.get("peak_memory_mib") is not None for row in rows)
    with_method = any(row.get("method") is not None for row in rows)
    headers = ["r", *(["method"] if with_method else []), "tokens left", "img/s", "speed-up", "range", "GFLOPs", "FLOPs ratio"] + (
        ["peak MiB"] if with_memory else [])
    table = []
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" + (" noisy" if row.get("noisy") else "")
        spread = f"{row['speedup_low']:.2f}-{row['speedup_high']:.2f}x" if "speedup_low" in row else "-"
        cells = [row["label"], *([row.get("method") or "-"] if with_method else []), row["tokens_left"], row["images_per_s"], speedup, spread, row["gflops"],
                 row["flops_ratio"]]
        if with_memory:
            cells.append(row["peak_memory_mib"])
        table.append(cells)
    print(format_table(headers, table))
    print("speed-up: median over rounds of the per-round ratio to r=0; range: lowest-highest round.")
    noisy = [row["label"] for row in rows if row.get("noisy")]
    if noisy:
        print(f"noisy (r = {', '.join(noisy)}): the speed-up exceeds 1 / FLOPs ratio, more than merging can give; "
              "the machine was busy. Rerun with more --runs or --min-time, on a quieter machine.", flush=True)


def default_batch_size(device: torch.device) -> int:
    """64 on CUDA (as in the paper's V100 numbers), 8 on CPU."""
    return 64 if device.type == "cuda" else 8


def default_dtype(device: torch.device) -> str:
    """fp16 on CUDA (as in the paper), fp32 on CPU."""
    return "fp16" if device.type == "cuda" else "fp32"


DEFAULT_SCHEDULES = "0,8,13,16"
"""``-r`` of ``tome bench`` when none is given."""


def run_bench(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """``tome bench``: measure, print, and optionally write JSON and a plot."""
    diffusion = model_form(args.model) == "diffusers"
    if diffusion and args.r is not None:
        raise ValueError(f"--model {args.model!r} merges a fraction of each level's tokens: pass --ratio (e.g. "
                         "--ratio 0.5, or several: --ratio 0.3,0.5), not -r, which counts tokens per block")
    if not diffusion and args.ratio is not None:
        raise ValueError("--ratio is the merge setting of diffusers:FOLDER models; for "
                         f"--model {args.model or 'shapes-long'!r} give -r (e.g. -r 0,8,16)")
    # Output paths are checked before minutes of measuring, not after.
    json_path = prepare_output_file(args.json, "--json") if args.json else None
    plot_path = prepare_output_file(args.plot, "--plot") if args.plot else None
    device = resolve_device(args.device)
    dtype_name = args.dtype or default_dtype(device)
    loaded = load_model_from_args(args, forms=("timm", "shipped", "hf", "diffusers"))
    model = loaded.patch()
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"Model: {loaded.description}")
    if diffusion:
        rows, report = _bench_ratios(model, args, device, dtype_name, threads)
    else:
        rows, report = _bench_schedules(model, args, device, dtype_name, threads)
    print("FLOPs: torch FlopCounterMode, 2 per multiply-add.")
    if json_path is not None:
        report = {"model": loaded.description, "device": str(device), "dtype": dtype_name, **report,
                  "rounds": args.runs, "min_time": args.min_time, "torch": torch.__version__, "results": rows}
        json_path.write_text(json.dumps(report, indent=2))
        print(f"Wrote {json_path}")
    if plot_path is not None:
        xlabel = "ratio (fraction of tokens merged)" if diffusion else "r (tokens merged per layer)"
        print(f"Wrote {save_plot(rows, plot_path, title=loaded.description, xlabel=xlabel)}")
    return rows


def _bench_schedules(model: nn.Module, args: argparse.Namespace, device: torch.device, dtype_name: str,
                     threads: str) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """``tome bench`` of an encoder or classifier at each ``-r`` schedule (and ``--method``)."""
    batch_size = args.batch_size or default_batch_size(device)
    size = input_size_of(model)
    print(f"Device: {device}{threads}, {dtype_name}, batch {batch_size} x {size}, {args.runs} interleaved rounds "
          f"of at least {args.min_time:g} s per r", flush=True)
    schedules, methods = expand_settings(args.r if args.r is not None else parse_schedules(DEFAULT_SCHEDULES),
                                         args.method)
    rows = measure_schedules(
        model, schedules, batch_size=batch_size, device=device, dtype=parse_dtype(dtype_name), rounds=args.runs,
        warmup=args.warmup, progress=True, min_time=args.min_time, methods=methods,
    )
    print_rows(rows)
    return rows, {"batch_size": batch_size, "input_size": list(size)}


def _bench_ratios(model: nn.Module, args: argparse.Namespace, device: torch.device, dtype_name: str,
                  threads: str) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """``tome bench`` of a diffusers denoiser at each ``--ratio``: one denoiser step per timing."""
    from ._denoisers import measure_ratios, print_ratio_rows

    if args.method != ["tome"]:
        raise ValueError(f"--method {','.join(args.method)}: diffusers models merge with ToMe for Stable Diffusion's "
                         "rule only; leave --method out")
    batch_size = args.batch_size or 2
    print(f"Device: {device}{threads}, {dtype_name}, one denoiser step on a batch of {batch_size}, {args.runs} "
          f"interleaved rounds of at least {args.min_time:g} s per ratio", flush=True)
    rows = measure_ratios(model, args.ratio or [0.5], batch_size=batch_size, device=device,
                          dtype=parse_dtype(dtype_name), rounds=args.runs, warmup=args.warmup, progress=True,
                          min_time=args.min_time)
    print_ratio_rows(rows)
    return rows, {"batch_size": batch_size}


def add_timing_arguments(parser: argparse.ArgumentParser, *, runs: int, what: str = "timed rounds") -> None:
    """``--runs`` and ``--min-time``, shared by ``tome bench``, ``tome demo`` and ``tome tune``."""
    parser.add_argument("--runs", type=positive_int, default=runs,
                        help=f"{what}; each round times every r once (default: %(default)s)")
    parser.add_argument("--min-time", type=non_negative_float, default=MIN_TIME, metavar="SECONDS",
                        help="repeat the forward until each timing covers this long (default: %(default)s)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome bench``."""
    parser = subparsers.add_parser(
        "bench",
        help="throughput, speed-up, GFLOPs, tokens left and memory for several r",
        description="Measure a model with token merging for several r values (timm, shipped and hf: models), "
        "or a diffusers denoiser for several merge ratios (--model diffusers:FOLDER --ratio 0.3,0.5).",
    )
    add_model_arguments(parser, diffusers=True)
    parser.add_argument("-r", "--r", type=schedules_arg, default=None,
                        help=f"{SCHEDULE_HELP} (default: {DEFAULT_SCHEDULES})")
    parser.add_argument("--ratio", type=ratios_arg, default=None, metavar="RATIOS",
                        help="for diffusers: models, instead of -r: fractions of each level's tokens merged away, "
                        "comma-separated, each in [0, 1); 0 is measured as the baseline (default: 0.5)")
    add_method_argument(parser, "each r > 0 is measured with each method, interleaved")
    parser.add_argument("--batch-size", type=positive_int,
                        help="images per forward (default: 64 on CUDA, 8 on CPU; diffusers: models 2)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="autocast dtype (default: fp16 on CUDA, fp32 on CPU)")
    add_timing_arguments(parser, runs=10)
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot throughput and GFLOPs against r")
    parser.set_defaults(func=run_bench)
