"""The embedded default model used by ``tome demo`` and ``tome visualize``."""

from __future__ import annotations

from typing import Tuple

from torch import nn

__all__ = ["load_demo_model"]


def load_demo_model() -> Tuple[nn.Module, str]:
    """The default model and a one-line description of its weights.

    Until a trained model ships with the package this is a timm ViT-S/16 with
    random weights (timings are meaningful, merges are not).
    """
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False)
    return model.eval(), "vit_small_patch16_224 with random weights"
