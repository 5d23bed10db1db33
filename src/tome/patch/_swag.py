"""ToMe for SWAG Vision Transformers loaded through torch.hub.

Singh et al., "Revisiting Weakly Supervised Pre-Training of Visual Perception
Models", CVPR 2022 (facebookresearch/SWAG: ``vit_b16_in1k``, ``vit_l16_in1k``,
``vit_h14_in1k`` and the trunks without a head).

SWAG's code is not an installable package, so its modules are recognised by
class name and layout: a ``VisionTransformer`` (or a subclass such as
``ViTB16``) with ``conv_proj``, ``classifier`` (``"token"`` or ``"gap"``),
``encoder`` (``pos_embedding`` of shape ``(seq, 1, dim)``, ``dropout``,
``layers`` of ``EncoderBlock``, ``ln``), ``trunk_output`` and ``head``. Its
blocks run sequence-first ``(tokens, batch, channels)``; the patched model
transposes once after embedding and runs every block batch-first, while a
block called on its own keeps the sequence-first interface. "token" models read
the protected class token; "gap" models average all tokens weighted by size.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from ._checks import check_family
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ToMeSettings,
    configure,
    example_images,
    original_class,
    register,
)
from ._shared import BlockCall, ToMeState, weighted_mean
from ._torchvision import ToMeEncoderBlock, ToMeEncoderModel, ToMeSwagEncoder, check_mha, patch_encoder_vit

__all__ = ["swag", "is_swag_vit"]

_CLASSIFIERS = ("token", "gap")
# Modules whose VisionTransformer classes belong to other families.
_OTHER_FAMILIES = ("timm.", "torchvision.")


def _swag_base(cls: type) -> Optional[type]:
    """The ``VisionTransformer`` class in ``cls``'s MRO that is not timm's or torchvision's."""
    for base in cls.__mro__:
        if base.__name__ == "VisionTransformer":
            return None if base.__module__.startswith(_OTHER_FAMILIES) else base
    return None


def is_swag_vit(model: nn.Module) -> bool:
    """Whether ``model`` looks like a SWAG ViT (by class name and attributes; nothing is imported)."""
    if _swag_base(type(model)) is None:
        return False
    encoder = getattr(model, "encoder", None)
    return isinstance(getattr(model, "classifier", None), str) and hasattr(encoder, "layers")


def _defined_by(cls: type, method: str) -> str:
    """Name of the class in ``cls``'s MRO that defines ``method``."""
    for base in cls.__mro__:
        if method in base.__dict__:
            return base.__name__
    return ""


class ToMeSwagEncoderBlock(ToMeEncoderBlock):
    """SWAG ``EncoderBlock``: same layout as torchvision's, sequence-first interface."""

    # SWAG's own block forward is sequence-first, but a patched model runs batch-first.
    _tome_native_when_idle = False

    def forward(self, input: torch.Tensor, *, tome: Optional[BlockCall] = None) -> torch.Tensor:
        if tome is not None or self._tome_block_r == 0:
            return super().forward(input, tome=tome)
        # Called on its own: (tokens, batch, channels) in and out, batch-first inside.
        return super().forward(input.transpose(0, 1)).transpose(0, 1)


class ToMeSwagVisionTransformer(ToMeEncoderModel):
    """SWAG ``VisionTransformer`` whose blocks merge tokens; "gap" pooling weighted by size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, state = self._tome_features(x)
        if self.classifier == "token":
            x = x[:, 0]  # the class token is protected and stays at index 0
        else:
            x = weighted_mean(x, state.size)  # "gap": no prefix tokens, every patch counts once
        x = self.trunk_output(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def _tome_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, ToMeState]:
        """Images ``(batch, 3, H, W)`` to normalised batch-first tokens and the final state."""
        traced = isinstance(x, torch.fx.Proxy)  # torch.fx: shapes are not known while tracing
        if not traced and (x.dim() != 4 or x.shape[2] != self.image_size or x.shape[3] != self.image_size):
            raise ValueError(
                f"{type(self).__name__} expects images of shape (batch, channels, {self.image_size}, "
                f"{self.image_size}), got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        x = self.conv_proj(x)
        # (batch, dim, h, w) -> (batch, h * w, dim): batch-first, unlike SWAG's own forward.
        x = x.reshape(batch, self.hidden_dim, -1).transpose(1, 2)
        if self.classifier == "token":
            x = torch.cat([self.class_token.expand(batch, -1, -1), x], dim=1)
        return self._tome_encode(x)


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` has SWAG's ViT layout that ToMe can run exactly."""
    check_family(model, "swag", is_swag_vit, "a SWAG VisionTransformer from torch.hub (facebookresearch/swag)")
    own = original_class(model)
    name = own.__name__
    if _defined_by(own, "forward") != "VisionTransformer":
        raise TypeError(
            f"{name}.forward is overridden (by {_defined_by(own, 'forward')}); ToMe supports SWAG's "
            "VisionTransformer.forward and subclasses that only change __init__ (ViTB16, ViTL16, ViTH14)"
        )
    if model.classifier not in _CLASSIFIERS:
        raise TypeError(f"{name} uses classifier={model.classifier!r}; supported: {_CLASSIFIERS}")
    missing = [
        attr
        for attr in ("conv_proj", "hidden_dim", "image_size", "trunk_output", "head")
        + (("class_token",) if model.classifier == "token" else ())
        if not hasattr(model, attr)
    ]
    encoder = model.encoder
    missing += [f"encoder.{attr}" for attr in ("pos_embedding", "dropout", "ln") if not hasattr(encoder, attr)]
    if missing:
        raise TypeError(f"{name} lacks {missing}; not SWAG's VisionTransformer layout")
    if _defined_by(original_class(encoder), "forward") != "Encoder":
        raise TypeError(f"{name}.encoder is a {type(encoder).__name__}; ToMe supports SWAG's Encoder")
    pos = encoder.pos_embedding
    if pos.dim() != 3 or pos.shape[1] != 1:
        raise TypeError(
            f"{name}.encoder.pos_embedding has shape {tuple(pos.shape)}; SWAG's layout is (tokens, 1, dim)"
        )
    for index, block in enumerate(encoder.layers):
        where = f"{name}.encoder.layers[{index}]"
        block_cls = original_class(block)
        if block_cls.__name__ != "EncoderBlock" or _defined_by(block_cls, "forward") != "EncoderBlock":
            raise TypeError(f"{where} is a {block_cls.__name__}; ToMe supports SWAG's EncoderBlock")
        absent = [attr for attr in ("ln_1", "self_attention", "dropout", "ln_2", "mlp") if not hasattr(block, attr)]
        if absent:
            raise TypeError(f"{where} lacks {absent}; not SWAG's EncoderBlock layout")
        check_mha(block.self_attention, f"{where}.self_attention", batch_first=False)


def swag(model: nn.Module, trace_source: bool = KEEP, prop_attn: Optional[bool] = KEEP, **settings: Any) -> nn.Module:
    """Patch a SWAG Vision Transformer in place to merge tokens; set ``model.r`` after.

    Called on a patched model, it changes only the settings given.

    Args:
        model: A SWAG ``VisionTransformer``, e.g.
            ``torch.hub.load("facebookresearch/swag", model="vit_b16_in1k")``.
        trace_source: Track which original patches each token contains; read
            ``tome.last_forward(model).source`` after a forward.
        prop_attn: Proportional attention (``log(size)`` added to attention logits);
            None: the default rule (on: :func:`tome.patch.default_prop_attn`).
        **settings: The other settings, ``r`` and ``method`` (:class:`tome.patch.ToMeSettings`).

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model does not have SWAG's layout, uses an unknown
            classifier, or an attention layer ToMe cannot rerun exactly.
        ValueError: for an unknown setting or an invalid value.
    """
    return configure(model, family="swag", caller="tome.patch.swag", trace_source=trace_source, prop_attn=prop_attn,
                     **settings)


def _patch(model: nn.Module, settings: ToMeSettings) -> nn.Module:
    check_supported(model)
    return patch_encoder_vit(
        model, ToMeSwagVisionTransformer, ToMeSwagEncoderBlock, model.classifier == "token", settings, ToMeSwagEncoder,
    )


def _tiny_swag(classifier: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from ._swag_layout import VisionTransformer

        return VisionTransformer(classifier=classifier).eval()

    return build


register(FamilySpec(
    name="swag",
    detector=is_swag_vit,
    patch=_patch,
    priority=40,
    exports=True,
    traceable=True,
    attention_features="nn.MultiheadAttention",
    # Batch-first inside the patched model, sequence-first in SWAG's: other reduction orders.
    examples=lambda: (Example("gap", _tiny_swag("gap"), example_images, idle_atol=1e-5, exports=False),  # as "token"
                      Example("token", _tiny_swag("token"), example_images, idle_atol=1e-5)),
))
