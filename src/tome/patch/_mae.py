"""ToMe for MAE fine-tuned Vision Transformers (He et al., "Masked Autoencoders Are
Scalable Vision Learners", CVPR 2022).

Two forms exist: timm ViTs with ``global_pool="avg"`` (how timm ships MAE
fine-tuned weights), and the MAE code base's own ``models_vit.VisionTransformer``,
a timm subclass with a boolean ``global_pool``, an ``fc_norm`` and its own
``forward_features`` that returns the pooled feature. Both pool by a
size-weighted mean over patch tokens after merging. Proportional attention is
off by default: MAE models are fine-tuned with average pooling, and the paper
found them better without it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ._lifecycle import KEEP, Example, FamilySpec, ToMeSettings, configure, example_images, original_class, register
from ._shared import weighted_mean
from ._timm import (
    ToMeTimmVisionTransformer,
    apply_to_timm,
    check_blocks,
    check_supported,
    is_timm_mae,
    is_timm_vit,
    tiny_timm,
)

__all__ = ["mae", "is_mae", "is_mae_codebase"]


def is_mae_codebase(model: nn.Module) -> bool:
    """Whether ``model`` is the MAE code base's ViT (a timm subclass with a bool ``global_pool``)."""
    return is_timm_vit(model) and isinstance(getattr(model, "global_pool", None), bool)


def is_mae(model: nn.Module) -> bool:
    """Whether ``model`` holds MAE weights: the MAE code base's ViT or timm's ``.mae`` weights."""
    return is_mae_codebase(model) or is_timm_mae(model)


class ToMeMAEVisionTransformer(ToMeTimmVisionTransformer):
    """The MAE code base's ViT: ``forward_features`` returns the pooled feature."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x, state = self._tome_encode(x)
        return self._tome_mae_pool(x, state.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head(self.forward_features(x))

    def _tome_mae_pool(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        if self.global_pool:
            patches = x[:, self.num_prefix_tokens :]
            sizes = None if size is None else size[:, self.num_prefix_tokens :]
            return self.fc_norm(weighted_mean(patches, sizes))
        return self.norm(x)[:, 0]


def _check_mae_codebase(model: nn.Module) -> None:
    check_blocks(model)
    name = original_class(model).__name__
    if model.global_pool and not hasattr(model, "fc_norm"):
        raise TypeError(f"{name} has global_pool=True but no fc_norm; not the MAE code base's layout")


def mae(model: nn.Module, trace_source: bool = KEEP, prop_attn: Optional[bool] = KEEP, **settings: Any) -> nn.Module:
    """Patch an MAE fine-tuned ViT in place to merge tokens; set ``model.r`` after.

    Called on a patched model, it changes only the settings given.

    Args:
        model: A timm ViT (usually ``global_pool="avg"``) or the MAE code base's
            ``models_vit.VisionTransformer``.
        trace_source: Track which original patches each token contains.
        prop_attn: Proportional attention; None: the default rule, off for MAE
            models (:func:`tome.patch.default_prop_attn`).
        **settings: The other settings, ``r`` and ``method`` (:class:`tome.patch.ToMeSettings`).

    Returns:
        The same model, patched.

    Raises:
        TypeError: if the model is not a ViT ToMe can run exactly.
        ValueError: for an unknown setting or an invalid value.
    """
    return configure(model, family="mae", caller="tome.patch.mae", trace_source=trace_source, prop_attn=prop_attn,
                     **settings)


def _patch(model: nn.Module, settings: ToMeSettings) -> nn.Module:
    if is_mae_codebase(model):
        _check_mae_codebase(model)
        return apply_to_timm(model, settings, ToMeMAEVisionTransformer)
    check_supported(model)
    return apply_to_timm(model, settings, ToMeTimmVisionTransformer)


def _tiny_codebase() -> nn.Module:
    from ._mae_layout import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()


register(FamilySpec(
    name="mae",
    detector=is_mae,
    patch=_patch,
    priority=10,
    prop_attn_default=False,
    prop_attn_reason="off by default for MAE weights",
    exports=True,
    traceable=True,
    attention_features="timm Attention",
    examples=lambda: (
        Example("codebase", _tiny_codebase, example_images, requires=("timm",)),
        # timm's layout: the ".mae" tag (kept without weights) marks MAE weights; it exports as the timm family does.
        Example("timm_avg", tiny_timm("vit_base_patch16_224.mae", global_pool="avg"), example_images,
                requires=("timm",), exports=False),
    ),
))
