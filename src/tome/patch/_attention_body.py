"""The body every family's patched attention shares: heads in, attention with the
``log(size)`` bias, the metric reported, heads out.

A family's attention module keeps what is its own (its projections, qk-norms,
rotary embeddings, output norm, gate and projection) and calls these pieces for
the rest, so a family's ``_tome_attention`` reads as "project, :func:`attend`,
project back". Each piece does exactly what the family modules did inline, so
results are unchanged to the bit.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ._shared import AttentionCall, attention

__all__ = ["attend", "fused_attention", "packed_heads", "split_heads"]


def packed_heads(qkv: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values from one packed projection.

    Args:
        qkv: ``(batch, tokens, 3 * heads * head_dim)``, laid out ``[q | k | v]``.
        heads: Number of heads.

    Returns:
        ``q, k, v``, each ``(batch, heads, tokens, head_dim)``.
    """
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def split_heads(x: torch.Tensor, *, heads: int = -1, head_dim: int = -1) -> torch.Tensor:
    """``(batch, tokens, heads * head_dim)`` -> ``(batch, heads, tokens, head_dim)``; give
    ``heads`` or ``head_dim``."""
    return x.reshape(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)


def attend(
    call: AttentionCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    fused: bool = True,
    metric_keys: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention with ``call.bias`` (``log(size)``) added to the logits; reports the metric.

    Args:
        call: The block's :class:`AttentionCall`: its bias is used, its metric set
            (:meth:`AttentionCall.report`, from ``q``, ``k`` and ``v`` as attention used them).
        q, k, v: ``(batch, heads, tokens, head_dim)``.
        dropout_p: Attention dropout probability (0 outside training).
        scale: Logit scale; ``head_dim ** -0.5`` when None.
        fused: ``scaled_dot_product_attention``, or the explicit softmax.
        metric_keys: Keys to report instead of ``k`` (e.g. before a rotary rotation).

    Returns:
        ``(batch, tokens, heads * head_dim)``, the heads side by side.
    """
    out = attention(q, k, v, call.bias, dropout_p=dropout_p, scale=scale, fused=fused)
    call.report(q, k if metric_keys is None else metric_keys, v, scale)
    return out.transpose(1, 2).flatten(2)


def fused_attention(attn: nn.Module) -> bool:
    """Whether a transformers attention module runs fused attention: models loaded with
    ``attn_implementation="eager"`` get the explicit softmax; every other implementation
    gets ``scaled_dot_product_attention`` (which takes the bias)."""
    return getattr(attn.config, "_attn_implementation", "sdpa") != "eager"
