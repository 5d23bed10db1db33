"""Integrations: one patch function per model family.

Each ``tome.patch.<family>(model, trace_source=False, prop_attn=...)`` swaps the
classes of the model and its blocks in place so that every block merges
``model.r`` tokens between its attention and its MLP. ``tome.remove_patch``
undoes it. Optional libraries are only imported by the family that needs them.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from torch import nn

from ._hf import hf, is_hf_vision
from ._lifecycle import is_patched, remove_patch
from ._mae import is_mae_codebase, mae
from ._swag import is_swag_vit, swag
from ._timm import is_timm_vit, timm
from ._torchvision import is_torchvision_vit, torchvision

__all__ = ["timm", "mae", "torchvision", "swag", "hf", "FAMILIES", "family_of", "is_patched", "remove_patch"]

# name -> (detector, patch function). Detectors look at class names and modules
# only, so no optional library is imported to answer "is this one of yours?".
# Order matters: the first match wins.
FAMILIES: Dict[str, Tuple[Callable[[nn.Module], bool], Callable[..., nn.Module]]] = {
    "mae": (is_mae_codebase, mae),
    "timm": (is_timm_vit, timm),
    "torchvision": (is_torchvision_vit, torchvision),
    "swag": (is_swag_vit, swag),
    "hf": (is_hf_vision, hf),
}


def family_of(model: nn.Module) -> str:
    """Name of the family that ``tome.apply_patch`` would use for ``model``.

    Raises:
        TypeError: naming the model's class and the supported families.
    """
    for name, (detector, _) in FAMILIES.items():
        if detector(model):
            return name
    raise TypeError(
        f"{type(model).__name__} ({type(model).__module__}) is not a model ToMe can patch. "
        f"Supported families: {', '.join(FAMILIES)}"
    )
