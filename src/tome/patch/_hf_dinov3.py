"""ToMe for Hugging Face DINOv3 ViTs (``transformers`` ``DINOv3ViTModel``).

DINOv3 rotates the queries and keys of its patch tokens by their 2-D position
(RoPE on patch-centre coordinates in [-1, 1]); its class and 4 register tokens
are not rotated and never merge. The model computes one ``(cos, sin)`` pair per
forward and hands it to every layer. Patched, its rotary module returns that
pair as a :class:`RotaryPair`, which can also give the rotary angles of every
patch; the first layer that merges starts carrying those angles in the state
(``ToMeState.positions``), merged like the features, and every later layer
rotates with ``(cos, sin)`` recomputed from the merged tokens' angles, as the
timm family does (``tome/patch/_eva.py``, ``docs/backbones.md``).

Built on the transformers machinery of ``tome/patch/_hf.py`` (the model starts
one ledger per forward and hands it to every layer through the keyword
arguments); what is DINOv3's own is here: its layer, attention and rotary module.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _hf
from ._eva import DEFAULT_ROPE_METRIC, RopeSettings, rope_setting_properties
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ToMeAttentionMixin,
    _masked,
    configure,
    example_images,
    is_patched,
    original_class,
    patch_model,
    register,
    supported_families,
    swap_class,
)
from ._shared import AttentionCall, ToMeState, attention, merge_block

__all__ = ["hf_dinov3", "is_hf_dinov3", "RotaryPair"]

_MODULE = "transformers.models.dinov3_vit.modeling_dinov3_vit"
_LAYER_ARGS = ("attention_mask", "position_embeddings")  # DINOv3ViTLayer.forward's arguments after x


class RotaryPair(tuple):
    """DINOv3's ``(cos, sin)`` rotary pair that can also give the angles it was made from.

    Unpacks as the pair the model's layers expect. ``angles()`` computes the
    ``(patches, head_dim // 2)`` rotary angles with the module's own coordinates and
    frequencies (only called by a layer that merges).
    """

    def __new__(cls, cos: torch.Tensor, sin: torch.Tensor, rope: nn.Module, grid: Tuple[int, int]) -> "RotaryPair":
        pair = super().__new__(cls, (cos, sin))
        pair.rope = rope
        pair.grid = grid
        info = rope.__dict__.get("_tome_info") or {}
        pair.rule = info.get("rope_position", "mean")
        pair.rotated_metric = info.get("rope_metric", DEFAULT_ROPE_METRIC) == "rotated"
        return pair

    def angles(self) -> torch.Tensor:
        rope = self.rope
        if rope.training and any(
            getattr(rope.config, name, None) is not None
            for name in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")
        ):
            raise ValueError(
                "token merging (r > 0) cannot follow DINOv3's random rotary coordinate augmentation while "
                "training (config.pos_embed_shift / jitter / rescale); call model.eval() or set model.r = 0"
            )
        from transformers.models.dinov3_vit.modeling_dinov3_vit import get_patches_center_coordinates

        coords = get_patches_center_coordinates(*self.grid, dtype=torch.float32, device=rope.inv_freq.device)
        return (2 * math.pi * coords[:, :, None] * rope.inv_freq[None, None, :]).flatten(1, 2)


class ToMeDINOv3Rope:
    """``DINOv3ViTRopePositionEmbedding`` returning a :class:`RotaryPair` (same values)."""

    _tome_keep_name = True

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cos, sin = super().forward(pixel_values)  # type: ignore[misc]
        patch = self.config.patch_size  # type: ignore[attr-defined]
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)
        return RotaryPair(cos, sin, self, grid)  # type: ignore[arg-type]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class ToMeDINOv3Attention(ToMeAttentionMixin):
    """``DINOv3ViTAttention`` with a ``log(size)`` bias; reports the keys (before or after the rotation)."""

    _tome_keep_name = True
    _tome_attrs = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "dropout")

    def forward(self, *args: Any, tome: Optional[AttentionCall] = None, **kwargs: Any) -> Any:
        if tome is None:
            return super().forward(*args, **kwargs)
        return self._tome_rope_attention(args[0], kwargs["position_embeddings"], kwargs["rotated_metric"], tome)

    def _tome_rope_attention(
        self, x: torch.Tensor, position_embeddings: Tuple[torch.Tensor, torch.Tensor], rotated_metric: bool,
        call: AttentionCall,
    ) -> Tuple[torch.Tensor, None]:
        batch, tokens, _ = x.shape
        shape = (batch, tokens, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        plain_k = k
        cos, sin = position_embeddings
        prefix = tokens - cos.shape[-2]  # class and register tokens are not rotated
        q = torch.cat((q[:, :, :prefix], q[:, :, prefix:] * cos + _rotate_half(q[:, :, prefix:]) * sin), dim=-2)
        k = torch.cat((k[:, :, :prefix], k[:, :, prefix:] * cos + _rotate_half(k[:, :, prefix:]) * sin), dim=-2)
        fused = getattr(self.config, "_attn_implementation", "sdpa") != "eager"
        dropout_p = self.dropout if self.training else 0.0
        out = attention(q, k, v, call.bias, dropout_p=dropout_p, scale=self.scaling, fused=fused)
        call.metric = (k if rotated_metric else plain_k).mean(dim=1)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), None


def _merged_pair(state: ToMeState, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the tokens this (merged) state describes, ``(batch, 1, patches, head_dim)``."""
    angles = state.positions[:, state.protected_tokens:].tile(2).unsqueeze(1)  # type: ignore[index]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class ToMeDINOv3Layer(_hf.ToMeHFLayer):
    """``DINOv3ViTLayer``: LayerScale and drop path on both branches; rotary pair handed on."""

    def _tome_call(
        self, x: torch.Tensor, args: tuple, kwargs: Dict[str, Any], call: Any, masks_mask_nothing: bool = False
    ) -> Any:
        kwargs = {**dict(zip(_LAYER_ARGS, args)), **kwargs}
        if call.r <= 0 and call.state.size is None and not isinstance(x, torch.fx.Proxy):
            return super()._tome_call(x, (), kwargs, call, masks_mask_nothing)  # the layer's own forward
        if not masks_mask_nothing and _masked((), {"attention_mask": kwargs.get("attention_mask")}):
            raise ValueError(
                "an attention mask cannot be combined with token merging: merged tokens no longer line up "
                "with the mask. Set model.r = 0 to use a mask."
            )
        pair = kwargs.get("position_embeddings")
        state = call.state
        if state.size is None:
            if not isinstance(pair, RotaryPair):
                raise TypeError(
                    "DINOv3ViTLayer merges but its rotary pair does not say where its patches are; patch the "
                    "whole DINOv3ViTModel with tome.apply_patch (or tome.patch.hf_dinov3)"
                )
            angles = pair.angles().to(x.device)
            angles = torch.cat([angles.new_zeros(state.protected_tokens, angles.shape[1]), angles])
            state = replace(state, positions=angles.unsqueeze(0).expand(x.shape[0], -1, -1), position_rule=pair.rule)
            now = (pair[0], pair[1])
        else:
            now = _merged_pair(state, x.dtype)
        rotated = pair.rotated_metric if isinstance(pair, RotaryPair) else DEFAULT_ROPE_METRIC == "rotated"
        branch = functools.partial(self._tome_attn_branch, position_embeddings=now, rotated_metric=rotated)
        x, call.out = merge_block(x, state, call.r, branch, self._tome_mlp_branch, self._tome_rule)
        return x

    def _tome_attn_branch(
        self, x: torch.Tensor, bias: Optional[torch.Tensor], position_embeddings: Any = None,
        rotated_metric: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        call = AttentionCall(bias)
        out, _ = self.attention(self.norm1(x), tome=call, position_embeddings=position_embeddings,
                                rotated_metric=rotated_metric)
        return self.drop_path(self.layer_scale1(out)), call.metric  # type: ignore[return-value]

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

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """The original class's ``from_pretrained``, patched again (``r = 0``)."""
        parent = cls.__dict__.get("_tome_parent")
        if parent is None:
            return super().from_pretrained(*args, **kwargs)
        loaded = parent.from_pretrained(*args, **kwargs)
        if isinstance(loaded, tuple):  # output_loading_info=True
            return (hf_dinov3(loaded[0]),) + loaded[1:]
        return hf_dinov3(loaded)


def _check(model: nn.Module) -> None:
    """The encoder, layers, attention and rotary modules must be transformers 5.x's DINOv3 classes."""
    parts = [("model", model.model, "DINOv3ViTEncoder"), ("rope_embeddings", model.rope_embeddings,
                                                            "DINOv3ViTRopePositionEmbedding")]
    for index, layer in enumerate(model.model.layer):
        parts += [(f"model.layer[{index}]", layer, "DINOv3ViTLayer"),
                  (f"model.layer[{index}].attention", layer.attention, "DINOv3ViTAttention")]
    for where, module, expected in parts:
        own = original_class(module)
        if own.__name__ != expected or own.__module__ != _MODULE:
            raise TypeError(f"DINOv3ViTModel.{where} is a {own.__name__} ({own.__module__}); ToMe expects "
                            f"{expected} (the layout of transformers 5.x)")
    missing = [name for name in ToMeDINOv3Attention._tome_attrs if not hasattr(model.model.layer[0].attention, name)]
    if missing or not hasattr(model.rope_embeddings, "inv_freq"):
        raise TypeError(f"DINOv3ViTModel's attention lacks {missing or ['rope_embeddings.inv_freq']}; ToMe "
                        "supports the layout of transformers 5.x")


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
    if not is_hf_dinov3(model):
        raise TypeError(f"tome.patch.hf_dinov3 expects a transformers DINOv3ViTModel, got {type(model).__name__}. "
                        f"Supported families: {supported_families()}")
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
    # The encoder reports into the same record as the model the user holds.
    object.__setattr__(encoder, "_tome_info", model._tome_info)
    rope = model.rope_embeddings
    swap_class(rope, ToMeDINOv3Rope)
    object.__setattr__(rope, "_tome_info", model._tome_info)
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
