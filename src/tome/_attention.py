"""Attention with an additive bias that depends on the key only, without an attention mask.

Proportional attention (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023,
Sec. 3) adds ``log(size_j)`` to every logit of key ``j``. Handed to
``scaled_dot_product_attention`` as a float ``attn_mask``, such a bias rules out the
FlashAttention backend on CUDA. A bias of the key alone fits into the product itself:

    scale * q_i . k_j + b_j  =  scale * [q_i, 1] . [k_j, b_j / scale]

so one extra channel on the queries (all ones) and on the keys (``b_j / scale``), with
``scale`` passed explicitly, gives the same logits, and the kernel sees no mask. Head
sizes must be a multiple of :data:`HEAD_DIM_MULTIPLE` for the fused CUDA kernels, so
``pad`` channels are added (64 -> 72), the bias spread evenly over them
(``b_j / (scale * pad)`` each); the values are zero-padded to the same size and their
padding is cut off the output.

Pure tensor functions: imports torch only, no module state.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["HEAD_DIM_MULTIPLE", "fold_key_bias", "is_key_bias", "key_bias_attention"]

HEAD_DIM_MULTIPLE = 8
"""Head sizes are padded to a multiple of this (FlashAttention, cuDNN and the
memory-efficient kernel take head sizes in multiples of 8)."""


def _padded(channels: int) -> int:
    return -(-channels // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


def is_key_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``bias`` depends on the key only (and the batch and head), so it can be folded.

    Args:
        bias: An additive logits bias, broadcastable to ``(batch, heads, queries, keys)``.
        q: ``(batch, heads, queries, head_dim)``.
        k: ``(batch, heads, keys, head_dim)``.

    Returns:
        True for a 4-D bias of shape ``(batch or 1, heads or 1, 1, keys)`` (or a lower-rank
        one that broadcasts the same way), the form of ``log(size)``.
    """
    if bias.dim() > 4 or bias.shape[-1] != k.shape[-2]:
        return False
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    return shape[2] == 1 and shape[0] in (1, q.shape[0]) and shape[1] in (1, q.shape[1])


def fold_key_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values whose plain scaled product carries a key-only bias.

    ``scale * q'_i . k'_j == scale * q_i . k_j + bias_j`` for every query ``i`` and key ``j``.
    The ``pad`` channels added (``head_dim + pad`` is the next multiple of
    :data:`HEAD_DIM_MULTIPLE` above ``head_dim``) hold ones in ``q'`` and
    ``bias / (scale * pad)`` in ``k'``: one constant pad for the queries, one concatenation
    for the keys, and no channel that is zero in one and not the other.

    Args:
        q: ``(batch, heads, queries, head_dim)``.
        k: ``(batch, heads, keys, head_dim)``.
        v: ``(batch, heads, keys, value_dim)``.
        bias: Finite key bias, broadcastable to ``(batch, heads, 1, keys)`` (see :func:`is_key_bias`).
            An infinite entry (a masked key) cannot be folded: the backward pass would
            multiply it by a zero attention weight.
        scale: The softmax scale the attention will be called with; not 0.

    Returns:
        ``(q', k', v')``: ``q`` and ``k`` with ``head_dim + pad`` channels; ``v`` zero-padded
        to the same size when ``value_dim == head_dim`` (kernels that need equal sizes get
        them; the output's extra channels are then 0), else unchanged.
    """
    head_dim = q.shape[-1]
    pad = _padded(head_dim + 1) - head_dim
    batch, heads, keys = k.shape[0], k.shape[1], k.shape[2]
    # (batch, heads, keys, pad): the bias as columns of the keys, divided in fp32 and rounded
    # once to the attention dtype (the mask path rounds the bias itself to that dtype).
    column = (bias.float() / (scale * pad)).reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).transpose(-1, -2)
    column = column.to(k.dtype).expand(batch, heads, keys, pad)
    q = F.pad(q, (0, pad), value=1.0)
    k = torch.cat([k, column], dim=-1)
    if v.shape[-1] == head_dim:
        v = F.pad(v, (0, pad))
    return q, k, v


def key_bias_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``softmax(scale * q k^T + bias) v`` for a key-only bias, through
    ``scaled_dot_product_attention`` with no mask (every backend stays eligible).

    Equals ``scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)`` up to
    rounding (1e-6 relative in fp32). The cost: one extra channel, rounded up to a
    multiple of 8 (64 -> 72 for ViT heads), and a copy of ``q``, ``k``, ``v``.

    Args:
        q: ``(batch, heads, queries, head_dim)``.
        k: ``(batch, heads, keys, head_dim)``.
        v: ``(batch, heads, keys, value_dim)``.
        bias: Finite key-only bias broadcastable to ``(batch, heads, 1, keys)``, e.g.
            ``log(size)`` of shape ``(batch, 1, 1, keys)`` (see :func:`is_key_bias`).
        scale: Logit scale; ``head_dim ** -0.5`` when None.
        dropout_p: Attention dropout probability.

    Returns:
        ``(batch, heads, queries, value_dim)``.

    Raises:
        ValueError: if ``bias`` is not a key-only bias for these shapes, or ``scale`` is 0.
    """
    if not is_key_bias(bias, q, k):
        raise ValueError(
            f"bias of shape {tuple(bias.shape)} is not a key-only bias for queries {tuple(q.shape)} and keys "
            f"{tuple(k.shape)}; expected (batch or 1, heads or 1, 1, {k.shape[-2]})"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if scale == 0:
        raise ValueError("scale=0 leaves only the bias in the logits; a key bias cannot be folded into a zero product")
    value_dim = v.shape[-1]
    q, k, v = fold_key_bias(q, k, v, bias, scale)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out[..., :value_dim] if out.shape[-1] != value_dim else out
