"""Export a ToMe model to ONNX and measure it in onnxruntime: ``tome export``.

Writes the merging model (``--output``) and, beside it, the same model unmerged
(``NAME.r0.onnx``), both with a dynamic batch; runs both in onnxruntime on a batch of
generated shape-task images (:class:`tome.data.SyntheticShapes`), checks each against
the eager model per sample, and times them side by side (interleaved rounds, median
of the per-round ratios). ``--int8`` adds int8 copies of both (``NAME.int8.onnx``,
``NAME.r0.int8.onnx``) made by ``onnxruntime.quantization``, so the table shows what
merging adds on top of quantization. The FLOP ceiling (eager FLOPs at r=0 over
FLOPs at r) is printed beside each speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import tome
from tome.export import (
    DEFAULT_OPSET,
    INT8_MODES,
    Agreement,
    compare_outputs,
    export_onnx,
    main_output,
    onnx_session,
    quantize_onnx,
    run_onnx,
)

from ._common import (
    Schedule,
    format_table,
    non_negative_float,
    non_negative_int,
    positive_int,
    prepare_output_file,
    progress_bar,
    schedule_arg,
    schedule_label,
)
from ._models import add_model_arguments, input_size_of, load_model_from_args
from ._timing import speedup_stats, time_rounds
from .benchmark import count_flops

__all__ = ["ExportRow", "generated_images", "time_sessions", "export_and_measure", "add_parser"]


@dataclass
class ExportRow:
    """One exported file and how it ran.

    Attributes:
        label: ``"fp32 r=16"``, ``"int8 r=0"``, ...
        path: The ``.onnx`` file.
        schedule: The merge schedule it was exported with.
        int8: Whether it is quantized.
        seconds: Median seconds per batch.
        speedup: Median per-round speed-up over the first row (fp32, unmerged), with its range.
        speedup_same_precision: Median speed-up over the unmerged file of the same precision.
        flop_ceiling: Eager FLOPs at r=0 over FLOPs at this schedule.
        agreement: Per-sample agreement with the eager model.
    """

    label: str
    path: Path
    schedule: Schedule
    int8: bool
    seconds: float = float("nan")
    speedup: tuple = (float("nan"),) * 3
    speedup_same_precision: float = float("nan")
    flop_ceiling: float = float("nan")
    agreement: Optional[Agreement] = None


def generated_images(batch: int, size: Sequence[int], split: str = "val", seed: int = 0) -> torch.Tensor:
    """``(batch, channels, height, width)`` normalised images of the generated shape task.

    Square 3-channel sizes use :class:`tome.data.SyntheticShapes`; other sizes get
    seeded standard-normal noise.
    """
    channels, height, width = size
    if channels == 3 and height == width:
        from tome.data import SyntheticShapes

        data = SyntheticShapes(split, length=batch, seed=seed, image_size=height)
        return torch.stack([data[i][0] for i in range(batch)])
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


def time_sessions(
    sessions: Sequence[Any], x: torch.Tensor, *, rounds: int = 10, warmup: int = 1, min_time: float = 0.0,
    progress: bool = False,
) -> List[List[float]]:
    """Seconds per batch of each onnxruntime session, measured in interleaved rounds.

    Each round runs every session once (repeated until ``min_time`` seconds have
    passed; the repeat count is found before the timed rounds), so slow changes of
    the machine hit every session alike. Feed the result to
    :func:`tome.tools.benchmark.speedup_stats`.

    Returns:
        One list of ``rounds`` timings per session.
    """
    feeds = [{session.get_inputs()[0].name: x.numpy()} for session in sessions]

    def run(i: int, count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            sessions[i].run(None, feeds[i])
        return time.perf_counter() - start

    return time_rounds(run, len(sessions), rounds=rounds, warmup=warmup, min_time=min_time, progress=progress)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}{suffix}.onnx")


def export_and_measure(
    model: torch.nn.Module,
    schedule: Schedule,
    output: Path,
    *,
    input_size: Sequence[int],
    batch_size: int = 8,
    opset: int = DEFAULT_OPSET,
    int8: Optional[str] = None,
    calibration_batches: int = 4,
    rounds: int = 10,
    min_time: float = 0.0,
    threads: int = 0,
    progress: bool = False,
    optimize: bool = True,
) -> List[ExportRow]:
    """Export ``model`` merged (``schedule``) and unmerged, optionally int8, check and time them.

    Args:
        model: A ToMe-patched model in eval mode (``model.r`` is set here and restored).
        schedule: The merge schedule of the deployed file.
        output: The merged fp32 ``.onnx`` file; the others are written beside it.
        input_size: ``(channels, height, width)``, fixed in the files (the batch is free).
        batch_size: Images per timed batch and per agreement check.
        opset: ONNX opset.
        int8: ``"dynamic"`` or ``"static"`` to add int8 copies (see :func:`tome.export.quantize_onnx`).
        calibration_batches: Batches of generated training images for ``"static"``.
        rounds: Timed rounds.
        min_time: Least seconds behind each timing.
        threads: onnxruntime intra-op threads (0: its default).
        progress: Progress bars on a terminal.
        optimize: Run onnxscript's graph optimizer on the fp32 exports (see
            :func:`tome.export.export_onnx`).

    Returns:
        The rows: fp32 unmerged, fp32 merged, then (with ``int8``) int8 unmerged, int8 merged.

    Raises:
        ValueError: for an unknown ``int8`` mode.
    """
    if int8 is not None and int8 not in INT8_MODES:
        raise ValueError(f"int8={int8!r} is not an int8 mode; expected one of {INT8_MODES}")
    x = generated_images(batch_size, input_size)
    rows = _planned_rows(schedule, output, int8)
    calibration = ([generated_images(batch_size, input_size, "train", seed) for seed in range(calibration_batches)]
                   if int8 == "static" else None)
    eager, flops = _write_files(model, rows, x, opset=opset, int8=int8, calibration=calibration,
                                progress=progress, optimize=optimize)
    sessions = [onnx_session(row.path, threads=threads) for row in rows]
    for row, session in zip(rows, sessions):
        row.agreement = compare_outputs(eager[schedule_label(row.schedule)], run_onnx(session, x))
        row.flop_ceiling = flops["0"] / flops[schedule_label(row.schedule)]
    times = time_sessions(sessions, x, rounds=rounds, min_time=min_time, progress=progress)
    stats = speedup_stats(times, base=0)
    for i, row in enumerate(rows):
        row.seconds = statistics.median(times[i])
        row.speedup = stats[i]
        base = 2 if row.int8 else 0
        row.speedup_same_precision = statistics.median(b / t for b, t in zip(times[base], times[i]))
    return rows


def _planned_rows(schedule: Schedule, output: Path, int8: Optional[str]) -> List[ExportRow]:
    """The files to write: fp32 unmerged and merged, then (with ``int8``) their int8 copies."""
    rows = [ExportRow("fp32 r=0", _sibling(output, ".r0"), 0, False),
            ExportRow(f"fp32 r={schedule_label(schedule)}", output, schedule, False)]
    if int8 is not None:
        rows += [ExportRow(f"int8 r=0 ({int8})", _sibling(output, ".r0.int8"), 0, True),
                 ExportRow(f"int8 r={schedule_label(schedule)} ({int8})", _sibling(output, ".int8"), schedule, True)]
    return rows


def _write_files(model: torch.nn.Module, rows: Sequence[ExportRow], x: torch.Tensor, *, opset: int,
                 int8: Optional[str], calibration: Optional[List[torch.Tensor]], progress: bool,
                 optimize: bool) -> tuple:
    """Export (fp32) or quantize (int8) every row's file.

    Returns:
        ``(eager outputs, eager FLOPs)`` on ``x``, each by schedule label.
    """
    example = x[: min(2, x.shape[0])]
    eager: Dict[str, torch.Tensor] = {}
    flops: Dict[str, int] = {}
    for row in progress_bar(rows, enabled=progress, desc="exporting", unit="file", leave=False):
        key = schedule_label(row.schedule)
        with tome.merging(model, row.schedule):
            if key not in eager:
                with torch.no_grad():
                    eager[key] = main_output(model(x))  # what the file returns: logits, embeddings, ...
                flops[key] = count_flops(model, x)
            if row.int8:
                fp32 = next(r.path for r in rows if not r.int8 and r.schedule == row.schedule)
                quantize_onnx(fp32, row.path, mode=int8, calibration=calibration)
            else:
                export_onnx(model, example, row.path, opset=opset, optimize=optimize)
    return eager, flops


def print_rows(rows: Sequence[ExportRow], batch_size: int) -> None:
    """The ``tome export`` table."""
    table = []
    for row in rows:
        median, low, high = row.speedup
        agreement = row.agreement
        table.append([
            row.label,
            1000 * row.seconds,
            batch_size / row.seconds,
            f"{median:.2f}x ({low:.2f}-{high:.2f})",
            f"{row.speedup_same_precision:.2f}x",
            f"{row.flop_ceiling:.2f}x",
            f"{sum(agreement.same_top1)}/{len(agreement.same_top1)}" if agreement else "-",
            max(agreement.max_abs_diff) if agreement else None,
        ])
    print(format_table(["file", "ms/batch", "img/s", "speed-up vs fp32 r=0", "vs own r=0", "FLOP ceiling",
                        "top-1 = eager", "max |diff|"], table))


def run_export(args: argparse.Namespace) -> List[ExportRow]:
    """``tome export``: export, check, time, print."""
    output = prepare_output_file(args.output, "--output")
    if output.suffix != ".onnx":
        raise ValueError(f"--output {str(output)!r} must end in .onnx")
    loaded = load_model_from_args(args, default_to_demo=True)
    model = loaded.patch()
    schedule = args.r if args.r is not None else (loaded.default_r if loaded.default_r is not None else 16)
    size = input_size_of(model)
    if args.input_size is not None:
        native = size
        size = (size[0], *args.input_size) if len(args.input_size) == 2 else (size[0], args.input_size[0], args.input_size[0])
        _check_input_size(model, schedule, size, native)
    threads = args.threads or "onnxruntime's default"
    print(f"Model: {loaded.description}")
    print(f"Exporting r={schedule_label(schedule)} and r=0 at {'x'.join(map(str, size))}, opset {args.opset}, "
          f"dynamic batch; timing batch {args.batch_size}, {args.runs} interleaved rounds, threads: {threads}",
          flush=True)
    rows = export_and_measure(
        model, schedule, output, input_size=size, batch_size=args.batch_size, opset=args.opset, int8=args.int8,
        calibration_batches=args.calibration_batches, rounds=args.runs, min_time=args.min_time,
        threads=args.threads, progress=True, optimize=args.optimize,
    )
    print_rows(rows, args.batch_size)
    print("Speed-up: median of per-round ratios (range). FLOP ceiling: eager FLOPs at r=0 / at r. "
          "Agreement: onnxruntime vs the eager fp32 model on generated images.")
    for row in rows:
        print(f"Wrote {row.path}")
    return rows


def _check_input_size(model: torch.nn.Module, schedule: Schedule, size: Sequence[int], native: Sequence[int]) -> None:
    """Run one image of ``size`` through ``model`` before exporting, so a size it rejects is named.

    Raises:
        ValueError: naming the ``--input-size`` value and the model's own size.
    """
    given, own = "x".join(map(str, size[1:])), "x".join(map(str, native[1:]))
    try:
        with torch.no_grad(), tome.merging(model, schedule):
            model(torch.zeros(1, *size))
    except (AssertionError, RuntimeError, ValueError) as error:
        raise ValueError(f"--input-size {given} is not a size this model takes ({error}); it was built for {own} "
                         "(a timm model built with dynamic_img_size=True takes other sizes)") from None


def _input_size(text: str) -> List[int]:
    parts = text.lower().replace("x", " ").split()
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an input size (e.g. 224 or 224x160)")
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome export``."""
    parser = subparsers.add_parser(
        "export",
        help="export to ONNX (merged and unmerged, optionally int8), check against eager, time in onnxruntime",
        description="Export a ToMe model to ONNX with a dynamic batch, run it in onnxruntime, compare it with "
        "the eager model and with the unmerged export. Needs token-merging[export].",
    )
    add_model_arguments(parser, demo_default=True)
    parser.add_argument("-r", "--r", type=schedule_arg, default=None,
                        help="the one merge schedule of the deployed file, in the grammar of every command: R (16), "
                        "R:INFLECTION (16:-1; 16:1 increases) or R/R/R (8/8/4) (default: the checkpoint's r, else 16)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="the merged model's ONNX file")
    parser.add_argument("--input-size", type=_input_size, metavar="H[xW]",
                        help="image size fixed in the file (default: the model's); the model must accept it")
    parser.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET,
                        help="ONNX opset, 18 or later (default: %(default)s, where GELU is one operator)")
    parser.add_argument("--no-optimize", dest="optimize", action="store_false",
                        help="skip onnxscript's graph optimizer: a merging model exports sooner (its time grows with "
                        "the square of the node count), onnxruntime optimizes the graph itself when it loads it, "
                        "and the file keeps more nodes (default: optimize)")
    parser.add_argument("--int8", nargs="?", const="dynamic", choices=INT8_MODES,
                        help="also write int8 copies: dynamic (default) or static (calibrated on generated images)")
    parser.add_argument("--calibration-batches", type=positive_int, default=4,
                        help="generated batches for --int8 static (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per timed batch (default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=10, help="timed rounds (default: %(default)s)")
    parser.add_argument("--min-time", type=non_negative_float, default=0.3, metavar="SECONDS",
                        help="repeat each run until a timing covers this long (default: %(default)s)")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="onnxruntime intra-op threads (default: 0, its own default)")
    parser.set_defaults(func=run_export)
