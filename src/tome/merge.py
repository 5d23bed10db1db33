"""Token matching and merging: the algorithm of Token Merging (ToMe).

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv 2210.09461).

Pure tensor functions, no module state and no model knowledge. Every matching
here is described by one integer map, ``dest``: for each token before the merge,
the position of the token it ends up in after the merge. Merging is then one
scatter, unmerging one gather, and tracing where original patches went is one
gather per layer (no dense ``(batch, tokens, original tokens)`` matrix).

The public functions keep the signatures of the original release
(``bipartite_soft_matching(metric, r, class_token, distill_token)`` returning
``(merge, unmerge)``), so code written against it keeps working.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch

__all__ = [
    "TokenAssignment",
    "bipartite_soft_matching",
    "kth_bipartite_soft_matching",
    "random_bipartite_soft_matching",
    "merge_wavg",
    "merge_source",
    "do_nothing",
    "stride_destinations",
    "hashed_stride_choice",
    "sign_projection",
    "match_stride_2d",
    "stride_destinations_3d",
    "match_stride_3d",
    "match_pitome",
    "pitome_energy",
    "merge_mlerp",
    "merge_prune",
    "match_random",
    "match_kth",
    "match_greedy",
    "match_random_drop",
    "match_attentive",
    "merge_drop",
    "merge_fuse",
]

_REDUCTIONS = ("sum", "mean", "amax", "amin", "prod")


def do_nothing(x: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
    """The identity, used as ``merge``/``unmerge`` when nothing is merged."""
    return x


class TokenAssignment:
    """Where every token goes in one merge step.

    Args:
        dest: ``(batch, tokens)`` long tensor; ``dest[b, i]`` is the index, in the
            merged sequence, of the token that token ``i`` becomes part of.
        num_out: Length of the merged sequence.

        kept: Optional ``(batch, tokens)`` bool tensor marking, in every group, the
            one token the group is built around (a destination or an unmerged
            token, never a token that merged away): exactly ``num_out`` per row.
            Needed only by :meth:`prune`; the bipartite matchings fill it in.

    Calling the object merges: ``assignment(x, mode="mean")`` maps
    ``(batch, tokens, channels)`` to ``(batch, num_out, channels)``. It is the
    ``merge`` function returned by the matching functions of this module.
    """

    __slots__ = ("dest", "num_out", "kept", "_flat_dest")

    def __init__(self, dest: torch.Tensor, num_out: int, kept: Optional[torch.Tensor] = None) -> None:
        self.dest = dest
        self.num_out = num_out
        self.kept = kept
        self._flat_dest: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        return self.merge(x, mode)

    def _flat_index(self) -> torch.Tensor:
        """``dest`` as row indices into ``(batch * num_out)`` rows, computed once."""
        if self._flat_dest is None:
            batch = self.dest.shape[0]
            offsets = torch.arange(batch, device=self.dest.device).unsqueeze(1) * self.num_out
            self._flat_dest = (self.dest + offsets).reshape(-1)
        return self._flat_dest

    def _check_tokens(self, x: torch.Tensor, tokens: int, what: str) -> None:
        if x.dim() != 3 or x.shape[0] != self.dest.shape[0] or x.shape[1] != tokens:
            raise ValueError(
                f"{what} expects shape (batch={self.dest.shape[0]}, tokens={tokens}, channels), "
                f"got {tuple(x.shape)}"
            )

    def merge(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """Combine the tokens of ``x`` (batch, tokens, channels) that share a destination.

        Args:
            x: Tensor of shape ``(batch, tokens, channels)``.
            mode: Reduction over the tokens that become one: ``"sum"``, ``"mean"``,
                ``"amax"``, ``"amin"`` or ``"prod"`` (as ``torch.scatter_reduce`` names them).

        Returns:
            Tensor of shape ``(batch, num_out, channels)``.
        """
        if mode not in _REDUCTIONS:
            raise ValueError(f"mode={mode!r} is not a reduction; expected one of {_REDUCTIONS}")
        self._check_tokens(x, self.dest.shape[1], "merge")
        batch, tokens, channels = x.shape
        if mode == "sum" or (mode == "mean" and x.is_floating_point()):
            # Row-wise index_add_ over (batch * tokens) rows: one contiguous row copy per
            # token, 10-30x faster on CPU than scatter_add_ with an expanded index.
            out = x.new_zeros(batch * self.num_out, channels)
            out.index_add_(0, self._flat_index(), x.reshape(batch * tokens, channels))
            out = out.view(batch, self.num_out, channels)
            if mode == "mean":
                count = x.new_zeros(batch * self.num_out)
                count.index_add_(0, self._flat_index(), x.new_ones(batch * tokens))
                out = out / count.view(batch, self.num_out, 1)
            return out
        index = self.dest.unsqueeze(-1).expand(-1, -1, channels)
        out = x.new_zeros(batch, self.num_out, channels)
        return out.scatter_reduce_(1, index, x, reduce=mode, include_self=False)

    def sizes(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """How many input tokens each merged token holds: ``(batch, num_out)`` of ``dtype``."""
        batch = self.dest.shape[0]
        count = torch.zeros(batch * self.num_out, dtype=dtype, device=self.dest.device)
        count.index_add_(0, self._flat_index(), torch.ones(self.dest.numel(), dtype=dtype, device=self.dest.device))
        return count.view(batch, self.num_out)

    def prune(self, x: torch.Tensor) -> torch.Tensor:
        """Keep each group's destination token and drop the tokens merged into it.

        Args:
            x: Tensor of shape ``(batch, tokens, channels)``.

        Returns:
            Tensor of shape ``(batch, num_out, channels)``: the values of the
            tokens marked in :attr:`kept`, in output order.

        Raises:
            ValueError: if the assignment has no ``kept`` mask (e.g. k-th bipartite).
        """
        if self.kept is None:
            raise ValueError("this TokenAssignment has no kept mask, so it cannot prune; use merge()")
        # One kept token per group: a sum over the group with the others zeroed is that token
        # (a scatter, no data-dependent shapes, so no device synchronisation).
        return self.merge(torch.where(self.kept.unsqueeze(-1), x, torch.zeros_like(x)), mode="sum")

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """Map merged tokens back: every pre-merge token gets its group's value.

        Args:
            x: Tensor of shape ``(batch, num_out, channels)``.

        Returns:
            Tensor of shape ``(batch, tokens, channels)``.
        """
        self._check_tokens(x, self.num_out, "unmerge")
        batch, _, channels = x.shape
        rows = x.reshape(batch * self.num_out, channels).index_select(0, self._flat_index())
        return rows.view(batch, self.dest.shape[1], channels)


def _cap_r(r: int, num_tokens: int, protected_tokens: int) -> int:
    return max(0, min(int(r), (num_tokens - protected_tokens) // 2))


def _check_metric(metric: torch.Tensor, protected_tokens: int) -> None:
    if metric.dim() != 3:
        raise ValueError(
            f"metric must have shape (batch, tokens, channels), got shape {tuple(metric.shape)}"
        )
    if protected_tokens < 0 or protected_tokens > metric.shape[1]:
        raise ValueError(
            f"protected_tokens={protected_tokens} must lie in [0, {metric.shape[1]}] "
            f"for a sequence of {metric.shape[1]} tokens"
        )


def _checked_r(metric: torch.Tensor, r: int, protected_tokens: int) -> int:
    """``r`` capped for ``metric``'s length, after :func:`_check_metric`."""
    _check_metric(metric, protected_tokens)
    return _cap_r(r, metric.shape[1], protected_tokens)


def _normalize(metric: torch.Tensor) -> torch.Tensor:
    """Unit rows, in float32 for fp16/bf16 metrics: near-tied similarities rounded to 8 or 11
    mantissa bits pick other partners than the same metric in float32 (and than the same
    sample in another batch), so every matcher scores in float32; the tokens themselves
    still merge in their own dtype."""
    if metric.dtype in (torch.float16, torch.bfloat16):
        metric = metric.float()
    return metric / metric.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------
# Padded sequences. A batch of samples of different lengths runs as one padded
# sequence; ``valid`` ``(batch, tokens)`` marks the real tokens (False: padding).
# Every matching that takes ``valid`` keeps one promise: a real token never pairs
# with a padding token while real partners remain, and a sample's real tokens are
# matched exactly as when it runs alone, as long as its real tokens allow r. Only
# beyond that (r above half its real, non-protected tokens) does padding merge,
# which costs nothing when the caller gives padding size 0.


def _check_valid(valid: Optional[torch.Tensor], batch: int, num_tokens: int) -> None:
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (batch, num_tokens)):
        raise ValueError(
            f"valid must be a bool tensor of shape (batch={batch}, tokens={num_tokens}), got "
            f"{valid.dtype} of shape {tuple(valid.shape)}"
        )


def _padded_metric(metric: torch.Tensor, valid: torch.Tensor, is_destination: torch.Tensor) -> torch.Tensor:
    """The metric of a padded sequence for matchings that split tokens into sources and destinations
    by position (bipartite: odd positions are destinations; k-th bipartite: every k-th).

    Every real token's unit metric gets one more channel of value 1 (scaled back to unit
    length), so two real tokens score ``(cos + 1) / 2`` in ``[0, 1]``: the order of their
    cosine, whatever the rest of the batch holds. A padding destination points along ``-``
    that channel (score ``-1/sqrt(2)`` with every real source) and a padding source along a
    channel of its own (score 0 with every destination). So a real source picks a real
    destination whenever one exists, and every real source with a real partner ranks above
    every padding source.

    Args:
        metric: ``(batch, tokens, channels)``.
        valid: ``(batch, tokens)`` bool, False for padding.
        is_destination: ``(tokens,)`` bool, the destination positions.

    Returns:
        ``(batch, tokens, channels + 2)``.
    """
    batch, tokens, channels = metric.shape
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ones, zeros = unit.new_ones(batch, tokens, 1), unit.new_zeros(batch, tokens, 1)
    real = torch.cat([unit, ones, zeros], dim=-1) * (0.5**0.5)
    destination = is_destination.view(1, tokens, 1).expand(batch, -1, -1).to(unit.dtype)
    padding = torch.cat([unit.new_zeros(batch, tokens, channels), -destination, 1 - destination], dim=-1)
    return torch.where(valid.unsqueeze(-1), real, padding)


def _normalize_valid(metric: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Unit rows; padding rows (``valid`` False) are 0, whatever they held (zero, NaN)."""
    if valid is None:
        return _normalize(metric)
    return torch.where(valid.unsqueeze(-1), _normalize(metric), torch.zeros_like(metric))


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """``(batch, n)`` with ``even`` at positions 0, 2, ... and ``odd`` at 1, 3, ... (``n`` = both lengths summed)."""
    paired = odd.shape[1]  # even has paired or paired + 1 columns
    out = torch.stack((even[:, :paired], odd), dim=2).flatten(1)
    return torch.cat((out, even[:, paired:]), dim=1) if even.shape[1] > paired else out


def _bipartite_sources(
    metric: torch.Tensor, r: int, protected_tokens: int, valid: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The edges of :func:`match_bipartite`: every A token's best B token, and the ``r`` A
    tokens that merge away.

    Returns:
        ``node_idx`` ``(batch, num_a)`` long, the B token each A token would merge into;
        ``is_src`` ``(batch, num_a)`` bool, True for the ``r`` A tokens that merge; ``num_b``.
    """
    batch, num_tokens, _ = metric.shape
    if valid is not None:
        metric = _padded_metric(metric, valid, torch.arange(num_tokens, device=metric.device) % 2 == 1)
    metric = _normalize(metric)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    num_a = a.shape[1]
    protected_a = (protected_tokens + 1) // 2  # prefix tokens at even positions
    protected_b = protected_tokens // 2  # prefix tokens at odd positions
    device = metric.device
    # Masks and torch.where rather than assignments into slices: the same values, and an
    # exported graph without a Transpose/ScatterND/Transpose chain per assignment.
    # Protected B tokens are never destinations: leave their columns out (a view).
    node_max, node_idx = scores[:, :, protected_b:].max(dim=-1)
    if protected_b:
        node_idx = node_idx + protected_b
    if protected_a:  # protected A tokens are never sources
        node_max = node_max.masked_fill(torch.arange(num_a, device=device) < protected_a, -math.inf)
    src_idx = node_max.topk(r, dim=-1).indices  # (batch, r) A tokens that merge away

    # A tensor source (not a Python bool) keeps this traceable by torch.jit.trace and ONNX export.
    is_src = torch.zeros(batch, num_a, dtype=torch.bool, device=device).scatter(
        1, src_idx, torch.ones_like(src_idx, dtype=torch.bool)
    )
    return node_idx, is_src, b.shape[1]


def _bipartite_layout(
    is_src: torch.Tensor, node_idx: torch.Tensor, num_b: int, protected_tokens: int, r: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The output slot of every token of :func:`match_bipartite`, and which tokens stay.

    Output layout: [prefix | kept non-prefix A | non-prefix B], in original order.

    Returns:
        ``dest`` ``(batch, tokens)`` long and ``kept`` ``(batch, tokens)`` bool, in input order.
    """
    batch, num_a = is_src.shape
    device = is_src.device
    protected_a, protected_b = (protected_tokens + 1) // 2, protected_tokens // 2
    unmerged_a = ~is_src
    first_b = protected_tokens + num_a - protected_a - r  # slot of the first non-prefix B token
    if protected_tokens <= 1:
        # No prefix, or the class token alone (A[0], slot 0): an unmerged A token's slot is its
        # rank among the unmerged A tokens, and B tokens follow them. The same slots as below,
        # in a third of the operations (what a merge step costs at small batch is mostly their count).
        slot_a = unmerged_a.cumsum(dim=1) - 1
        slot_b = torch.arange(first_b, first_b + num_b, device=device)
    else:
        a_pos = torch.arange(num_a, device=device)
        b_pos = torch.arange(num_b, device=device)
        rank_a = (unmerged_a & (a_pos >= protected_a)).cumsum(dim=1) - 1
        slot_b = torch.where(b_pos < protected_b, 2 * b_pos + 1, first_b + b_pos - protected_b)
        slot_a = torch.where(a_pos < protected_a, 2 * a_pos, protected_tokens + rank_a)
    slot_b = slot_b.expand(batch, -1)
    slot_a = torch.where(is_src, slot_b.gather(1, node_idx), slot_a)
    dest = _interleave(slot_a, slot_b)
    kept = _interleave(unmerged_a, torch.ones_like(slot_b, dtype=torch.bool))
    return dest, kept


def match_bipartite(
    metric: torch.Tensor, r: int, protected_tokens: int = 0, valid: Optional[torch.Tensor] = None
) -> Optional[TokenAssignment]:
    """Bipartite soft matching that removes ``r`` tokens, as a :class:`TokenAssignment`.

    Tokens at even positions form set A, odd positions set B. The ``r`` A tokens
    most similar (cosine) to some B token are merged into it. The first
    ``protected_tokens`` tokens (class, distillation, register tokens) never
    merge and stay at the front, in order; then come the unmerged A tokens and
    then the B tokens, each group in original order.

    Args:
        metric: ``(batch, tokens, channels)`` similarity features (keys averaged over heads).
        r: Tokens to remove; capped at ``(tokens - protected_tokens) // 2``.
        protected_tokens: Number of leading tokens that must not merge.
        valid: Optional ``(batch, tokens)`` bool, False for padding. A real A token then
            merges only into a real B token while one exists, and the A tokens that merge
            are the ones that merge without the padding, as long as the real tokens allow
            r; only the rest of r comes out of padding A tokens (into any B token). So
            with padding at the end of each row, a padded sample merges as it does alone.

    Returns:
        The assignment, or ``None`` when nothing is merged (r capped to 0).

    Raises:
        ValueError: if ``metric`` is not 3-D, ``protected_tokens`` is out of range or
            ``valid`` is not a ``(batch, tokens)`` bool tensor.
    """
    r = _checked_r(metric, r, protected_tokens)
    batch, num_tokens, _ = metric.shape
    _check_valid(valid, batch, num_tokens)
    if r <= 0:
        return None

    with torch.no_grad():
        node_idx, is_src, num_b = _bipartite_sources(metric, r, protected_tokens, valid)
        dest, kept = _bipartite_layout(is_src, node_idx, num_b, protected_tokens, r)
    return TokenAssignment(dest, num_tokens - r, kept)


# ---------------------------------------------------------------------------
# PiToMe: Tran et al., "Accelerating Transformers with Spectrum-Preserving Token
# Merging", NeurIPS 2024 (arXiv 2405.16148), section 3 (energy score and the
# merging procedure, Algorithm 1). Written from the paper; no code of its release.


def pitome_energy(
    metric: torch.Tensor,
    margin: float,
    alpha: float = 1.0,
    protected_tokens: int = 0,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PiToMe's energy score of every token in the cosine-similarity graph.

    ``E_i = mean_j f(cos(m_i, m_j))`` over the non-protected tokens ``j`` (``i``
    itself included), with ``f(x) = x`` for ``x >= margin`` and
    ``f(x) = alpha * (exp(x - margin) - 1)`` below it. A token with many close
    neighbours (a redundant one, in a large cluster) has a high energy; an
    isolated, informative token a low one.

    Args:
        metric: ``(batch, tokens, channels)`` similarity features (keys averaged over heads).
        margin: Similarity above which neighbours count in full.
        alpha: Scale of the (negative, bounded) penalty below the margin.
        protected_tokens: Leading tokens left out of the graph; their energy is ``-inf``.
        valid: Optional ``(batch, tokens)`` bool, False for padding: padding is left out
            of the graph too (the mean runs over a sample's real tokens only, so a real
            token's energy is the one it has without the padding), and its energy is ``-inf``.

    Returns:
        ``(batch, tokens)`` energies, in ``metric``'s dtype.

    Raises:
        ValueError: if ``metric`` is not 3-D, ``protected_tokens`` is out of range or
            ``valid`` is not a ``(batch, tokens)`` bool tensor.
    """
    _check_metric(metric, protected_tokens)
    _check_valid(valid, metric.shape[0], metric.shape[1])
    with torch.no_grad():
        free_valid = None if valid is None else valid[:, protected_tokens:]
        free = _normalize_valid(metric[:, protected_tokens:], free_valid)
        sim = free @ free.transpose(-1, -2)
        weighted = torch.where(sim >= margin, sim, alpha * torch.expm1(sim - margin))
        if free_valid is None:
            energy = weighted.mean(dim=-1)
        else:
            weighted = weighted.masked_fill(~free_valid.unsqueeze(1), 0)
            count = free_valid.sum(dim=-1, keepdim=True).clamp_min(1).to(weighted.dtype)
            energy = (weighted.sum(dim=-1) / count).masked_fill(~free_valid, -math.inf)
        if protected_tokens:
            prefix = energy.new_full((metric.shape[0], protected_tokens), -math.inf)
            energy = torch.cat([prefix, energy], dim=1)
    return energy


def _pitome_pairs(
    metric: torch.Tensor,
    r: int,
    protected_tokens: int,
    margin: float,
    alpha: float,
    valid: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 of :func:`match_pitome`: the ``r`` A tokens that merge and the B token each merges into.

    Returns:
        ``(batch, r)`` long positions of the A tokens and ``(batch, r)`` of their B tokens.
    """
    energy = pitome_energy(metric, margin, alpha, protected_tokens, valid)
    # Rank the non-protected tokens only: protected and padding energies are both -inf.
    order = energy[:, protected_tokens:].argsort(dim=1, descending=True, stable=True) + protected_tokens
    candidates = order[:, : 2 * r]
    a_pos, b_pos = candidates[:, ::2], candidates[:, 1::2]  # (batch, r) each
    normed = _normalize_valid(metric, valid)
    a = normed.gather(1, a_pos.unsqueeze(-1).expand(-1, -1, normed.shape[-1]))
    b = normed.gather(1, b_pos.unsqueeze(-1).expand(-1, -1, normed.shape[-1]))
    scores = a @ b.transpose(-1, -2)
    if valid is not None:  # a real A token never picks a padding B token while a real one is there
        real_a, real_b = valid.gather(1, a_pos), valid.gather(1, b_pos)
        scores = scores.masked_fill(real_a.unsqueeze(-1) & ~real_b.unsqueeze(1), -math.inf)
    best = scores.argmax(dim=-1)  # (batch, r) index into B
    return a_pos, b_pos.gather(1, best)


def match_pitome(
    metric: torch.Tensor,
    r: int,
    protected_tokens: int = 0,
    margin: float = 0.9,
    alpha: float = 1.0,
    valid: Optional[torch.Tensor] = None,
) -> Optional[TokenAssignment]:
    """PiToMe's matching: energy-ranked candidates, then bipartite soft matching.

    1. Energy of every non-protected token (:func:`pitome_energy`).
    2. The ``2r`` highest-energy tokens are the merge candidates; every other
       token is kept as it is (low energy: informative, protected from merging).
    3. The candidates, in descending energy order, are split alternately:
       ranks 0, 2, 4, ... form set A, ranks 1, 3, 5, ... set B (``r`` each).
    4. Every A token merges into its most similar B token (cosine), so exactly
       ``r`` tokens go.

    Output order: the protected prefix, then every token that did not merge
    away, in original order.

    Args:
        metric: ``(batch, tokens, channels)`` similarity features.
        r: Tokens to remove; capped at ``(tokens - protected_tokens) // 2`` as in ToMe.
        protected_tokens: Leading tokens that never merge (class, distillation, registers).
        margin: Energy margin (PiToMe uses one that falls with depth; see
            :class:`tome.MergeMethod`).
        alpha: Energy penalty scale below the margin.
        valid: Optional ``(batch, tokens)`` bool, False for padding. Energies then come
            from the real tokens only and padding ranks below every real token, so the
            candidates, and the merges, are those without the padding as long as the real
            tokens allow r (``2r`` real candidates); beyond that padding fills the
            candidates, and a real A token merges into a padding B token only when no
            real B token is left.

    Returns:
        The assignment, or ``None`` when nothing is merged (r capped to 0).

    Raises:
        ValueError: if ``metric`` is not 3-D, ``protected_tokens`` is out of range or
            ``valid`` is not a ``(batch, tokens)`` bool tensor.
    """
    r = _checked_r(metric, r, protected_tokens)
    batch, num_tokens, _ = metric.shape
    _check_valid(valid, batch, num_tokens)
    if r <= 0:
        return None
    with torch.no_grad():
        a_pos, b_pos = _pitome_pairs(metric, r, protected_tokens, margin, alpha, valid)
        is_src = torch.zeros(batch, num_tokens, dtype=torch.bool, device=metric.device).scatter(
            1, a_pos, torch.ones_like(a_pos, dtype=torch.bool)
        )
        slot = (~is_src).cumsum(dim=1) - 1  # protected prefix first, all kept tokens in order
        dest = slot.scatter(1, a_pos, slot.gather(1, b_pos))
    return TokenAssignment(dest, num_tokens - r, ~is_src)


# ---------------------------------------------------------------------------
# ToFu: Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and
# Token Merging", WACV 2024 (arXiv 2312.01026), section 3: pruning in early
# layers, norm-preserving MLERP merging after. Written from the paper.


def _weighted_average(merge: Callable, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_wavg`, with a group of size 0 (padding only) averaging to 0 rather than 0 / 0."""
    new_size = merge(size, mode="sum")
    return merge(x * size, mode="sum") / new_size.clamp_min(torch.finfo(x.dtype).tiny), new_size


def merge_mlerp(
    merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToFu's MLERP merge: average direction, the largest member norm.

    A group of tokens ``x_i`` with sizes ``s_i`` becomes
    ``a * max_i ||x_i|| / ||a||`` with ``a = sum(s_i x_i) / sum(s_i)``: the
    size-weighted average (as :func:`merge_wavg`) rescaled so that averaging
    does not shrink the feature norm. Unmerged tokens are returned unchanged.
    Tokens of size 0 (padding, in a padded batch) stand for no patch and count for
    nothing: not in the average, not in the largest norm, not as members (a real
    token merged with padding only stays as it is); a group of padding only is 0.

    Args:
        merge: A ``merge`` function (or :class:`TokenAssignment`) from a matching.
        x: ``(batch, tokens, channels)``.
        size: ``(batch, tokens, 1)`` sizes; ``None`` means all ones.

    Returns:
        ``(x, size)`` of shapes ``(batch, tokens - r, channels)`` and ``(batch, tokens - r, 1)``.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    average, new_size = _weighted_average(merge, x, size)
    real = size > 0
    members = merge(real.to(x.dtype), mode="sum")
    largest = merge(torch.where(real, x.norm(dim=-1, keepdim=True), torch.zeros_like(size, dtype=x.dtype)),
                    mode="amax")
    scale = largest / average.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(members > 1, average * scale, average), new_size


def merge_prune(
    assignment: TokenAssignment, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToFu's pruning step: tokens that would merge away are dropped instead.

    Every destination keeps its own value. Its size still becomes the sum of its
    group's sizes: the dropped tokens were its closest matches and it now stands
    for their patches, so proportional attention, size-weighted pooling and the
    source map stay consistent (and for exact duplicates pruning equals merging).
    A destination of size 0 (padding, in a padded batch) stands for no patch and has
    no value to keep: if tokens of nonzero size went into it (which a padded matching
    allows only when a sample's real tokens have no real partner left), the group
    takes their size-weighted average.

    Args:
        assignment: A :class:`TokenAssignment` with a ``kept`` mask.
        x: ``(batch, tokens, channels)``.
        size: ``(batch, tokens, 1)`` sizes; ``None`` means all ones.

    Returns:
        ``(x, size)`` of shapes ``(batch, tokens - r, channels)`` and ``(batch, tokens - r, 1)``.

    Raises:
        ValueError: if ``assignment`` has no ``kept`` mask.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    kept = assignment.prune(x)
    average, new_size = _weighted_average(assignment, x, size)
    empty_destination = (assignment.prune(size) == 0) & (new_size > 0)
    return torch.where(empty_destination, average, kept), new_size


def _protected_count(class_token: bool, distill_token: bool, protected_tokens: Optional[int]) -> int:
    if protected_tokens is not None:
        if isinstance(protected_tokens, bool) or not isinstance(protected_tokens, int) or protected_tokens < 0:
            raise ValueError(f"protected_tokens must be a non-negative int, got {protected_tokens!r}")
        return protected_tokens
    return int(bool(class_token)) + int(bool(distill_token))


def _as_functions(assignment: Optional[TokenAssignment]) -> Tuple[Callable, Callable]:
    if assignment is None:
        return do_nothing, do_nothing
    return assignment, assignment.unmerge


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = False,
    distill_token: bool = False,
    *,
    protected_tokens: Optional[int] = None,
) -> Tuple[Callable, Callable]:
    """ToMe's bipartite soft matching, removing ``r`` tokens.

    Args:
        metric: ``(batch, tokens, channels)`` similarity features.
        r: Number of tokens to remove, capped at ``(tokens - protected) // 2``.
        class_token: Protect the token at index 0.
        distill_token: Also protect the token at index 1 (DeiT distillation token).
        protected_tokens: Number of leading tokens to protect (class, distillation
            and register tokens together); overrides ``class_token``/``distill_token``.

    Returns:
        ``(merge, unmerge)``: ``merge(x, mode="mean")`` maps ``(batch, tokens, c)``
        to ``(batch, tokens - r, c)``; ``unmerge(y)`` maps it back, every original
        token taking the value of the token it was merged into.
    """
    protected = _protected_count(class_token, distill_token, protected_tokens)
    return _as_functions(match_bipartite(metric, r, protected))


def kth_bipartite_soft_matching(metric: torch.Tensor, k: int) -> Tuple[Callable, Callable]:
    """Ablation: in every group of ``k`` consecutive tokens, the last is a destination.

    The other ``k - 1`` tokens of each group (and the ``tokens % k`` left over at
    the end) merge into their most similar destination; the output holds the
    ``tokens // k`` destinations only.

    Args:
        metric: ``(batch, tokens, channels)`` similarity features.
        k: Group size; ``k <= 1`` (or fewer than ``k`` tokens) merges nothing.

    Returns:
        ``(merge, unmerge)`` as :func:`bipartite_soft_matching`.
    """
    _check_metric(metric, 0)
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    batch, num_tokens, _ = metric.shape
    num_dst = num_tokens // k if k > 1 else 0
    if num_dst == 0:
        return do_nothing, do_nothing
    with torch.no_grad():
        metric = _normalize(metric)
        positions = torch.arange(num_tokens, device=metric.device)
        is_dst = (positions % k == k - 1) & (positions < num_dst * k)
        dst_pos = positions[is_dst]
        scores = metric @ metric[:, dst_pos].transpose(-1, -2)  # (batch, tokens, num_dst)
        dest = scores.argmax(dim=-1)
        dest[:, dst_pos] = torch.arange(num_dst, device=metric.device)
    return _as_functions(TokenAssignment(dest, num_dst))


def match_random(
    metric: torch.Tensor, r: int, protected_tokens: int = 0, generator: Optional[torch.Generator] = None
) -> Optional[TokenAssignment]:
    """Ablation: ``r`` random tokens merge into their most similar remaining token.

    Args:
        metric: ``(batch, tokens, channels)`` similarity features.
        r: Number of tokens to remove, capped at ``(tokens - protected_tokens) // 2``.
        protected_tokens: Leading tokens that neither move nor receive merges.
        generator: Optional ``torch.Generator`` (on ``metric``'s device) for the draw;
            None draws from torch's global generator.

    Returns:
        The assignment (destinations keep their original order), or ``None`` when
        nothing is merged.

    Raises:
        ValueError: if ``metric`` is not 3-D or ``protected_tokens`` is out of range.
    """
    r = _checked_r(metric, r, protected_tokens)
    batch, num_tokens, _ = metric.shape
    if r <= 0:
        return None
    with torch.no_grad():
        is_src = _random_sources(batch, num_tokens, r, protected_tokens, metric.device, generator)
        slot = (~is_src).cumsum(dim=1) - 1  # position among kept tokens, in order

        metric = _normalize(metric)
        scores = metric @ metric.transpose(-1, -2)
        # Sources match only kept, non-protected tokens.
        blocked = is_src.clone()
        blocked[:, :protected_tokens] = True
        scores = scores.masked_fill(blocked.unsqueeze(1), -math.inf)
        best = scores.argmax(dim=-1)
        dest = torch.where(is_src, slot.gather(1, best), slot)
    return TokenAssignment(dest, num_tokens - r, ~is_src)


def _random_sources(
    batch: int, num_tokens: int, r: int, protected_tokens: int, device: Any, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """``(batch, tokens)`` bool: ``r`` non-protected tokens per row, drawn uniformly."""
    free = num_tokens - protected_tokens
    order = torch.rand(batch, free, device=device, generator=generator).argsort(dim=1)
    src = order[:, :r] + protected_tokens
    return torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter(
        1, src, torch.ones_like(src, dtype=torch.bool)
    )


def random_bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    generator: Optional[torch.Generator] = None,
    *,
    protected_tokens: int = 0,
) -> Tuple[Callable, Callable]:
    """Ablation: ``r`` random tokens merge into their most similar remaining token.

    Args:
        metric: ``(batch, tokens, channels)`` similarity features.
        r: Number of tokens to remove, capped at ``(tokens - protected_tokens) // 2``.
        generator: Optional ``torch.Generator`` (on ``metric``'s device) for the draw.
        protected_tokens: Leading tokens that neither move nor receive merges.

    Returns:
        ``(merge, unmerge)``; destinations keep their original order.
    """
    return _as_functions(match_random(metric, r, protected_tokens, generator))


def merge_wavg(
    merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge ``x`` as a size-weighted average and return the new sizes.

    Args:
        merge: A ``merge`` function from one of the matching functions.
        x: ``(batch, tokens, channels)``.
        size: ``(batch, tokens, 1)``, how many original patches each token stands
            for; ``None`` means all ones.

    Returns:
        ``(x, size)`` of shapes ``(batch, tokens - r, channels)`` and ``(batch, tokens - r, 1)``.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Callable, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Update the dense source map: which original tokens each token contains.

    Args:
        merge: A ``merge`` function from one of the matching functions.
        x: ``(batch, tokens, channels)``, used for its shape when ``source`` is None.
        source: ``(batch, tokens, original tokens)`` 0/1 map; ``None`` is the identity.

    Returns:
        ``(batch, tokens - r, original tokens)`` 0/1 map.
    """
    if source is None:
        batch, num_tokens, _ = x.shape
        source = torch.eye(num_tokens, device=x.device, dtype=x.dtype).expand(batch, -1, -1)
    return merge(source, mode="amax")


# ---------------------------------------------------------------------------
# The 2-D stride partition of ToMe for Stable Diffusion (Bolya & Hoffman,
# "Token Merging for Fast Stable Diffusion", CVPRW 2023, section 4.2): the
# image tokens of one level are cut into sy x sx cells and one token per full
# cell is a destination, so destinations cover the image evenly.


def _check_grid(num_tokens: int, height: int, width: int, sx: int, sy: int) -> None:
    for name, value in (("height", height), ("width", width), ("sx", sx), ("sy", sy)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if height * width != num_tokens:
        raise ValueError(
            f"a {height}x{width} token grid has {height * width} tokens, but the metric has {num_tokens}"
        )


def stride_destinations(
    height: int, width: int, sx: int, sy: int, choice: Optional[torch.Tensor] = None, device: Any = None
) -> torch.Tensor:
    """Positions of the destination tokens of the 2-D stride partition.

    The ``height x width`` grid (row-major token order) is cut into
    ``(height // sy) x (width // sx)`` full cells of ``sy x sx`` tokens; cells cut
    off at the bottom and right edges have no destination.

    Args:
        height, width: Token grid, in tokens.
        sx, sy: Cell width and height, in tokens.
        choice: ``(height // sy, width // sx)`` long tensor; the offset inside
            each cell, ``dy * sx + dx``, of its destination. ``None`` takes the
            top-left token of every cell.
        device: Device of the result when ``choice`` is None.

    Returns:
        ``(num_cells,)`` long tensor of token positions, one per cell, in cell order.
    """
    cells_y, cells_x = height // sy, width // sx
    device = choice.device if choice is not None else device
    rows = torch.arange(cells_y, device=device).view(-1, 1) * sy
    cols = torch.arange(cells_x, device=device).view(1, -1) * sx
    if choice is not None:
        rows = rows + torch.div(choice, sx, rounding_mode="floor")
        cols = cols + choice % sx
    return (rows * width + cols).reshape(-1)


def _hash31(values: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash of ``values`` (int64), elementwise; multiply-xorshift rounds,
    kept in 31 bits so that int64 never overflows."""
    mask = 0x7FFFFFFF
    h = (values * 0x2545F491 + 0x3C6EF372) & mask
    for _ in range(3):
        h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & mask
        h = ((h ^ (h >> 12)) * 0x297A2D39) & mask
    return h ^ (h >> 15)


def hashed_stride_choice(cells_y: int, cells_x: int, cell_size: int, key: torch.Tensor) -> torch.Tensor:
    """A uniform-looking offset in ``[0, cell_size)`` per cell, a pure function of ``key``.

    Used instead of a random generator so that a random destination choice is
    reproducible from a seed, identical for every sample of a batch, and stays
    inside a compiled graph (no generator object, no state).

    Args:
        cells_y, cells_x: Number of cells.
        cell_size: ``sx * sy``.
        key: Integer tensor with one element (seed, step and block mixed by the caller).

    Returns:
        ``(cells_y, cells_x)`` long tensor.
    """
    cell = torch.arange(cells_y * cells_x, device=key.device, dtype=torch.long)
    h = _hash31((key.reshape(()).long() * 0x2545F491 + cell * 0x6A09E667) & 0x7FFFFFFF)
    return (h % cell_size).view(cells_y, cells_x)


def sign_projection(channels: int, dim: int, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fixed ``(channels, dim)`` matrix of ``+-1/sqrt(dim)``, the same on every call.

    Projecting features onto it keeps their cosine similarities approximately
    (a random sign projection in the sense of Achlioptas, "Database-friendly random
    projections", 2003), so matching on ``dim`` channels instead of ``channels``
    costs ``dim / channels`` of the similarity matrix.

    Args:
        channels: Input channels.
        dim: Output channels.
        device, dtype: Of the result.

    Returns:
        ``(channels, dim)`` tensor.
    """
    index = torch.arange(channels * dim, device=device, dtype=torch.long)
    signs = (_hash31(index) & 1).to(dtype) * 2 - 1
    return signs.view(channels, dim) / math.sqrt(dim)


def match_stride_2d(
    metric: torch.Tensor,
    height: int,
    width: int,
    sx: int,
    sy: int,
    r: int,
    choice: Optional[torch.Tensor] = None,
) -> Optional[TokenAssignment]:
    """Bipartite soft matching over the 2-D stride partition (ToMe for SD, section 4.2).

    Destinations (set B) are one token per full ``sy x sx`` cell
    (:func:`stride_destinations`); every other token is a source (set A). Each
    source's most similar destination (cosine) is its match, and the ``r``
    sources with the highest scores merge into their match. The output holds
    the unmerged sources, then the destinations, each in partition order.

    Args:
        metric: ``(batch, tokens, channels)``, ``tokens == height * width``.
        height, width: Token grid, in tokens (row-major).
        sx, sy: Cell width and height, in tokens.
        r: Tokens to remove; capped at the number of sources.
        choice: Destination offset per cell (see :func:`stride_destinations`).

    Returns:
        The assignment, or ``None`` when nothing merges (``r <= 0`` or no cells).

    Raises:
        ValueError: if the grid does not match the metric or a size is not positive.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must have shape (batch, tokens, channels), got shape {tuple(metric.shape)}")
    num_tokens = metric.shape[1]
    _check_grid(num_tokens, height, width, sx, sy)
    num_dst = (height // sy) * (width // sx)
    r = min(int(r), num_tokens - num_dst)
    if r <= 0 or num_dst == 0:
        return None
    dst_pos = stride_destinations(height, width, sx, sy, choice, device=metric.device)
    return _match_into(metric, dst_pos, r)


def stride_destinations_3d(
    frames: int, height: int, width: int, st: int, sy: int, sx: int,
    choice: Optional[torch.Tensor] = None, device: Any = None,
) -> torch.Tensor:
    """Positions of the destination tokens of the 3-D stride partition (video tokens).

    The ``frames x height x width`` grid (frame-major, then row-major token order,
    as video transformers flatten their latent) is cut into
    ``(frames // st) x (height // sy) x (width // sx)`` full cells of
    ``st x sy x sx`` tokens; cells cut off at an edge have no destination.
    With ``frames == st == 1`` this is :func:`stride_destinations`.

    Args:
        frames, height, width: Token grid, in tokens.
        st, sy, sx: Cell depth (frames), height and width, in tokens.
        choice: ``(frames // st, height // sy, width // sx)`` long tensor; the offset
            inside each cell, ``(dt * sy + dy) * sx + dx``, of its destination.
            ``None`` takes the first token of every cell.
        device: Device of the result when ``choice`` is None.

    Returns:
        ``(num_cells,)`` long tensor of token positions, one per cell, in cell order.
    """
    cells_t, cells_y, cells_x = frames // st, height // sy, width // sx
    device = choice.device if choice is not None else device
    ts = torch.arange(cells_t, device=device).view(-1, 1, 1) * st
    rows = torch.arange(cells_y, device=device).view(1, -1, 1) * sy
    cols = torch.arange(cells_x, device=device).view(1, 1, -1) * sx
    if choice is not None:
        ts = ts + torch.div(choice, sy * sx, rounding_mode="floor")
        rows = rows + torch.div(choice % (sy * sx), sx, rounding_mode="floor")
        cols = cols + choice % sx
    return ((ts * height + rows) * width + cols).reshape(-1)


def match_stride_3d(
    metric: torch.Tensor,
    grid: Tuple[int, int, int],
    strides: Tuple[int, int, int],
    r: int,
    choice: Optional[torch.Tensor] = None,
) -> Optional[TokenAssignment]:
    """Bipartite soft matching over the 3-D stride partition of video tokens.

    ToMe for SD's stride partition (Bolya & Hoffman, CVPRW 2023, section 4.2)
    extended over time: one destination per full ``st x sy x sx`` cell
    (:func:`stride_destinations_3d`), every other token a source; the ``r``
    sources most similar (cosine) to their best destination merge into it. The
    output holds the unmerged sources, then the destinations, in partition order;
    with one frame it equals :func:`match_stride_2d`.

    Args:
        metric: ``(batch, tokens, channels)``, ``tokens == frames * height * width``.
        grid: ``(frames, height, width)``, in tokens.
        strides: ``(st, sy, sx)``, the cell size in tokens.
        r: Tokens to remove; capped at the number of sources.
        choice: Destination offset per cell (see :func:`stride_destinations_3d`).

    Returns:
        The assignment, or ``None`` when nothing merges (``r <= 0`` or no cells).

    Raises:
        ValueError: if the grid does not match the metric or a size is not positive.
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must have shape (batch, tokens, channels), got shape {tuple(metric.shape)}")
    frames, height, width = grid
    st, sy, sx = strides
    for name, value in (("frames", frames), ("st", st)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_grid(metric.shape[1], frames * height, width, sx, sy)
    num_dst = (frames // st) * (height // sy) * (width // sx)
    r = min(int(r), metric.shape[1] - num_dst)
    if r <= 0 or num_dst == 0:
        return None
    dst_pos = stride_destinations_3d(frames, height, width, st, sy, sx, choice, device=metric.device)
    return _match_into(metric, dst_pos, r)


def _match_into(metric: torch.Tensor, dst_pos: torch.Tensor, r: int) -> TokenAssignment:
    """Merge the ``r`` sources most similar to their best destination among ``dst_pos``;
    the output holds the unmerged sources, then the destinations, in partition order."""
    batch, num_tokens, _ = metric.shape
    num_dst = dst_pos.numel()
    with torch.no_grad():
        device = metric.device
        is_dst = torch.zeros(num_tokens, dtype=torch.bool, device=device)
        is_dst[dst_pos] = True
        src_pos = torch.argsort(is_dst.to(torch.int8), stable=True)[: num_tokens - num_dst]
        metric = _normalize(metric)
        scores = metric.index_select(1, src_pos) @ metric.index_select(1, dst_pos).transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        merged = node_max.topk(r, dim=-1).indices
        num_src = num_tokens - num_dst
        is_merged = torch.zeros(batch, num_src, dtype=torch.bool, device=device).scatter(
            1, merged, torch.ones_like(merged, dtype=torch.bool)
        )
        kept_slot = (~is_merged).cumsum(dim=1) - 1
        dst_slot = torch.arange(num_dst, device=device) + (num_src - r)
        src_slot = torch.where(is_merged, dst_slot[node_idx], kept_slot)
        dest = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        dest[:, src_pos] = src_slot
        dest[:, dst_pos] = dst_slot.expand(batch, -1)
    return TokenAssignment(dest, num_tokens - r)


# ---------------------------------------------------------------------------
# Ablations of ToMe's design (Bolya et al., ICLR 2023, sec. 4.1: which tokens to
# pair, how to combine them) and the token-pruning baselines it is compared with
# (random dropping; EViT, Liang et al., "Not All Patches are What You Need:
# Expediting Vision Transformers via Token Reorganizations", ICLR 2022, sec. 3:
# keep the tokens the class token attends to most, optionally fuse the rest).
# Written from the papers' descriptions. Every function removes exactly the r of
# the schedule (capped as ToMe caps it), so token counts and FLOPs match ToMe's.


def _assignment_from_sources(
    is_src: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor, num_tokens: int, r: int
) -> TokenAssignment:
    """Sources ``src_pos`` ``(batch, r)`` merge into ``dst_pos`` ``(batch, r)``; every other token
    stays, in original order (the protected prefix first, as it is first in the input)."""
    slot = (~is_src).cumsum(dim=1) - 1
    dest = slot.scatter(1, src_pos, slot.gather(1, dst_pos))
    return TokenAssignment(dest, num_tokens - r, ~is_src)


def match_kth(
    metric: torch.Tensor, r: int, protected_tokens: int = 0, k: int = 2, valid: Optional[torch.Tensor] = None
) -> Optional[TokenAssignment]:
    """Ablation: k-th bipartite matching that removes ``r`` tokens.

    Every token at a position ``p >= protected_tokens`` with ``p % k == k - 1`` is a
    destination, the other non-protected tokens are sources (``k - 1`` sources per
    destination). Each source's best match is its most similar destination (cosine);
    the ``r`` sources with the highest best score merge into it. With ``k = 2`` the
    groups are exactly those of :func:`match_bipartite`; a larger ``k`` fixes fewer,
    evenly spaced destinations (ALGORITHM.md, "Variants"; the library's
    :func:`kth_bipartite_soft_matching` is the version that keeps only the destinations).

    Args:
        metric: ``(batch, tokens, channels)`` similarity features.
        r: Tokens to remove; capped at ``(tokens - protected_tokens) // 2`` (as ToMe,
            so token counts match) and at the number of sources.
        protected_tokens: Leading tokens that never merge.
        k: Group size, an int >= 2.
        valid: Optional ``(batch, tokens)`` bool, False for padding: as for
            :func:`match_bipartite`, a real source merges only into a real destination
            while one exists, and padding sources merge only for the part of r the real
            tokens do not allow.

    Returns:
        The assignment (protected prefix, then every token left, in original order),
        or ``None`` when nothing is merged.

    Raises:
        ValueError: if ``k`` is not an int >= 2, ``metric`` is not 3-D,
            ``protected_tokens`` is out of range or ``valid`` is not a ``(batch, tokens)``
            bool tensor.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    _check_metric(metric, protected_tokens)
    batch, num_tokens, _ = metric.shape
    _check_valid(valid, batch, num_tokens)
    dst_list = [p for p in range(protected_tokens, num_tokens) if p % k == k - 1]
    src_list = [p for p in range(protected_tokens, num_tokens) if p % k != k - 1]
    r = min(_cap_r(r, num_tokens, protected_tokens), len(src_list))
    if r <= 0 or not dst_list:
        return None
    with torch.no_grad():
        device = metric.device
        dst_pos = torch.tensor(dst_list, device=device)
        src_pos = torch.tensor(src_list, device=device)
        if valid is not None:
            is_dst = torch.zeros(num_tokens, dtype=torch.bool, device=device).index_fill(0, dst_pos, True)
            metric = _padded_metric(metric, valid, is_dst)
        normed = _normalize(metric)
        scores = normed.index_select(1, src_pos) @ normed.index_select(1, dst_pos).transpose(-1, -2)
        best, best_dst = scores.max(dim=-1)  # (batch, sources)
        merged = best.topk(r, dim=-1).indices  # (batch, r) index into the sources
        src = src_pos[merged]
        dst = dst_pos[best_dst.gather(1, merged)]
        is_src = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter(
            1, src, torch.ones_like(src, dtype=torch.bool)
        )
    return _assignment_from_sources(is_src, src, dst, num_tokens, r)


def _greedy_pair_scores(metric: torch.Tensor, protected_tokens: int, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``(batch, tokens, tokens)`` scores :func:`match_greedy` ranks pairs by: cosine for a
    pair ``i < j`` of non-protected tokens, ``-inf`` for every other entry."""
    num_tokens = metric.shape[1]
    normed = _normalize(metric)
    scores = normed @ normed.transpose(-1, -2)
    if valid is not None:  # cosines lie in [-1, 1]: real pairs first, then padding pairs, then mixed ones
        real_pair = valid.unsqueeze(-1) & valid.unsqueeze(1)
        padding_pair = ~valid.unsqueeze(-1) & ~valid.unsqueeze(1)
        scores = torch.where(real_pair, scores, torch.where(padding_pair, -2.0, -3.0).to(scores.dtype))
    positions = torch.arange(num_tokens, device=metric.device)
    free = positions >= protected_tokens
    allowed = (positions.view(-1, 1) < positions.view(1, -1)) & free.view(-1, 1) & free.view(1, -1)
    return scores.masked_fill(~allowed, -math.inf)


def match_greedy(
    metric: torch.Tensor, r: int, protected_tokens: int = 0, valid: Optional[torch.Tensor] = None
) -> Optional[TokenAssignment]:
    """Ablation: greedy pair matching; repeatedly pair the globally most similar two tokens.

    Over all pairs of non-protected tokens (cosine similarity of ``metric``), take
    the most similar pair, merge the later token into the earlier one, remove both
    from further consideration, and repeat ``r`` times. Similarities are computed
    once (merged tokens are not re-compared: every token takes part in at most one
    merge per call, as in bipartite matching). Ties go to the pair that comes first
    in row-major order. ``r`` sequential arg-max steps over a ``tokens x tokens``
    matrix: slower than bipartite matching, which is fine for an ablation.

    Args:
        metric: ``(batch, tokens, channels)`` similarity features.
        r: Pairs to merge; capped at ``(tokens - protected_tokens) // 2`` (so enough
            disjoint pairs always exist).
        protected_tokens: Leading tokens that never merge.
        valid: Optional ``(batch, tokens)`` bool, False for padding: every pair of real
            tokens then ranks above every pair of padding tokens, and those above every
            pair of one real and one padding token, so a sample pairs its real tokens as
            it does alone while they allow r.

    Returns:
        The assignment (protected prefix, then every token left, in original order),
        or ``None`` when nothing is merged.

    Raises:
        ValueError: if ``metric`` is not 3-D, ``protected_tokens`` is out of range or
            ``valid`` is not a ``(batch, tokens)`` bool tensor.
    """
    r = _checked_r(metric, r, protected_tokens)
    batch, num_tokens, _ = metric.shape
    _check_valid(valid, batch, num_tokens)
    if r <= 0:
        return None
    with torch.no_grad():
        device = metric.device
        scores = _greedy_pair_scores(metric, protected_tokens, valid)
        src = torch.empty(batch, r, dtype=torch.long, device=device)
        dst = torch.empty(batch, r, dtype=torch.long, device=device)
        for step in range(r):
            flat = scores.flatten(1).argmax(dim=1)
            first = torch.div(flat, num_tokens, rounding_mode="floor")
            second = flat % num_tokens
            dst[:, step], src[:, step] = first, second
            used = torch.stack([first, second], dim=1)  # (batch, 2): neither takes part again
            scores.scatter_(1, used.unsqueeze(-1).expand(-1, -1, num_tokens), -math.inf)
            scores.scatter_(2, used.unsqueeze(1).expand(-1, num_tokens, -1), -math.inf)
        is_src = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device).scatter(
            1, src, torch.ones_like(src, dtype=torch.bool)
        )
    return _assignment_from_sources(is_src, src, dst, num_tokens, r)


def match_random_drop(
    metric: torch.Tensor, r: int, protected_tokens: int = 0, generator: Optional[torch.Generator] = None
) -> Optional[TokenAssignment]:
    """Pruning baseline: drop ``r`` random non-protected tokens.

    The result describes a drop, not a merge: combine it with :func:`merge_drop`
    (the :attr:`TokenAssignment.kept` tokens keep their values and sizes, the others
    vanish). A dropped token's ``dest`` is slot 0, only so that indices stay valid;
    it is not part of that token, so ``merge``/``unmerge``/``sizes`` of this
    assignment do not describe the pruned sequence.

    Args:
        metric: ``(batch, tokens, channels)``; only its shape and device are used.
        r: Tokens to drop; capped at ``(tokens - protected_tokens) // 2`` as in ToMe.
        protected_tokens: Leading tokens that are never dropped.
        generator: Optional ``torch.Generator`` for the draw (None: torch's global one).

    Returns:
        The assignment, or ``None`` when nothing is dropped.

    Raises:
        ValueError: if ``metric`` is not 3-D or ``protected_tokens`` is out of range.
    """
    r = _checked_r(metric, r, protected_tokens)
    batch, num_tokens, _ = metric.shape
    if r <= 0:
        return None
    with torch.no_grad():
        is_dropped = _random_sources(batch, num_tokens, r, protected_tokens, metric.device, generator)
        slot = (~is_dropped).cumsum(dim=1) - 1
        dest = torch.where(is_dropped, torch.zeros_like(slot), slot)
    return TokenAssignment(dest, num_tokens - r, ~is_dropped)


def match_attentive(
    cls_attention: torch.Tensor,
    r: int,
    protected_tokens: int = 1,
    fuse: bool = False,
    valid: Optional[torch.Tensor] = None,
) -> Optional[TokenAssignment]:
    """Pruning baseline (EViT, ICLR 2022, sec. 3): keep the tokens the class token attends to most.

    Without ``fuse`` the ``r`` non-protected tokens with the lowest class-token
    attention are dropped (combine with :func:`merge_drop`). With ``fuse`` the
    ``r + 1`` least attended ones are fused into one new token placed last (EViT's
    "inattentive token fusion"; combine with :func:`merge_fuse`), so that, like
    every other rule here, the sequence shrinks by exactly ``r``. Ties in attention
    drop the earlier token first (stable sort). Without ``fuse``, a dropped token's
    ``dest`` is slot 0, only to keep indices valid (see :func:`match_random_drop`).

    Args:
        cls_attention: ``(batch, tokens)`` attention of the class token (at index 0)
            to every token, averaged over heads.
        r: Tokens to remove; capped at ``(tokens - protected_tokens) // 2`` as in ToMe.
        protected_tokens: Leading tokens (class token first) that are never dropped.
        fuse: Fuse the dropped tokens into one token instead of discarding them.
        valid: Optional ``(batch, tokens)`` bool, False for padding: padding then ranks as
            the most attended (it is removed last), so a sample drops the real tokens it
            drops alone while they allow r.

    Returns:
        The assignment (protected prefix, the kept tokens in original order, then the
        fused token if any), or ``None`` when nothing is removed.

    Raises:
        ValueError: if ``cls_attention`` is not 2-D, ``protected_tokens`` is out of range or
            ``valid`` is not a ``(batch, tokens)`` bool tensor.
    """
    if cls_attention.dim() != 2:
        raise ValueError(f"cls_attention must have shape (batch, tokens), got shape {tuple(cls_attention.shape)}")
    batch, num_tokens = cls_attention.shape
    if protected_tokens < 0 or protected_tokens > num_tokens:
        raise ValueError(f"protected_tokens={protected_tokens} must lie in [0, {num_tokens}]")
    _check_valid(valid, batch, num_tokens)
    r = _cap_r(r, num_tokens, protected_tokens)
    if r <= 0:
        return None
    removed = r + 1 if fuse else r
    with torch.no_grad():
        if valid is not None:
            cls_attention = cls_attention.masked_fill(~valid, math.inf)
        order = cls_attention[:, protected_tokens:].argsort(dim=1, stable=True)
        gone = order[:, :removed] + protected_tokens
        is_gone = torch.zeros(batch, num_tokens, dtype=torch.bool, device=cls_attention.device).scatter(
            1, gone, torch.ones_like(gone, dtype=torch.bool)
        )
        slot = (~is_gone).cumsum(dim=1) - 1
        target = num_tokens - r - 1 if fuse else 0  # the fused token's slot, or a placeholder
        dest = torch.where(is_gone, torch.full_like(slot, target), slot)
    return TokenAssignment(dest, num_tokens - r, None if fuse else ~is_gone)


def merge_drop(
    assignment: TokenAssignment, x: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token pruning: kept tokens keep their values and sizes; the others are discarded.

    Unlike :func:`merge_prune` (ToMe's "keep one", ToFu), nothing is added to the
    kept tokens' sizes: the dropped patches are gone from the model's view.

    Args:
        assignment: From :func:`match_random_drop` or :func:`match_attentive` (``fuse=False``).
        x: ``(batch, tokens, channels)``.
        size: ``(batch, tokens, 1)``; ``None`` means all ones.

    Returns:
        ``(x, size)`` of shapes ``(batch, tokens - r, channels)`` and ``(batch, tokens - r, 1)``.

    Raises:
        ValueError: if ``assignment`` has no ``kept`` mask.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    return assignment.prune(x), assignment.prune(size)


def merge_fuse(
    assignment: TokenAssignment, x: torch.Tensor, weight: torch.Tensor, size: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """EViT's fusion: every group of several tokens becomes their ``weight``-weighted average.

    Tokens alone in their group are returned unchanged (bit for bit); sizes add up
    over a group, as for merging.

    Args:
        assignment: Any assignment (from :func:`match_attentive` with ``fuse=True``
            only the fused group has several members).
        x: ``(batch, tokens, channels)``.
        weight: ``(batch, tokens, 1)`` non-negative weights (EViT: the class token's attention).
        size: ``(batch, tokens, 1)``; ``None`` means all ones.

    Returns:
        ``(x, size)`` of shapes ``(batch, tokens - r, channels)`` and ``(batch, tokens - r, 1)``.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    weight = weight.to(x.dtype)
    members = assignment.merge(torch.ones_like(size), mode="sum")
    fused = assignment.merge(x * weight, mode="sum") / assignment.merge(weight, mode="sum").clamp_min(
        torch.finfo(x.dtype).tiny
    )
    return torch.where(members > 1, fused, assignment.merge(x, mode="sum")), assignment.merge(size, mode="sum")
