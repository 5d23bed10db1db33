"""Attention with proportional attention's bias, and the process-wide choice of how
``scaled_dot_product_attention`` receives that bias (a mask, or one extra query/key channel).

Proportional attention adds ``log(size)`` of every key to the logits (Bolya et al.,
ICLR 2023, sec. 3, eq. 1), so a merged token counts once per patch it holds.
"""

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from .._attention import is_key_bias, key_bias_attention

PROP_ATTN_KERNELS = ("auto", "mask", "channel")


_prop_attn_kernel = "auto"


def set_prop_attn_kernel(kernel: str) -> None:
    """Choose how proportional attention hands its ``log(size)`` bias to
    ``scaled_dot_product_attention``, for every patched model in the process.

    - ``"mask"``: as a float ``attn_mask`` of shape ``(batch, 1, 1, tokens)``. On CUDA
      a mask rules out the FlashAttention backend.
    - ``"channel"``: folded into one extra channel of the queries and keys
      (:func:`tome._attention.key_bias_attention`), with no mask, so every SDPA
      backend stays eligible; the head size grows to the next multiple of 8
      (64 -> 72).
    - ``"auto"`` (the default): ``"channel"`` on CUDA, ``"mask"`` elsewhere. On CPU the
      mask is the faster form (measured in ``docs/benchmarks.md``: at ViT-B/16 sizes the
      channel form took 2.4-5.9x the attention time of the mask, which cost nothing over
      no bias). On CUDA the channel form is the choice until ``benchmarks/gpu.py`` has
      measured both there.

    Both forms give the same outputs up to rounding (1e-6 relative in fp32). Biases
    that mask keys out (padding tokens, -inf) always use the mask: they cannot be
    folded. A process-wide setting, like ``torch.backends.cuda.enable_flash_sdp``:
    threads running at the same time see the same kernel. ``torch.compile`` guards on
    it, so changing it recompiles once per kernel.

    Args:
        kernel: One of ``"auto"``, ``"mask"``, ``"channel"``.

    Raises:
        ValueError: for any other value.
    """
    global _prop_attn_kernel
    if kernel not in PROP_ATTN_KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {PROP_ATTN_KERNELS}")
    _prop_attn_kernel = kernel


def get_prop_attn_kernel() -> str:
    """The setting of :func:`set_prop_attn_kernel` (``"auto"``, ``"mask"`` or ``"channel"``)."""
    return _prop_attn_kernel


@contextlib.contextmanager
def prop_attn_kernel(kernel: str) -> Iterator[None]:
    """:func:`set_prop_attn_kernel` for the duration of a ``with`` block, then the previous setting.

    ::

        with tome.prop_attn_kernel("mask"):
            logits = model(images)

    Raises:
        ValueError: for a kernel other than ``"auto"``, ``"mask"``, ``"channel"``.
    """
    previous = _prop_attn_kernel
    set_prop_attn_kernel(kernel)
    try:
        yield
    finally:
        set_prop_attn_kernel(previous)


def _fold_bias(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether :func:`attention` folds ``bias`` into a channel (see :func:`set_prop_attn_kernel`)."""
    kernel = _prop_attn_kernel
    if kernel == "mask" or not isinstance(q, torch.Tensor) or not is_finite_key_bias(bias):
        return False  # torch.fx proxies (symbolic tracing) keep the mask: no data-dependent shapes
    if kernel == "auto" and q.device.type != "cuda":
        return False
    return is_key_bias(bias, q, k)


def finite_key_bias(bias: torch.Tensor) -> torch.Tensor:
    """Mark ``bias`` as a finite, key-only bias that :func:`attention` may fold into a channel.

    A bias holding ``-inf`` (masked keys) must never be marked. The mark is an attribute
    on the tensor object, so it holds for this tensor only (not for copies or casts).
    """
    bias._tome_finite_key_bias = True
    return bias


def is_finite_key_bias(bias: Any) -> bool:
    """Whether ``bias`` was marked by :func:`finite_key_bias`."""
    return isinstance(bias, torch.Tensor) and getattr(bias, "_tome_finite_key_bias", False) is True


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    fused: bool = True,
) -> torch.Tensor:
    """Multi-head attention with an optional additive bias.

    With ``fused`` and a bias marked by :func:`finite_key_bias` (proportional attention's
    ``log(size)`` of a batch without padding), the bias goes into an extra query/key
    channel instead of a mask where :func:`set_prop_attn_kernel` says so (on CUDA by
    default), so that ``scaled_dot_product_attention`` may pick FlashAttention. Without a
    bias this is ``scaled_dot_product_attention(q, k, v)``, unchanged.

    Args:
        q, k, v: ``(batch, heads, tokens, head_dim)``.
        bias: Additive logits bias broadcastable to ``(batch, heads, tokens, tokens)``,
            e.g. ``log(size)`` of shape ``(batch, 1, 1, tokens)``.
        dropout_p: Attention dropout probability (pass 0 in eval mode).
        scale: Logit scale; ``head_dim ** -0.5`` when None.
        fused: Use ``scaled_dot_product_attention``; otherwise the explicit softmax
            (for models built with fused attention off).

    Returns:
        ``(batch, heads, tokens, head_dim)``.
    """
    if bias is not None and fused and _fold_bias(q, k, bias):
        return key_bias_attention(q, k, v, bias, scale=scale, dropout_p=dropout_p)
    if bias is not None:
        bias = bias.to(q.dtype)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    weights = logits.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v
