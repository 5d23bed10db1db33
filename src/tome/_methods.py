"""Merge methods: which tokens merge and how, one setting for every model family.

- ``"tome"``: bipartite soft matching and size-weighted averaging (Bolya et al.,
  ICLR 2023). The default.
- ``"pitome"``: energy-protected matching (Tran et al., "Accelerating Transformers
  with Spectrum-Preserving Token Merging", NeurIPS 2024, arXiv 2405.16148, sec. 3).
- ``"tofu"``: ToMe's matching; pruning in the early blocks, norm-preserving MLERP
  merging in the later ones (Kim et al., "Token Fusion: Bridging the Gap between
  Token Pruning and Token Merging", WACV 2024, arXiv 2312.01026, sec. 3).

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

from .merge import TokenAssignment, match_bipartite, match_pitome, merge_mlerp, merge_prune

__all__ = ["METHODS", "MergeMethod", "LayerRule", "as_method", "TOME_RULE"]

METHODS = ("tome", "pitome", "tofu")

# PiToMe's margin falls linearly with depth from this value at the first block to 0 after the last.
_PITOME_MARGIN_START = 0.9


class LayerRule(NamedTuple):
    """What one block does when it merges (plain values, so torch.fx can record it).

    Attributes:
        match: ``"bipartite"`` (ToMe) or ``"pitome"``.
        combine: ``"wavg"`` (size-weighted average), ``"prune"`` or ``"mlerp"``.
        margin: PiToMe's energy margin at this block (unused otherwise).
        alpha: PiToMe's penalty scale below the margin (unused otherwise).
    """

    match: str = "bipartite"
    combine: str = "wavg"
    margin: float = 0.0
    alpha: float = 1.0

    def assign(self, metric: torch.Tensor, r: int, protected_tokens: int) -> Optional[TokenAssignment]:
        """The matching of this rule on ``metric`` ``(batch, tokens, channels)``; None if nothing merges."""
        if self.match == "pitome":
            return match_pitome(metric, r, protected_tokens, self.margin, self.alpha)
        return match_bipartite(metric, r, protected_tokens)

    def combine_tokens(
        self, assignment: TokenAssignment, x: torch.Tensor, size: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Combine ``x`` ``(batch, tokens, channels)`` with sizes ``(batch, tokens, 1)``
        by a rule other than the size-weighted average; returns ``(x, size)`` merged."""
        if self.combine == "prune":
            return merge_prune(assignment, x, size)
        if self.combine == "mlerp":
            return merge_mlerp(assignment, x, size)
        raise ValueError(f"combine={self.combine!r} is not a combine rule; expected 'wavg', 'prune' or 'mlerp'")


TOME_RULE = LayerRule()


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

    Raises:
        ValueError: for an unknown ``name`` (the valid ones are listed), an option
            given to a method that does not take it, or an option out of range.
    """

    name: str = "tome"
    margin: Optional[float] = None
    alpha: Optional[float] = None
    prune_layers: Optional[int] = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method={self.name!r} is not a merge method; expected one of {list(METHODS)}")
        for option, owner in (("margin", "pitome"), ("alpha", "pitome"), ("prune_layers", "tofu")):
            value = getattr(self, option)
            if value is not None and self.name != owner:
                raise ValueError(f"{option}={value!r} is an option of method '{owner}', not of {self.name!r}")
        if self.margin is not None and not -1.0 <= float(self.margin) <= 1.0:
            raise ValueError(f"margin={self.margin!r} must lie in [-1, 1] (it is a cosine similarity)")
        if self.alpha is not None and not (float(self.alpha) >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha={self.alpha!r} must be a finite number >= 0")
        if self.prune_layers is not None and (
            isinstance(self.prune_layers, bool) or not isinstance(self.prune_layers, int) or self.prune_layers < 0
        ):
            raise ValueError(f"prune_layers={self.prune_layers!r} must be a non-negative int")

    def rule(self, layer: int, num_layers: int) -> LayerRule:
        """The rule block ``layer`` (from 0) of a ``num_layers``-block model follows."""
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
        options = [f"{key}={getattr(self, key)!r}" for key in ("margin", "alpha", "prune_layers") if getattr(self, key) is not None]
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
