"""How a patched model calls its blocks and a block its attention, and the block loop.

Blocks are called through ``nn.Module.__call__`` with one extra keyword,
``tome=BlockCall(state, r)``; a block's attention module with ``tome=AttentionCall(bias)``,
and it writes the metric back. :func:`merge_block` is one block (attention, merge, MLP;
Bolya et al., ICLR 2023, sec. 3) and :func:`run_blocks` the loop over them.
"""

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._methods import TOME_RULE, LayerRule
from ._state import ToMeState

if TYPE_CHECKING:
    from ._rope import RotaryPositions


ATTENTION_FEATURES = ("k", "q", "v", "k_cat", "cls_attn")


class AttentionCall:
    """What a patched block hands its attention module (as the ``tome`` keyword).

    Attributes:
        bias: Additive logits bias ``(batch, 1, 1, tokens)`` (``log(size)``), or None.
        feature: What the block's merge rule matches on (:attr:`tome._methods.LayerRule.attention_feature`):
            ``"k"`` (ToMe's default) unless an ablation asks for another one.
        metric: Filled in by the attention module: by default the keys averaged over heads,
            ``(batch, tokens, head_dim)``, ToMe's similarity metric (paper, Sec. 3);
            see :meth:`report` for the others.
    """

    __slots__ = ("bias", "feature", "metric")

    def __init__(self, bias: Optional[torch.Tensor], feature: str = "k") -> None:
        self.bias = bias
        self.feature = feature
        self.metric: Optional[torch.Tensor] = None

    def report(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> None:
        """Set :attr:`metric` from the attention's ``q``, ``k``, ``v``, each ``(batch, heads, tokens, head_dim)``
        (after any qk-norm: what the attention used).

        By :attr:`feature`: ``"k"``, ``"q"``, ``"v"``: averaged over heads, ``(batch, tokens, head_dim)``;
        ``"k_cat"``: the keys of all heads concatenated, ``(batch, tokens, heads * head_dim)``;
        ``"cls_attn"``: the attention weights of the query at index 0 (the class token) over all
        keys, with :attr:`bias` and ``scale`` (``head_dim ** -0.5`` if None) as the attention
        uses them, averaged over heads, ``(batch, tokens, 1)`` (EViT's token ranking).
        """
        feature = self.feature
        if feature == "k":
            self.metric = k.mean(dim=1)
        elif feature == "q":
            self.metric = q.mean(dim=1)
        elif feature == "v":
            self.metric = v.mean(dim=1)
        elif feature == "k_cat":
            self.metric = k.transpose(1, 2).flatten(2)
        elif feature == "cls_attn":
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (batch, heads, 1, tokens)
            if self.bias is not None:
                logits = logits + self.bias.to(logits.dtype)
            self.metric = logits.softmax(dim=-1).mean(dim=1).transpose(1, 2)
        else:
            raise ValueError(f"feature={feature!r} is not one of {ATTENTION_FEATURES}")


class BlockCall:
    """What a patched model hands each block (as the ``tome`` keyword): the state on
    entry and the block's r; the block writes the state on exit into ``out``.

    The entry state is never changed, so a block re-run by gradient checkpointing
    reads the same state and writes the same result.
    """

    __slots__ = ("state", "r", "out")

    def __init__(self, state: ToMeState, r: int) -> None:
        self.state = state
        self.r = r
        self.out: Optional[ToMeState] = None


class ToMeForward:
    """One model forward's record, for blocks called by a framework's own loop.

    Hugging Face models hand their keyword arguments to every layer, so the
    model the user holds passes one ``ToMeForward`` as ``tome=`` and every layer
    finds its entry state by its index: block ``i`` reads the state entering it
    and writes the state leaving it. Entry states are never overwritten by a
    different value, so a layer re-run by gradient checkpointing reads what it
    read the first time.

    Args:
        protected_tokens, prop_attn, trace_source: Settings for the first state,
            which is made when block 0 sees its input.
    """

    def __init__(self, protected_tokens: int, prop_attn: bool, trace_source: bool) -> None:
        self._settings = (protected_tokens, prop_attn, trace_source)
        self._states: dict = {}
        self.removed: dict = {}
        self.info: Optional[object] = None  # the record of the model that started this forward
        self.like: Optional[torch.Tensor] = None  # an input of this forward (batch, device, dtype)
        # The attention mask the caller passed to the model (None: masks reaching the layers
        # were built by the model from nothing, and mask nothing).
        self.caller_mask: Optional[torch.Tensor] = None
        # A key-padding mask folded into the first state's sizes: (batch, tokens, 1) float32,
        # 1 for valid tokens and 0 for padding (see ToMeState.padded).
        self.padding: Optional[torch.Tensor] = None
        # The tokens' rotary positions, carried from the first state on (set by a model with
        # rotary embeddings when a block merges; see tome.patch._rope).
        self.positions: Optional["RotaryPositions"] = None

    def enter(self, index: int, x: torch.Tensor, r: int) -> BlockCall:
        """The call for block ``index`` on ``x`` ``(batch, tokens, channels)`` with its ``r``."""
        self.like = x
        state = self._states.get(index)
        if state is None:
            if index != 0:
                raise RuntimeError(f"block {index} ran before block {index - 1} in this forward")
            state = self._states[0] = ToMeState.start(x.shape[1], *self._settings)
            if self.padding is not None:
                if tuple(self.padding.shape[:2]) != (x.shape[0], x.shape[1]):
                    raise ValueError(
                        f"attention_mask covers {tuple(self.padding.shape[:2])} (batch, tokens) but the first "
                        f"layer sees {x.shape[0]} x {x.shape[1]} tokens (prefix tokens included); pass a mask "
                        "of that shape, or set model.r = 0"
                    )
                state = self._states[0] = replace(state, size=self.padding, padded=True)
            if self.positions is not None:
                state = self._states[0] = self.positions.start(state, x)
        return BlockCall(state, r)

    def leave(self, index: int, call: BlockCall) -> None:
        """Record what block ``index`` left behind."""
        self._states[index + 1] = call.out
        self.removed[index] = call.state.num_tokens - call.out.num_tokens  # type: ignore[union-attr]

    @property
    def final(self) -> Optional[ToMeState]:
        """The state after the last block run (None before any block ran)."""
        return self._states[max(self._states)] if self._states else None


def merge_block(
    x: torch.Tensor,
    state: ToMeState,
    r: int,
    attn_branch: Callable[[torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]],
    mlp_branch: Callable[[torch.Tensor], torch.Tensor],
    rule: LayerRule = TOME_RULE,
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
        rule: The block's merge rule (from ``model.tome_method`` at its depth); with
            ``rule.metric == "x"`` the matching compares the block's input ``x``
            instead of the metric the attention reported.

    Returns:
        ``(x, state)`` after the block.
    """
    delta, metric = attn_branch(x, state.attn_bias(x.dtype))
    if rule.metric == "x":  # ablation: match on the block's input instead of the keys
        metric = x
    x = x + delta
    x, state = state.merge(x, metric, r, rule)
    x = x + mlp_branch(x)
    return x, state


def run_blocks(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    state: ToMeState,
    schedule: Sequence[int],
    grad_checkpointing: bool = False,
    after_block: Optional[Callable[[int, torch.Tensor, ToMeState], None]] = None,
    block_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[torch.Tensor, ToMeState, List[int]]:
    """Run patched blocks in order, each removing its scheduled r, threading the state.

    Every block is called through ``block(x, tome=BlockCall(...))``, that is
    through ``nn.Module.__call__``, so forward hooks and pre-hooks registered on
    blocks (and on their attention modules) fire as in the unpatched model.

    Args:
        blocks: Patched blocks; ``zip`` with ``schedule`` decides how many run.
        x: ``(batch, tokens, channels)`` entering the first block.
        state: Initial state.
        schedule: r per block.
        grad_checkpointing: Recompute each block in backward instead of storing
            its activations (only when gradients are being recorded).
        after_block: Called as ``after_block(index, x, state)`` after each block.
        block_kwargs: Further keyword arguments every block is called with, as the
            framework's own loop passes them (e.g. timm Eva's ``rope=`` table).

    Returns:
        ``(x, state, removed)`` after the last block run; ``removed`` holds the
        number of tokens each block actually removed (r after capping).

    Raises:
        TypeError: if a block is not patched (e.g. replaced after patching).
    """
    use_checkpoint = grad_checkpointing and torch.is_grad_enabled()
    extra = block_kwargs or {}
    removed = []
    for index, (block, r) in enumerate(zip(blocks, schedule)):
        if "_tome_parent" not in type(block).__dict__:
            raise TypeError(
                f"block {index} is an unpatched {type(block).__name__} inside a patched model (was it "
                "replaced after patching?); call tome.apply_patch(model) again to patch it"
            )
        call = BlockCall(state, r)
        if use_checkpoint:
            x = checkpoint(block, x, use_reentrant=False, tome=call, **extra)
        else:
            x = block(x, tome=call, **extra)
        if call.out is None:
            raise RuntimeError(f"block {index} ({type(block).__name__}) did not report its token state")
        removed.append(state.num_tokens - call.out.num_tokens)
        state = call.out
        if after_block is not None:
            after_block(index, x, state)
    return x, state, removed
