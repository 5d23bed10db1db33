"""Plain ToMe forward through blocks built around ``nn.MultiheadAttention`` (torchvision, SWAG).

Uses only the plain reference of ``tests/reference.py`` and the modules'
parameters: q, k and v are cut out of the packed ``in_proj_weight`` by hand,
attention is an explicit softmax. Shares no code with ``tome``.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

import torch
from torch import nn

from reference import reference_attention, reference_compose_sources, reference_match, reference_merge


def reference_mha_encoder(
    blocks: Iterable[nn.Module], x: torch.Tensor, schedule: List[int], protected: int, prop_attn: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``EncoderBlock``-shaped blocks (ln_1, self_attention, dropout, ln_2, mlp) with merging.

    Args:
        blocks: The blocks, eval mode.
        x: ``(batch, tokens, channels)`` batch-first embedded tokens.
        schedule: r per block.
        protected: Leading tokens that never merge.
        prop_attn: Add ``log(size)`` to the attention logits.

    Returns:
        Tokens after the last block, their sizes ``(batch, tokens, 1)`` and the
        dense source map ``(batch, tokens, original tokens)``.
    """
    batch, num_tokens, dim = x.shape
    size = torch.ones(batch, num_tokens, 1)
    source = torch.eye(num_tokens).expand(batch, -1, -1)
    for block, r in zip(blocks, schedule):
        attn = block.self_attention
        heads = attn.num_heads
        head_dim = dim // heads
        h = block.ln_1(x)
        w, b = attn.in_proj_weight, attn.in_proj_bias

        def project(part: int) -> torch.Tensor:
            rows = slice(part * dim, (part + 1) * dim)
            out = h @ w[rows].T + b[rows]
            return out.reshape(batch, -1, heads, head_dim).transpose(1, 2)

        q, k, v = project(0), project(1), project(2)
        o = reference_attention(q, k, v, size if prop_attn else None, head_dim**-0.5)
        o = o.transpose(1, 2).reshape(batch, -1, dim) @ attn.out_proj.weight.T + attn.out_proj.bias
        x = x + o
        groups, _ = reference_match(k.mean(1), r, protected)
        x, size = reference_merge(x, size, groups)
        source = reference_compose_sources(source, groups)
        x = x + block.mlp(block.ln_2(x))
    return x, size, source
