"""Deployment benchmark: timm ViTs exported to ONNX, fp32 and int8, unmerged vs merged, in onnxruntime.

    nice uv run python benchmarks/deployment.py                      # ViT-S/16 and ViT-B/16, batch 8, 2 threads
    nice uv run python benchmarks/deployment.py --models vit_large_patch16_224 --rounds 5

For each model every setting (r = 0, 8, 13, 16 and the decreasing schedule 16:-1,
each fp32 and int8 via ``onnxruntime.quantization.quantize_dynamic``) is exported with
a dynamic batch and timed in one process, in interleaved rounds; speed-ups are the
median of per-round ratios to fp32 r=0 (and to int8 r=0), with the FLOP ceiling (eager
FLOPs at r=0 over FLOPs at r) beside each row. The accuracy section runs the shipped
model (``tome.tools.demo_model``) on the generated shape task's validation images for
fp32/int8 x r. Writes ``--json`` and prints markdown tables (docs/deployment.md).
Random weights for the timing models (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import tome
from tome.export import export_onnx, onnx_session, quantize_onnx, run_onnx
from tome.tools._common import parse_schedules, schedule_label
from tome.tools.benchmark import count_flops
from tome.tools.export import time_sessions


def speed(model_name: str, schedules, batch: int, rounds: int, threads: int, min_time: float, workdir: Path):
    import timm

    torch.manual_seed(0)
    model = tome.apply_patch(timm.create_model(model_name, pretrained=False).eval(), r=0)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    base_flops = count_flops(model, x[:1])
    rows = []
    for schedule in schedules:
        label = schedule_label(schedule)
        with tome.merging(model, schedule):
            flops = count_flops(model, x[:1])
            fp32 = export_onnx(model, x[:2], workdir / f"{model_name}-{label.replace(':', 'd')}.onnx")
        int8 = quantize_onnx(fp32, fp32.with_suffix(".int8.onnx"))
        rows += [dict(model=model_name, r=label, precision="fp32", path=fp32, ceiling=base_flops / flops),
                 dict(model=model_name, r=label, precision="int8", path=int8, ceiling=base_flops / flops)]
        print(f"  exported {model_name} r={label}", flush=True)
    sessions = [onnx_session(row["path"], threads=threads) for row in rows]
    times = time_sessions(sessions, x, rounds=rounds, min_time=min_time)
    for i, row in enumerate(rows):
        base = 0 if row["precision"] == "fp32" else 1
        row["ms"] = 1000 * statistics.median(times[i])
        row["speedup_fp32_r0"] = statistics.median(a / b for a, b in zip(times[0], times[i]))
        row["speedup_own_r0"] = statistics.median(a / b for a, b in zip(times[base], times[i]))
        row["speedup_range"] = [min(a / b for a, b in zip(times[0], times[i])), max(a / b for a, b in zip(times[0], times[i]))]
        row["path"] = str(row["path"].name)
    return rows


def accuracy(schedules, images: int, workdir: Path):
    from tome.data import SyntheticShapes
    from tome.tools.demo_model import load_demo_model

    model, description = load_demo_model()
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
        int8 = quantize_onnx(fp32, fp32.with_suffix(".int8.onnx"))
        for precision, path in (("fp32", fp32), ("int8", int8)):
            logits = run_onnx(onnx_session(path), x)
            rows.append(dict(r=label, precision=precision, top1=float((logits.argmax(1) == labels).float().mean()),
                             same_as_eager=float((logits.argmax(1) == eager.argmax(1)).float().mean())))
    return description, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--schedules", default="0,8,13,16,16:-1")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-schedules", default="0,4,8,8:-1")
    parser.add_argument("--accuracy-images", type=int, default=1000)
    parser.add_argument("--json", default="benchmarks/out/deployment-cpu.json")
    args = parser.parse_args()
    import onnxruntime

    started = time.time()
    report = dict(command=" ".join(["python", *sys.argv]), machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), threads=args.threads, batch_size=args.batch_size, rounds=args.rounds,
                  torch=torch.__version__, onnxruntime=onnxruntime.__version__, speed=[], accuracy=[])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.models.split(","):
            report["speed"] += speed(name, parse_schedules(args.schedules), args.batch_size, args.rounds,
                                     args.threads, args.min_time, workdir)
        report["demo_model"], report["accuracy"] = accuracy(parse_schedules(args.accuracy_schedules),
                                                            args.accuracy_images, workdir)
    report["seconds"] = time.time() - started
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print("| model | r | precision | ms / batch | speed-up vs fp32 r=0 (range) | vs same precision r=0 | FLOP ceiling |")
    print("|---|---|---|---|---|---|---|")
    for row in report["speed"]:
        low, high = row["speedup_range"]
        print(f"| {row['model']} | {row['r']} | {row['precision']} | {row['ms']:.0f} | {row['speedup_fp32_r0']:.2f}x "
              f"({low:.2f}-{high:.2f}) | {row['speedup_own_r0']:.2f}x | {row['ceiling']:.2f}x |")
    print()
    print("| r | precision | top-1 | top-1 same as eager (same r) |")
    print("|---|---|---|---|")
    for row in report["accuracy"]:
        print(f"| {row['r']} | {row['precision']} | {100 * row['top1']:.1f}% | {100 * row['same_as_eager']:.1f}% |")
    print(f"\n{report['seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
