"""What the visual tokens of the small VLMs trained here tell the language model: linear probes.

For each shipped model (``vqa-qwen2_5_vl``, ``vqa-llava`` of :mod:`tome.vlm_models`), the
visual tokens its language model reads (LLaVA's projector outputs, Qwen2.5-VL's merged tokens)
of ``--images`` generated training scenes are collected; a ridge-regularised least-squares
probe on one-hot targets is fitted on the first 80 % of the images and scored on the rest,
for each label of :func:`tome.data.vqa.scene_labels`: the token's row and column (8 bins of
the image side; chance 12.5 %), and the shape and colour under it (scored on object cells;
chance about 17 %). A label no linear read-out finds is one the language model has to
reconstruct itself, or cannot: the spatial slice needs both a shape's identity and its place
in the tokens it attends to (attention returns values, and rotary positions rotate queries
and keys only).

Usage (the command docs/vlm.md records):

    OMP_NUM_THREADS=1 uv run python benchmarks/vlm_probe.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlm_study  # noqa: E402

from tome.data import vqa  # noqa: E402
from tome.vlm_models import SHIPPED_VLMS  # noqa: E402

LABELS = ("row", "col", "shape", "colour")
_FIRST = 5_000_000
"""First train-split index of the probed scenes (past every index the shipped runs trained on)."""


@torch.no_grad()
def visual_tokens(model: Any, processor: Any, arch: str, samples: Sequence[vqa.VQASample],
                  batch_size: int = 20) -> np.ndarray:
    """The visual tokens the language model reads, ``(images, tokens, width)``, in row-major grid order."""
    chunks = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels = processor.image_processor(images=[vqa.to_pil(s) for s in chunk], return_tensors="pt")
        if arch == "qwen2_5_vl":
            out = model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
        else:
            out = model.model.get_image_features(
                pixels["pixel_values"], vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        tokens = getattr(out, "pooler_output", out)
        if isinstance(tokens, (list, tuple)):
            tokens = torch.cat(list(tokens))
        chunks.append(tokens.reshape(len(chunk), -1, tokens.shape[-1]).float().numpy())
    return np.concatenate(chunks)


def probe(features: np.ndarray, target: np.ndarray, cells: np.ndarray, train: int, ridge: float = 1e-2) -> float:
    """Held-out accuracy of a linear least-squares probe on one-hot targets.

    Args:
        features: ``(images, tokens, width)``.
        target: ``(images, tokens)`` class indices (non-negative where ``cells``).
        cells: ``(images, tokens)`` bool, the cells fitted (in the first ``train`` images) and
            scored (in the rest).
        train: Images fitted on (the first ones); the rest are scored.
        ridge: The ridge term, per fitted token, on centred features.
    """
    width = features.shape[-1]
    fit, test = cells[:train].reshape(-1), cells[train:].reshape(-1)
    x_fit, x_test = features[:train].reshape(-1, width)[fit], features[train:].reshape(-1, width)[test]
    y_fit = target[:train].reshape(-1)[fit]
    one_hot = np.eye(int(target[cells].max()) + 1)[y_fit]
    mean = x_fit.mean(0)
    x_fit, x_test = x_fit - mean, x_test - mean
    weights = np.linalg.solve(x_fit.T @ x_fit + ridge * len(x_fit) * np.eye(width),
                              x_fit.T @ (one_hot - one_hot.mean(0)))
    predicted = (x_test @ weights).argmax(-1)
    return float((predicted == target[train:].reshape(-1)[test]).mean())


def study(name: str, images: int) -> Dict[str, Any]:
    """Probe accuracies (and the grid) of the shipped model ``name`` on ``images`` scenes."""
    model, processor, arch = vlm_study.load(SHIPPED_VLMS[name])
    samples = [vqa.make_sample(_FIRST + i, "train", image_size=224) for i in range(images)]
    features = visual_tokens(model, processor, arch, samples)
    grid = int(round(features.shape[1] ** 0.5))
    labels = [vqa.scene_labels(s, grid) for s in samples]
    stack = {k: np.stack([label[k] for label in labels]) for k in LABELS}
    on_object = stack["shape"] > 0
    train = int(0.8 * images)
    row = {"model": name, "grid": grid, "images": images}
    for k in LABELS:
        # Shape and colour: fitted and scored on object cells only (labels 1.. there; 0 is "none").
        if k in ("shape", "colour"):
            row[k] = probe(features, stack[k] - 1, on_object, train)
        else:
            row[k] = probe(features, stack[k], np.ones_like(on_object), train)
    return row


def table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| model | visual tokens | row % | column % | shape % | colour % |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['grid']} x {r['grid']} | {100 * r['row']:.1f} | {100 * r['col']:.1f} | "
                     f"{100 * r['shape']:.1f} | {100 * r['colour']:.1f} |")
    lines.append(f"| chance | | {100 / vqa.POSITION_BINS:.1f} | {100 / vqa.POSITION_BINS:.1f} | "
                 f"{100 / len(vqa.SHAPES):.1f} | {100 / len(vqa.COLOURS):.1f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300, help="scenes probed, 80 %% fitted (default: %(default)s)")
    parser.add_argument("--models", nargs="+", choices=tuple(SHIPPED_VLMS), default=list(SHIPPED_VLMS))
    args = parser.parse_args(argv)
    if args.images < 5:
        parser.error(f"--images {args.images} must be at least 5 (4 fitted, 1 scored)")
    print(table([study(name, args.images) for name in args.models]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
