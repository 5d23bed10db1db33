"""A "published-style" merge step, as a baseline for the library's own.

The original ToMe release merges by splitting the sequence into its A (even) and
B (odd) halves, gathering the unmerged and the source A tokens with an index
expanded over channels, ``scatter_reduce``-ing the sources into B and
concatenating ``[unmerged A | B]``. This module re-implements that *approach*
(written here from that description, not copied) as a drop-in replacement for
``ToMeState.merge``, so the same patched model can be timed with either merge.

Only plain class-token models (one protected token) and ``trace_source=False``
are supported: that is the published code's scope, and what the suite times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Tuple

import torch

from tome.patch import _shared

__all__ = ["published_style"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _match(metric: torch.Tensor, r: int, protected_tokens: int):
    """Gather/scatter indices of the published approach: (unmerged A, source A, their B)."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        if protected_tokens:
            scores[:, 0, :] = -math.inf  # the class token is A[0]
        best_score, best_b = scores.max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True).unsqueeze(-1)
        src_a = order[:, :r]
        kept_a = order[:, r:].sort(dim=1).values  # original order, class token first
        src_b = best_b.unsqueeze(-1).gather(1, src_a)
    return kept_a, src_a, src_b


def _merge_sum(x: torch.Tensor, r: int, kept_a: torch.Tensor, src_a: torch.Tensor, src_b: torch.Tensor) -> torch.Tensor:
    a, b = x[:, ::2], x[:, 1::2]
    batch, num_a, channels = a.shape
    kept = a.gather(1, kept_a.expand(batch, num_a - r, channels))
    src = a.gather(1, src_a.expand(batch, r, channels))
    b = b.scatter_reduce(1, src_b.expand(batch, r, channels), src, reduce="sum")
    return torch.cat([kept, b], dim=1)


def _published_merge(
    self: _shared.ToMeState, x: torch.Tensor, metric: torch.Tensor, r: int, rule: object = None
) -> Tuple[torch.Tensor, _shared.ToMeState]:
    # ``rule`` (the block's merge rule, always ToMe's here) is taken so the signature is ToMeState.merge's.
    if self.trace_source or self.protected_tokens > 1:
        raise ValueError("the published-style baseline supports trace_source=False and at most a class token")
    r = max(0, min(r, (x.shape[1] - self.protected_tokens) // 2))
    if r <= 0:
        return x, self
    kept_a, src_a, src_b = _match(metric, r, self.protected_tokens)
    size = self.sizes(x)
    work = x.float() if x.dtype in _LOW_PRECISION else x
    merged = _merge_sum(work * size, r, kept_a, src_a, src_b)
    new_size = _merge_sum(size, r, kept_a, src_a, src_b)
    merged = (merged / new_size).to(x.dtype)
    return merged, dataclasses.replace(self, size=new_size, num_tokens=x.shape[1] - r)


@contextlib.contextmanager
def published_style() -> Iterator[None]:
    """Within the block, every patched model merges the published way."""
    original = _shared.ToMeState.merge
    _shared.ToMeState.merge = _published_merge  # type: ignore[method-assign]
    try:
        yield
    finally:
        _shared.ToMeState.merge = original  # type: ignore[method-assign]
