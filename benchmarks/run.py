"""ToMe benchmark suite: unmerged timm ViTs vs patched ones, side by side, in one process.

    uv run python benchmarks/run.py                 # default grid (~10-15 min on 2 CPU cores)
    uv run python benchmarks/run.py --quick         # ~2-3 min smoke run
    uv run python benchmarks/run.py --full          # every model/batch/precision (GPU or big CPU)
    uv run python benchmarks/run.py --models vit_b16 --batch-sizes 16 --schedules 0,16,16d --precisions fp32,bf16

Sections: ``throughput`` (images/s, speed-up, FLOP ceiling, speed-up / ceiling,
share of time in matching+merging), ``compile`` (torch.compile fullgraph, recompiles,
compiled vs eager), ``memory`` (source tracing: group index vs dense map). Writes a
JSON file and a PNG plot to ``--out``. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tome_bench.models import MODELS, dtype_supported, parse_schedule, schedule_label  # noqa: E402

SCHEDULES = "0,8,13,16,16d"

# (model, batch, precision, schedules, published-style schedules)
PRESETS = {
    "quick": dict(
        groups=[("vit_s16", 8, "fp32", "0,16", "16")],
        rounds=3, warmup=1, sections="throughput,compile,memory",
        compile=("vit_s16", 4, "13"), memory_batch=16, memory_forward_batch=0,
    ),
    "default": dict(
        groups=[
            ("vit_s16", 16, "fp32", SCHEDULES, "16"),
            ("vit_b16", 16, "fp32", SCHEDULES, "16"),
            ("vit_b16", 16, "bf16", "0,16", ""),
        ],
        rounds=5, warmup=1, sections="throughput,compile,memory",
        compile=("vit_s16", 16, "13"), memory_batch=64, memory_forward_batch=0,
    ),
    "full": dict(
        groups=[
            (model, batch, precision, SCHEDULES, "16")
            for model in ("vit_s16", "vit_b16", "vit_l16", "vit_b16_384")
            for batch in (16, 64)
            for precision in ("fp32", "bf16")
        ],
        rounds=10, warmup=2, sections="throughput,compile,memory",
        compile=("vit_b16", 64, "16"), memory_batch=64, memory_forward_batch=64,
    ),
}


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS") if k in os.environ},
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Flags"):
                info[key.strip()] = value.strip() if key.strip() != "Flags" else [
                    f for f in value.split() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))
                ]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _split(text: str) -> List[str]:
    return [part for part in (p.strip() for p in text.split(",")) if part]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_const", dest="preset", const="quick", help="tiny smoke run")
    preset.add_argument("--full", action="store_const", dest="preset", const="full", help="the whole grid")
    parser.add_argument("--models", help=f"comma list of {', '.join(MODELS)} or timm names (overrides the preset grid)")
    parser.add_argument("--batch-sizes", help="comma list, e.g. 16,64")
    parser.add_argument("--precisions", help="comma list of fp32, bf16, fp16 (autocast)")
    parser.add_argument("--schedules", help=f"comma list; '16d' is (16, -1.0), '16:-0.5' is (16, -0.5); default {SCHEDULES}")
    parser.add_argument("--published", help="schedules also timed with the published-style merge ('' for none)")
    parser.add_argument("--sections", help="comma list of throughput, compile, memory")
    parser.add_argument("--rounds", type=int, help="timed interleaved rounds per group")
    parser.add_argument("--warmup", type=int, help="untimed rounds first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's choice")
    parser.add_argument("--no-flop-count", action="store_true", help="skip FlopCounterMode (batch-1 forwards)")
    parser.add_argument("--no-control", action="store_true", help="do not time timm's model a second time per round (no noise-floor row)")
    parser.add_argument("--compile-model", help="model for the compile section")
    parser.add_argument("--compile-batch", type=int, help="batch for the compile section (default: the preset's)")
    parser.add_argument("--compile-schedule", help="schedule for the compile section (default: the preset's)")
    parser.add_argument("--compile-precision", default="fp32", help="precision for the compile section (default: %(default)s)")
    parser.add_argument("--compile-base", action="store_true", help="also compile and time the unmerged model")
    parser.add_argument("--memory-model", default="vit_large_patch16_384", help="model for the memory section (default: %(default)s)")
    parser.add_argument("--memory-schedule", default="23", help="schedule for the memory section (default: %(default)s)")
    parser.add_argument("--memory-batch", type=int, help="batch for the memory section (default: the preset's)")
    parser.add_argument("--memory-forward-batch", type=int, help="also measure whole forwards at this batch (0: skip)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"), help="directory for the JSON and PNG (default: benchmarks/out)")
    parser.add_argument("--name", default=None, help="file stem for the JSON/PNG (default: the preset name)")
    args = parser.parse_args(argv)

    config = dict(PRESETS[args.preset or "default"])
    if any([args.models, args.batch_sizes, args.precisions, args.schedules]):
        models = _split(args.models or "vit_b16")
        batches = [int(b) for b in _split(args.batch_sizes or "16")]
        precisions = _split(args.precisions or "fp32")
        schedules = args.schedules or SCHEDULES
        published = args.published if args.published is not None else "16"
        config["groups"] = [(m, b, p, schedules, published) for m in models for b in batches for p in precisions]
    elif args.published is not None:
        config["groups"] = [(m, b, p, s, args.published) for m, b, p, s, _ in config["groups"]]
    rounds = args.rounds or config["rounds"]
    warmup = args.warmup if args.warmup is not None else config["warmup"]
    sections = _split(args.sections or config["sections"])
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    os.makedirs(args.out, exist_ok=True)
    stem = args.name or (args.preset or "default")
    started = time.time()
    report = {
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv else "run.py"] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "device": str(device),
        "rounds": rounds,
        "warmup": warmup,
        "load_average_start": _load(),
        "throughput": [],
        "skipped": [],
        "compile": [],
        "memory": None,
    }
    print(f"machine: {report['machine']}")

    def save() -> None:
        report["load_average_end"] = _load()
        report["elapsed_s"] = time.time() - started
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(report, f, indent=1)

    if "throughput" in sections:
        from tome_bench.throughput import run_group

        for model, batch, precision, schedules, published in config["groups"]:
            why_not = dtype_supported(precision, device)
            if why_not:
                report["skipped"].append(f"{model} b{batch} {precision}: {why_not}")
                print(f"skip {model} batch {batch} {precision}: {why_not}")
                continue
            print(f"\n== {model} batch {batch} {precision} (load {_load()})", flush=True)
            rows = run_group(
                model, batch, precision,
                [parse_schedule(s) for s in _split(schedules)],
                [parse_schedule(s) for s in _split(published)],
                rounds, warmup, device, count_flops=not args.no_flop_count, control=not args.no_control,
                progress=lambda line: print(line, flush=True),
            )
            report["throughput"].extend(rows)
            save()

    if "compile" in sections:
        from tome_bench.compiled import run_compile

        model, batch, schedule = config["compile"]
        model = args.compile_model or model
        batch = args.compile_batch or batch
        schedule = parse_schedule(args.compile_schedule or schedule)
        print(f"\n== compile {model} batch {batch} {args.compile_precision} {schedule_label(schedule)} (load {_load()})", flush=True)
        try:
            report["compile"].append(
                run_compile(model, batch, schedule, args.compile_precision, rounds, warmup, device,
                            compile_base=args.compile_base, progress=lambda line: print(line, flush=True))
            )
        except Exception as error:  # report, keep the other sections' results
            report["compile_error"] = f"{type(error).__name__}: {error}"
            print(f"compile section failed: {report['compile_error']}")
        save()

    if "memory" in sections:
        from tome_bench.memory import run_memory

        model_name = args.memory_model
        spec = MODELS.get(model_name)
        timm_name = spec.timm_name if spec else model_name
        image_size = spec.image_size if spec else (384 if timm_name.endswith("_384") else 224)
        forward_batch = args.memory_forward_batch if args.memory_forward_batch is not None else config["memory_forward_batch"]
        print(f"\n== memory {timm_name} (load {_load()})", flush=True)
        report["memory"] = run_memory(
            timm_name, image_size, args.memory_batch or config["memory_batch"], parse_schedule(args.memory_schedule),
            args.device, forward_batch, progress=lambda line: print(line, flush=True),
        )
        save()

    from tome_bench.report import compile_table, memory_table, plot, throughput_table

    save()
    print()
    if report["throughput"]:
        print(throughput_table(report["throughput"]))
    if report["compile"]:
        print()
        print(compile_table(report["compile"]))
    if report["memory"]:
        print()
        print(memory_table(report["memory"]))
    if report["skipped"]:
        print("\nskipped: " + "; ".join(report["skipped"]))
    if report["throughput"] or report["compile"]:
        machine = report["machine"]
        title = (
            f"{machine.get('gpu') or machine.get('Model name', 'CPU')}, {machine['threads']} threads {machine['env'] or ''}, torch {machine['torch']}; "
            f"{report['date']}; load avg {report['load_average_start']:.1f}->{_load():.1f}"
        )
        plot(report["throughput"], report["compile"], os.path.join(args.out, f"{stem}.png"), title)
    print(f"\nwrote {os.path.join(args.out, stem)}.json/.png in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
