"""The visual-token reduction methods of ``tome.visual_tokens``: the invariants every method
keeps, a brute-force or hand-worked reference per method, and what each method is for."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tome.merge import bipartite_soft_matching, merge_source, merge_wavg
from tome.visual_tokens import (
    METHODS,
    VIDEO_METHODS,
    VISIONZIP_CONTEXTUAL,
    VisualContext,
    conditional_dpp,
    instruction_relevance,
    reduce_tokens,
)

SELECTIONS = ("random", "divprune", "cdpruner", "fastv")
MERGES = ("tome", "pool", "visionzip")
CASES = [  # (grid, budget)
    ((1, 6, 6), 1),
    ((1, 6, 6), 7),
    ((1, 6, 6), 35),
    ((1, 5, 7), 12),
    ((3, 4, 4), 10),
    ((4, 4, 4), 20),
    ((2, 3, 5), 17),
]


def _context(num_tokens, channels, grid=None, seed=0, **fields):
    g = torch.Generator().manual_seed(seed + 1)
    values = dict(
        grid=grid,
        metric=torch.randn(num_tokens, 12, generator=g),
        attention=torch.rand(num_tokens, generator=g),
        text=torch.randn(5, channels, generator=g),
        generator=torch.Generator().manual_seed(seed),
    )
    values.update(fields)
    return VisualContext(**values)


def _tokens(num_tokens, channels=16, seed=0):
    return torch.randn(num_tokens, channels, generator=torch.Generator().manual_seed(seed))


def _first_sources(source):
    return [int(row.nonzero()[0]) for row in source]


def _groups(source):
    """The reduction as a set of frozensets of original indices."""
    return {frozenset(row.nonzero().squeeze(1).tolist()) for row in source}


def test_every_method_is_registered_and_accepts_video():
    assert set(METHODS) == {"random", "pool", "tome", "divprune", "visionzip", "cdpruner", "fastv"}
    assert VIDEO_METHODS == frozenset(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("grid,budget", CASES)
def test_invariants(method, grid, budget):
    num_tokens = math.prod(grid)
    x = _tokens(num_tokens)
    out = reduce_tokens(method, x, budget, _context(num_tokens, x.shape[1], grid))
    _check(method, x, budget, out)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_invariants_on_a_blank_video(method):
    # every token the same: all similarities tie, the DPP has rank 1, relevance is flat
    x = torch.ones(2 * 6 * 6, 16)
    context = _context(72, 16, (2, 6, 6), metric=torch.ones(72, 4), attention=torch.ones(72), text=torch.ones(3, 16))
    for budget in (1, 7, 40):
        out = reduce_tokens(method, x, budget, context)
        _check(method, x, budget, out)
        assert torch.equal(out.features, torch.ones_like(out.features))


def _check(method, x, budget, out):
    """The promises of every Reduction (see the module docstring)."""
    num_tokens = x.shape[0]
    k = out.features.shape[0]
    if method == "pool":
        assert 1 <= k <= budget
    else:
        assert k == budget
    assert out.source.shape == (k, num_tokens)
    assert set(out.source.unique().tolist()) <= {0.0, 1.0}
    per_original = out.source.sum(0)
    assert per_original.max() <= 1  # every original in at most one row
    first = _first_sources(out.source)
    assert first == sorted(first) and len(set(first)) == k  # ordered by first source token
    if out.index is not None:  # a selection
        assert out.source.sum(-1).tolist() == [1.0] * k
        assert torch.equal(out.source.argmax(-1), out.index)
        assert torch.equal(out.features, x[out.index])
    else:  # a merge: every original in exactly one row, features = source-weighted means
        assert method in MERGES
        assert per_original.tolist() == [1.0] * num_tokens
        means = (out.source @ x) / out.source.sum(-1, keepdim=True)
        torch.testing.assert_close(out.features, means, rtol=1e-5, atol=1e-5)
    if method in SELECTIONS:
        assert out.index is not None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_budget_of_all_tokens_is_the_identity(method):
    x = _tokens(36)
    for budget in (36, 50):
        out = reduce_tokens(method, x, budget, _context(36, 16, (1, 6, 6)))
        assert torch.equal(out.index, torch.arange(36))
        assert torch.equal(out.features, x)
        assert torch.equal(out.source, torch.eye(36))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_deterministic_given_a_generator(method):
    x = _tokens(48)
    a = reduce_tokens(method, x, 9, _context(48, 16, (3, 4, 4), seed=3))
    b = reduce_tokens(method, x, 9, _context(48, 16, (3, 4, 4), seed=3))
    assert torch.equal(a.source, b.source) and torch.equal(a.features, b.features)


def test_random_depends_on_the_generator_only():
    x = _tokens(64)
    draws = {tuple(reduce_tokens("random", x, 8, _context(64, 16, seed=s)).index.tolist()) for s in range(5)}
    assert len(draws) > 1


def test_random_is_uniform():
    # every token kept with probability budget / N: 4 of 16 over 2000 draws
    x = _tokens(16)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(16)
    for _ in range(2000):
        counts[reduce_tokens("random", x, 4, VisualContext(generator=g)).index] += 1
    assert (counts / 2000 - 0.25).abs().max() < 0.04  # 4 standard errors


def test_pool_averages_the_quadrants():
    x = _tokens(16)
    out = reduce_tokens("pool", x, 4, VisualContext(grid=(1, 4, 4)))
    quadrants = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert [sorted(row.nonzero().squeeze(1).tolist()) for row in out.source] == quadrants
    torch.testing.assert_close(out.features, torch.stack([x[q].mean(0) for q in quadrants]))


# ---------------------------------------------------------------------------
# tome


def _tome_reference(x, metric, budget):
    """Repeated rounds of the public ``bipartite_soft_matching`` with a dense source map,
    size-weighted metrics, and the tokens put back in first-source order between rounds."""
    m, size, source = metric[None].float(), None, None
    while m.shape[1] > budget:
        r = min(m.shape[1] - budget, m.shape[1] // 2)
        merge, _ = bipartite_soft_matching(m, r)
        source = merge_source(merge, m, source)
        m, size = merge_wavg(merge, m, size)
        order = torch.tensor(_first_sources(source[0])).argsort()
        m, size, source = m[:, order], size[:, order], source[:, order]
    source = source[0]
    return source, (source @ x) / source.sum(-1, keepdim=True)


@pytest.mark.parametrize("num_tokens,budget", [(36, 1), (36, 9), (36, 20), (49, 5), (64, 31)])
@pytest.mark.parametrize("use_metric", [False, True])
def test_tome_equals_repeated_bipartite_rounds(num_tokens, budget, use_metric):
    x = _tokens(num_tokens, seed=num_tokens)
    context = _context(num_tokens, 16) if use_metric else VisualContext()
    metric = context.metric if use_metric else x
    out = reduce_tokens("tome", x, budget, context)
    source, features = _tome_reference(x, metric, budget)
    assert torch.equal(out.source, source)
    torch.testing.assert_close(out.features, features, rtol=1e-5, atol=1e-5)


def test_tome_merges_similar_tokens():
    # 4 clusters of 9 tokens each, scattered over the sequence: at 12 tokens (3 per
    # cluster) no merged token mixes two clusters, and their features are the clusters'.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    label = torch.randperm(36, generator=g) % 4
    x = centres[label] + 0.05 * torch.randn(36, 16, generator=g)
    out = reduce_tokens("tome", x, 12, VisualContext())
    for group in _groups(out.source):
        assert len({int(label[j]) for j in group}) == 1
    assert (out.features[:, None] - centres[None]).norm(dim=-1).min(-1).values.max() < 0.5  # centres lie > 20 apart
    # a random grouping of the same sizes would mix them
    shuffled = out.source[:, torch.randperm(36, generator=g)]
    assert any(len({int(label[j]) for j in group}) > 1 for group in _groups(shuffled))


@pytest.mark.parametrize("frames", [2, 3, 4, 8])
def test_tome_reduces_a_static_video_to_one_frame_exactly(frames):
    frame = _tokens(12)
    video = frame.repeat(frames, 1)
    out = reduce_tokens("tome", video, 12, VisualContext(grid=(frames, 3, 4)))
    torch.testing.assert_close(out.features, frame, rtol=0, atol=1e-6)
    expected = {frozenset(p + 12 * t for t in range(frames)) for p in range(12)}
    assert _groups(out.source) == expected
    # without the grid, plain bipartite matching does not find that (frames of 12 tokens:
    # even and odd positions of each frame land in A and B together)
    plain = reduce_tokens("tome", video + 1e-3 * _tokens(12 * frames, seed=1), 12, VisualContext())
    assert _groups(plain.source) != expected


def test_tome_temporal_rule_merges_the_most_similar_places_first():
    # Two frames; at 5 of the 12 places the second frame barely changes, elsewhere it does.
    first, noise = _tokens(12, seed=1), _tokens(12, seed=2)
    still = torch.tensor([0, 3, 4, 8, 11])
    second = noise.clone()
    second[still] = first[still] + 0.01 * noise[still]
    out = reduce_tokens("tome", torch.cat([first, second]), 19, VisualContext(grid=(2, 3, 4)))
    merged = {g for g in _groups(out.source) if len(g) > 1}
    assert merged == {frozenset((p, p + 12)) for p in still.tolist()}


def test_tome_temporal_then_spatial():
    # 3 frames, budget below one frame: frames 0+1 merge, then (0+1)+2, then spatial rounds.
    g = torch.Generator().manual_seed(4)
    video = torch.randn(3 * 16, 8, generator=g)
    out = reduce_tokens("tome", video, 6, VisualContext(grid=(3, 4, 4)))
    assert out.features.shape[0] == 6
    for group in _groups(out.source):  # every place's three frames stay together
        places = {j % 16 for j in group}
        assert group == {p + 16 * t for p in places for t in range(3)}


# ---------------------------------------------------------------------------
# divprune


def _max_min_reference(x, budget):
    """DivPrune by the definition, O(N^2 K) in plain Python loops over a distance table."""
    unit = F.normalize(x.double(), dim=-1)
    dist = (1 - unit @ unit.t()).tolist()
    n = len(dist)
    first = max(range(n), key=lambda i: min(dist[i][j] for j in range(n) if j != i))
    chosen = [first]
    while len(chosen) < budget:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(dist[i][j] for j in chosen)))
    return chosen


@pytest.mark.parametrize("num_tokens,budget,seed", [(20, 1, 0), (20, 6, 1), (40, 13, 2), (30, 29, 3)])
def test_divprune_equals_the_max_min_loop(num_tokens, budget, seed):
    x = _tokens(num_tokens, channels=8, seed=seed)
    out = reduce_tokens("divprune", x, budget, VisualContext())
    assert out.index.tolist() == sorted(_max_min_reference(x, budget))


def test_divprune_keeps_one_token_per_cluster():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    label = torch.arange(60) % 5
    sizes = [30, 15, 8, 5, 2]  # unequal clusters: a top-k or a random pick would miss the small ones
    label = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    x = centres[label] + 0.02 * torch.randn(60, 32, generator=g)
    out = reduce_tokens("divprune", x, 5, VisualContext())
    assert sorted(label[out.index].tolist()) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------
# cdpruner


def _logdet_greedy(kernel, budget):
    """Greedy MAP of a DPP by explicit log-determinants of the chosen submatrix."""
    chosen = []
    for _ in range(budget):
        best = max((i for i in range(kernel.shape[0]) if i not in chosen),
                   key=lambda i: torch.logdet(kernel[chosen + [i]][:, chosen + [i]]).item())
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed,budget", [(0, 1), (1, 4), (2, 7), (3, 10)])
def test_cdpruner_equals_brute_force_logdet_greedy(seed, budget):
    x = _tokens(12, channels=16, seed=seed)
    text = _tokens(3, channels=16, seed=seed + 100)
    out = reduce_tokens("cdpruner", x, budget, VisualContext(text=text))
    # the kernel by the paper's definition, in float64
    unit = F.normalize(x.double(), dim=-1)
    relevance = (unit @ F.normalize(text.double(), dim=-1).t()).mean(-1)
    relevance = (relevance - relevance.min()) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * (unit @ unit.t()) * relevance[None, :]
    assert out.index.tolist() == sorted(_logdet_greedy(kernel, budget))


def test_conditional_dpp_order_and_fill_beyond_the_rank():
    # 3-D tokens: the similarity has rank 3, so only 3 picks add volume; the rest are
    # filled by quality, highest first.
    g = torch.Generator().manual_seed(0)
    unit = F.normalize(torch.randn(10, 3, generator=g), dim=-1)
    quality = torch.rand(10, generator=g) + 0.5
    chosen = conditional_dpp(unit, quality, 7).tolist()
    kernel = quality[:, None].double() * (unit @ unit.t()).double() * quality[None, :].double()
    assert chosen[:3] == _logdet_greedy(kernel, 3)
    rest = [i for i in quality.argsort(descending=True).tolist() if i not in chosen[:3]]
    assert chosen[3:] == rest[:4]
    assert len(set(chosen)) == 7


def test_cdpruner_follows_the_instruction():
    # Two groups of tokens along two directions; the text names one of them.
    g = torch.Generator().manual_seed(0)
    a, b = torch.eye(32)[0], torch.eye(32)[1]
    x = torch.cat([a + 0.3 * torch.randn(20, 32, generator=g), b + 0.3 * torch.randn(20, 32, generator=g)])
    for direction, group in ((a, range(0, 20)), (b, range(20, 40))):
        text = direction[None] + 0.05 * torch.randn(4, 32, generator=g)
        out = reduce_tokens("cdpruner", x, 6, VisualContext(text=text))
        assert sum(int(i) in group for i in out.index) >= 5
    # the relevance itself: the tokens of the named group score higher
    relevance = instruction_relevance(x, a[None])
    assert relevance[:20].mean() > relevance[20:].mean() + 0.3
    assert relevance.min() == 0 and relevance.max() == 1


def test_cdpruner_with_equally_relevant_tokens_is_a_plain_dpp():
    # text orthogonal to every token: the relevance is flat, so the choice is pure
    # diversity (one token per cluster), not the first tokens
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g)
    label = torch.arange(40) // 10
    x = torch.cat([centres[label] + 0.05 * torch.randn(40, 8, generator=g), torch.zeros(40, 8)], dim=1)
    text = torch.cat([torch.zeros(3, 8), torch.randn(3, 8, generator=g)], dim=1)
    assert torch.equal(instruction_relevance(x, text), torch.ones(40))
    out = reduce_tokens("cdpruner", x, 4, VisualContext(text=text))
    assert sorted(label[out.index].tolist()) == [0, 1, 2, 3]


def test_instruction_relevance_theta_mixing():
    x, text = _tokens(10), _tokens(2, seed=5)
    plain = instruction_relevance(x, text)
    mixed = instruction_relevance(x, text, theta=0.5)
    torch.testing.assert_close(mixed, torch.exp(0.5 * plain))
    assert torch.equal(plain.argsort(), instruction_relevance(x, text, theta=0.9).argsort())
    with pytest.raises(ValueError, match="theta=1.0"):
        instruction_relevance(x, text, theta=1.0)


# ---------------------------------------------------------------------------
# fastv, visionzip


def test_fastv_is_the_top_k_of_the_attention():
    x = _tokens(50)
    attention = torch.rand(50, generator=torch.Generator().manual_seed(7))
    out = reduce_tokens("fastv", x, 12, VisualContext(attention=attention))
    assert out.index.tolist() == sorted(attention.topk(12).indices.tolist())


@pytest.mark.parametrize("num_tokens,budget", [(64, 3), (64, 4), (64, 16), (100, 64), (40, 39)])
@pytest.mark.parametrize("use_metric", [False, True])
def test_visionzip_dominant_and_contextual_tokens(num_tokens, budget, use_metric):
    x = _tokens(num_tokens)
    context = _context(num_tokens, 16)
    if not use_metric:
        context.metric = None
    out = reduce_tokens("visionzip", x, budget, context)
    share, out_of = VISIONZIP_CONTEXTUAL
    contextual = int(budget * share / out_of + 0.5)
    dominant = set(context.attention.topk(budget - contextual).indices.tolist())
    singles = {next(iter(g)) for g in _groups(out.source) if len(g) == 1}
    assert dominant <= singles
    if contextual == 0:
        assert out.index is not None and set(out.index.tolist()) == dominant
        return
    assert out.index is None
    rest = [i for i in range(num_tokens) if i not in dominant]
    targets = rest[:: len(rest) // contextual][:contextual]
    metric = F.normalize(context.metric if use_metric else x, dim=-1)
    expected = {t: {t} for t in targets}
    for i in rest:
        if i not in targets:
            expected[max(targets, key=lambda t: float(metric[i] @ metric[t]))].add(i)
    groups = _groups(out.source)
    assert {frozenset(g) for g in expected.values()} <= groups
    for row, features in zip(out.source, out.features):  # each contextual token = its group's mean
        members = row.nonzero().squeeze(1)
        torch.testing.assert_close(features, x[members].mean(0), rtol=1e-5, atol=1e-6)


def test_visionzip_split_of_the_budget():
    # the paper's LLaVA budgets: 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30
    x = _tokens(576, channels=8)
    context = _context(576, 8)
    for budget, contextual in ((64, 10), (128, 20), (192, 30)):
        out = reduce_tokens("visionzip", x, budget, context)
        assert int((out.size > 1).sum()) <= contextual
        assert int((out.size == 1).sum()) >= budget - contextual
        assert out.features.shape[0] == budget


# ---------------------------------------------------------------------------
# bad input


def test_unknown_method_names_it():
    with pytest.raises(ValueError, match="'tofu'.*expected one of"):
        reduce_tokens("tofu", _tokens(4), 2)


@pytest.mark.parametrize("method,field", [("cdpruner", "text"), ("visionzip", "attention"), ("fastv", "attention")])
def test_missing_context_names_method_and_field(method, field):
    context = _context(36, 16)
    setattr(context, field, None)
    with pytest.raises(ValueError, match=f"'{method}' needs context.{field}"):
        reduce_tokens(method, _tokens(36), 5, context)


@pytest.mark.parametrize("budget", [0, -3, 2.5, True, None])
def test_bad_budget_names_it(budget):
    with pytest.raises(ValueError, match=f"budget={budget!r}"):
        reduce_tokens("tome", _tokens(8), budget)


@pytest.mark.parametrize("method,field,value,match", [
    ("fastv", "attention", torch.rand(35), r"context.attention of shape \(tokens=36,\)"),
    ("visionzip", "attention", torch.rand(36, 1), r"context.attention of shape \(tokens=36,\)"),
    ("tome", "metric", torch.rand(30, 4), r"context.metric of shape \(tokens=36, D\)"),
    ("divprune", "metric", torch.rand(36), r"context.metric of shape \(tokens=36, D\)"),
    ("cdpruner", "text", torch.rand(3, 15), r"context.text must be \(text tokens >= 1, channels=16\)"),
    ("cdpruner", "text", torch.rand(0, 16), r"got \(0, 16\)"),
])
def test_context_of_the_wrong_shape_is_named(method, field, value, match):
    context = _context(36, 16)
    setattr(context, field, value)
    with pytest.raises(ValueError, match=match):
        reduce_tokens(method, _tokens(36), 5, context)


def test_grid_that_does_not_hold_the_tokens():
    with pytest.raises(ValueError, match=r"context.grid=\(2, 3, 3\) holds 18 tokens"):
        reduce_tokens("tome", _tokens(20), 5, VisualContext(grid=(2, 3, 3)))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_features(method):
    x = _tokens(36).to(torch.bfloat16)
    out = reduce_tokens(method, x, 8, _context(36, 16, (1, 6, 6)))
    assert out.features.dtype == torch.bfloat16 and out.source.dtype == torch.bfloat16
    if out.index is None:
        means = (out.source.float() @ x.float()) / out.source.float().sum(-1, keepdim=True)
        torch.testing.assert_close(out.features.float(), means, rtol=1e-2, atol=1e-2)

