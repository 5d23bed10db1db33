"""Helpers for the tools tests: tiny timm ViTs and tiny image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

# A 2-block ViT on 32x32 images with 8x8 patches: 16 patches + 1 class token.
TINY_NAME = "vit_tiny_patch16_224"
TINY_KWARGS: Dict[str, object] = {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 4}
TINY_ARGS: List[str] = ["--model", TINY_NAME, "--model-kwargs"] + [f"{k}={v}" for k, v in TINY_KWARGS.items()]


def tiny_model(**overrides):
    """The tiny ViT (random weights, eval mode), with ``timm.create_model`` overrides."""
    import timm

    return timm.create_model(TINY_NAME, **{**TINY_KWARGS, **overrides}).eval()


def write_image_folder(root: Path, classes: int = 2, per_class: int = 3, corrupt: int = 1, seed: int = 0) -> Path:
    """``root/class_k/i.png`` with random 40x40 images, plus ``corrupt`` unreadable .png files."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((40, 40, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    for i in range(corrupt):
        (root / "class_0" / f"broken_{i}.png").write_bytes(b"this is not a png")
    return root
