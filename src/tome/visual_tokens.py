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
- ``"tome"``: ToMe's bipartite soft matching repeated down to the budget, size-weighted
  means; in a video, tokens at the same place of consecutive frames merge first
  (Bolya et al., ICLR 2023, sec. 3). Context: ``metric`` (optional), ``grid``.
- ``"divprune"``: greedy max-min diversity selection on cosine distance (Alvar et al.,
  CVPR 2025, arXiv 2503.02175). Context: ``metric`` (optional).
- ``"visionzip"``: dominant tokens by attention received in the vision tower plus a few
  contextual tokens merged from the rest (Yang et al., CVPR 2025, arXiv 2412.04467).
  Context: ``attention`` (required), ``metric`` (optional).
- ``"cdpruner"``: a DPP conditioned on the instruction's relevance, greedy MAP (Zhang et
  al., arXiv 2506.10967). Context: ``text`` (required), ``metric`` (optional).
- ``"fastv"``: the tokens the last token attends to most at a language-model layer
  (Chen et al., ECCV 2024, arXiv 2403.06764). Context: ``attention`` (required).

Every method accepts a video (``VIDEO_METHODS``). Selections (``random``, ``divprune``,
``cdpruner``, ``fastv``) pass on exactly ``budget`` original tokens; merges (``tome``,
``visionzip``) exactly ``budget`` size-weighted means; ``pool`` at most ``budget`` cells.

No model knowledge; imports torch and the matching of :mod:`tome.merge` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from tome.merge import TokenAssignment, match_bipartite, merge_wavg

__all__ = [
    "METHODS",
    "VIDEO_METHODS",
    "VISIONZIP_CONTEXTUAL",
    "Reduction",
    "VisualContext",
    "cdpruner",
    "conditional_dpp",
    "divprune",
    "fastv",
    "instruction_relevance",
    "pool",
    "random",
    "reduce_tokens",
    "register_method",
    "resolve_budget",
    "selection",
    "tome_merge",
    "visionzip",
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
    if (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget)
            or int(budget) != budget or budget < 1):
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
    # Every output cell holds at least one input cell (each axis shrinks, never grows).
    return _merged(features, cell.reshape(-1), math.prod(out))


# ---------------------------------------------------------------------------
# Shared helpers of the methods below.


def _token_metric(features: torch.Tensor, context: VisualContext, method: str) -> torch.Tensor:
    """``context.metric`` when given (checked to be ``(N, D)``), else ``features``; float32 or wider."""
    metric = features if context.metric is None else context.metric
    if metric.dim() != 2 or metric.shape[0] != features.shape[0]:
        raise ValueError(f"method {method!r} needs context.metric of shape (tokens={features.shape[0]}, D), "
                         f"got {tuple(metric.shape)}")
    return metric if metric.dtype == torch.float64 else metric.float()


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero)."""
    return F.normalize(x, dim=-1, eps=1e-12)


def _token_attention(features: torch.Tensor, context: VisualContext, method: str) -> torch.Tensor:
    """``context.attention`` as a float ``(N,)`` vector, or ``ValueError``."""
    attention = context.require("attention", method)
    if attention.dim() != 1 or attention.shape[0] != features.shape[0]:
        raise ValueError(f"method {method!r} needs context.attention of shape (tokens={features.shape[0]},), "
                         f"got {tuple(attention.shape)}")
    return attention.float()


def _merged(features: torch.Tensor, group: torch.Tensor, num_groups: int) -> Reduction:
    """The :class:`Reduction` in which original token ``j`` is part of group ``group[j]``.

    Every group is non-empty; each passes on the mean of its members' features
    (every original has size 1, so this is the size-weighted mean), computed in float32
    in one step from the originals. Rows are ordered by their first source token.
    """
    num_tokens = features.shape[0]
    device = features.device
    row = _first_source_rank(group, num_groups)[group]
    source = torch.zeros(num_groups, num_tokens, dtype=features.dtype, device=device)
    source[row, torch.arange(num_tokens, device=device)] = 1
    dtype = torch.promote_types(features.dtype, torch.float32)
    total = torch.zeros(num_groups, features.shape[1], dtype=dtype, device=device)
    total.index_add_(0, row, features.to(dtype))
    size = torch.zeros(num_groups, dtype=dtype, device=device)
    size.index_add_(0, row, torch.ones(num_tokens, dtype=dtype, device=device))
    return Reduction(features=(total / size[:, None]).to(features.dtype), source=source, index=None)


def _first_source_rank(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``(num_groups,)`` each group's rank when groups are ordered by their first member
    (original token ``j`` is in group ``group[j]``; every group non-empty)."""
    num_tokens = group.shape[0]
    positions = torch.arange(num_tokens, device=group.device)
    first = torch.full((num_groups,), num_tokens, dtype=torch.long, device=group.device)
    first = first.scatter_reduce(0, group, positions, reduce="amin")
    rank = torch.empty_like(first)
    rank[first.argsort()] = torch.arange(num_groups, device=group.device)
    return rank


# ---------------------------------------------------------------------------
# "tome": bipartite soft matching repeated down to the budget, with the temporal rule.


def _merge_time(metric: torch.Tensor, size: torch.Tensor, where: torch.Tensor,
                grid: Tuple[int, int, int], budget: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The temporal rule of ``"tome"``: merge tokens at the same place of consecutive frames.

    Level by level, frames are paired (0, 1), (2, 3), ...; each pair of tokens at the same
    ``(h, w)`` place is a candidate, the odd frame's token merging into the even frame's.
    When the budget needs fewer merges than a level offers, the most similar pairs (cosine
    of ``metric``) merge and the rule stops; otherwise the whole level merges, the video
    has ``ceil(frames / 2)`` frames of merged tokens, and the next level pairs those.

    Args:
        metric: ``(1, n, D)`` float, ``n = frames * height * width`` in row-major order.
        size: ``(1, n, 1)`` sizes. where: ``(N,)`` current token of each original token.
        grid: ``(frames, height, width)``. budget: tokens to reach, ``< n``.

    Returns:
        ``(metric, size, where)`` after the temporal merges (tokens in frame-major order).
    """
    frames, height, width = grid
    place = height * width
    device = metric.device
    while frames > 1 and metric.shape[1] > budget:
        num = metric.shape[1]
        pairs = frames // 2
        candidates = pairs * place
        r = min(num - budget, candidates)
        even = (torch.arange(pairs, device=device)[:, None] * 2 * place
                + torch.arange(place, device=device)[None, :]).reshape(-1)
        odd = even + place
        unit = _unit(metric[0])
        score = (unit[even] * unit[odd]).sum(-1)
        merged = odd if r == candidates else odd[score.topk(r).indices]
        target = torch.arange(num, device=device)
        target[merged] = merged - place
        kept = torch.ones(num, dtype=torch.bool, device=device)
        kept[merged] = False
        slot = kept.cumsum(0) - 1
        dest = slot[target]
        assignment = TokenAssignment(dest[None], num - r)
        metric, size = merge_wavg(assignment, metric, size)
        where = dest[where]
        if r < candidates:
            break
        frames = (frames + 1) // 2
    return metric, size, where


@register_method("tome")
def tome_merge(features: torch.Tensor, budget: int, context: VisualContext) -> Reduction:
    """Merge tokens by bipartite soft matching, round after round, down to ``budget``.

    Each round is ToMe's bipartite soft matching (:func:`tome.merge.match_bipartite`):
    tokens at even positions of the current sequence are set A, odd ones set B, and the
    ``r`` A tokens most similar (cosine) to some B token merge into it. A round removes at
    most half of the tokens, so rounds repeat, the last removing exactly what is left to
    reach ``budget``. Merged metrics are size-weighted means of their members'
    (:func:`tome.merge.merge_wavg`), so later rounds compare groups as ToMe's next layer
    would; between rounds the tokens are put back in the order of their first source
    token, so A and B alternate over the image. The passed-on features are the
    size-weighted means of the original features of each group.

    Video (``context.grid`` with ``frames > 1``): tokens at the same place in consecutive
    frames are the most redundant, so they merge first. Frames are paired (0, 1), (2, 3),
    ...; the odd frame's token at ``(h, w)`` merges into the even frame's token at the same
    place, the most similar pairs first, as many as the budget needs; when a whole level of
    pairs merges, the merged frames are paired again. Only when one frame is left does
    spatial matching take over. A video of identical frames thus reduces to one frame's
    tokens exactly.

    Registered as ``"tome"`` (the function is not named ``tome``, so that a star import
    does not hide the package).

    Source: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv
    2210.09461), sec. 3 (bipartite soft matching, size-weighted averages). Here it runs
    once on the tokens entering the language model, not inside the vision tower's layers.

    Args:
        features: ``(N, C)``.
        budget: ``1 <= budget < N``; exactly ``budget`` tokens are passed on.
        context: ``metric`` ``(N, D)`` is what similarity is measured on (default: the
            features); ``grid`` turns on the temporal rule for ``frames > 1``.

    Returns:
        a merge (``index`` None): every original token in exactly one row.

    Raises:
        ValueError: when ``context.metric`` is not ``(N, D)``.
    """
    num_tokens = features.shape[0]
    metric = _token_metric(features, context, "tome")[None]
    size = torch.ones(1, num_tokens, 1, dtype=metric.dtype, device=metric.device)
    where = torch.arange(num_tokens, device=features.device)
    if context.grid is not None and context.grid[0] > 1:
        metric, size, where = _merge_time(metric, size, where, tuple(context.grid), budget)
    while metric.shape[1] > budget:
        num = metric.shape[1]
        assignment = match_bipartite(metric, min(num - budget, num // 2))
        metric, size = merge_wavg(assignment, metric, size)
        where = assignment.dest[0][where]
        # Back to the order of each token's first source token, for the next round's split.
        rank = _first_source_rank(where, metric.shape[1])
        order = torch.empty_like(rank)
        order[rank] = torch.arange(rank.shape[0], device=rank.device)
        metric, size, where = metric[:, order], size[:, order], rank[where]
    return _merged(features, where, metric.shape[1])


# ---------------------------------------------------------------------------
# Selection methods: "divprune", "cdpruner", "fastv"; and "visionzip" (select + merge).


def _nearest_neighbour_distance(unit: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """``(N,)`` each row's cosine distance to its nearest other row, in chunks of rows
    (no ``(N, N)`` matrix for long videos)."""
    num = unit.shape[0]
    out = torch.empty(num, dtype=unit.dtype, device=unit.device)
    for start in range(0, num, chunk):
        dist = 1 - unit[start:start + chunk] @ unit.t()
        rows = torch.arange(dist.shape[0], device=unit.device)
        dist[rows, rows + start] = math.inf
        out[start:start + chunk] = dist.min(-1).values
    return out


@register_method("divprune")
def divprune(features: torch.Tensor, budget: int, context: VisualContext) -> Reduction:
    """Keep a max-min diverse subset: greedy farthest-point selection on cosine distance.

    DivPrune casts pruning as the max-min diversity problem (choose ``budget`` tokens whose
    smallest pairwise cosine distance is largest) and solves it greedily. The first pick,
    as the paper's release does, is the most isolated token: the one whose distance to its
    nearest other token is largest. Every next pick is the token farthest from the
    chosen set (the largest minimum distance to it); chosen tokens are never picked
    again. Ties go to the lowest index.

    Source: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025 (arXiv 2503.02175), sec. 3 (eq. 3, the greedy MMDP
    solution). The paper measures distance on the tokens entering the language model.

    Video: flat over all tokens of all frames (as the paper runs it on video).

    Args:
        features: ``(N, C)``.
        budget: ``1 <= budget < N``.
        context: ``metric`` ``(N, D)`` replaces the features for the distances if given.

    Returns:
        a selection of ``budget`` tokens, in their original order.

    Raises:
        ValueError: when ``context.metric`` is not ``(N, D)``.
    """
    unit = _unit(_token_metric(features, context, "divprune"))
    chosen = torch.empty(budget, dtype=torch.long, device=features.device)
    chosen[0] = _nearest_neighbour_distance(unit).argmax()
    nearest = 1 - unit @ unit[chosen[0]]  # each token's distance to the chosen set
    for i in range(1, budget):
        nearest[chosen[i - 1]] = -math.inf
        chosen[i] = nearest.argmax()
        nearest = torch.minimum(nearest, 1 - unit @ unit[chosen[i]])
    return selection(features, chosen)


def instruction_relevance(features: torch.Tensor, text: torch.Tensor, theta: Optional[float] = None) -> torch.Tensor:
    """CDPruner's relevance of each visual token to the instruction.

    ``r_i`` = mean over the text tokens of the cosine similarity between visual token
    ``i`` and the text token, min-max normalised over the image to ``[0, 1]`` (all ones
    when every token is equally relevant). With ``theta`` in ``(0, 1)`` the relevance is
    mixed as ``exp(alpha * r)`` with ``alpha = theta / (2 * (1 - theta))`` (the
    relevance-diversity trade-off of Chen et al., NeurIPS 2018, sec. 5, which CDPruner's
    release offers as an option); None uses ``r`` itself, as CDPruner's LLaVA results do.
    (CDPruner's LLaVA release negates the cosine because of CLIP's embedding space;
    here the text and the tokens share the language model's input space, so the plain
    cosine is the relevance.)

    Args:
        features: ``(N, C)`` the visual tokens. text: ``(L, C)`` the instruction's
            embeddings, ``L >= 1``. theta: None or a float in ``(0, 1)``.

    Returns:
        ``(N,)`` float32 relevance, ``>= 0``.

    Raises:
        ValueError: when ``text`` is not ``(L, C)`` with ``L >= 1`` or ``theta`` is out of range.
    """
    if text.dim() != 2 or text.shape[0] < 1 or text.shape[1] != features.shape[1]:
        raise ValueError(f"context.text must be (text tokens >= 1, channels={features.shape[1]}), "
                         f"got {tuple(text.shape)}")
    if theta is not None and not 0.0 < theta < 1.0:
        raise ValueError(f"theta={theta!r} is not valid; expected None or a float in (0, 1)")
    cosine = _unit(features.float()) @ _unit(text.float()).t()
    relevance = cosine.mean(-1)
    low, high = relevance.min(), relevance.max()
    if float(high - low) < 1e-6:
        relevance = torch.ones_like(relevance)
    else:
        relevance = (relevance - low) / (high - low)
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance


def conditional_dpp(unit: torch.Tensor, quality: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy MAP inference of the DPP with kernel ``L = diag(q) S diag(q)``, ``S = unit unit^T``.

    Fast greedy MAP inference (Chen et al., "Fast Greedy MAP Inference for Determinantal
    Point Process to Improve Recommendation Diversity", NeurIPS 2018, Algorithm 1): each
    step adds the item with the largest gain in ``log det L_S``, kept up to date by an
    incremental Cholesky factorisation, in ``O(N * budget)`` memory (rows of ``L`` are made
    on the fly; no ``(N, N)`` matrix). When no item adds a positive gain any more (more
    items than the rank of ``S``, or zero quality), the rest are filled in order of
    quality, highest first.

    Args:
        unit: ``(N, D)`` unit rows (``S`` their cosine similarity). quality: ``(N,)`` ``>= 0``.
        budget: ``1 <= budget <= N``.

    Returns:
        ``(budget,)`` long, the chosen items in the order they were chosen.
    """
    num = unit.shape[0]
    chosen = torch.empty(budget, dtype=torch.long, device=unit.device)
    valid = torch.empty(budget, dtype=torch.bool, device=unit.device)
    factors = unit.new_zeros(budget, num)  # rows of the incremental Cholesky factor
    gain = quality * quality  # diag(L): the gain of each item while nothing is chosen
    floor = 1e-6 * gain.max()
    # No host synchronisation inside the loop (tensors, not Python numbers): on a GPU it
    # runs as queued kernels. Once no gain exceeds the floor, the picks are marked invalid
    # (gains only shrink, so the valid picks are a prefix) and replaced below.
    for i in range(budget):
        j = gain.argmax()
        valid[i] = gain[j] > floor
        row = quality[j] * quality * (unit @ unit[j])  # L[j, :]
        factor = (row - factors[:i, j] @ factors[:i]) / gain[j].clamp_min(floor).sqrt()
        factors[i] = factor
        gain = gain - factor * factor
        gain[j] = -math.inf
        chosen[i] = j
    picked = int(valid.cumprod(0).sum())
    if picked < budget:
        rest = torch.ones(num, dtype=torch.bool, device=unit.device)
        rest[chosen[:picked]] = False
        candidates = rest.nonzero().squeeze(1)
        order = quality[candidates].argsort(descending=True, stable=True)
        chosen[picked:] = candidates[order[: budget - picked]]
    return chosen


@register_method("cdpruner")
def cdpruner(features: torch.Tensor, budget: int, context: VisualContext) -> Reduction:
    """Keep the tokens of greatest conditional diversity: a DPP conditioned on the instruction.

    The kernel is ``L = diag(r) S diag(r)``: ``S`` the cosine similarity of the tokens and
    ``r`` each token's relevance to the instruction (:func:`instruction_relevance`, no
    ``theta`` mixing). The ``budget`` tokens are chosen by greedy MAP inference of the
    DPP (:func:`conditional_dpp`), which favours sets that are both relevant and diverse.

    Source: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional
    Diversity for Token Pruning in MLLMs" (CDPruner), arXiv 2506.10967, sec. 3
    (conditional similarity, conditional DPP, fast MAP inference).

    Video: flat over all tokens of all frames.

    Args:
        features: ``(N, C)``.
        budget: ``1 <= budget < N``.
        context: ``text`` ``(L, C)`` is required (the instruction's embeddings, in the
            features' space); ``metric`` ``(N, D)`` replaces the features for ``S`` if given.

    Returns:
        a selection of ``budget`` tokens, in their original order.

    Raises:
        ValueError: without ``context.text``, or with a ``text`` or ``metric`` of the wrong shape.
    """
    text = context.require("text", "cdpruner")
    relevance = instruction_relevance(features, text)
    unit = _unit(_token_metric(features, context, "cdpruner"))
    return selection(features, conditional_dpp(unit, relevance.to(unit.dtype), budget))


@register_method("fastv")
def fastv(features: torch.Tensor, budget: int, context: VisualContext) -> Reduction:
    """Keep the ``budget`` tokens that receive most attention from the last token.

    FastV ranks the visual tokens by the attention the last token of the prompt pays
    them at layer K of the language model (K = 2 in the paper) and drops the rest for the
    layers after it. This function is that ranking: a top-k of ``context.attention``; the
    integration computes the attention row at its layer (the VLM families then shorten the
    sequence for the whole language model, FastV-select, or for the layers from K on, as
    the paper: ``docs/vlm_reduction.md``, ``fastv_mode``).
    Ties go to the lower index.

    Source: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play
    Inference Acceleration for Large Vision-Language Models" (FastV), ECCV 2024 (arXiv
    2403.06764), sec. 4.

    Video: flat over all tokens of all frames.

    Args:
        features: ``(N, C)``.
        budget: ``1 <= budget < N``.
        context: ``attention`` ``(N,)`` is required.

    Returns:
        a selection of ``budget`` tokens, in their original order.

    Raises:
        ValueError: without ``context.attention``, or with one that is not ``(N,)``.
    """
    attention = _token_attention(features, context, "fastv")
    return selection(features, _top(attention, budget))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores``; ties go to the lower index (deterministic)."""
    return scores.argsort(descending=True, stable=True)[:k]


VISIONZIP_CONTEXTUAL = (10, 64)
"""VisionZip's share of contextual tokens: 10 of 64 (54 dominant + 10 contextual for
LLaVA-1.5 at 64 tokens; the same 84 : 16 split at 128 and 192)."""


@register_method("visionzip")
def visionzip(features: torch.Tensor, budget: int, context: VisualContext) -> Reduction:
    """Keep the dominant tokens by attention received; merge the rest into contextual tokens.

    Of the budget, ``round(budget * 10 / 64)`` tokens are contextual and the rest
    dominant (:data:`VISIONZIP_CONTEXTUAL`, the paper's 54 : 10 for LLaVA-1.5 at 64
    tokens). The dominant tokens are those with the most attention received in the
    vision tower (``context.attention``). The remaining tokens, in their original order,
    give the contextual targets at an even stride (every ``R // contextual``-th of the
    ``R`` remaining, the first ``contextual`` of them); every other remaining token joins
    its most similar target (cosine of ``context.metric``, the tower's keys, else of the
    features). A contextual token is the mean of its group, target included: the
    size-weighted mean of its members, as for every merge here (the paper's release adds
    the target to the mean of the tokens assigned to it instead, a token of about twice
    the scale).

    Source: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
    Models", CVPR 2025 (arXiv 2412.04467), sec. 3 (dominant token selection, contextual
    token merging).

    Video: flat over all tokens of all frames.

    Args:
        features: ``(N, C)``.
        budget: ``1 <= budget < N``.
        context: ``attention`` ``(N,)`` is required; ``metric`` ``(N, D)`` is optional.

    Returns:
        a merge (``index`` None; every original token in exactly one row), or a selection
        (``index`` set) when the budget leaves no contextual token (``budget <= 3``).

    Raises:
        ValueError: without ``context.attention``, or with ``attention``/``metric`` of the
            wrong shape.
    """
    attention = _token_attention(features, context, "visionzip")
    metric = _token_metric(features, context, "visionzip")
    share, out_of = VISIONZIP_CONTEXTUAL
    contextual = int(math.floor(budget * share / out_of + 0.5))
    dominant = _top(attention, budget - contextual)
    if contextual == 0:
        return selection(features, dominant)
    num_tokens = features.shape[0]
    rest = torch.ones(num_tokens, dtype=torch.bool, device=features.device)
    rest[dominant] = False
    rest = rest.nonzero().squeeze(1)  # in original order; len(rest) > contextual
    step = rest.shape[0] // contextual
    targets = rest[::step][:contextual]
    unit = _unit(metric)
    nearest = (unit[rest] @ unit[targets].t()).argmax(-1)
    group = torch.empty(num_tokens, dtype=torch.long, device=features.device)
    group[dominant] = torch.arange(dominant.shape[0], device=features.device)
    group[rest] = dominant.shape[0] + nearest
    group[targets] = dominant.shape[0] + torch.arange(contextual, device=features.device)
    return _merged(features, group, budget)


VIDEO_METHODS = frozenset({"random", "pool", "tome", "divprune", "cdpruner", "fastv", "visionzip"})
"""The methods that accept a video (``context.grid`` with ``frames > 1``): all of them.
``"pool"`` pools the 3-D grid, ``"tome"`` merges across time first, the others run flat
over every token of every frame."""
