"""The patched attention modules and layers of the Hugging Face ``transformers`` family.

Each transformers layer is a pre-norm block whose two branches this module names (its norms,
dropouts, LayerScale and drop path are the model's own modules, called as the model calls
them); each attention module with separate q/k/v projections runs the shared attention body
(:mod:`tome.patch._attention_body`) with the ``log(size)`` bias of proportional attention
(Bolya et al., ICLR 2023, sec. 3). Which model uses which is :mod:`tome.patch._hf`'s table.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._attention_body import attend, fused_attention, split_heads
from ._lifecycle import ToMeAttentionMixin, ToMeBlockMixin, call_attention
from ._shared import AttentionCall

__all__ = [
    "ToMeHFAttention",
    "ToMeCLIPAttention",
    "ToMeVideoMAESelfAttention",
    "ToMeHFLayer",
    "ToMeViTLayer",
    "ToMeDinov2Layer",
    "ToMeCLIPLayer",
    "ToMeVideoMAELayer",
]


class ToMeHFAttention(ToMeAttentionMixin):
    """A transformers self-attention module with separate q/k/v projections: with
    ``tome=AttentionCall(bias)`` it adds the ``log(size)`` bias to its logits and
    reports the mean key. Returns ``(output, None)`` like the module does.

    Subclasses name the module's attributes: ``_tome_attrs`` = (q, k, v, output
    projection or "", head_dim, scale, dropout probability).
    """

    _tome_keep_name = True  # transformers recognises classes by name and module

    _tome_attrs: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "attention_dropout")

    def _tome_attention(self, x: torch.Tensor, call: AttentionCall) -> Tuple[torch.Tensor, None]:
        q_name, k_name, v_name, out_name, dim_name, scale_name, dropout_name = self._tome_attrs
        head_dim = getattr(self, dim_name)
        q, k, v = (split_heads(getattr(self, name)(x), head_dim=head_dim) for name in (q_name, k_name, v_name))
        dropout_p = getattr(self, dropout_name) if self.training else 0.0
        out = attend(call, q, k, v, dropout_p=dropout_p, scale=getattr(self, scale_name), fused=fused_attention(self))
        return (getattr(self, out_name)(out) if out_name else out), None


class ToMeCLIPAttention(ToMeHFAttention):
    """``CLIPAttention`` and ``SiglipAttention``."""

    _tome_attrs = ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scale", "dropout")


class ToMeVideoMAESelfAttention(ToMeHFAttention):
    """``VideoMAESelfAttention`` (its output projection lives in a sibling module)."""

    _tome_attrs = ("query", "key", "value", "", "attention_head_size", "scaling", "dropout_prob")


class ToMeHFLayer(ToMeBlockMixin):
    """Common part of patched transformers layers. They are called by the model's own
    loop (through ``__call__``, so transformers' gradient checkpointing and hooks
    apply) with ``tome=ToMeForward`` among the keyword arguments the model hands
    every layer."""

    _tome_keep_name = True  # transformers recognises classes by name and module


class ToMeViTLayer(ToMeHFLayer):
    """``ViTLayer``, ``DeiTLayer``, ``ASTLayer``: pre-norm, dropout on both branches."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        (out, _), metric = call_attention(self.attention, self.layernorm_before(x), bias)
        return self.dropout(out), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp(self.layernorm_after(x)))


class ToMeDinov2Layer(ToMeHFLayer):
    """``Dinov2Layer`` and ``Dinov2WithRegistersLayer``: LayerScale and drop path on both branches."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        (out, _), metric = call_attention(self.attention, self.norm1(x), bias)
        return self.drop_path(self.layer_scale1(out)), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class ToMeCLIPLayer(ToMeHFLayer):
    """``CLIPEncoderLayer`` and ``SiglipEncoderLayer``: pre-norm, no dropout on the residuals."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        (out, _), metric = call_attention(self.self_attn, self.layer_norm1(x), bias)
        return out, metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.layer_norm2(x))


class ToMeVideoMAELayer(ToMeHFLayer):
    """``VideoMAELayer``: ``VideoMAEAttention`` passes ``tome`` on to its self-attention
    and applies its own output module."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return call_attention(self.attention, self.layernorm_before(x), bias)

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        # VideoMAEOutput adds the residual itself; merge_block adds it here instead.
        return self.output.dropout(self.output.dense(self.intermediate(self.layernorm_after(x))))
