"""Merge methods: which tokens merge and how, one setting for every model family.

- ``"tome"``: bipartite soft matching and size-weighted averaging (Bolya et al.,
  ICLR 2023). The default.
- ``"pitome"``: energy-protected matching (Tran et al., "Accelerating Transformers
  with Spectrum-Preserving Token Merging", NeurIPS 2024, arXiv 2405.16148, sec. 3).
- ``"tofu"``: ToMe's matching; pruning in the early blocks, norm-preserving MLERP
  merging in the later ones (Kim et al., "Token Fusion: Bridging the Gap between
  Token Pruning and Token Merging", WACV 2024, arXiv 2312.01026, sec. 3).
- ``"ablation"``: a research setting, not a method: ToMe with one design choice
  changed (similarity feature, matching, combining; ToMe paper sec. 4.1), or a
  token-pruning baseline (random dropping; EViT's attentive-token pruning, with or
  without fusion). See docs/ablations.md.

A :class:`MergeMethod` is a model-level setting (``model.tome_method``); each
block holds the :class:`LayerRule` it resolves to at its depth, and hands it to
the one shared merge step (:meth:`tome.patch._shared.ToMeState.merge`). Pure
functions of tensors; no model knowledge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch

from .merge import (
    TokenAssignment,
    match_attentive,
    match_bipartite,
    match_greedy,
    match_kth,
    match_pitome,
    match_random,
    match_random_drop,
    merge_drop,
    merge_fuse,
    merge_mlerp,
    merge_prune,
)

__all__ = ["METHODS", "MergeMethod", "LayerRule", "as_method", "TOME_RULE", "ABLATION_METRICS",
           "ABLATION_MATCHES", "ABLATION_COMBINES"]

METHODS = ("tome", "pitome", "tofu")

# The research setting MergeMethod("ablation", ...): not one of METHODS (tools that run "all"
# methods skip it). Its options and their meanings are documented on MergeMethod.
ABLATION = "ablation"
ABLATION_METRICS = ("k", "x", "q", "v", "k_cat")
ABLATION_MATCHES = ("bipartite", "kth", "random", "greedy", "random_drop", "evit", "evit_fuse")
ABLATION_COMBINES = ("wavg", "keep", "amax", "mean")
_PRUNING_COMBINE = {"random_drop": "drop", "evit": "drop", "evit_fuse": "fuse"}
_DEFAULT_KTH = 4

# PiToMe's margin falls linearly with depth from this value at the first block to 0 after the last.
_PITOME_MARGIN_START = 0.9


class LayerRule(NamedTuple):
    """What one block does when it merges (plain values, so torch.fx can record it).

    Attributes:
        match: ``"bipartite"`` (ToMe), ``"pitome"``, or an ablation: ``"kth"``,
            ``"random"``, ``"greedy"`` (merging); ``"random_drop"``, ``"evit"``,
            ``"evit_fuse"`` (pruning baselines).
        combine: ``"wavg"`` (size-weighted average), ``"prune"`` (keep the
            destination, add the sizes), ``"mlerp"``, or an ablation: ``"amax"``,
            ``"mean"`` (unweighted), ``"drop"``, ``"fuse"``.
        margin: PiToMe's energy margin at this block (unused otherwise).
        alpha: PiToMe's penalty scale below the margin (unused otherwise).
        metric: Similarity feature: ``"k"`` (keys averaged over heads, ToMe's), ``"x"``
            (the block's input), ``"q"``/``"v"`` (averaged over heads), ``"k_cat"``
            (keys of all heads concatenated).
        kth: Group size of the ``"kth"`` matching.
    """

    match: str = "bipartite"
    combine: str = "wavg"
    margin: float = 0.0
    alpha: float = 1.0
    metric: str = "k"
    kth: int = 2

    @property
    def attention_feature(self) -> str:
        """What the block's attention must report (:class:`tome.patch._shared.AttentionCall`):
        ``"cls_attn"`` for EViT's pruning, the metric for ``q``/``v``/``k_cat``, else ``"k"``
        (the block input, ``"x"``, needs nothing from the attention)."""
        if self.match in ("evit", "evit_fuse"):
            return "cls_attn"
        return self.metric if self.metric in ("q", "v", "k_cat") else "k"

    def assign(
        self, metric: torch.Tensor, r: int, protected_tokens: int, valid: Optional[torch.Tensor] = None
    ) -> Optional[TokenAssignment]:
        """The matching of this rule on ``metric`` ``(batch, tokens, channels)``; None if nothing merges.

        For ``"evit"``/``"evit_fuse"`` the metric is the class token's attention, ``(batch, tokens, 1)``.
        ``"random"`` and ``"random_drop"`` draw from torch's global generator.
        ``valid`` ``(batch, tokens)`` bool marks the real tokens of a padded batch (False:
        padding); every rule but the random ones then matches a sample's real tokens as
        it does alone (see :mod:`tome.merge`).

        Raises:
            ValueError: for ``"random"``/``"random_drop"`` with ``valid`` (:data:`RANDOM_MATCHES`).
        """
        match = self.match
        if match == "bipartite":
            return match_bipartite(metric, r, protected_tokens, valid)
        if match == "pitome":
            return match_pitome(metric, r, protected_tokens, self.margin, self.alpha, valid)
        if match == "kth":
            return match_kth(metric, r, protected_tokens, self.kth, valid)
        if match in RANDOM_MATCHES and valid is not None:
            raise ValueError(PADDED_RANDOM_REFUSAL.format(match=match))
        if match == "random":
            return match_random(metric, r, protected_tokens)
        if match == "greedy":
            return match_greedy(metric, r, protected_tokens, valid)
        if match == "random_drop":
            return match_random_drop(metric, r, protected_tokens)
        if match in ("evit", "evit_fuse"):
            return match_attentive(metric[..., 0], r, protected_tokens, fuse=match == "evit_fuse", valid=valid)
        raise ValueError(f"match={match!r} is not a matching rule; expected 'bipartite', 'pitome' or one of "
                         f"{list(ABLATION_MATCHES)}")

    def combine_tokens(
        self, assignment: TokenAssignment, x: torch.Tensor, size: torch.Tensor, metric: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Combine ``x`` ``(batch, tokens, channels)`` with sizes ``(batch, tokens, 1)``
        by a rule other than the size-weighted average; returns ``(x, size)`` merged.
        ``metric`` is this block's metric (``"fuse"`` weights by it: the class token's attention).
        Tokens of size 0 (padding) count for nothing in a group that holds a real token."""
        combine = self.combine
        if combine == "prune":
            return merge_prune(assignment, x, size)
        if combine == "mlerp":
            return merge_mlerp(assignment, x, size)
        if combine in ("amax", "mean"):
            return _combine_real(assignment, x, size, combine), assignment.merge(size, mode="sum")
        if combine == "drop":
            return merge_drop(assignment, x, size)
        if combine == "fuse" and metric is not None:
            return merge_fuse(assignment, x, metric, size)
        raise ValueError(f"combine={combine!r} is not a combine rule; expected 'wavg', 'prune', 'mlerp', "
                         "'amax', 'mean', 'drop' or 'fuse' (with the class-token attention as metric)")


TOME_RULE = LayerRule()

# Matchings that draw tokens at random: with padding they cannot match a sample as it is
# matched alone (the draw depends on the padded length), so padded batches refuse them.
RANDOM_MATCHES = ("random", "random_drop")
PADDED_RANDOM_REFUSAL = (
    "match={match!r} draws its tokens at random, and the draw depends on the padded length of the batch, so a "
    "padded sample cannot merge as it would alone; run it without a padding mask (one sample at a time, or "
    "samples of one size) or use a deterministic matching"
)


def _combine_real(assignment: TokenAssignment, x: torch.Tensor, size: torch.Tensor, mode: str) -> torch.Tensor:
    """Unweighted ``"mean"`` or ``"amax"`` over each group's tokens of nonzero size (all of them
    without padding); a group of padding only (size 0) combines all of its tokens."""
    real = size > 0
    if mode == "mean":
        weight = real.to(x.dtype)
        count = assignment.merge(weight, mode="sum")
        over_real = assignment.merge(x * weight, mode="sum") / count.clamp_min(1)
        return torch.where(count > 0, over_real, assignment.merge(x, mode="mean"))
    over_real = assignment.merge(torch.where(real, x, torch.full_like(x, -math.inf)), mode="amax")
    return torch.where(assignment.merge(real.to(x.dtype), mode="amax") > 0, over_real, assignment.merge(x, mode="amax"))


@dataclass(frozen=True)
class MergeMethod:
    """A merge method and its options: ``tome.apply_patch(model, r, method=...)``.

    Args:
        name: One of :data:`METHODS`: ``"tome"``, ``"pitome"``, ``"tofu"``.
        margin: ``"pitome"`` only. Fixed energy margin for every block; ``None``
            (default) uses the paper's depth schedule ``0.9 * (1 - layer / layers)``
            (layer counted from 0).
        alpha: ``"pitome"`` only. Penalty scale below the margin; ``None`` means 1.0.
        prune_layers: ``"tofu"`` only. Blocks ``0 .. prune_layers - 1`` prune, the
            rest merge with MLERP; ``None`` means ``ceil(layers / 4)`` (3 of 12).
        metric: ``"ablation"`` only. Similarity feature the matching compares:
            ``"k"`` (default: keys averaged over heads, ToMe's), ``"x"`` (the block's
            input, before its attention), ``"q"`` or ``"v"`` (averaged over heads),
            ``"k_cat"`` (keys of all heads concatenated). ``q``/``v``/``k_cat`` need the
            attention to report them: timm ViT and MAE, torchvision and SWAG models do;
            other families raise ``ValueError`` when the method is set.
        match: ``"ablation"`` only. ``"bipartite"`` (default, ToMe), ``"kth"`` (fixed,
            evenly spaced destinations: every ``kth`` token; :func:`tome.merge.match_kth`),
            ``"random"`` (random sources merge into their best match), ``"greedy"``
            (repeatedly the globally most similar pair), or a pruning baseline:
            ``"random_drop"`` (drop random tokens), ``"evit"`` (drop the tokens the
            class token attends to least, averaged over heads; EViT, ICLR 2022),
            ``"evit_fuse"`` (EViT with the dropped tokens fused into one extra token:
            it drops ``r + 1`` and adds the fused one, so the count falls by ``r`` like
            every other rule). EViT needs a class token and the attention to report
            its attention (the families listed under ``metric``).
        combine: ``"ablation"`` merging only. ``"wavg"`` (default, size-weighted
            average), ``"keep"`` (keep the destination's value, drop the source's;
            sizes still add), ``"amax"`` (max pooling), ``"mean"`` (plain, unweighted
            average). Pruning matches fix their own (drop, or EViT's attention-weighted fusion).
        kth: ``"ablation"`` with ``match="kth"`` only: group size (``None``: 4).

    ``MergeMethod("ablation")`` with no options is ToMe exactly. Pruning baselines
    drop patches, so they cannot trace sources (``trace_source``). With a key-padding
    mask every method and ablation merges each sample as it would alone, except the
    random matchings (``"random"``, ``"random_drop"``), which refuse padding: their draw
    depends on the padded length.

    Raises:
        ValueError: for an unknown ``name`` (the valid ones are listed), an option
            given to a method that does not take it, or an option out of range.
    """

    name: str = "tome"
    margin: Optional[float] = None
    alpha: Optional[float] = None
    prune_layers: Optional[int] = None
    metric: Optional[str] = None
    match: Optional[str] = None
    combine: Optional[str] = None
    kth: Optional[int] = None

    def __post_init__(self) -> None:
        if self.name not in METHODS and self.name != ABLATION:
            raise ValueError(f"method={self.name!r} is not a merge method; expected one of {list(METHODS)} "
                             f"(or {ABLATION!r}, the research setting of docs/ablations.md)")
        for option, owner in (("margin", "pitome"), ("alpha", "pitome"), ("prune_layers", "tofu"),
                              ("metric", ABLATION), ("match", ABLATION), ("combine", ABLATION), ("kth", ABLATION)):
            value = getattr(self, option)
            if value is not None and self.name != owner:
                raise ValueError(f"{option}={value!r} is an option of method '{owner}', not of {self.name!r}")
        if self.name == ABLATION:
            self._check_ablation()
        if self.margin is not None and not -1.0 <= float(self.margin) <= 1.0:
            raise ValueError(f"margin={self.margin!r} must lie in [-1, 1] (it is a cosine similarity)")
        if self.alpha is not None and not (float(self.alpha) >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha={self.alpha!r} must be a finite number >= 0")
        if self.prune_layers is not None and (
            isinstance(self.prune_layers, bool) or not isinstance(self.prune_layers, int) or self.prune_layers < 0
        ):
            raise ValueError(f"prune_layers={self.prune_layers!r} must be a non-negative int")

    def _check_ablation(self) -> None:
        for option, allowed in (("metric", ABLATION_METRICS), ("match", ABLATION_MATCHES),
                                ("combine", ABLATION_COMBINES)):
            value = getattr(self, option)
            if value is not None and value not in allowed:
                raise ValueError(f"{option}={value!r} is not an ablation {option}; expected one of {list(allowed)}")
        if self.match in _PRUNING_COMBINE:
            if self.combine is not None:
                raise ValueError(f"combine={self.combine!r} cannot be set for the pruning baseline "
                                 f"match={self.match!r} (it drops or fuses tokens itself)")
            if self.match != "random_drop" and self.metric is not None:
                raise ValueError(f"metric={self.metric!r} cannot be set for match={self.match!r}: EViT ranks "
                                 "tokens by the class token's attention")
        if self.kth is not None:
            if self.match != "kth":
                raise ValueError(f"kth={self.kth!r} is an option of match='kth', not of match={self.match!r}")
            if isinstance(self.kth, bool) or not isinstance(self.kth, int) or self.kth < 2:
                raise ValueError(f"kth={self.kth!r} must be an int >= 2")

    def rule(self, layer: int, num_layers: int) -> LayerRule:
        """The rule block ``layer`` (from 0) of a ``num_layers``-block model follows."""
        if self.name == ABLATION:
            match = self.match or "bipartite"
            combine = _PRUNING_COMBINE.get(match) or {"keep": "prune"}.get(self.combine or "wavg", self.combine or "wavg")
            kth = (self.kth or _DEFAULT_KTH) if match == "kth" else 2
            rule = LayerRule(match, combine, 0.0, 1.0, self.metric or "k", kth)
            return TOME_RULE if rule == TOME_RULE else rule
        if self.name == "pitome":
            margin = self.margin
            if margin is None:
                margin = _PITOME_MARGIN_START * (1 - layer / max(num_layers, 1))
            return LayerRule("pitome", "wavg", float(margin), 1.0 if self.alpha is None else float(self.alpha))
        if self.name == "tofu":
            prune_layers = math.ceil(num_layers / 4) if self.prune_layers is None else self.prune_layers
            return LayerRule("bipartite", "prune" if layer < prune_layers else "mlerp")
        return TOME_RULE

    def __str__(self) -> str:
        options = [f"{key}={getattr(self, key)!r}"
                   for key in ("margin", "alpha", "prune_layers", "metric", "match", "combine", "kth")
                   if getattr(self, key) is not None]
        return self.name if not options else f"{self.name}({', '.join(options)})"


def as_method(method: Union[str, MergeMethod, None]) -> MergeMethod:
    """A :class:`MergeMethod` from a name, a method, or None (``"tome"``).

    Raises:
        ValueError: for an unknown name (the valid ones are listed) or another type.
    """
    if method is None:
        return MergeMethod()
    if isinstance(method, MergeMethod):
        return method
    if isinstance(method, str):
        return MergeMethod(method)
    raise ValueError(f"method={method!r} is not a merge method; expected one of {list(METHODS)} or a tome.MergeMethod")
