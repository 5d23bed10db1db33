"""An independent, deliberately plain implementation of ToMe, for checking the library.

Written from ../shared/ALGORITHM.md with Python loops over batch elements and
tokens; shares no code with ``tome``. Slow, so only for tiny inputs.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn


def reference_match(metric: torch.Tensor, r: int, protected: int) -> Tuple[List[List[List[int]]], int]:
    """Bipartite soft matching for each batch element.

    Returns:
        groups[b] = list of output tokens, each the list of input token indices it
        combines, in output order; and the capped r.
    """
    batch, n, _ = metric.shape
    r = max(0, min(r, (n - protected) // 2))
    if r == 0:  # "If r <= 0, nothing happens": no reordering either.
        return [[[t] for t in range(n)] for _ in range(batch)], 0
    result = []
    for b in range(batch):
        m = metric[b].double()
        m = m / m.norm(dim=-1, keepdim=True)
        a_idx = list(range(0, n, 2))
        b_idx = list(range(1, n, 2))
        best = {}
        for i in a_idx:
            if i < protected:
                best[i] = (-math.inf, None)
                continue
            candidates = [(float(m[i] @ m[j]), j) for j in b_idx if j >= protected]
            if not candidates:
                best[i] = (-math.inf, None)
                continue
            score, j = max(candidates, key=lambda c: c[0])
            best[i] = (score, j)
        ranked = sorted(a_idx, key=lambda i: -best[i][0])
        sources = set(ranked[:r])
        into = {j: [j] for j in b_idx}
        for i in sorted(sources):
            into[best[i][1]].append(i)
        prefix = [[t] for t in range(min(protected, n))]
        kept_a = [[i] for i in a_idx if i >= protected and i not in sources]
        kept_b = [sorted(into[j]) for j in b_idx if j >= protected]
        result.append(prefix + kept_a + kept_b)
    return result, r


def reference_merge(
    x: torch.Tensor, size: torch.Tensor, groups: List[List[List[int]]]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average over each group; returns (x, size)."""
    out_x, out_s = [], []
    for b, token_groups in enumerate(groups):
        xs, ss = [], []
        for g in token_groups:
            s = size[b, g]  # (len(g), 1)
            xs.append((x[b, g] * s).sum(0) / s.sum(0))
            ss.append(s.sum(0))
        out_x.append(torch.stack(xs))
        out_s.append(torch.stack(ss))
    return torch.stack(out_x), torch.stack(out_s)


def reference_keepers(groups: List[List[List[int]]]) -> List[List[int]]:
    """For bipartite groups: the token each group is built around (its B token, the odd one)."""
    return [[next((t for t in g if t % 2 == 1), g[0]) if len(g) > 1 else g[0] for g in token_groups]
            for token_groups in groups]


def reference_pitome_energy(metric: torch.Tensor, protected: int, margin: float, alpha: float) -> List[List[float]]:
    """PiToMe energy per non-protected token, with explicit loops (docs/methods.md)."""
    batch, n, _ = metric.shape
    out = []
    for b in range(batch):
        m = metric[b].double()
        m = m / m.norm(dim=-1, keepdim=True)
        free = list(range(protected, n))
        energies = []
        for i in free:
            total = 0.0
            for j in free:
                c = float(m[i] @ m[j])
                total += c if c >= margin else alpha * (math.exp(c - margin) - 1)
            energies.append(total / len(free))
        out.append(energies)
    return out


def reference_pitome_match(
    metric: torch.Tensor, r: int, protected: int, margin: float, alpha: float
) -> Tuple[List[List[List[int]]], List[List[int]], int]:
    """PiToMe matching: 2r highest-energy tokens alternate into A (ranks 0, 2, ..) and
    B (ranks 1, 3, ..); every A token joins its most similar B token.

    Returns:
        groups (as :func:`reference_match`), the keeper of every group, and the capped r.
        Output order: prefix, then every token that stays, in original order.
    """
    batch, n, _ = metric.shape
    r = max(0, min(r, (n - protected) // 2))
    if r == 0:
        groups = [[[t] for t in range(n)] for _ in range(batch)]
        return groups, [[t for t in range(n)] for _ in range(batch)], 0
    energies = reference_pitome_energy(metric, protected, margin, alpha)
    all_groups, all_keepers = [], []
    for b in range(batch):
        m = metric[b].double()
        m = m / m.norm(dim=-1, keepdim=True)
        free = list(range(protected, n))
        ranked = sorted(free, key=lambda t: -energies[b][t - protected])  # stable: ties keep order
        a_set, b_set = ranked[: 2 * r : 2], ranked[1 : 2 * r : 2]
        into = {}
        for i in a_set:
            j = max(b_set, key=lambda j: float(m[i] @ m[j]))
            into.setdefault(j, []).append(i)
        groups, keepers = [], []
        for t in range(n):
            if t in a_set:
                continue
            groups.append(sorted([t] + into.get(t, [])))
            keepers.append(t)
        all_groups.append(groups)
        all_keepers.append(keepers)
    return all_groups, all_keepers, r


def reference_mlerp(
    x: torch.Tensor, size: torch.Tensor, groups: List[List[List[int]]]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToFu's MLERP: size-weighted average rescaled to the largest member norm; returns (x, size)."""
    out_x, out_s = [], []
    for b, token_groups in enumerate(groups):
        xs, ss = [], []
        for g in token_groups:
            s = size[b, g]
            avg = (x[b, g] * s).sum(0) / s.sum(0)
            if len(g) > 1:
                avg = avg * (max(float(x[b, t].norm()) for t in g) / avg.norm())
            xs.append(avg)
            ss.append(s.sum(0))
        out_x.append(torch.stack(xs))
        out_s.append(torch.stack(ss))
    return torch.stack(out_x), torch.stack(out_s)


def reference_prune(
    x: torch.Tensor, size: torch.Tensor, groups: List[List[List[int]]], keepers: List[List[int]]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ToFu's pruning: each group takes its keeper's value; sizes still add up."""
    out_x = torch.stack([torch.stack([x[b, k] for k in keep]) for b, keep in enumerate(keepers)])
    out_s = torch.stack([torch.stack([size[b, g].sum(0) for g in token_groups]) for b, token_groups in enumerate(groups)])
    return out_x, out_s


def reference_compose_sources(source: torch.Tensor, groups: List[List[List[int]]]) -> torch.Tensor:
    """Dense (batch, tokens, original) source map after merging ``groups``."""
    rows = []
    for b, token_groups in enumerate(groups):
        rows.append(torch.stack([source[b, g].amax(0) for g in token_groups]))
    return torch.stack(rows)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + log(size)^T) v, explicitly. q, k, v: (B, H, N, d); size (B, N, 1)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(-1) @ v


def reference_timm_vit(
    model: nn.Module, x: torch.Tensor, r: List[int], prop_attn: bool = True, method: str = "tome"
):
    """Plain ToMe forward of an (unpatched-or-patched) timm VisionTransformer.

    Only for eval-mode models whose blocks are timm ``Block`` with timm ``Attention``.
    ``method``: "tome", "pitome" (margin 0.9 * (1 - layer / layers), alpha 1) or
    "tofu" (prune in the first ceil(layers / 4) blocks, MLERP after), as docs/methods.md says.
    Returns (logits or pooled features, final size, final source map).
    """
    protected = model.num_prefix_tokens
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    batch, n, _ = x.shape
    size = torch.ones(batch, n, 1)
    source = torch.eye(n).expand(batch, -1, -1)
    for layer, (block, block_r) in enumerate(zip(model.blocks, r)):
        attn = block.attn
        h = block.norm1(x)
        qkv = attn.qkv(h).reshape(batch, h.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = reference_attention(q, k, v, size if prop_attn else None, attn.scale)
        o = o.transpose(1, 2).reshape(batch, h.shape[1], -1)
        o = attn.norm(o)
        if attn.gate is not None:
            o = o * attn.gate(h).sigmoid()
        o = attn.proj(o)
        x = x + block.ls1(o)
        layers = len(model.blocks)
        if method == "pitome":
            groups, keepers, _ = reference_pitome_match(k.mean(1), block_r, protected, 0.9 * (1 - layer / layers), 1.0)
            x, size = reference_merge(x, size, groups)
        else:
            groups, _ = reference_match(k.mean(1), block_r, protected)
            if method == "tofu" and layer < math.ceil(layers / 4):
                x, size = reference_prune(x, size, groups, reference_keepers(groups))
            elif method == "tofu":
                x, size = reference_mlerp(x, size, groups)
            else:
                x, size = reference_merge(x, size, groups)
        source = reference_compose_sources(source, groups)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    pool = model.global_pool
    if model.attn_pool is not None:
        feats = x if model.pool_include_prefix else x[:, protected:]
        s = size if model.pool_include_prefix else size[:, protected:]
        pooled = model.attn_pool(feats, attn_mask=s.log()[:, None, None, :, 0])
    elif pool == "token":
        pooled = x[:, 0]
    elif pool == "avg":
        feats, s = x[:, protected:], size[:, protected:]
        pooled = (feats * s).sum(1) / s.sum(1)
    else:
        raise NotImplementedError(pool)
    pooled = model.fc_norm(pooled)
    return model.head(pooled), size, source
