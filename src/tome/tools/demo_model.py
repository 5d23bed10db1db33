"""The embedded default model used by ``tome demo`` and ``tome visualize``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

from torch import nn

__all__ = ["load_demo_model", "DEMO_MODEL_PATH", "SHIPPED_MODELS"]

_ASSETS = Path(__file__).resolve().parent.parent / "assets"

DEMO_MODEL_PATH = _ASSETS / "tome_shapes_vit.safetensors"
"""The shipped model's weights; its description (architecture, training command, accuracy) is the ``.json`` beside it."""

SHIPPED_MODELS: Dict[str, Path] = {
    "shapes": DEMO_MODEL_PATH,
    "shapes-long": _ASSETS / "tome_shapes_vit_long.safetensors",
}
"""The models shipped in the package, by name: ``"shapes"`` (the default of ``tome demo``,
``tome visualize`` and ``tome eval``; 1 500 training steps) and ``"shapes-long"`` (the same
architecture trained for 5 000 steps; the one the ablations in ``docs/ablations.md`` use).
Both are described in ``docs/results.md``."""


def load_demo_model(name: str = "shapes") -> Tuple[nn.Module, str]:
    """A shipped model and a one-line description of its weights.

    A small timm ViT trained with ``tome train`` on the generated shape task of
    :mod:`tome.data` (see ``docs/results.md``). Its ``pretrained_cfg`` holds the
    input size, normalisation and class names.

    Args:
        name: A key of :data:`SHIPPED_MODELS`.

    Returns:
        ``(model in eval mode, description)``.

    Raises:
        ValueError: for a name that is not a shipped model.
    """
    from .train import load_model

    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model is called {name!r}; choose one of {sorted(SHIPPED_MODELS)}")
    model, info = load_model(SHIPPED_MODELS[name])
    accuracy = info.get("val_accuracy")
    size = "x".join(str(s) for s in model.pretrained_cfg["input_size"][1:])
    described = f"{info['architecture']} ({info['model_kwargs']}) at {size}px, trained on tome.data.SyntheticShapes"
    if accuracy is not None:
        described += f" ({100 * accuracy:.1f}% val top-1)"
    return model, described
