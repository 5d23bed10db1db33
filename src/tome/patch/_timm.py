"""ToMe for timm Vision Transformers (``timm.models.vision_transformer`` and ``deit``).

Handles everything a timm >= 1.0 ``VisionTransformer`` can be built with that
ToMe can run exactly: LayerScale, qk-norm, attention output norm and gate,
class/register/distillation prefix tokens, models without a class token,
``token``/``avg``/``max``/``avgmax``/``map`` pooling, ``dynamic_img_size``,
gradient checkpointing, fused or explicit attention. Anything else is refused
with a ``TypeError`` at patch time.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._lifecycle import ToMeBlockMixin, ToMeModelMixin, original_class, patch_model, supported_families
from ._shared import ToMeState, attention, merge_block, run_blocks, weighted_mean

__all__ = ["timm", "apply_to_timm", "is_timm_vit"]

_SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "", "map")


def _vit_base() -> type:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (checked by class, timm not imported otherwise)."""
    return any(
        cls.__name__ == "VisionTransformer" and cls.__module__ == "timm.models.vision_transformer"
        for cls in type(model).__mro__
    )


def _attention_branch(attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` with a ``log(size)`` bias, also returning the mean key."""
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out = attention(q, k, v, bias, dropout_p=dropout_p, scale=attn.scale, fused=attn.fused_attn)
    out = out.transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(dim=1)


class ToMeBlock(ToMeBlockMixin):
    """timm ``Block`` (pre-norm) with a merge between attention and MLP."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal or self._tome_block_r == 0:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        return self.tome_forward(x, self._tome_start(x), self._tome_block_r)[0]

    def tome_forward(self, x: torch.Tensor, state: ToMeState, r: int) -> Tuple[torch.Tensor, ToMeState]:
        """Run the block on ``(batch, tokens, channels)``, removing ``r`` tokens."""
        if r <= 0 and state.size is None:
            # Nothing merged yet and nothing to merge here: timm's own block is exact
            # (no size bias, no metric to compute), so r=0 costs nothing over timm.
            return super().forward(x), state  # type: ignore[misc]
        return self._tome_merge_block(x, state, r)

    def _tome_merge_block(self, x: torch.Tensor, state: ToMeState, r: int) -> Tuple[torch.Tensor, ToMeState]:
        def attn_branch(x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
            out, metric = _attention_branch(self.attn, self.norm1(x), bias)
            return self.drop_path1(self.ls1(out)), metric

        def mlp_branch(x: torch.Tensor) -> torch.Tensor:
            return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

        return merge_block(x, state, r, attn_branch, mlp_branch)


class ToMeResPostBlock(ToMeBlock):
    """timm ``ResPostBlock`` (norm after each branch) with a merge between attention and MLP."""

    def _tome_merge_block(self, x: torch.Tensor, state: ToMeState, r: int) -> Tuple[torch.Tensor, ToMeState]:
        def attn_branch(x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
            out, metric = _attention_branch(self.attn, x, bias)
            return self.drop_path1(self.norm1(out)), metric

        def mlp_branch(x: torch.Tensor) -> torch.Tensor:
            return self.drop_path2(self.norm2(self.mlp(x)))

        return merge_block(x, state, r, attn_branch, mlp_branch)


class ToMeVisionTransformer(ToMeModelMixin):
    """timm ``VisionTransformer`` whose blocks merge tokens; pooling weighted by size."""

    def _tome_blocks(self) -> Sequence[nn.Module]:
        return list(self.blocks)

    def _tome_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _tome_run(self, x: torch.Tensor) -> Tuple[torch.Tensor, ToMeState, List[int]]:
        """Embedded tokens through all blocks; returns tokens, final state, schedule."""
        schedule = self._tome_schedule()
        state = self._tome_begin(x)
        x, state = run_blocks(
            [block.tome_forward for block in self.blocks], x, state, schedule, self.grad_checkpointing
        )
        self._tome_info.record(state, x, schedule)
        return x, state, schedule

    def forward_features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        return self._tome_features(x, attn_mask, is_causal)[0]

    def _tome_features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if attn_mask is not None or is_causal:
            if any(self._tome_schedule()):
                raise ValueError(
                    "attn_mask / is_causal cannot be combined with token merging (r > 0): merged "
                    "tokens no longer line up with the mask. Set model.r = 0 to use a mask."
                )
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal), None  # type: ignore[misc]
        x, state, _ = self._tome_run(self._tome_embed(x))
        return self.norm(x), state.size

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._tome_head(x, self._tome_last_size(x), pre_logits)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        x, size = self._tome_features(x, attn_mask, is_causal)
        return self._tome_head(x, size, False)

    def _tome_head(self, x: torch.Tensor, size: Optional[torch.Tensor], pre_logits: bool) -> torch.Tensor:
        # Nothing merged, or a head that only reads prefix tokens: the model's own head is exact.
        if size is None or (self.attn_pool is None and self.global_pool in ("token", "")) or hasattr(self, "dist_token"):
            return super().forward_head(x, pre_logits=pre_logits)  # type: ignore[misc]
        x = self._tome_pool(x, size)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def _tome_pool(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        if self.attn_pool is not None:
            # Attention pooling: every key counts once per patch it stands for.
            bias = size.log().transpose(1, 2).unsqueeze(1).to(x.dtype)
            return self.attn_pool(x, attn_mask=bias)
        if self.global_pool == "avg":
            return weighted_mean(x, size)
        if self.global_pool == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + weighted_mean(x, size))  # avgmax


_BLOCK_MIXINS = {"Block": ToMeBlock, "ResPostBlock": ToMeResPostBlock}


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` unless every part of ``model`` can be run exactly with merging."""
    from timm.models import vision_transformer as vt

    name = type(model).__name__
    if not is_timm_vit(model):
        raise TypeError(
            f"tome.patch.timm expects a timm VisionTransformer (vision_transformer.py, deit.py), "
            f"got {name}. Supported families: {supported_families()}"
        )
    own = original_class(model)
    for method in ("forward_features", "forward", "forward_head", "_pos_embed", "pool"):
        impl = getattr(own, method)
        allowed = (getattr(vt.VisionTransformer, method),)
        if own.__name__ == "VisionTransformerDistilled" and method in ("forward_head", "_pos_embed"):
            allowed = (impl,)
        if impl not in allowed:
            raise TypeError(
                f"{own.__name__} overrides VisionTransformer.{method}; ToMe cannot patch it exactly. "
                "For MAE fine-tuned models use tome.patch.mae(model)."
            )
    if model.global_pool not in _SUPPORTED_POOLS:
        raise TypeError(
            f"{own.__name__} uses global_pool={model.global_pool!r}, which ToMe cannot weight by token "
            f"size; supported: {_SUPPORTED_POOLS}"
        )
    if model.attn_pool is not None:
        if type(model.attn_pool).__name__ != "AttentionPoolLatent" or getattr(model.attn_pool, "pos_embed", None) is not None:
            raise TypeError(
                f"attention pooling {type(model.attn_pool).__name__} (with position embedding: "
                f"{getattr(model.attn_pool, 'pos_embed', None) is not None}) is not supported; "
                "supported: AttentionPoolLatent without pos_embed ('map')"
            )
    check_blocks(model)


def check_blocks(model: nn.Module) -> None:
    """Raise ``TypeError`` unless every block and attention layer is one ToMe runs exactly."""
    from timm.layers.attention import Attention
    from timm.models import vision_transformer as vt

    own = original_class(model)
    for index, block in enumerate(model.blocks):
        block_cls = original_class(block)
        if block_cls not in (vt.Block, vt.ResPostBlock):
            raise TypeError(
                f"{own.__name__}.blocks[{index}] is a {block_cls.__name__}; ToMe supports timm Block and "
                "ResPostBlock (parallel and differential-attention blocks are not supported)"
            )
        if original_class(block.attn) is not Attention:
            raise TypeError(
                f"{own.__name__}.blocks[{index}].attn is a {type(block.attn).__name__}; ToMe supports "
                "timm's Attention (RoPE and other attention variants are not supported)"
            )






def apply_to_timm(model: nn.Module, trace_source: bool, prop_attn: bool, model_mixin: type) -> nn.Module:
    """Patch a checked timm ViT with ``model_mixin`` (used by the timm and MAE families)."""
    return patch_model(
        model,
        model_mixin,
        list(model.blocks),
        lambda block: _BLOCK_MIXINS[original_class(block).__name__],
        protected_tokens=model.num_prefix_tokens,
        trace_source=trace_source,
        prop_attn=prop_attn,
        class_token=bool(getattr(model, "has_class_token", model.cls_token is not None)),
        distill_token=getattr(model, "dist_token", None) is not None,
    )


def timm(model: nn.Module, trace_source: bool = False, prop_attn: bool = True) -> nn.Module:
    """Patch a timm Vision Transformer in place to merge tokens; set ``model.r`` after.

    Args:
        model: A ``timm.models.VisionTransformer`` (also DeiT, distilled DeiT,
            DeiT-III, DINOv2, register and class-token-free variants).
        trace_source: Track which original patches each token contains; read
            ``model._tome_info["source"]`` after a forward.
        prop_attn: Proportional attention (``log(size)`` added to attention logits);
            keep it on for models trained without ToMe.

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model, one of its blocks, attention layers or its pooling
            is not something ToMe can run exactly.
    """
    check_supported(model)
    return apply_to_timm(model, trace_source, prop_attn, ToMeVisionTransformer)
