"""The research setting ``MergeMethod("ablation", ...)``: ToMe's design choices changed one
at a time (similarity feature, matching, combining) and the pruning baselines (random
dropping, EViT with and without fusion), all through the one shared merge step.

Each new matching and combining rule is checked against a plain, loop-based reference
written here from the rule's description (docs/ablations.md), plus ToMe's invariants.
"""

from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tome
from tome._methods import TOME_RULE, LayerRule, MergeMethod
from tome.merge import (
    match_attentive,
    match_greedy,
    match_kth,
    match_random,
    match_random_drop,
    merge_drop,
    merge_fuse,
    merge_source,
    merge_wavg,
)
from tome.patch._shared import ToMeState

from conftest import trained_like_
from reference import reference_attention, reference_match, reference_merge

Groups = List[List[List[int]]]

shapes = st.tuples(st.integers(1, 3), st.integers(1, 30), st.integers(3, 8))


def _inputs(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, tokens, channels = shape
    metric = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    x = torch.randn(batch, tokens, 5, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=generator).to(torch.float64)
    return metric, x, size


def _groups_of(assignment, batch: int, tokens: int) -> Groups:
    """Members of every output token, in output order (from the assignment's ``dest``)."""
    groups = []
    for b in range(batch):
        rows: List[List[int]] = [[] for _ in range(assignment.num_out)]
        for t in range(tokens):
            rows[int(assignment.dest[b, t])].append(t)
        groups.append(rows)
    return groups


def _cosine(metric: torch.Tensor, b: int, i: int, j: int) -> float:
    a, c = metric[b, i].double(), metric[b, j].double()
    return float(a @ c / (a.norm() * c.norm()))


def _groups_from_pairs(tokens: int, merges: dict) -> List[List[int]]:
    """Output groups (kept tokens in original order) from ``{source: destination}``."""
    groups = {t: [t] for t in range(tokens) if t not in merges}
    for src, dst in merges.items():
        groups[dst].append(src)
    return [sorted(groups[t]) for t in sorted(groups)]


# ----------------------------------------------------------------------------- plain references


def reference_kth(metric: torch.Tensor, r: int, protected: int, k: int) -> Tuple[Groups, int]:
    """Every k-th token (p % k == k - 1, p >= protected) a destination; the r best sources merge."""
    batch, n, _ = metric.shape
    dst = [p for p in range(protected, n) if p % k == k - 1]
    src = [p for p in range(protected, n) if p % k != k - 1]
    r = min(max(0, min(r, (n - protected) // 2)), len(src))
    if r == 0 or not dst:
        return [[[t] for t in range(n)] for _ in range(batch)], 0
    result = []
    for b in range(batch):
        best = {}
        for i in src:
            scores = [(_cosine(metric, b, i, j), j) for j in dst]
            best[i] = max(scores, key=lambda s: s[0])  # first destination on ties
        chosen = sorted(src, key=lambda i: -best[i][0])[:r]
        result.append(_groups_from_pairs(n, {i: best[i][1] for i in chosen}))
    return result, r


def reference_greedy(metric: torch.Tensor, r: int, protected: int) -> Tuple[Groups, int]:
    """r times: the most similar pair (i < j) of unused, unprotected tokens; j merges into i."""
    batch, n, _ = metric.shape
    r = max(0, min(r, (n - protected) // 2))
    if r == 0:
        return [[[t] for t in range(n)] for _ in range(batch)], 0
    result = []
    for b in range(batch):
        used, merges = set(), {}
        for _ in range(r):
            best: Tuple[float, Optional[int], Optional[int]] = (-math.inf, None, None)
            for i in range(protected, n):
                for j in range(i + 1, n):
                    if i in used or j in used:
                        continue
                    score = _cosine(metric, b, i, j)
                    if score > best[0]:  # strictly: the first pair in row-major order wins ties
                        best = (score, i, j)
            _, i, j = best
            used |= {i, j}
            merges[j] = i
        result.append(_groups_from_pairs(n, merges))
    return result, r


def reference_attentive(cls_attention: torch.Tensor, r: int, protected: int, fuse: bool) -> Tuple[List[List[int]], int]:
    """EViT: indices of the tokens removed (the least attended), per batch row, and the capped r."""
    batch, n = cls_attention.shape
    r = max(0, min(r, (n - protected) // 2))
    gone = []
    for b in range(batch):
        ranked = sorted(range(protected, n), key=lambda t: (float(cls_attention[b, t]), t))
        gone.append(sorted(ranked[: r + 1 if fuse else r]) if r else [])
    return gone, r


def reference_combine(x: torch.Tensor, size: torch.Tensor, groups: Groups, how: str,
                      keepers: Optional[List[List[int]]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combine each group: "amax", "mean" (unweighted) or "keep" (the keeper's value); sizes add."""
    out_x, out_s = [], []
    for b, token_groups in enumerate(groups):
        xs = []
        for index, g in enumerate(token_groups):
            if how == "amax":
                xs.append(x[b, g].max(0).values)
            elif how == "mean":
                xs.append(x[b, g].sum(0) / len(g))
            else:
                xs.append(x[b, keepers[b][index]])
        out_x.append(torch.stack(xs))
        out_s.append(torch.stack([size[b, g].sum(0) for g in token_groups]))
    return torch.stack(out_x), torch.stack(out_s)


def _check_merge_invariants(assignment, x, size, protected, groups):
    batch, tokens, _ = x.shape
    r = tokens - assignment.num_out
    assert assignment.dest.shape == (batch, tokens)
    assert torch.equal(assignment.dest[:, :protected], torch.arange(protected).expand(batch, -1))  # prefix in front
    for rows in groups:
        assert rows[:protected] == [[t] for t in range(protected)]  # the prefix never merges
        assert sorted(t for g in rows for t in g) == list(range(tokens))  # a partition
        assert len(rows) == tokens - r
    merged, new_size = merge_wavg(assignment, x, size)
    assert torch.equal(new_size.sum(dim=1), size.sum(dim=1))  # sizes add up
    torch.testing.assert_close(merged[:, :protected], x[:, :protected])
    assert torch.all(merge_source(assignment, x).sum(dim=1) == 1)
    if assignment.kept is not None:  # one kept token per group, never a source
        assert torch.all(assignment.merge(assignment.kept.unsqueeze(-1).double(), mode="sum") == 1)


# ----------------------------------------------------------------------------- the rules


@settings(max_examples=80, deadline=None)
@given(shape=shapes, r=st.integers(0, 20), protected=st.integers(0, 4), k=st.integers(2, 5), seed=st.integers(0, 9999))
def test_kth_matches_reference(shape, r, protected, k, seed):
    metric, x, size = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    assignment = match_kth(metric, r, protected, k)
    groups, capped = reference_kth(metric, r, protected, k)
    if capped == 0:
        assert assignment is None
        return
    assert assignment.num_out == tokens - capped
    assert _groups_of(assignment, batch, tokens) == groups
    _check_merge_invariants(assignment, x, size, protected, groups)


@settings(max_examples=50, deadline=None)
@given(shape=shapes, r=st.integers(0, 20), protected=st.integers(0, 4), seed=st.integers(0, 9999))
def test_kth_with_k2_is_bipartite(shape, r, protected, seed):
    metric, _, _ = _inputs(shape, seed)
    protected = min(protected, shape[1])
    groups, capped = reference_match(metric, r, protected)
    assignment = match_kth(metric, r, protected, 2)
    if capped == 0:
        assert assignment is None
        return
    # The same groups; only their order in the output differs (kept tokens in original order here).
    assert sorted(map(sorted, _groups_of(assignment, *shape[:2])[0])) == sorted(map(sorted, groups[0]))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, r=st.integers(0, 20), protected=st.integers(0, 4), seed=st.integers(0, 9999))
def test_greedy_matches_reference(shape, r, protected, seed):
    metric, x, size = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    assignment = match_greedy(metric, r, protected)
    groups, capped = reference_greedy(metric, r, protected)
    if capped == 0:
        assert assignment is None
        return
    assert _groups_of(assignment, batch, tokens) == groups
    assert all(len(g) <= 2 for rows in groups for g in rows)  # pairs: nothing merges twice in one step
    _check_merge_invariants(assignment, x, size, protected, groups)


def test_greedy_takes_the_globally_best_pair_first():
    # Tokens 1 and 3 are near-identical; bipartite matching cannot pair them (both odd), greedy does.
    metric = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.01]]])
    assignment = match_greedy(metric, 1, 0)
    assert _groups_of(assignment, 1, 4) == [[[0], [1, 3], [2]]]
    assert [1, 3] not in _groups_of(match_kth(metric, 1, 0, 2), 1, 4)[0]


@settings(max_examples=60, deadline=None)
@given(shape=shapes, r=st.integers(0, 20), protected=st.integers(0, 4), seed=st.integers(0, 9999))
def test_random_matching_invariants(shape, r, protected, seed):
    metric, x, size = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    assignment = match_random(metric, r, protected, torch.Generator().manual_seed(seed))
    capped = max(0, min(r, (tokens - protected) // 2))
    if capped == 0:
        assert assignment is None
        return
    groups = _groups_of(assignment, batch, tokens)
    _check_merge_invariants(assignment, x, size, protected, groups)
    # Every source went to its most similar kept, unprotected token.
    for b in range(batch):
        kept = [t for t in range(tokens) if assignment.kept[b, t]]
        for t in range(tokens):
            if not assignment.kept[b, t]:
                into = next(k for k in kept if assignment.dest[b, k] == assignment.dest[b, t])
                best = max((k for k in kept if k >= protected), key=lambda k: _cosine(metric, b, t, k))
                assert math.isclose(_cosine(metric, b, t, into), _cosine(metric, b, t, best), abs_tol=1e-12)


@settings(max_examples=80, deadline=None)
@given(shape=shapes, r=st.integers(0, 20), protected=st.integers(0, 4), seed=st.integers(0, 9999))
def test_combines_match_reference(shape, r, protected, seed):
    metric, x, size = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    groups, capped = reference_match(metric, r, protected)
    if capped == 0:
        return
    from tome.merge import match_bipartite

    assignment = match_bipartite(metric, r, protected)
    for combine, how in (("amax", "amax"), ("mean", "mean"), ("prune", "keep")):
        keepers = [[next((t for t in g if assignment.kept[b, t]), g[0]) for g in rows] for b, rows in enumerate(groups)]
        merged, new_size = LayerRule("bipartite", combine).combine_tokens(assignment, x, size)
        ref_x, ref_size = reference_combine(x, size, groups, how, keepers)
        torch.testing.assert_close(merged, ref_x)
        assert torch.equal(new_size, ref_size)
        assert torch.equal(merged[:, :protected], x[:, :protected])


@settings(max_examples=80, deadline=None)
@given(shape=shapes, r=st.integers(0, 20), protected=st.integers(0, 4), fuse=st.booleans(), seed=st.integers(0, 9999))
def test_attentive_pruning_matches_reference(shape, r, protected, fuse, seed):
    _, x, size = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    generator = torch.Generator().manual_seed(seed + 1)
    attention = torch.rand(batch, tokens, generator=generator, dtype=torch.float64).softmax(dim=1)
    assignment = match_attentive(attention, r, protected, fuse)
    gone, capped = reference_attentive(attention, r, protected, fuse)
    if capped == 0:
        assert assignment is None
        return
    assert assignment.num_out == tokens - capped  # fusing drops r + 1 and adds one: the same count
    if fuse:
        merged, new_size = merge_fuse(assignment, x, attention.unsqueeze(-1), size)
        groups = _groups_of(assignment, batch, tokens)
        for b in range(batch):
            kept = [t for t in range(tokens) if t not in gone[b]]
            assert groups[b] == [[t] for t in kept] + [gone[b]]
            w = attention[b, gone[b]].unsqueeze(-1)
            torch.testing.assert_close(merged[b, -1], (x[b, gone[b]] * w).sum(0) / w.sum())
            assert torch.equal(merged[b, :-1], x[b, kept])  # kept tokens bit for bit
        assert torch.equal(new_size.sum(dim=1), size.sum(dim=1))
    else:
        merged, new_size = merge_drop(assignment, x, size)
        for b in range(batch):
            kept = [t for t in range(tokens) if t not in gone[b]]
            assert torch.equal(merged[b], x[b, kept]) and torch.equal(new_size[b], size[b, kept])
    assert torch.equal(merged[:, :protected], x[:, :protected])


@settings(max_examples=50, deadline=None)
@given(shape=shapes, r=st.integers(0, 20), protected=st.integers(0, 4), seed=st.integers(0, 9999))
def test_random_drop_keeps_the_rest_in_order(shape, r, protected, seed):
    metric, x, size = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    assignment = match_random_drop(metric, r, protected, torch.Generator().manual_seed(seed))
    capped = max(0, min(r, (tokens - protected) // 2))
    if capped == 0:
        assert assignment is None
        return
    merged, new_size = merge_drop(assignment, x, size)
    assert merged.shape[1] == tokens - capped
    for b in range(batch):
        kept = assignment.kept[b].nonzero().flatten().tolist()
        assert len(kept) == tokens - capped and kept[:protected] == list(range(protected))
        assert torch.equal(merged[b], x[b, kept]) and torch.equal(new_size[b], size[b, kept])


def test_traced_merge_node_takes_every_rule_field():
    import inspect

    from tome.patch._shared import merge_tokens

    assert inspect.signature(merge_tokens).parameters["rule"].default == tuple(TOME_RULE)


def test_rule_errors():
    with pytest.raises(ValueError, match="k must be an int >= 2"):
        match_kth(torch.randn(1, 6, 3), 2, 0, 1)
    with pytest.raises(ValueError, match="cls_attention must have shape"):
        match_attentive(torch.randn(1, 6, 1), 2)
    assignment = match_attentive(torch.rand(1, 6), 2, 1, fuse=True)
    with pytest.raises(ValueError, match="no kept mask"):
        merge_drop(assignment, torch.randn(1, 6, 3))


# ----------------------------------------------------------------------------- the setting


def test_ablation_options_and_errors():
    assert MergeMethod("ablation").rule(0, 4) is TOME_RULE
    assert MergeMethod("ablation", combine="keep").rule(0, 4) == LayerRule("bipartite", "prune")
    assert MergeMethod("ablation", match="kth").rule(0, 4).kth == 4
    assert MergeMethod("ablation", match="evit").rule(0, 4).attention_feature == "cls_attn"
    assert MergeMethod("ablation", match="evit_fuse").rule(0, 4).combine == "fuse"
    assert MergeMethod("ablation", metric="x").rule(0, 4).attention_feature == "k"
    assert str(MergeMethod("ablation", metric="q", match="greedy")) == "ablation(metric='q', match='greedy')"
    for bad, message in [
        (dict(metric="z"), "metric='z' is not an ablation metric"),
        (dict(match="hungarian"), "match='hungarian' is not an ablation match"),
        (dict(combine="median"), "combine='median' is not an ablation combine"),
        (dict(match="evit", combine="mean"), "cannot be set for the pruning baseline"),
        (dict(match="evit", metric="q"), "EViT ranks tokens"),
        (dict(kth=3), "option of match='kth'"),
        (dict(match="kth", kth=1), "kth=1 must be an int >= 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            MergeMethod("ablation", **bad)
    with pytest.raises(ValueError, match="option of method 'ablation'"):
        MergeMethod("tome", metric="q")
    with pytest.raises(ValueError, match="not a merge method"):
        MergeMethod("ablations")
    assert "ablation" not in tome.METHODS  # tools that run every method do not run it


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)

ABLATIONS = [
    dict(metric="x"), dict(metric="q"), dict(metric="v"), dict(metric="k_cat"),
    dict(match="kth"), dict(match="greedy"), dict(match="random"),
    dict(combine="keep"), dict(combine="amax"), dict(combine="mean"),
    dict(match="random_drop"), dict(match="evit"), dict(match="evit_fuse"),
]
_ids = [",".join(f"{k}={v}" for k, v in a.items()) for a in ABLATIONS]


def _timm(seed=0, **overrides):
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY, **overrides})
    return trained_like_(model, seed).eval()


def _images(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_default_ablation_is_tome_bit_for_bit():
    model = _timm()
    x = _images()
    tome.apply_patch(model, r=3)
    with torch.no_grad():
        expected = model(x)
        model.tome_method = MergeMethod("ablation")
        assert torch.equal(model(x), expected)
    # The default asks the attention for nothing new: no per-module setting is written.
    assert all("_tome_feature" not in m.__dict__ for m in model.modules())


def reference_ablation_vit(model, x, r: List[int], ablation: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain forward of a timm ViT (class token, token pooling) under one ablation rule.

    Returns (logits, final sizes).
    """
    metric_name = ablation.get("metric", "k")
    match = ablation.get("match", "bipartite")
    combine = ablation.get("combine", "wavg")
    protected = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    batch, n, _ = x.shape
    size = torch.ones(batch, n, 1)
    for block, block_r in zip(model.blocks, r):
        attn = block.attn
        block_input = x
        h = block.norm1(x)
        qkv = attn.qkv(h).reshape(batch, h.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = reference_attention(q, k, v, size, attn.scale)
        x = x + attn.proj(o.transpose(1, 2).reshape(batch, h.shape[1], -1))
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale + size.log()[:, None, None, :, 0]
        cls_attention = logits.softmax(-1).mean(1)[:, 0]  # (batch, tokens)
        metric = {"x": block_input, "q": q.mean(1), "v": v.mean(1), "k": k.mean(1),
                  "k_cat": torch.cat(list(k.unbind(1)), dim=-1)}[metric_name]
        if match in ("evit", "evit_fuse"):
            gone, capped = reference_attentive(cls_attention, block_r, protected, match == "evit_fuse")
            xs, ss = [], []
            for b in range(batch):
                kept = [t for t in range(x.shape[1]) if t not in gone[b]]
                rows, sizes = [x[b, t] for t in kept], [size[b, t] for t in kept]
                if match == "evit_fuse" and capped:
                    w = cls_attention[b, gone[b]].unsqueeze(-1)
                    rows.append((x[b, gone[b]] * w).sum(0) / w.sum())
                    sizes.append(size[b, gone[b]].sum(0))
                xs.append(torch.stack(rows))
                ss.append(torch.stack(sizes))
            x, size = torch.stack(xs), torch.stack(ss)
        else:
            if match == "kth":
                groups, _ = reference_kth(metric, block_r, protected, 4)
            elif match == "greedy":
                groups, _ = reference_greedy(metric, block_r, protected)
            else:
                groups, _ = reference_match(metric, block_r, protected)
            if combine == "wavg":
                x, size = reference_merge(x, size, groups)
            else:
                # "keep": the destination (odd position in bipartite matching) keeps its value.
                keepers = [[next((t for t in g if t % 2 == 1), g[0]) if len(g) > 1 else g[0] for g in rows]
                           for rows in groups]
                x, size = reference_combine(x, size, groups, combine, keepers)
        x = x + block.mlp(block.norm2(x))
    return model.head(model.fc_norm(model.norm(x)[:, 0])), size


@pytest.mark.parametrize("ablation", [a for a in ABLATIONS if a.get("match") not in ("random", "random_drop")],
                         ids=[i for a, i in zip(ABLATIONS, _ids) if a.get("match") not in ("random", "random_drop")])
def test_timm_matches_plain_reference(ablation):
    model = _timm()
    x = _images()
    tome.apply_patch(model, r=3, method=MergeMethod("ablation", **ablation))
    with torch.no_grad():
        out = model(x)
        ref, ref_size = reference_ablation_vit(model, x, [3] * 4, ablation)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model._tome_info["size"], ref_size)


@pytest.mark.parametrize("ablation", ABLATIONS, ids=_ids)
def test_every_ablation_keeps_the_invariants(ablation):
    model = _timm()
    x = _images()
    with torch.no_grad():
        base = model(x)
    patched = copy.deepcopy(model)
    tome.apply_patch(patched, r=0, method=MergeMethod("ablation", **ablation))
    pruning = ablation.get("match") in ("random_drop", "evit")
    with torch.no_grad():
        assert torch.equal(patched(x), base)  # r = 0 is the unpatched model
        patched.r = 3
        torch.manual_seed(0)
        out = patched(x)
        size = patched._tome_info["size"]
        patched.tome_method = "tome"
        tome_out = patched(x)
    assert not torch.allclose(out, base, atol=1e-3)
    assert not torch.allclose(out, tome_out, atol=1e-5)  # the rule reached the blocks
    tokens = 1 + (32 // 8) ** 2
    assert size.shape[1] == tokens - 4 * 3  # every rule removes exactly the schedule's tokens
    assert torch.all(size[:, :1] == 1)  # the class token never merges
    if pruning:  # dropped patches are gone: every remaining token is one patch
        assert torch.all(size == 1)
    else:
        assert torch.all(size.sum(dim=1) == tokens)


@pytest.mark.parametrize("ablation", [dict(match="greedy", combine="amax"), dict(match="evit_fuse"), dict(metric="q")])
def test_sources_and_tracing(ablation):
    model = _timm()
    x = _images()
    tome.apply_patch(model, r=3, trace_source=True, method=MergeMethod("ablation", **ablation))
    with torch.no_grad():
        eager = model(x)
        source, size = model._tome_info["source"], model._tome_info["size"]
        assert torch.all(source.sum(dim=1) == 1) and torch.equal(source.sum(dim=2, keepdim=True), size)
        graph = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(graph(x), eager)


def test_pruning_refuses_source_tracing():
    model = _timm()
    tome.apply_patch(model, r=3, trace_source=True, method=MergeMethod("ablation", match="random_drop"))
    with pytest.raises(ValueError, match="drops patches"):
        model(_images())


def test_evit_needs_a_class_token():
    model = _timm(class_token=False, global_pool="avg")
    tome.apply_patch(model, r=3)
    with pytest.raises(ValueError, match="no protected class token"):
        model.tome_method = MergeMethod("ablation", match="evit")
    assert model.tome_method.name == "tome"


def test_switching_back_resets_the_attention():
    model = _timm()
    x = _images()
    tome.apply_patch(model, r=3)
    with torch.no_grad():
        expected = model(x)
        model.tome_method = MergeMethod("ablation", metric="v")
        assert all(block.attn._tome_feature == "v" for block in model.blocks)
        model.tome_method = "tome"
        assert torch.equal(model(x), expected)
    tome.remove_patch(model)
    assert all("_tome_feature" not in m.__dict__ for m in model.modules())


# ----------------------------------------------------------------------------- other families


def _torchvision():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=5)
    return trained_like_(model).eval()


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=2, num_labels=5)
    return trained_like_(ViTForImageClassification(config)).eval()


@pytest.mark.parametrize("ablation", [dict(metric="q"), dict(match="evit_fuse"), dict(metric="x", combine="mean")])
def test_torchvision_gets_the_ablations(ablation):
    model = _torchvision()
    x = _images()
    with torch.no_grad():
        base = model(x)
    tome.apply_patch(model, r=0, method=MergeMethod("ablation", **ablation))
    with torch.no_grad():
        assert torch.equal(model(x), base)
        model.r = 3
        out = model(x)
        model.tome_method = "tome"
        tome_out = model(x)
    assert not torch.allclose(out, tome_out, atol=1e-5)


def test_hf_refuses_attention_features_but_takes_block_inputs():
    model = _hf_vit()
    x = _images()
    tome.apply_patch(model, r=3)
    with pytest.raises(ValueError, match=r"report 'q'.*reports only the keys averaged over heads.*timm") as error:
        model.tome_method = MergeMethod("ablation", metric="q")
    assert model.tome_method.name == "tome"
    # The families named are those whose FamilySpec declares attention_features, from the registry.
    supported = str(error.value).split("Supported: ")[1]
    for name in ("timm (timm Attention)", "mae (timm Attention)", "torchvision (nn.MultiheadAttention)",
                 "swag (nn.MultiheadAttention)"):
        assert name in supported
    assert "hf (" not in supported
    with torch.no_grad():
        tome_out = model(x).logits
        model.tome_method = MergeMethod("ablation", metric="x")
        out = model(x).logits
    assert not torch.allclose(out, tome_out, atol=1e-5)
    assert model._tome_info["size"].shape[1] == 17 - 12


def test_padding_refuses_random_ablations_only():
    state = ToMeState(torch.ones(1, 6, 1), None, 6, 1, True, False, padded=True)
    for match in ("random", "random_drop"):
        with pytest.raises(ValueError, match=f"does not support key-padding masks.*{match}.*draws its tokens at random"):
            state.merge(torch.randn(1, 6, 4), torch.randn(1, 6, 4), 2, LayerRule(match, "drop" if "drop" in match else "wavg"))
    for rule in (LayerRule("greedy"), LayerRule("kth", kth=3), LayerRule("bipartite", "prune"), LayerRule("bipartite", "amax")):
        merged, _ = state.merge(torch.randn(1, 6, 4), torch.randn(1, 6, 4), 2, rule)
        assert merged.shape == (1, 4, 4)


# ----------------------------------------------------------------------------- the study's script


def _benchmark_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"
    spec = importlib.util.spec_from_file_location("ablations_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_study_table_reports_paired_differences():
    bench = _benchmark_module()
    hits = torch.tensor([True, False, True, True, False, True, False])
    assert torch.equal(bench._unpack(bench._pack(hits), len(hits)), hits)
    other = torch.tensor([True, True, True, False, False, True, True])
    d = bench.paired_delta(other, hits)
    assert math.isclose(d["delta"], 100 * (5 - 4) / 7)
    diff = other.double() - hits.double()
    assert math.isclose(d["se"], 100 * float(diff.std()) / math.sqrt(7))
    column = {"label": "10", "tokens": [65, 8], "flops_ratio": 0.51, "kind": "constant"}
    results = {
        "columns": [column], "half_flops_column": 0, "val_images": 7, "data_seed": 0, "model": "m.safetensors",
        "sha256": "abc", "unmerged_accuracy": 0.7, "timing_batch_size": 4, "threads": 1,
        "rows": [
            {"name": "ToMe", "group": "ToMe", "accuracy": [4 / 7], "hits": [bench._pack(hits)], "images_per_s": 10.0},
            {"name": "greedy", "group": "matching", "accuracy": [5 / 7], "hits": [bench._pack(other)],
             "images_per_s": 5.0},
        ],
    }
    table = bench.markdown_table(results)
    assert "| ToMe | ToMe | **57.14** | 10 |" in table
    assert f"| matching | greedy | 71.43 (+14.29 ± {d['se']:.2f}) | 5 |" in table
    assert "sha256 `abc...`" in table
