"""Deployment benchmark: timm ViTs exported to ONNX, fp32 and int8, unmerged vs merged, in onnxruntime.

    OMP_WAIT_POLICY=PASSIVE nice uv run python benchmarks/deployment.py   # ViT-S/16 and ViT-B/16, batch 8, 2 threads
    OMP_WAIT_POLICY=PASSIVE nice uv run python benchmarks/deployment.py --models vit_large_patch16_224 --rounds 5

For each model every setting (r = 0, 8, 13, 16 and the decreasing schedule 16:-1,
each fp32 and int8 via :func:`tome.export.quantize_onnx`) is exported with a dynamic
batch and timed in one process, in interleaved rounds; speed-ups are the median of
per-round ratios to fp32 r=0 (and to int8 r=0), with the FLOP ceiling (eager FLOPs at
r=0 over FLOPs at r) beside each row. ``--legacy-schedules`` adds, in the same rounds,
files made the way this project made them before (opset 18, ``quantize_dynamic`` with
its default operator types and per-tensor weights), so the two can be compared side by
side; ``--profile`` adds onnxruntime's per-operator-type kernel time of every file.
The accuracy section runs the short shipped model (``load_demo_model("shapes")``) on the
generated shape task's validation images for fp32/int8 x r (``--accuracy-images 0``
skips it). Writes ``--json`` and prints markdown tables (docs/deployment.md).
Random weights for the timing models (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tome
from tome.export import DEFAULT_OPSET, export_onnx, onnx_session, quantize_onnx, run_onnx
from tome.tools._common import parse_schedules, schedule_label
from tome.tools.benchmark import count_flops
from tome.tools.export import time_sessions


def _legacy_int8(source: Path, target: Path) -> Path:
    """int8 the way this project did before: ``quantize_dynamic`` with its defaults (Conv too, per tensor)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return target


def op_type_times(path: Path, x: torch.Tensor, threads: int, runs: int) -> dict:
    """Milliseconds per run spent in each operator type (onnxruntime's profiler, kernel time only)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)  # warm-up: its events are left out below
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, feed)
    wall = (time.perf_counter() - start) / runs
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_end = first["ts"] + first["dur"]
    micros: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warm_end:
            micros[event["args"]["op_name"]] += event["dur"]
    return dict(wall_ms=1000 * wall, ops_ms={op: us / 1000 / runs for op, us in micros.most_common()})


def speed(model_name: str, schedules, batch: int, rounds: int, threads: int, min_time: float, workdir: Path,
          opset: int = DEFAULT_OPSET, legacy_schedules=(), profile_runs: int = 0, reduce_range: bool = False):
    import timm

    torch.manual_seed(0)
    model = tome.apply_patch(timm.create_model(model_name, pretrained=False).eval(), r=0)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    example = torch.randn(2, 3, 224, 224)  # batch 2 at export: a batch of 1 would be fixed in the file
    base_flops = count_flops(model, x[:1])
    rows = []
    plan = [(s, False) for s in schedules] + [(s, True) for s in legacy_schedules]
    for schedule, legacy in plan:
        label = schedule_label(schedule)
        stem = f"{model_name}-r{label.replace(':', 'd')}-opset{18 if legacy else opset}"
        start = time.time()
        fp32 = workdir / f"{stem}.onnx"
        with tome.merging(model, schedule):
            flops = count_flops(model, x[:1])
            if not fp32.is_file():  # --workdir keeps the exports of an earlier run (they take minutes)
                export_onnx(model, example, fp32, opset=18 if legacy else opset)
        if legacy:
            int8 = _legacy_int8(fp32, fp32.with_suffix(".int8-before.onnx"))
            names = ("fp32 (opset 18)", "int8 (before: opset 18, Conv too, per tensor)")
        else:
            int8 = quantize_onnx(fp32, fp32.with_suffix(".int8.onnx"))
            names = ("fp32", "int8")
        rows += [dict(model=model_name, r=label, precision=names[0], path=fp32, ceiling=base_flops / flops),
                 dict(model=model_name, r=label, precision=names[1], path=int8, ceiling=base_flops / flops)]
        if reduce_range and not legacy:
            reduced = quantize_onnx(fp32, fp32.with_suffix(".int8-reduce-range.onnx"), reduce_range=True)
            rows.append(dict(model=model_name, r=label, precision="int8 (reduce_range)", path=reduced,
                             ceiling=base_flops / flops))
        print(f"  exported {model_name} r={label}{' (legacy)' if legacy else ''} in {time.time() - start:.0f} s", flush=True)
    sessions = [onnx_session(row["path"], threads=threads) for row in rows]
    times = time_sessions(sessions, x, rounds=rounds, min_time=min_time)
    for i, row in enumerate(rows):
        # The same-precision base: the unmerged file made the same way.
        base = next(j for j, other in enumerate(rows) if other["precision"] == row["precision"] and other["r"] == "0")
        row["ms"] = 1000 * statistics.median(times[i])
        row["speedup_fp32_r0"] = statistics.median(a / b for a, b in zip(times[0], times[i]))
        row["speedup_own_r0"] = statistics.median(a / b for a, b in zip(times[base], times[i]))
        row["speedup_range"] = [min(a / b for a, b in zip(times[0], times[i])), max(a / b for a, b in zip(times[0], times[i]))]
        if profile_runs:
            row["profile"] = op_type_times(row["path"], x, threads, profile_runs)
        row["path"] = str(row["path"].name)
    return rows


def export_cost(model_name: str, schedules, batch: int, rounds: int, threads: int, workdir: Path,
                opset: int = DEFAULT_OPSET):
    """Seconds per export phase, ONNX node counts, and onnxruntime speed with and without the optimizer."""
    import onnx
    import timm

    from tome.export import export_program

    torch.manual_seed(0)
    model = tome.apply_patch(timm.create_model(model_name, pretrained=False).eval(), r=0)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    example = torch.randn(2, 3, 224, 224)
    rows = []
    for schedule in schedules:
        label = schedule_label(schedule)
        with tome.merging(model, schedule):
            start = time.perf_counter()
            program = export_program(model, example)
            seconds = dict(torch_export=time.perf_counter() - start)
        start = time.perf_counter()
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, optimize=False, verbose=False)
        seconds["translate"] = time.perf_counter() - start
        plain = workdir / f"{model_name}-r{label.replace(':', 'd')}-cost-plain.onnx"
        onnx_program.save(str(plain))
        start = time.perf_counter()
        onnx_program.optimize()
        seconds["optimize"] = time.perf_counter() - start
        optimized = plain.with_name(plain.name.replace("-plain", "-optimized"))
        onnx_program.save(str(optimized))
        nodes = {kind: len(onnx.load(str(path), load_external_data=False).graph.node)
                 for kind, path in (("plain", plain), ("optimized", optimized))}
        rows.append(dict(model=model_name, r=label, seconds=seconds, program_nodes=len(program.graph.nodes),
                         onnx_nodes=nodes, paths=(optimized, plain)))
        print(f"  export cost {model_name} r={label}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
              flush=True)
    sessions = [onnx_session(path, threads=threads) for row in rows for path in row["paths"]]
    times = time_sessions(sessions, x, rounds=rounds, min_time=0.0)
    for i, row in enumerate(rows):
        optimized, plain = times[2 * i], times[2 * i + 1]
        row["ms_optimized"] = 1000 * statistics.median(optimized)
        row["ms_plain"] = 1000 * statistics.median(plain)
        row["plain_over_optimized"] = statistics.median(b / a for a, b in zip(optimized, plain))
        row["paths"] = [p.name for p in row["paths"]]
    return rows


def accuracy(schedules, images: int, workdir: Path, reduce_range: bool = False):
    from tome.data import SyntheticShapes
    from tome.tools.demo_model import load_demo_model

    model, description = load_demo_model("shapes")  # the model docs/deployment.md's accuracy table was measured on
    tome.apply_patch(model, r=0)
    size = model.pretrained_cfg["input_size"][1]
    data = SyntheticShapes("val", length=images, image_size=size)
    x = torch.stack([data[i][0] for i in range(images)])
    labels = torch.tensor([data[i][1] for i in range(images)])
    rows = []
    for schedule in schedules:
        label = schedule_label(schedule)
        with tome.merging(model, schedule), torch.no_grad():
            eager = model(x)
            fp32 = export_onnx(model, x[:2], workdir / f"demo-{label.replace(':', 'd')}.onnx")
        files = [("fp32", fp32), ("int8", quantize_onnx(fp32, fp32.with_suffix(".int8.onnx")))]
        if reduce_range:
            files.append(("int8 (reduce_range)",
                          quantize_onnx(fp32, fp32.with_suffix(".int8-reduce-range.onnx"), reduce_range=True)))
        for precision, path in files:
            logits = run_onnx(onnx_session(path), x)
            rows.append(dict(r=label, precision=precision, top1=float((logits.argmax(1) == labels).float().mean()),
                             same_as_eager=float((logits.argmax(1) == eager.argmax(1)).float().mean())))
    return description, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224",
                        help="comma-separated timm model names, built with random weights ('' for none)")
    parser.add_argument("--schedules", default="0,8,13,16,16:-1",
                        help="comma-separated schedules to time: r, or r:inflection for a decreasing one")
    parser.add_argument("--batch-size", type=int, default=8, help="images per timed batch")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--min-time", type=float, default=0.0, metavar="SECONDS",
                        help="repeat each file within a round until this long has passed")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset of the exports")
    parser.add_argument("--legacy-schedules", default="",
                        help="also time these schedules exported and quantized as before (opset 18, plain quantize_dynamic)")
    parser.add_argument("--profile", type=int, default=0, metavar="RUNS",
                        help="profile every file over RUNS runs: kernel time per operator type")
    parser.add_argument("--export-cost", default="", metavar="SCHEDULES",
                        help="time the export of these schedules phase by phase, and the files with and without "
                             "onnxscript's optimizer")
    parser.add_argument("--reduce-range", action="store_true",
                        help="also time and check int8 files with 7-bit weights (quantize_onnx(reduce_range=True))")
    parser.add_argument("--accuracy-schedules", default="0,4,8,8:-1",
                        help="schedules for the shipped model's fp32/int8 accuracy")
    parser.add_argument("--accuracy-images", type=int, default=1000,
                        help="generated validation images for the accuracy section (0 skips it)")
    parser.add_argument("--json", default="benchmarks/out/deployment-cpu.json", help="where to write the results")
    parser.add_argument("--workdir", default=None,
                        help="keep the ONNX files here and reuse the fp32 exports found there (default: a temporary folder)")
    args = parser.parse_args()
    import onnxruntime

    started = time.time()
    report = dict(command=" ".join(["python", *sys.argv]), machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), threads=args.threads, batch_size=args.batch_size, rounds=args.rounds,
                  torch=torch.__version__, onnxruntime=onnxruntime.__version__, speed=[], export_cost=[],
                  accuracy=[])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        legacy = parse_schedules(args.legacy_schedules) if args.legacy_schedules else []
        for name in filter(None, args.models.split(",")):
            report["speed"] += speed(name, parse_schedules(args.schedules), args.batch_size, args.rounds,
                                     args.threads, args.min_time, workdir, opset=args.opset,
                                     legacy_schedules=legacy, profile_runs=args.profile,
                                     reduce_range=args.reduce_range)
            if args.export_cost:
                report["export_cost"] += export_cost(name, parse_schedules(args.export_cost), args.batch_size,
                                                     args.rounds, args.threads, workdir, opset=args.opset)
        if args.accuracy_images > 0:
            report["demo_model"], report["accuracy"] = accuracy(parse_schedules(args.accuracy_schedules),
                                                                args.accuracy_images, workdir, args.reduce_range)
    report["seconds"] = time.time() - started
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print("| model | r | precision | ms / batch | speed-up vs fp32 r=0 (range) | vs same precision r=0 | FLOP ceiling |")
    print("|---|---|---|---|---|---|---|")
    for row in report["speed"]:
        low, high = row["speedup_range"]
        print(f"| {row['model']} | {row['r']} | {row['precision']} | {row['ms']:.0f} | {row['speedup_fp32_r0']:.2f}x "
              f"({low:.2f}-{high:.2f}) | {row['speedup_own_r0']:.2f}x | {row['ceiling']:.2f}x |")
    if args.profile:
        print()
        print("| model | r | precision | ms / run (profiled) | largest operator types, share of kernel time |")
        print("|---|---|---|---|---|")
        for row in report["speed"]:
            ops = row["profile"]["ops_ms"]
            total = sum(ops.values())
            shares = ", ".join(f"{op} {100 * ms / total:.1f}%" for op, ms in list(ops.items())[:10])
            print(f"| {row['model']} | {row['r']} | {row['precision']} | {row['profile']['wall_ms']:.0f} | {shares} |")
    if report["export_cost"]:
        print()
        print("| model | r | torch.export s | to ONNX s | optimizer s | nodes (program / ONNX / optimized) "
              "| ms optimized | ms unoptimized | unoptimized / optimized |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in report["export_cost"]:
            s, n = row["seconds"], row["onnx_nodes"]
            print(f"| {row['model']} | {row['r']} | {s['torch_export']:.1f} | {s['translate']:.1f} | {s['optimize']:.1f} "
                  f"| {row['program_nodes']} / {n['plain']} / {n['optimized']} | {row['ms_optimized']:.0f} "
                  f"| {row['ms_plain']:.0f} | {row['plain_over_optimized']:.2f}x |")
    print()
    print("| r | precision | top-1 | top-1 same as eager (same r) |")
    print("|---|---|---|---|")
    for row in report["accuracy"]:
        print(f"| {row['r']} | {row['precision']} | {100 * row['top1']:.1f}% | {100 * row['same_as_eager']:.1f}% |")
    print(f"\n{report['seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
