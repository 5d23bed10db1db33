"""ToMe for torchvision Vision Transformers (``torchvision.models.vision_transformer``).

Covers ``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32`` and ``vit_h_14``
(including torchvision's SWAG weights), with or without a conv stem or a
``representation_size`` pre-logits layer. The blocks are batch-first
``EncoderBlock``s around an ``nn.MultiheadAttention`` whose packed
``in_proj_weight`` is reused here, so attention runs through
``scaled_dot_product_attention`` with the ``log(size)`` bias of proportional
attention. The model reads the class token, which never merges, so the
classifier head needs no change.

The attention branch and block below are shared with the SWAG family, whose
blocks have the same layout but run sequence-first.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._attention_body import attend, packed_heads
from ._checks import check_family, check_own_methods, has_class
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ToMeAttentionMixin,
    ToMeBlockMixin,
    ToMeModelMixin,
    ToMeSettings,
    call_attention,
    configure,
    example_images,
    original_class,
    patch_model,
    register,
)
from ._shared import ATTENTION_FEATURES, AttentionCall, ToMeState

__all__ = [
    "torchvision",
    "is_torchvision_vit",
    "check_mha",
    "ToMeEncoder",
    "ToMeSwagEncoder",
    "ToMeEncoderBlock",
    "ToMeMultiheadAttention",
]

_TV_MODULE = "torchvision.models.vision_transformer"


def is_torchvision_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision ``VisionTransformer`` (checked by class, torchvision not imported)."""
    return has_class(model, "VisionTransformer", _TV_MODULE)


def check_mha(attn: nn.Module, where: str, batch_first: bool) -> None:
    """Raise ``TypeError`` unless ``attn`` is a plain self-attention ``nn.MultiheadAttention`` ToMe can rerun.

    Args:
        attn: The block's attention module.
        where: Its path in the model, for the message.
        batch_first: The layout the surrounding block feeds it.
    """
    supported = (
        "supported: nn.MultiheadAttention with packed in_proj_weight (kdim == vdim == embed_dim), "
        f"batch_first={batch_first}, no add_bias_kv, no add_zero_attn"
    )
    if not isinstance(attn, nn.MultiheadAttention) or original_class(attn).forward is not nn.MultiheadAttention.forward:
        raise TypeError(f"{where} is a {type(attn).__name__}; {supported}")
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        raise TypeError(
            f"{where} is an nn.MultiheadAttention with separate q/k/v projections "
            f"(kdim={attn.kdim}, vdim={attn.vdim}, embed_dim={attn.embed_dim}); {supported}"
        )
    if attn.bias_k is not None or attn.bias_v is not None:
        raise TypeError(f"{where} is an nn.MultiheadAttention with add_bias_kv=True; {supported}")
    if attn.add_zero_attn:
        raise TypeError(f"{where} is an nn.MultiheadAttention with add_zero_attn=True; {supported}")
    if bool(attn.batch_first) != batch_first:
        raise TypeError(
            f"{where} is an nn.MultiheadAttention with batch_first={attn.batch_first}, but its block "
            f"feeds it {'batch' if batch_first else 'sequence'}-first tokens; {supported}"
        )


class ToMeMultiheadAttention(ToMeAttentionMixin):
    """``nn.MultiheadAttention`` (self-attention) that adds a ``log(size)`` bias and reports
    the mean key when asked. Uses the module's own packed projection weights, so the
    result is what the module computes (``need_weights=False``) plus the bias; like
    the module, it returns ``(output, None)``."""

    _tome_features = ATTENTION_FEATURES

    def _tome_attention(self, x: torch.Tensor, call: AttentionCall) -> Tuple[torch.Tensor, None]:
        # x is (batch, tokens, channels), batch-first whatever self.batch_first says.
        q, k, v = packed_heads(F.linear(x, self.in_proj_weight, self.in_proj_bias), self.num_heads)
        # nn.MultiheadAttention applies its dropout to the attention weights, only in training.
        out = attend(call, q, k, v, dropout_p=self.dropout if self.training else 0.0)
        # The module applies out_proj functionally (its hooks never run), so do the same.
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None


class ToMeEncoderBlock(ToMeBlockMixin):
    """``EncoderBlock`` (``ln_1``, ``self_attention``, ``dropout``, ``ln_2``, ``mlp``) merging tokens.

    Shared by torchvision (batch-first) and SWAG (sequence-first, see its subclass);
    inside a patched model its tokens are always batch-first.
    """

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        y = self.ln_1(x)
        (out, _), metric = call_attention(self.self_attention, y, bias, y, y, need_weights=False)
        return self.dropout(out), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_2(x))


class ToMeEncoder:
    """torchvision's / SWAG's ``Encoder``. A patched model calls it through ``__call__`` (so its
    hooks fire, e.g. accelerate's weight offloading) with ``tome=run``: it adds its position
    embedding, hands the batch-first tokens to ``run`` (the merging block loop) and applies
    its final norm. Without ``tome`` it is the original module."""

    _tome_sequence_first = False  # SWAG keeps its position embedding as (tokens, 1, dim)

    def forward(self, input: torch.Tensor, *, tome: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        if tome is None:
            return super().forward(input)  # type: ignore[misc]
        pos = self.pos_embedding.transpose(0, 1) if self._tome_sequence_first else self.pos_embedding
        return self.ln(tome(self.dropout(input + pos)))


class ToMeSwagEncoder(ToMeEncoder):
    """SWAG's ``Encoder``: the same, with a sequence-first position embedding."""

    _tome_sequence_first = True


class ToMeEncoderModel(ToMeModelMixin):
    """Model-level part shared by torchvision and SWAG: blocks live in ``encoder.layers``."""

    def _tome_blocks(self) -> Sequence[nn.Module]:
        return list(self.encoder.layers)

    def _tome_encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, ToMeState]:
        """Batch-first embedded tokens (before the position embedding) through the encoder."""
        final = []

        def run(tokens: torch.Tensor) -> torch.Tensor:
            tokens, state = self._tome_run(tokens)
            final.append(state)
            return tokens

        x = self.encoder(x, tome=run)
        return x, final[-1]


class ToMeTorchvisionVisionTransformer(ToMeEncoderModel):
    """torchvision ``VisionTransformer`` whose encoder blocks merge tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        class_token = self.class_token.expand(x.shape[0], -1, -1)
        x, _ = self._tome_encode(torch.cat([class_token, x], dim=1))
        # The class token is protected and stays at index 0.
        return self.heads(x[:, 0])


def patch_encoder_vit(
    model: nn.Module,
    model_mixin: type,
    block_mixin: type,
    class_token: bool,
    settings: ToMeSettings,
    encoder_mixin: type = ToMeEncoder,
) -> nn.Module:
    """Patch a checked torchvision- or SWAG-layout ViT (``encoder.layers`` of ``EncoderBlock``s)."""
    return patch_model(
        model,
        model_mixin,
        list(model.encoder.layers),
        lambda block: block_mixin,
        attention=lambda block: (block.self_attention, ToMeMultiheadAttention),
        encoder=(model.encoder, encoder_mixin),
        settings=settings,
        protected_tokens=int(class_token),
        class_token=class_token,
    )


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` is a torchvision ViT that ToMe can run exactly."""
    check_family(model, "torchvision", is_torchvision_vit,
                 "a torchvision.models.VisionTransformer (vit_b_16 ... vit_h_14)")
    from torchvision.models import vision_transformer as tv

    own = original_class(model)
    check_own_methods(model, tv.VisionTransformer, ("forward", "_process_input"),
                      " Supported: torchvision's VisionTransformer and subclasses that only change __init__.")
    encoder = model.encoder
    if not isinstance(encoder, tv.Encoder) or original_class(encoder).forward is not tv.Encoder.forward:
        raise TypeError(
            f"{own.__name__}.encoder is a {type(encoder).__name__}; ToMe supports torchvision's Encoder"
        )
    for index, block in enumerate(encoder.layers):
        block_cls = original_class(block)
        if block_cls is not tv.EncoderBlock:
            raise TypeError(
                f"{own.__name__}.encoder.layers[{index}] is a {block_cls.__name__}; ToMe supports "
                "torchvision's EncoderBlock"
            )
        check_mha(block.self_attention, f"{own.__name__}.encoder.layers[{index}].self_attention", batch_first=True)


def torchvision(
    model: nn.Module, trace_source: bool = KEEP, prop_attn: Optional[bool] = KEEP, **settings: Any
) -> nn.Module:
    """Patch a torchvision Vision Transformer in place to merge tokens; set ``model.r`` after.

    Called on a patched model, it changes only the settings given.

    Args:
        model: A ``torchvision.models.VisionTransformer`` (``vit_b_16``, ``vit_b_32``,
            ``vit_l_16``, ``vit_l_32``, ``vit_h_14``, any weights).
        trace_source: Track which original patches each token contains; read
            ``tome.last_forward(model).source`` after a forward.
        prop_attn: Proportional attention (``log(size)`` added to attention logits);
            None: the default rule (on: :func:`tome.patch.default_prop_attn`).
        **settings: The other settings, ``r`` and ``method`` (:class:`tome.patch.ToMeSettings`).

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model, its encoder, a block or an attention layer is not
            something ToMe can run exactly (e.g. separate q/k/v projections).
        ValueError: for an unknown setting or an invalid value.
    """
    return configure(model, family="torchvision", caller="tome.patch.torchvision", trace_source=trace_source,
                     prop_attn=prop_attn, **settings)


def _patch(model: nn.Module, settings: ToMeSettings) -> nn.Module:
    check_supported(model)
    return patch_encoder_vit(model, ToMeTorchvisionVisionTransformer, ToMeEncoderBlock, True, settings)


def _tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=5).eval()


register(FamilySpec(
    name="torchvision",
    detector=is_torchvision_vit,
    patch=_patch,
    priority=30,
    exports=True,
    traceable=True,
    attention_features="nn.MultiheadAttention",
    # Gradients off, nn.MultiheadAttention takes its fused fast path, another kernel than the
    # patched model's scaled_dot_product_attention: equal to about 5e-7 (docs/families.md).
    examples=lambda: (Example("vit", _tiny_vit, example_images, requires=("torchvision",), idle_atol=1e-5),),
))
