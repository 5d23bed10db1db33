"""Integrations: one patch function per model family.

Each ``tome.patch.<family>(model, trace_source=False, prop_attn=...)`` swaps the
classes of the model, its blocks and their attention modules in place so that
every block merges ``model.r`` tokens between its attention and its MLP.
``tome.remove_patch`` undoes it. Optional libraries are only imported by the
family that needs them.

A family registers its patch function with
``@register_family(name, detector, priority)`` (see ``docs/families.md``,
"Adding a family"); ``tome.apply_patch`` asks the detectors in priority order.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

from torch import nn

# Importing the family modules registers them.
from ._diffusers import diffusers
from ._eva import eva
from ._hf import hf
from ._hf_dinov3 import hf_dinov3
from ._lifecycle import families, is_patched, register_family, remove_patch
from ._mae import mae
from ._naflex import naflexvit
from ._swag import swag
from ._timm import timm
from ._torchvision import torchvision

__all__ = [
    "timm",
    "mae",
    "torchvision",
    "swag",
    "hf",
    "diffusers",
    "eva",
    "hf_dinov3",
    "naflexvit",
    "FAMILIES",
    "families",
    "family_of",
    "is_patched",
    "register_family",
    "remove_patch",
]

# name -> (detector, patch function), in the order the detectors are asked.
FAMILIES: Dict[str, Tuple[Callable[[nn.Module], bool], Callable[..., nn.Module]]] = families()


def family_of(model: nn.Module) -> str:
    """Name of the family that ``tome.apply_patch`` would use for ``model``.

    Raises:
        TypeError: naming the model's class and the supported families.
    """
    registered = families()
    for name, (detector, _) in registered.items():
        if detector(model):
            return name
    raise TypeError(
        f"{type(model).__name__} ({type(model).__module__}) is not a model ToMe can patch. "
        f"Supported families: {', '.join(registered)}"
    )
