"""The attention-then-merge step shared by every model family.

A family module knows where its model keeps attention, prefix tokens and
pooling; everything ToMe does inside a block lives here:

    x = x + attention_branch(x, bias=log(size))   # attention sees N tokens
    x, state = state.merge(x, metric, r)          # N -> N - r tokens
    x = x + mlp_branch(x)                         # MLP sees N - r tokens

Per-forward state (sizes, source groups) is a :class:`ToMeState` created at the
top of a model's forward and handed from block to block. It is immutable: a
merge returns a new state, so blocks can be re-run (gradient checkpointing),
called directly, or run by several threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..merge import match_bipartite

__all__ = [
    "ToMeState",
    "attention",
    "merge_block",
    "run_blocks",
    "sources_from_groups",
    "weighted_mean",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def sources_from_groups(groups: torch.Tensor, num_tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense source map from group indices.

    Args:
        groups: ``(batch, original tokens)`` long; the current token holding each original token.
        num_tokens: Current number of tokens.
        dtype: dtype of the result.

    Returns:
        ``(batch, tokens, original tokens)`` 0/1 tensor; row ``t`` marks the
        original tokens that token ``t`` contains.
    """
    return F.one_hot(groups, num_tokens).transpose(1, 2).to(dtype)


@dataclass(frozen=True)
class ToMeState:
    """What one forward pass knows about its tokens. Never mutated.

    Attributes:
        size: ``(batch, tokens, 1)`` float32 count of original patches per token;
            ``None`` while nothing has been merged (all ones).
        groups: ``(batch, original tokens)`` long index of the token that holds
            each original token; only kept when tracing sources.
        num_tokens: Current number of tokens.
        protected_tokens: Leading tokens that never merge (class, distillation, registers).
        prop_attn: Add ``log(size)`` to attention logits.
        trace_source: Keep ``groups`` up to date.
    """

    size: Optional[torch.Tensor]
    groups: Optional[torch.Tensor]
    num_tokens: int
    protected_tokens: int
    prop_attn: bool
    trace_source: bool

    @classmethod
    def start(cls, num_tokens: int, protected_tokens: int, prop_attn: bool, trace_source: bool) -> "ToMeState":
        """The state before any merge: every token is one patch."""
        return cls(None, None, num_tokens, protected_tokens, prop_attn, trace_source)

    def attn_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Proportional-attention bias ``log(size)``, shape ``(batch, 1, 1, tokens)``, or None."""
        if not self.prop_attn or self.size is None:
            return None
        return self.size.log().transpose(1, 2).unsqueeze(1).to(dtype)

    def sizes(self, like: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, 1)`` float32 sizes, ones when nothing was merged yet."""
        if self.size is not None:
            return self.size
        return torch.ones(like.shape[0], like.shape[1], 1, device=like.device, dtype=torch.float32)

    def merge(self, x: torch.Tensor, metric: torch.Tensor, r: int) -> Tuple[torch.Tensor, "ToMeState"]:
        """Remove ``r`` tokens from ``x`` by bipartite soft matching on ``metric``.

        Args:
            x: ``(batch, tokens, channels)`` hidden states.
            metric: ``(batch, tokens, head_dim)`` keys averaged over heads.
            r: Tokens to remove (capped by the matching).

        Returns:
            The merged ``(batch, tokens - r, channels)`` tensor (size-weighted
            average) and the next state.
        """
        if r <= 0:
            return x, self
        assignment = match_bipartite(metric, r, self.protected_tokens)
        if assignment is None:
            return x, self
        size = self.sizes(x)
        # Weighted sums of up to hundreds of tokens can overflow fp16: accumulate in fp32.
        work = x.float() if x.dtype in _LOW_PRECISION else x
        # Before the first merge every size is 1: skip multiplying by ones.
        merged = assignment.merge(work if self.size is None else work * size, mode="sum")
        new_size = assignment.merge(size, mode="sum")
        merged = (merged / new_size).to(x.dtype)
        groups = self.groups
        if self.trace_source:
            groups = assignment.dest.gather(1, self.group_index(x.shape[0], x.device))
        return merged, replace(self, size=new_size, groups=groups, num_tokens=assignment.num_out)

    def group_index(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, original tokens)`` group index, the identity when nothing merged."""
        if self.groups is not None:
            return self.groups
        return torch.arange(self.num_tokens, device=device).expand(batch, -1)


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


def merge_block(
    x: torch.Tensor,
    state: ToMeState,
    r: int,
    attn_branch: Callable[[torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]],
    mlp_branch: Callable[[torch.Tensor], torch.Tensor],
) -> Tuple[torch.Tensor, ToMeState]:
    """One transformer block with a merge between its attention and MLP.

    Args:
        x: ``(batch, tokens, channels)``.
        state: The forward's state on entry to this block.
        r: Tokens this block removes.
        attn_branch: ``(x, bias) -> (residual, metric)``: the block's whole
            attention residual branch (norms, LayerScale, drop path included) and
            the keys averaged over heads, ``(batch, tokens, head_dim)``.
        mlp_branch: ``x -> residual``: the block's whole MLP residual branch.

    Returns:
        ``(x, state)`` after the block.
    """
    delta, metric = attn_branch(x, state.attn_bias(x.dtype))
    x = x + delta
    x, state = state.merge(x, metric, r)
    x = x + mlp_branch(x)
    return x, state


BlockStep = Callable[[torch.Tensor, ToMeState, int], Tuple[torch.Tensor, ToMeState]]


def run_blocks(
    steps: Iterable[BlockStep],
    x: torch.Tensor,
    state: ToMeState,
    schedule: Sequence[int],
    grad_checkpointing: bool = False,
) -> Tuple[torch.Tensor, ToMeState]:
    """Run blocks in order, each removing its scheduled r, threading the state.

    Args:
        steps: One ``(x, state, r) -> (x, state)`` callable per block.
        x: ``(batch, tokens, channels)`` entering the first block.
        state: Initial state.
        schedule: r per block.
        grad_checkpointing: Recompute each block in backward instead of storing
            its activations (only when gradients are being recorded).

    Returns:
        ``(x, state)`` after the last block.
    """
    use_checkpoint = grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
    for step, r in zip(steps, schedule):
        if use_checkpoint:
            x, state = checkpoint(step, x, state, r, use_reentrant=False)
        else:
            x, state = step(x, state, r)
    return x, state


def weighted_mean(x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Size-weighted mean over tokens: ``sum(x * size) / sum(size)``.

    Args:
        x: ``(batch, tokens, channels)``.
        size: ``(batch, tokens, 1)`` or None (plain mean).

    Returns:
        ``(batch, channels)``.
    """
    if size is None:
        return x.mean(dim=1)
    return ((x * size).sum(dim=1) / size.sum(dim=1)).to(x.dtype)

