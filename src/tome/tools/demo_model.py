"""The embedded default model used by ``tome demo`` and ``tome visualize``."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from torch import nn

__all__ = ["load_demo_model", "DEMO_MODEL_PATH"]

DEMO_MODEL_PATH = Path(__file__).resolve().parent.parent / "assets" / "tome_shapes_vit.safetensors"
"""The shipped model's weights; its description (architecture, training command, accuracy) is the ``.json`` beside it."""


def load_demo_model() -> Tuple[nn.Module, str]:
    """The default model and a one-line description of its weights.

    A small timm ViT trained with ``tome train`` on the generated shape task of
    :mod:`tome.data` (see ``docs/results.md``). Its ``pretrained_cfg`` holds the
    input size, normalisation and class names.

    Returns:
        ``(model in eval mode, description)``.
    """
    from .train import load_model

    model, info = load_model(DEMO_MODEL_PATH)
    accuracy = info.get("val_accuracy")
    size = "x".join(str(s) for s in model.pretrained_cfg["input_size"][1:])
    described = f"{info['architecture']} ({info['model_kwargs']}) at {size}px, trained on tome.data.SyntheticShapes"
    if accuracy is not None:
        described += f" ({100 * accuracy:.1f}% val top-1)"
    return model, described
