"""Invariants of the matching and merging functions, and agreement with the plain reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tome.merge import (
    bipartite_soft_matching,
    do_nothing,
    kth_bipartite_soft_matching,
    match_bipartite,
    merge_source,
    merge_wavg,
    random_bipartite_soft_matching,
)

from reference import reference_compose_sources, reference_match, reference_merge

shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(1, 40),  # tokens
    st.integers(1, 8),  # channels
)


def _inputs(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, tokens, channels = shape
    metric = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    x = torch.randn(batch, tokens, 5, generator=generator, dtype=torch.float64)
    return metric, x


@settings(max_examples=150, deadline=None)
@given(shape=shapes, r=st.integers(0, 30), protected=st.integers(0, 5), seed=st.integers(0, 10_000))
def test_bipartite_invariants(shape, r, protected, seed):
    metric, x = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    merge, unmerge = bipartite_soft_matching(metric, r, protected_tokens=protected)
    expected_r = max(0, min(r, (tokens - protected) // 2))

    merged, size = merge_wavg(merge, x)
    assert merged.shape == (batch, tokens - expected_r, 5)
    # Sizes sum to the original token count.
    assert torch.all(size.sum(dim=1) == tokens)
    # Source rows partition the original tokens: every original token in exactly one row.
    source = merge_source(merge, x)
    assert source.shape == (batch, tokens - expected_r, tokens)
    assert torch.all(source.sum(dim=1) == 1)
    assert torch.equal(source.sum(dim=2, keepdim=True), size)
    # Prefix tokens never merge and stay at the front in order.
    assert torch.equal(merged[:, :protected], x[:, :protected])
    assert torch.all(size[:, :protected] == 1)
    # unmerge inverts merge: each original token gets the value of the token it ended up in.
    restored = unmerge(merged)
    assert restored.shape == x.shape
    assert torch.equal(restored, torch.einsum("bno,bnc->boc", source, merged))
    assert torch.equal(restored[:, :protected], x[:, :protected])
    assert torch.equal(merge(restored, mode="amax"), merged)


# At least 3 channels: with 1 channel normalised metrics are +-1 and every score ties.
shapes_no_ties = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(3, 8))


@settings(max_examples=100, deadline=None)
@given(shape=shapes_no_ties, r=st.integers(0, 30), protected=st.integers(0, 4), seed=st.integers(0, 10_000))
def test_bipartite_matches_reference(shape, r, protected, seed):
    metric, x = _inputs(shape, seed)
    protected = min(protected, shape[1])
    size = torch.rand(shape[0], shape[1], 1, dtype=torch.float64) * 3 + 1
    merge, _ = bipartite_soft_matching(metric, r, protected_tokens=protected)
    merged, merged_size = merge_wavg(merge, x, size)
    groups, _ = reference_match(metric, r, protected)
    ref_x, ref_size = reference_merge(x, size, groups)
    torch.testing.assert_close(merged, ref_x)
    torch.testing.assert_close(merged_size, ref_size)
    eye = torch.eye(shape[1], dtype=torch.float64).expand(shape[0], -1, -1)
    torch.testing.assert_close(merge_source(merge, x), reference_compose_sources(eye, groups))


def test_r_zero_is_identity():
    metric, x = _inputs((2, 17, 4), 0)
    merge, unmerge = bipartite_soft_matching(metric, 0, class_token=True)
    assert merge is do_nothing and unmerge is do_nothing
    assert torch.equal(merge_wavg(merge, x)[0], x)


def test_class_and_distill_token_flags():
    metric, x = _inputs((2, 21, 4), 1)
    for class_token, distill_token, protected in [(True, False, 1), (True, True, 2), (False, False, 0)]:
        merge, unmerge = bipartite_soft_matching(metric, 7, class_token, distill_token)
        ref, _ = bipartite_soft_matching(metric, 7, protected_tokens=protected)
        assert torch.equal(merge(x), ref(x))
        # The published unmerge put the wrong token at position 1 with a distillation token.
        restored = unmerge(merge(x))
        assert torch.equal(restored[:, :protected], x[:, :protected])


def test_output_order_prefix_then_kept_a_then_b():
    """[prefix | unmerged A in order | B in order], as ALGORITHM.md step 8 (and the published code with a class token)."""
    directions = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 5.5])  # token 4 points exactly like token 5
    metric = torch.stack([directions.cos(), directions.sin()], dim=-1).unsqueeze(0)
    assignment = match_bipartite(metric, 1, protected_tokens=1)
    # A = {0 (class), 2, 4, 6}, B = {1, 3, 5}; token 4 merges into token 5.
    assert assignment.dest.tolist() == [[0, 3, 1, 4, 5, 5, 2]]
    # Two protected tokens: the distillation token (B[0]) stays at position 1.
    assignment = match_bipartite(metric, 1, protected_tokens=2)
    assert assignment.dest.tolist() == [[0, 1, 2, 4, 5, 5, 3]]


def test_merge_modes_reduce_each_group():
    metric, x = _inputs((2, 10, 3), 2)
    merge, _ = bipartite_soft_matching(metric, 4)
    dest = match_bipartite(metric, 4, protected_tokens=0).dest  # output slot of every token
    reducers = {
        "sum": lambda t: t.sum(0), "mean": lambda t: t.mean(0), "amax": lambda t: t.amax(0),
        "amin": lambda t: t.amin(0), "prod": lambda t: t.prod(0),
    }
    for mode, reduce in reducers.items():
        out = merge(x, mode=mode)
        assert out.shape == (2, 6, x.shape[-1])
        for b in range(2):
            for slot in range(6):
                members = x[b, dest[b] == slot]
                assert len(members) >= 1
                torch.testing.assert_close(out[b, slot], reduce(members), msg=f"mode={mode}")
    with pytest.raises(ValueError, match="'median'"):
        merge(x, mode="median")


def test_bad_metric_and_protected():
    with pytest.raises(ValueError, match="shape"):
        bipartite_soft_matching(torch.randn(4, 3), 1)
    with pytest.raises(ValueError, match="protected_tokens"):
        bipartite_soft_matching(torch.randn(1, 4, 3), 1, protected_tokens=-1)
    with pytest.raises(ValueError, match="protected_tokens"):
        bipartite_soft_matching(torch.randn(1, 4, 3), 1, protected_tokens=9)


def test_gradients_flow_through_merge():
    metric, x = _inputs((2, 12, 4), 3)
    x.requires_grad_(True)
    merge, _ = bipartite_soft_matching(metric, 5)
    merged, _ = merge_wavg(merge, x)
    merged.sum().backward()
    # Each output is the mean of its group, so every member of a group of n gets gradient 1/n.
    dest = match_bipartite(metric, 5, protected_tokens=0).dest
    group_size = (dest.unsqueeze(2) == dest.unsqueeze(1)).sum(dim=2).to(x.dtype)  # (batch, tokens)
    torch.testing.assert_close(x.grad, (1 / group_size).unsqueeze(-1).expand_as(x))
    assert (group_size > 1).any()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, k=st.integers(0, 6), seed=st.integers(0, 10_000))
def test_kth_bipartite(shape, k, seed):
    metric, x = _inputs(shape, seed)
    batch, tokens, _ = shape
    merge, unmerge = kth_bipartite_soft_matching(metric, k)
    merged, size = merge_wavg(merge, x)
    expected = tokens // k if k > 1 and tokens // k > 0 else tokens
    assert merged.shape[1] == expected
    assert torch.all(size.sum(dim=1) == tokens)
    if k > 1 and tokens // k > 0:
        # Destinations are the last token of each group of k; they keep their own value when alone.
        dst = torch.arange(k - 1, (tokens // k) * k, k)
        assert unmerge(merged).shape == x.shape
        assert torch.equal(unmerge(merged)[:, dst], merged)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, r=st.integers(0, 25), protected=st.integers(0, 3), seed=st.integers(0, 10_000))
def test_random_bipartite(shape, r, protected, seed):
    metric, x = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    generator = torch.Generator().manual_seed(seed)
    merge, unmerge = random_bipartite_soft_matching(metric, r, generator, protected_tokens=protected)
    expected_r = max(0, min(r, (tokens - protected) // 2))
    merged, size = merge_wavg(merge, x)
    assert merged.shape[1] == tokens - expected_r
    assert torch.all(size.sum(dim=1) == tokens)
    assert torch.equal(merged[:, :protected], x[:, :protected])
    # The generator controls the draw.
    again, _ = random_bipartite_soft_matching(metric, r, torch.Generator().manual_seed(seed), protected_tokens=protected)
    assert torch.equal(again(x), merge(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_metrics_pick_the_float32_partners(dtype):
    # Keys of a ViT-B block (197 tokens, 64 channels) have many near-tied similarities: scored in
    # fp16/bf16 they round together and other partners win. Every matcher scores in float32, so a
    # half-precision model merges the tokens its float32-upcast keys would merge.
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(32, 197, 64, generator=generator).to(dtype)
    low = match_bipartite(metric, 16, protected_tokens=1)
    high = match_bipartite(metric.float(), 16, protected_tokens=1)
    assert torch.equal(low.dest, high.dest)
    x = torch.randn(32, 197, 8, generator=generator).to(dtype)
    merge, _ = bipartite_soft_matching(metric, 16, class_token=True)
    assert merge(x).dtype == dtype  # the tokens merge in their own dtype
