"""ToMe for Hugging Face DINOv3 ViTs (``transformers`` ``DINOv3ViTModel``).

DINOv3 rotates the queries and keys of its patch tokens by their 2-D position
(RoPE on patch-centre coordinates in [-1, 1]); its class and 4 register tokens
are not rotated and never merge. The model computes one ``(cos, sin)`` pair per
forward and hands it to every layer. Patched, the model hands its forward's ledger
the rotary angles of its patches (from the module's own coordinates and
frequencies), which the ledger carries from the first layer on when a layer
merges; every layer after a merge rotates with ``(cos, sin)`` recomputed from the
merged tokens' angles, as the timm family does (:mod:`tome.patch._rope`,
``docs/backbones.md``).

Built on the transformers machinery of ``tome/patch/_hf.py`` (the model starts
one ledger per forward and hands it to every layer through the keyword
arguments); what is DINOv3's own is here: its layer, its attention and its angles.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _hf
from ._attention_body import fused_attention, split_heads
from ._checks import check_class, check_family
from ._eva import RopeSettings, rope_setting_properties
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    call_attention,
    configure,
    example_images,
    is_patched,
    original_class,
    patch_model,
    register,
    swap_class,
)
from ._rope import (
    DEFAULT_ROPE_METRIC,
    RotaryPositions,
    ToMeRotaryAttentionMixin,
    ToMeRotaryBlockMixin,
    cos_sin,
    token_angles,
)
from ._shared import AttentionCall

__all__ = ["hf_dinov3", "is_hf_dinov3"]

_MODULE = "transformers.models.dinov3_vit.modeling_dinov3_vit"
_AUGMENTATIONS = ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class ToMeDINOv3Attention(ToMeRotaryAttentionMixin):
    """``DINOv3ViTAttention`` with a ``log(size)`` bias; reports the keys (after the rotation,
    or before it with ``rope_metric="plain"``)."""

    _tome_keep_name = True
    _tome_attrs = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "dropout")

    @property
    def _tome_rotated_metric(self) -> bool:  # type: ignore[override]
        return self.__dict__["_tome_info"].get("rope_metric", DEFAULT_ROPE_METRIC) == "rotated"

    def _tome_rope_attention(
        self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], call: AttentionCall
    ) -> Tuple[torch.Tensor, None]:
        q, k, v = (split_heads(proj(x), head_dim=self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rope
        prefix = x.shape[1] - cos.shape[-2]  # class and register tokens are not rotated
        out = self._tome_attend(call, q, k, v, prefix, lambda t: t * cos + _rotate_half(t) * sin,
                                dropout_p=self.dropout if self.training else 0.0, scale=self.scaling,
                                fused=fused_attention(self))
        return self.o_proj(out), None


class ToMeDINOv3Layer(ToMeRotaryBlockMixin, _hf.ToMeHFLayer):
    """``DINOv3ViTLayer``: LayerScale and drop path on both branches; rotary pair handed on."""

    _tome_block_args = ("attention_mask", "position_embeddings")  # DINOv3ViTLayer.forward's arguments after x
    _tome_rope_arg = "position_embeddings"

    def _tome_table(self, angles: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        return cos_sin(angles, dtype)

    def _tome_attn_branch(
        self, x: torch.Tensor, bias: Optional[torch.Tensor], rope: Any = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        (out, _), metric = call_attention(self.attention, self.norm1(x), bias, rope=rope)
        return self.drop_path(self.layer_scale1(out)), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class ToMeDINOv3Encoder(_hf.ToMeHFRunner):
    """``DINOv3ViTEncoder``: its own forward, with the forward's ledger among the keyword arguments."""

    def _tome_blocks(self) -> Sequence[nn.Module]:
        return list(self.layer)


class ToMeDINOv3Model(_hf.ToMeHFModel):
    """``DINOv3ViTModel``: ``model.r`` and ``model._tome_info``; its own forward."""

    def _tome_blocks(self) -> Sequence[nn.Module]:
        return list(self.model.layer)

    def _tome_positions(self, args: tuple, kwargs: Dict[str, Any]) -> Optional[RotaryPositions]:
        pixel_values = args[0] if args else kwargs.get("pixel_values")
        if pixel_values is None:
            return None  # the model's own forward says what is missing
        angles = functools.partial(self._tome_angles, pixel_values.shape[-2:])
        return RotaryPositions(angles, self._tome_info["rope_position"])

    def _tome_angles(self, image_size: Tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, head_dim // 2)`` rotary angles of the tokens ``x`` of images of
        ``image_size``, with the rotary module's coordinates and frequencies (zeros for the prefix)."""
        rope = self.rope_embeddings
        if rope.training and any(getattr(self.config, name, None) is not None for name in _AUGMENTATIONS):
            raise ValueError(
                "token merging (r > 0) cannot follow DINOv3's random rotary coordinate augmentation while "
                "training (config.pos_embed_shift / jitter / rescale); call model.eval() or set model.r = 0"
            )
        from transformers.models.dinov3_vit.modeling_dinov3_vit import get_patches_center_coordinates

        patch = self.config.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (image_size[0] // patch_h, image_size[1] // patch_w)
        coords = get_patches_center_coordinates(*grid, dtype=torch.float32, device=rope.inv_freq.device)
        angles = (2 * math.pi * coords[:, :, None] * rope.inv_freq[None, None, :]).flatten(1, 2)
        return token_angles(angles.to(x.device), 1 + self.config.num_register_tokens, x.shape[0])

    @staticmethod
    def _tome_patch_again(model: nn.Module) -> nn.Module:
        return hf_dinov3(model)


def _check(model: nn.Module) -> None:
    """The encoder, layers, attention and rotary modules must be transformers 5.x's DINOv3 classes."""
    parts = [("model", model.model, "DINOv3ViTEncoder"),
             ("rope_embeddings", model.rope_embeddings, "DINOv3ViTRopePositionEmbedding")]
    for index, layer in enumerate(model.model.layer):
        parts += [(f"model.layer[{index}]", layer, "DINOv3ViTLayer"),
                  (f"model.layer[{index}].attention", layer.attention, "DINOv3ViTAttention")]
    for where, module, expected in parts:
        check_class(module, f"DINOv3ViTModel.{where}", (expected,), _MODULE, _hf.LAYOUT)
    missing = [name for name in ToMeDINOv3Attention._tome_attrs if not hasattr(model.model.layer[0].attention, name)]
    if missing or not hasattr(model.rope_embeddings, "inv_freq"):
        raise TypeError(f"DINOv3ViTModel's attention lacks {missing or ['rope_embeddings.inv_freq']};{_hf.LAYOUT}")


def is_hf_dinov3(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``DINOv3ViTModel`` (by class; nothing imported)."""
    own = original_class(model)
    return own.__name__ == "DINOv3ViTModel" and own.__module__ == _MODULE


def hf_dinov3(
    model: nn.Module, trace_source: bool = KEEP, prop_attn: Optional[bool] = KEEP, **settings: Any
) -> nn.Module:
    """Patch a transformers ``DINOv3ViTModel`` in place to merge tokens; set ``model.r`` after.

    Called on a patched model, it changes only the settings given.

    Args:
        model: A ``DINOv3ViTModel``.
        trace_source: Track which original patches each token contains
            (``tome.last_forward(model).source``; :func:`tome.unmerge_tokens` maps
            ``last_hidden_state`` back to the patch grid).
        prop_attn: Proportional attention (``log(size)`` added to attention logits);
            None: the default rule (on: :func:`tome.patch.default_prop_attn`).
        **settings: ``rope_position``, ``rope_metric`` (as in :func:`tome.patch.eva`),
            ``r`` and ``method`` (:class:`tome.patch.RopeSettings`).

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model is not a ``DINOv3ViTModel`` with the layout of transformers 5.x.
        ValueError: for an unknown setting or an invalid value (``rope_position``, ``rope_metric``, ...).
    """
    return configure(model, family="hf_dinov3", caller="tome.patch.hf_dinov3", trace_source=trace_source,
                     prop_attn=prop_attn, **settings)


def _patch(model: nn.Module, settings: RopeSettings) -> nn.Module:
    check_family(model, "hf_dinov3", is_hf_dinov3, "a transformers DINOv3ViTModel")
    if is_patched(model) and not isinstance(model, ToMeDINOv3Model):
        raise TypeError(f"{type(model).__name__} is already patched by another family; call tome.remove_patch first")
    _check(model)
    encoder = model.model
    swap_class(encoder, ToMeDINOv3Encoder)
    _hf._keep_output_capture(encoder)
    patch_model(
        model,
        ToMeDINOv3Model,
        list(encoder.layer),
        lambda layer: ToMeDINOv3Layer,
        attention=lambda layer: (layer.attention, ToMeDINOv3Attention),
        settings=settings,
        protected_tokens=1 + model.config.num_register_tokens,
        class_token=True,
    )
    _hf._keep_output_capture(model)
    # The encoder reports into the same record as the model the user holds; the attention
    # modules read the rope_metric setting from it (patch_model records the settings there).
    for module in [encoder] + [layer.attention for layer in encoder.layer]:
        object.__setattr__(module, "_tome_info", model._tome_info)
    return model


def _tiny_dinov3() -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                             patch_size=8, image_size=32, num_register_tokens=4)
    return DINOv3ViTModel(config).eval()


rope_setting_properties(ToMeDINOv3Model)
register(FamilySpec(
    name="hf_dinov3",
    detector=is_hf_dinov3,
    patch=_patch,
    settings=RopeSettings,
    priority=45,
    exports=True,
    examples=lambda: (Example("dinov3", _tiny_dinov3, lambda batch, seed: {"pixel_values": example_images(batch, seed)},
                              requires=("transformers",)),),
))
