"""The models shipped in the package; the default one drives ``tome demo``, ``visualize`` and ``eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

from torch import nn

__all__ = ["load_demo_model", "DEFAULT_MODEL", "DEMO_MODEL_PATH", "SHIPPED_MODELS"]

_ASSETS = Path(__file__).resolve().parent.parent / "assets"

SHIPPED_MODELS: Dict[str, Path] = {
    "shapes-long": _ASSETS / "tome_shapes_vit_long.safetensors",
    "shapes": _ASSETS / "tome_shapes_vit.safetensors",
}
"""The models shipped in the package, by name: ``"shapes-long"`` (the default of ``tome demo``,
``tome visualize``, ``tome eval`` and ``tome export``; 5 000 training steps, 95.85 % on the
generated task) and ``"shapes"`` (the same architecture trained for 1 500 steps, 65.45 %; the
model of the first ablations in ``docs/ablations.md``). Both are described in ``docs/results.md``;
the command line takes either name as ``--model``."""

DEFAULT_MODEL = "shapes-long"
"""The shipped model used when no model is named: the better-trained one."""

DEMO_MODEL_PATH = SHIPPED_MODELS[DEFAULT_MODEL]
"""The default model's weights; its description (architecture, training command, accuracy) is the ``.json`` beside it."""


def load_demo_model(name: str = DEFAULT_MODEL) -> Tuple[nn.Module, str]:
    """A shipped model and a one-line description of its weights.

    A small timm ViT trained with ``tome train`` on the generated shape task of
    :mod:`tome.data` (see ``docs/results.md``). Its ``pretrained_cfg`` holds the
    input size, normalisation and class names.

    Args:
        name: A key of :data:`SHIPPED_MODELS`; by default :data:`DEFAULT_MODEL`
            (``"shapes-long"``).

    Returns:
        ``(model in eval mode, description)``.

    Raises:
        ValueError: for a name that is not a shipped model.
    """
    from .model_io import load_model

    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model is called {name!r}; choose one of {sorted(SHIPPED_MODELS)}")
    model, info = load_model(SHIPPED_MODELS[name])
    accuracy = info.get("val_accuracy")
    size = "x".join(str(s) for s in model.pretrained_cfg["input_size"][1:])
    described = (f"shipped model {name} ({info['architecture']}, {info['model_kwargs']}) at {size}px, "
                 "trained on tome.data.SyntheticShapes")
    if accuracy is not None:
        described += f" ({100 * accuracy:.2f}% val top-1)"
    return model, described
