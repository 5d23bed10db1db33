"""Visual-token reduction for vision-language models: plain tensor functions.

A vision-language model turns each image (or video) into ``N`` visual tokens that enter
its language model beside the text; they dominate the language model's prefill cost and
its KV cache. Each method here takes the ``N`` tokens of *one* image or video, as they
enter the language model (after the projector, patch merger or pixel shuffle), and
returns at most ``budget`` tokens to pass on instead, with the record of which original
tokens each one stands for. The model integration (``tome.patch._vlm``) shrinks the
sequence, the attention mask and the positions from that record.

Every method has the same signature, ``method(features, budget, context) -> Reduction``:

- ``features``: ``(N, C)`` the image's tokens, in the model's order (row-major over the
  ``(frames, height, width)`` grid of ``context.grid``).
- ``budget``: the most tokens to pass on, ``1 <= budget``; a budget of at least ``N``
  passes every token on unchanged (:func:`reduce_tokens` does not call the method then).
- ``context``: a :class:`VisualContext` with what some methods need beyond the features
  (the grid, the attention a token receives, the instruction's embeddings). The
  integration computes those from queries and keys, never from returned attention
  weights, so no method forces eager attention.

Methods (``METHODS``):

- ``"random"``: a uniformly random subset (the baseline that UniPruneBench found to beat
  six of eight methods at 67-78 % pruning; Peng et al., 2025).
- ``"pool"``: 2-D average pooling of the token grid to the budget (the downsampling
  baseline of VTC-Bench; Liao et al., 2025).

No model knowledge; imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "METHODS",
    "Reduction",
    "VisualContext",
    "pool",
    "random",
    "reduce_tokens",
    "register_method",
    "resolve_budget",
    "selection",
]


@dataclass(frozen=True)
class Reduction:
    """The tokens one image or video passes on to the language model.

    Attributes:
        features: ``(K, C)`` the tokens passed on, ``K <= budget``, ordered by their
            first source token (so a selection keeps the model's order).
        source: ``(K, N)`` 0/1 membership: ``source[i, j] == 1`` when original token
            ``j`` is part of passed-on token ``i``. Rows of a selection are one-hot;
            every original token belongs to at most one row (dropped ones to none).
            ``source.sum(-1)`` is each token's size (how many originals it stands for).
        index: ``(K,)`` for selection methods, the original index of each passed-on
            token (``features == original[index]``); None for methods that merge.
    """

    features: torch.Tensor
    source: torch.Tensor
    index: Optional[torch.Tensor] = None

    @property
    def size(self) -> torch.Tensor:
        """``(K,)`` how many original tokens each passed-on token stands for."""
        return self.source.sum(-1)

    def positions(self, original: torch.Tensor) -> torch.Tensor:
        """Positions of the passed-on tokens: a selected token keeps its own; a merged one
        gets the size-weighted mean of its members' (the rule the RoPE backbones use).

        Args:
            original: ``(N,)`` or ``(N, D)`` the original tokens' positions (``D`` = 3 for
                M-RoPE's ``(t, h, w)``).

        Returns:
            ``(K,)`` or ``(K, D)`` float positions (exact integers for a selection).
        """
        if self.index is not None:
            return original[self.index].to(torch.float32)
        weights = self.source.to(torch.float32)
        mean = weights @ original.to(torch.float32).reshape(original.shape[0], -1)
        mean = mean / weights.sum(-1, keepdim=True).clamp(min=1)
        return mean.reshape((weights.shape[0],) + tuple(original.shape[1:]))


@dataclass
class VisualContext:
    """What a method may need beyond the tokens themselves. Every field is optional; a
    method that needs one the integration did not provide raises ``ValueError``.

    Attributes:
        grid: ``(frames, height, width)`` of the ``N`` tokens, ``frames * height * width == N``
            (``frames == 1`` for an image).
        metric: ``(N, D)`` the feature similarity is measured on (e.g. the vision tower's
            last keys); default: the tokens themselves.
        attention: ``(N,)`` how much attention each token receives (VisionZip: in the
            vision tower; FastV: from the last text token at a language-model layer).
        text: ``(L, C)`` the instruction's token embeddings, in the language model's input
            space (CDPruner's relevance).
        generator: the random generator of ``"random"`` (default: torch's global one).
    """

    grid: Optional[Tuple[int, int, int]] = None
    metric: Optional[torch.Tensor] = None
    attention: Optional[torch.Tensor] = None
    text: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None

    def require(self, name: str, method: str) -> torch.Tensor:
        """The field ``name``, or ``ValueError`` saying that ``method`` needs it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"visual-token method {method!r} needs context.{name}, which was not given")
        return value


Method = Callable[[torch.Tensor, int, VisualContext], Reduction]
METHODS: Dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Decorator: register ``fn`` as the visual-token method ``name`` (replacing one of that name)."""

    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn

    return wrap


def resolve_budget(visual_tokens: Union[int, float, None], num_tokens: int) -> int:
    """The number of tokens an image of ``num_tokens`` passes on.

    Args:
        visual_tokens: an int ``K >= 1`` (tokens per image or video), a float in ``(0, 1]``
            (the fraction kept, rounded up, at least 1), or None (keep all).
        num_tokens: the image's visual tokens before reduction.

    Returns:
        ``min(budget, num_tokens)``.

    Raises:
        ValueError: for 0, a negative value, a float above 1, or a non-number.
    """
    check_budget(visual_tokens)
    if visual_tokens is None:
        return num_tokens
    if isinstance(visual_tokens, float):
        return min(num_tokens, max(1, math.ceil(visual_tokens * num_tokens)))
    return min(num_tokens, int(visual_tokens))


def check_budget(visual_tokens: Union[int, float, None]) -> None:
    """Raise ``ValueError`` unless ``visual_tokens`` is None, an int >= 1 or a float in (0, 1]."""
    if visual_tokens is None:
        return
    if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, (int, float)):
        raise ValueError(f"visual_tokens={visual_tokens!r} is not valid; expected None, an int >= 1 "
                         "(tokens per image or video) or a float in (0, 1] (the fraction kept)")
    if isinstance(visual_tokens, float) and not 0.0 < visual_tokens <= 1.0:
        raise ValueError(f"visual_tokens={visual_tokens!r} is not valid; a float must be in (0, 1] "
                         "(the fraction of visual tokens kept); use an int for a token count")
    if isinstance(visual_tokens, int) and visual_tokens < 1:
        raise ValueError(f"visual_tokens={visual_tokens!r} is not valid; expected an int >= 1 "
                         "(tokens per image or video), a float in (0, 1], or None to keep all")


def selection(features: torch.Tensor, index: torch.Tensor) -> Reduction:
    """A :class:`Reduction` that keeps the rows ``index`` of ``features``, in ascending order.

    Args:
        features: ``(N, C)``.
        index: ``(K,)`` distinct original indices, in any order.
    """
    index = index.sort().values
    source = torch.zeros(index.shape[0], features.shape[0], dtype=features.dtype, device=features.device)
    source[torch.arange(index.shape[0], device=index.device), index] = 1
    return Reduction(features=features[index], source=source, index=index)


def reduce_tokens(method: str, features: torch.Tensor, budget: int,
                  context: Optional[VisualContext] = None) -> Reduction:
    """Reduce one image's (or video's) ``features`` to at most ``budget`` tokens with ``method``.

    Args:
        method: a name in ``METHODS``.
        features: ``(N, C)``.
        budget: ``>= 1``; at least ``N`` passes every token on unchanged (identity).
        context: see :class:`VisualContext`.

    Raises:
        ValueError: for an unknown method, a budget below 1, a grid that does not hold
            ``N`` tokens, or a context field the method needs and did not get.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a visual-token method; expected one of {sorted(METHODS)}")
    if features.dim() != 2:
        raise ValueError(f"features must be (tokens, channels), got shape {tuple(features.shape)}")
    if isinstance(budget, bool) or int(budget) != budget or budget < 1:
        raise ValueError(f"budget={budget!r} is not valid; expected an int >= 1")
    context = context if context is not None else VisualContext()
    num_tokens = features.shape[0]
    if context.grid is not None and math.prod(context.grid) != num_tokens:
        raise ValueError(f"context.grid={tuple(context.grid)} holds {math.prod(context.grid)} tokens, "
                         f"but features has {num_tokens}")
    if budget >= num_tokens:
        return selection(features, torch.arange(num_tokens, device=features.device))
    return METHODS[method](features, int(budget), context)


@register_method("random")
def random(features: torch.Tensor, budget: int, context: VisualContext) -> Reduction:
    """Keep a uniformly random subset of ``budget`` tokens, in their original order.

    Args:
        features: ``(N, C)``; budget: ``1 <= budget < N``; context: its ``generator`` is used.

    Returns:
        a selection of ``budget`` tokens.
    """
    order = torch.randperm(features.shape[0], generator=context.generator, device="cpu")
    return selection(features, order[:budget].to(features.device))


def _pool_grid(grid: Tuple[int, int, int], budget: int) -> Tuple[int, int, int]:
    """The largest output grid ``(t', h', w')`` with ``t' * h' * w' <= budget`` that keeps the
    input's aspect ratio as closely as possible (time first shrinks last)."""
    frames, height, width = grid
    best = (1, 1, 1)
    for out_t in range(1, frames + 1):
        per_frame = budget // out_t
        if per_frame < 1:
            break
        scale = math.sqrt(per_frame / (height * width))
        out_h = max(1, min(height, math.floor(height * scale)))
        out_w = max(1, min(width, per_frame // out_h))
        if out_t * out_h * out_w > math.prod(best):
            best = (out_t, out_h, out_w)
    return best


@register_method("pool")
def pool(features: torch.Tensor, budget: int, context: VisualContext) -> Reduction:
    """Average-pool the token grid down to at most ``budget`` tokens: the grid is cut into
    near-equal cells (a partition) and each cell passes on the plain mean of its tokens.

    Source: the downsampling baseline of VTC-Bench (Liao et al., "Are We Using the Right
    Benchmark: An Evaluation Framework for Visual Token Compression Methods", 2025, sec. 3).

    Args:
        features: ``(N, C)``; budget: ``1 <= budget < N``; context: ``grid`` is required
            (default: a square ``(1, sqrt(N), sqrt(N))`` grid when ``N`` is a square).

    Raises:
        ValueError: when no grid is given and ``N`` is not a square.
    """
    num_tokens = features.shape[0]
    grid = context.grid
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"method 'pool' needs context.grid for {num_tokens} tokens (not a square)")
        grid = (1, side, side)
    out = _pool_grid(tuple(grid), budget)
    # Each input cell belongs to exactly one output cell: along every axis, input i of n goes
    # to output (i * m) // n of m (a partition, unlike adaptive pooling's overlapping windows).
    axes = [(torch.arange(n, device=features.device) * m) // n for n, m in zip(grid, out)]
    cell = (axes[0][:, None, None] * out[1] + axes[1][None, :, None]) * out[2] + axes[2][None, None, :]
    source = F.one_hot(cell.reshape(-1), math.prod(out)).t().to(features.dtype)
    pooled = (source @ features) / source.sum(-1, keepdim=True)
    order = torch.argmax(source, dim=-1).argsort()  # first member of each cell, ascending
    return Reduction(features=pooled[order], source=source[order], index=None)
