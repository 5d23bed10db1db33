"""The per-forward state of a merging model and its algebra.

A :class:`ToMeState` (sizes, source groups, padding, rotary positions) is created at
the top of a model's forward and handed from block to block; it is immutable, so a
merge returns a new state. :func:`merge_tokens` is the same merge as one function of
tensors, a leaf for ``torch.fx``; :func:`weighted_mean` and the biases are what pooling
and attention read from the sizes.
"""

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._methods import PADDED_RANDOM_REFUSAL, RANDOM_MATCHES, TOME_RULE, LayerRule
from ..merge import TokenAssignment
from ._prop_attn import finite_key_bias

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
