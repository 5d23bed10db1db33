"""Where should a merged token sit? RoPE merge rules measured on a trained model.

A DINOv3-style timm Eva trained by ``tome train`` on the generated shapes task
(docs/backbones.md has the command) is evaluated on the task's first 2000
validation images with every combination of

- ``rope_position``: ``"mean"`` (the merged token's rotary angles are the
  size-weighted mean of its patches', i.e. it sits at their mean coordinate) or
  ``"destination"`` (it keeps the position of the token the others merged into);
- ``rope_metric``: the matching compares the keys ``"plain"`` (before the rotation)
  or ``"rotated"`` (after it, as attention compares them);

at several merge schedules. Reported: top-1 accuracy, and how close the dense
features of the last block (``forward_intermediates``, NCHW, each patch reading
its merged token) are to the unmerged model's: cosine similarity per patch,
mean and 5th percentile over patches and images.

    uv run python benchmarks/rope_rules.py --model outputs/shapes-dinov3/model.safetensors \\
        --json benchmarks/out/rope-rules.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

import tome
from tome.tools.train import TrainConfig, build_datasets, load_model

POSITIONS = ("mean", "destination")
METRICS = ("plain", "rotated")
SCHEDULES: List[Any] = [0, 4, 6, 8, (8, -1.0), 10]


def _label(schedule: Any) -> str:
    return f"({schedule[0]}, {schedule[1]:g})" if isinstance(schedule, tuple) else str(schedule)


def _images(count: int, image_size: int) -> Dict[str, torch.Tensor]:
    _, val, _ = build_datasets(TrainConfig(image_size=image_size, val_size=count, train_size=64))
    pairs = [val[i] for i in range(len(val))]
    return {"x": torch.stack([p[0] for p in pairs]), "y": torch.tensor([int(p[1]) for p in pairs])}


@torch.inference_mode()
def _run(model: torch.nn.Module, data: Dict[str, torch.Tensor], batch: int, dense_count: int,
         reference: Optional[List[torch.Tensor]]) -> Dict[str, Any]:
    correct = 0
    maps: List[torch.Tensor] = []
    last = len(model.blocks) - 1
    for start in range(0, len(data["y"]), batch):
        x = data["x"][start:start + batch]
        correct += int((model(x).argmax(-1) == data["y"][start:start + batch]).sum())
        if start < dense_count:
            maps.append(model.forward_intermediates(x, indices=[last], norm=True, intermediates_only=True)[0])
    result: Dict[str, Any] = {"top1": correct / len(data["y"]), "tokens_out": model._tome_info["size"].shape[1]}
    if reference is not None:
        cos = torch.cat([torch.nn.functional.cosine_similarity(a, b, dim=1).flatten()
                         for a, b in zip(maps, reference)])
        result["dense_cos_mean"] = float(cos.mean())
        result["dense_cos_p05"] = float(cos.quantile(0.05))
    return result, maps


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .safetensors written by tome train (Eva architecture)")
    parser.add_argument("--images", type=int, default=2000, help="validation images (default: %(default)s)")
    parser.add_argument("--dense-images", type=int, default=500, help="images for the dense-feature similarity")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    started = time.time()
    model, description = load_model(args.model)
    data = _images(args.images, description["image_size"])
    rows = []
    reference_maps: Optional[List[torch.Tensor]] = None
    tome.patch.eva(model)
    model.r = 0
    base, reference_maps = _run(model, data, args.batch, args.dense_images, None)
    rows.append({"rope_position": "-", "rope_metric": "-", "schedule": "0", **base,
                 "dense_cos_mean": 1.0, "dense_cos_p05": 1.0})
    print(f"r=0: top-1 {base['top1']:.4f}", flush=True)
    for position, metric in itertools.product(POSITIONS, METRICS):
        tome.patch.eva(model, rope_position=position, rope_metric=metric)
        for schedule in SCHEDULES[1:]:
            model.r = schedule
            result, _ = _run(model, data, args.batch, args.dense_images, reference_maps)
            row = {"rope_position": position, "rope_metric": metric, "schedule": _label(schedule), **result}
            rows.append(row)
            print(f"{position:11s} {metric:7s} r={_label(schedule):8s} top-1 {result['top1']:.4f} "
                  f"tokens {result['tokens_out']:3d} dense cos {result['dense_cos_mean']:.4f} "
                  f"(p05 {result['dense_cos_p05']:.4f})", flush=True)
    report = {
        "command": " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model,
        "architecture": description.get("architecture"),
        "model_kwargs": description.get("model_kwargs"),
        "images": args.images,
        "dense_images": args.dense_images,
        "threads": torch.get_num_threads(),
        "elapsed_s": time.time() - started,
        "rows": rows,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print("\n| rope_position | rope_metric | r | tokens out | top-1 | dense cos (mean) | dense cos (p05) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['rope_position']} | {row['rope_metric']} | {row['schedule']} | {row['tokens_out']} | "
              f"{100 * row['top1']:.2f} % | {row['dense_cos_mean']:.4f} | {row['dense_cos_p05']:.4f} |")
    print(f"\n{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
