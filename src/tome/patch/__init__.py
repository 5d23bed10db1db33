"""Integrations: one patch function per model family.

Each ``tome.patch.<family>(model, **settings)`` swaps the classes of the model, its
blocks and their attention modules in place so that every block merges
``model.r`` tokens between its attention and its MLP; called again, it changes
only the settings passed. ``tome.remove_patch`` undoes it. Optional libraries
are only imported by the family that needs them.

A family is one declaration, a :class:`FamilySpec` given to :func:`register`
(see ``docs/families.md``, "Adding a family"): its detector, its patch function,
its settings (a dataclass) and the tiny models the conformance suite runs on.
``tome.apply_patch`` asks the detectors in priority order.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Tuple

from torch import nn

from . import (  # noqa: F401  (register the VLM adapters)
    _vlm_families,
    _vlm_gemma3,
    _vlm_idefics3,
    _vlm_internvl,
    _vlm_onevision,
)

# Importing the family modules registers them.
from ._diffusers import DiffusionSettings, diffusers, set_token_grid
from ._eva import RopeSettings, eva
from ._hf import hf
from ._hf_dinov3 import hf_dinov3
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ForwardReport,
    ToMeSettings,
    configure,
    default_prop_attn,
    families,
    family_spec,
    is_patched,
    last_forward,
    list_families,
    passed,
    patched_parts,
    register,
    register_family,
    registered,
    remove_patch,
)
from ._mae import mae
from ._naflex import naflexvit
from ._swag import swag
from ._timm import timm
from ._torchvision import torchvision
from ._vlm import VisualTokenSettings, vlm

__all__ = [
    "timm",
    "mae",
    "torchvision",
    "swag",
    "hf",
    "diffusers",
    "set_token_grid",
    "eva",
    "hf_dinov3",
    "naflexvit",
    "vlm",
    "FAMILIES",
    "KEEP",
    "DiffusionSettings",
    "Example",
    "FamilySpec",
    "ForwardReport",
    "RopeSettings",
    "VisualTokenSettings",
    "ToMeSettings",
    "configure",
    "default_prop_attn",
    "families",
    "family_of",
    "family_spec",
    "is_patched",
    "last_forward",
    "list_families",
    "passed",
    "patched_parts",
    "register",
    "register_family",
    "registered",
    "remove_patch",
]


class _Families(Mapping):
    """``name -> (detector, patch function)`` of the registered families, read from the
    registry on every access (a family registered later appears), in detection order."""

    def __getitem__(self, name: str) -> Tuple[Callable[[Any], bool], Callable[..., Any]]:
        spec = family_spec(name) if name in list_families() else None
        if spec is None:
            raise KeyError(name)
        return spec.detector, spec.apply

    def __iter__(self) -> Iterator[str]:
        return iter(list_families())

    def __len__(self) -> int:
        return len(list_families())

    def __repr__(self) -> str:
        return f"FAMILIES({list_families()})"


FAMILIES: Mapping[str, Tuple[Callable[[Any], bool], Callable[..., Any]]] = _Families()


def family_of(model: nn.Module) -> str:
    """Name of the family that ``tome.apply_patch`` would use for ``model``.

    Raises:
        TypeError: naming the model's class and the supported families.
    """
    for spec in registered():
        if spec.detector(model):
            return spec.name
    raise TypeError(
        f"{type(model).__name__} ({type(model).__module__}) is not a model ToMe can patch. "
        f"Supported families: {', '.join(list_families())}"
    )
