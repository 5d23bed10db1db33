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

Blocks are called through ``nn.Module.__call__`` as the framework itself calls
them, with one extra keyword, ``tome=BlockCall(state, r)``: the block reads its
entry state and r from it and writes its exit state back. A block's attention
module is called the same way with ``tome=AttentionCall(bias)`` and writes the
metric back. So hooks on blocks and attention modules fire as in the unpatched
model, and a block's hooks see tensors in and out, as they always did.
"""


import contextlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._attention import is_key_bias, key_bias_attention
from .._methods import PADDED_RANDOM_REFUSAL, RANDOM_MATCHES, TOME_RULE, LayerRule
from ..merge import TokenAssignment

if TYPE_CHECKING:
    from ._rope import RotaryPositions

__all__ = [
    "AttentionCall",
    "BlockCall",
    "ToMeForward",
    "ToMeState",
    "attention",
    "finite_key_bias",
    "get_prop_attn_kernel",
    "prop_attn_kernel",
    "set_prop_attn_kernel",
    "merge_block",
    "merge_positions",
    "padding_bias",
    "run_blocks",
    "size_bias",
    "sources_from_groups",
    "weighted_mean",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _padding_last(assignment: TokenAssignment, real: torch.Tensor, protected_tokens: int) -> TokenAssignment:
    """The same merge with the tokens that hold padding only (size 0) moved behind the real ones.

    The real tokens keep their order, so a padded sample's real tokens sit where
    they would sit were the sample run alone, and the next block's matching (which
    splits tokens by position) splits them the same way.

    Args:
        assignment: The merge step.
        real: ``(batch, num_out)`` bool, the merged tokens of nonzero size.
        protected_tokens: Leading tokens that stay in front whatever their size.
    """
    real = real.clone()
    real[:, :protected_tokens] = True
    num_real = real.sum(dim=1, keepdim=True)
    slot = torch.where(real, real.cumsum(dim=1) - 1, num_real + (~real).cumsum(dim=1) - 1)
    return TokenAssignment(slot.gather(1, assignment.dest), assignment.num_out, assignment.kept)


def padding_bias(size: torch.Tensor, dtype: torch.dtype, proportional: bool = True) -> torch.Tensor:
    """Attention bias over keys of sizes ``(batch, tokens, 1)`` in which 0 marks padding.

    ``log(size)`` as :func:`size_bias` (``proportional=False``: 0 for real keys), so
    padding keys get ``-inf`` and no weight. A sample made of padding only (a batch
    padded with empty samples) would then attend to no key at all, and a softmax over
    no key is 0 / 0; such a sample gets 0 on every key instead, so it attends to its
    tokens as if unmasked and stays finite, as the frameworks' own finite masks keep it.

    Args:
        size: ``(batch, tokens, 1)`` float sizes, 0 for padding.
        dtype: dtype of the result.
        proportional: ``log(size)`` (proportional attention); False: only the padding mask.

    Returns:
        ``(batch, 1, 1, tokens)`` in ``dtype``.
    """
    real = size > 0
    weight = size if proportional else real.to(torch.float32)
    has_real = size.amax(dim=1, keepdim=True) > 0  # sizes are never negative
    return size_bias(torch.where(has_real, weight, torch.ones_like(weight)), dtype)


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
        padded: ``size`` comes from a key-padding mask: padding tokens have size 0
            (they count for nothing in merges and pools, and attention ignores them),
            and a merged token is valid if any of its members is.
        positions: ``(batch, tokens, k)`` float32 per-token position vectors (e.g. the
            rotary angles of a RoPE model, which are linear in the patch coordinates),
            merged with the tokens; ``None`` for models without them.
        position_rule: How a merged token's position is formed: ``"mean"`` (size-weighted
            average of its members', like the features) or ``"destination"`` (the
            position of the token the others merged into).
    """

    size: Optional[torch.Tensor]
    groups: Optional[torch.Tensor]
    num_tokens: int
    protected_tokens: int
    prop_attn: bool
    trace_source: bool
    padded: bool = False
    positions: Optional[torch.Tensor] = None
    position_rule: str = "mean"

    @classmethod
    def start(cls, num_tokens: int, protected_tokens: int, prop_attn: bool, trace_source: bool) -> "ToMeState":
        """The state before any merge: every token is one patch."""
        return cls(None, None, num_tokens, protected_tokens, prop_attn, trace_source)

    def attn_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Proportional-attention bias ``log(size)``, shape ``(batch, 1, 1, tokens)``, or None."""
        if self.padded and self.size is not None:
            # log(size), or without proportional attention only the padding (0 valid, -inf padding).
            return padding_bias(self.size, dtype, self.prop_attn)
        if not self.prop_attn or self.size is None:
            return None
        # Not padded, so every size is >= 1 and the bias is finite: attention() may fold it.
        return finite_key_bias(size_bias(self.size, dtype))

    def sizes(self, like: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens, 1)`` float32 sizes, ones when nothing was merged yet."""
        if self.size is not None:
            return self.size
        return torch.ones(like.shape[0], like.shape[1], 1, device=like.device, dtype=torch.float32)

    def merge(
        self, x: torch.Tensor, metric: torch.Tensor, r: int, rule: LayerRule = TOME_RULE
    ) -> Tuple[torch.Tensor, "ToMeState"]:
        """Remove ``r`` tokens from ``x``, matching on ``metric`` by the block's merge rule.

        Args:
            x: ``(batch, tokens, channels)`` hidden states.
            metric: ``(batch, tokens, head_dim)`` keys averaged over heads (or the
                feature an ablation rule asked for; see :class:`AttentionCall`).
            r: Tokens to remove (capped by the matching).
            rule: The block's :class:`tome._methods.LayerRule` (ToMe's bipartite
                matching and size-weighted average unless ``model.tome_method`` says otherwise).

        Returns:
            The merged ``(batch, tokens - r, channels)`` tensor and the next state.
            Sizes always add up over a group, whatever the rule does with the values
            (except for the pruning baselines, which drop tokens and their sizes).

        With padding (``padded``) the rule matches only real tokens with real tokens
        while a sample's real tokens allow r, moves tokens that hold padding only behind
        the real ones, and combines as the rule says with padding counting for nothing,
        so a padded sample merges as it would alone (see :mod:`tome.merge`).

        Raises:
            ValueError: for a pruning rule with ``trace_source``, or a random matching
                with padding (see :func:`rule_check`).
        """
        if r <= 0:
            return x, self
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: the merge is one graph node
            merged, size, groups, positions = merge_tokens(
                x, metric, self.size, self.groups, r, self.protected_tokens, self.trace_source, tuple(rule),
                self.positions, self.position_rule,
            )
            return merged, replace(self, size=size, groups=groups, num_tokens=merged.shape[1], positions=positions)
        if rule is not TOME_RULE:
            rule_check(rule, self)
        size = self.sizes(x)
        valid = size[..., 0] > 0 if self.padded else None
        assignment = rule.assign(metric, r, self.protected_tokens, valid)
        if assignment is None:
            return x, self
        if self.padded:
            holds = assignment.prune(size) if rule.combine == "drop" else assignment.merge(size, mode="sum")
            assignment = _padding_last(assignment, holds[..., 0] > 0, self.protected_tokens)
        # Weighted sums of up to hundreds of tokens can overflow fp16: accumulate in fp32.
        work = x.float() if x.dtype in _LOW_PRECISION else x
        if rule.combine == "wavg":
            # Before the first merge every size is 1: skip multiplying by ones.
            merged = assignment.merge(work if self.size is None else work * size, mode="sum")
            new_size = assignment.merge(size, mode="sum")
            # A token made of padding only has size 0 (and value 0); it stays padding.
            merged = merged / (new_size.clamp_min(1e-6) if self.padded else new_size)
        else:
            merged, new_size = rule.combine_tokens(assignment, work, size, metric)
        merged = merged.to(x.dtype)
        groups = assignment.dest.gather(1, self.group_index(x.shape[0], x.device)) if self.trace_source else self.groups
        return merged, replace(self, size=new_size, groups=groups, num_tokens=assignment.num_out,
                               positions=self._merged_positions(assignment, rule, size, new_size))

    def _merged_positions(
        self, assignment: TokenAssignment, rule: LayerRule, size: torch.Tensor, new_size: torch.Tensor
    ) -> Optional[torch.Tensor]:
        """The carried positions after a merge step (None when none are carried)."""
        if self.positions is None:
            return None
        if rule.combine == "drop":  # pruning: the kept tokens keep their own positions
            return assignment.prune(self.positions)
        return merge_positions(assignment, self.positions, size, new_size, self.position_rule)

    def group_index(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, original tokens)`` group index, the identity when nothing merged."""
        if self.groups is not None:
            return self.groups
        return torch.arange(self.num_tokens, device=device).expand(batch, -1)


def rule_check(rule: LayerRule, state: ToMeState) -> None:
    """Refuse what an ablation rule cannot do with this state (a ``ValueError`` saying why)."""
    if rule.combine == "drop" and state.trace_source:
        raise ValueError(
            f"match={rule.match!r} drops patches, which the source map (trace_source, forward_intermediates, "
            "tome.vis) cannot represent; use a merging rule or trace_source=False"
        )
    if state.padded and rule.match in RANDOM_MATCHES:
        raise ValueError(
            f"the ablation rule {tuple(rule)} does not support key-padding masks (padding tokens of size 0): "
            + PADDED_RANDOM_REFUSAL.format(match=rule.match)
        )


POSITION_RULES = ("mean", "destination")


def merge_positions(
    assignment: TokenAssignment,
    positions: torch.Tensor,
    size: torch.Tensor,
    new_size: torch.Tensor,
    rule: str = "mean",
) -> torch.Tensor:
    """Positions of the merged tokens.

    Args:
        assignment: The merge step.
        positions: ``(batch, tokens, k)`` float32 positions before the merge.
        size: ``(batch, tokens, 1)`` sizes before the merge.
        new_size: ``(batch, tokens - r, 1)`` sizes after it.
        rule: ``"mean"``: the size-weighted mean of the members' positions (merged
            exactly as the features are); ``"destination"``: the position of the
            token the others merged into (set B of the bipartite split, the odd
            positions), unchanged.

    Returns:
        ``(batch, tokens - r, k)`` float32.
    """
    if rule == "mean":
        # A token made of padding only (size 0, padded batches) sits at 0 rather than at 0 / 0.
        return assignment.merge(positions * size, mode="sum") / new_size.clamp_min(1e-6)
    if rule != "destination":
        raise ValueError(f"position_rule={rule!r} is not one of {POSITION_RULES}")
    # Weight 1 for destinations (odd positions) and for tokens left alone, 0 for the
    # sources, so a group's weighted mean is its destination's position.
    tokens = positions.shape[1]
    ones = torch.ones_like(size)
    alone = assignment.unmerge(assignment.merge(ones, mode="sum")) == 1
    odd = (torch.arange(tokens, device=positions.device) % 2 == 1).view(1, tokens, 1)
    weight = (alone | odd).to(positions.dtype)
    return assignment.merge(positions * weight, mode="sum") / assignment.merge(weight, mode="sum")


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


@torch.jit.ignore  # TorchScript (e.g. of an fx graph) calls it in Python
def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: Optional[torch.Tensor],
    groups: Optional[torch.Tensor],
    r: int,
    protected_tokens: int,
    trace_source: bool,
    rule: Tuple[str, str, float, float, str, int] = ("bipartite", "wavg", 0.0, 1.0, "k", 2),
    positions: Optional[torch.Tensor] = None,
    position_rule: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """:meth:`ToMeState.merge` as one function of tensors, for torch.fx graphs.

    How many tokens remain depends on the input's token count, so torch.fx must not
    trace into the matching: this function is registered with ``torch.fx.wrap`` and
    appears as a single node. It always returns sizes (ones where nothing merged)
    and, when tracing sources, the group index, so the graph's later nodes get tensors.
    ``rule`` is the block's :class:`LayerRule` as a plain tuple (what a graph can record).
    ``positions`` ``(batch, tokens, k)`` (rotary angles of a RoPE model, or None) are
    merged by ``position_rule`` as :meth:`ToMeState.merge` merges them.

    Returns:
        ``(merged x, sizes (batch, tokens, 1), groups (batch, original tokens) or None,
        positions (batch, tokens - r, k) or None)``.
    """
    state = ToMeState(size, groups, x.shape[1], protected_tokens, True, trace_source, positions=positions,
                      position_rule=position_rule)
    merged, state = state.merge(x, metric, r, LayerRule(*rule))
    out_groups = state.group_index(x.shape[0], x.device) if trace_source else None
    return merged, state.sizes(merged), out_groups, state.positions


torch.fx.wrap("merge_tokens")


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


def size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional-attention bias for keys of sizes ``(batch, tokens, 1)``: ``log(size)``
    as ``(batch, 1, 1, tokens)``, added to every query's logits (paper, Sec. 3, Eq. 1)."""
    return size.log().transpose(1, 2).unsqueeze(1).to(dtype)


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
    # A sample of padding only (every size 0) has mean 0, as timm's masked pooling gives it.
    return ((x * size).sum(dim=1) / size.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)).to(x.dtype)

