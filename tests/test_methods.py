"""Merge methods (tome, pitome, tofu): the invariants ToMe has, plain references for each
rule, and the one switch reaching every model family through the shared merge step."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tome
from tome._methods import LayerRule, MergeMethod
from tome.merge import match_bipartite, match_pitome, merge_mlerp, merge_prune, merge_source, merge_wavg, pitome_energy
from tome.patch._shared import ToMeState

from conftest import trained_like_
from reference import (
    reference_keepers,
    reference_match,
    reference_merge,
    reference_mlerp,
    reference_pitome_energy,
    reference_pitome_match,
    reference_prune,
    reference_timm_vit,
)

METHODS = ["tome", "pitome", "tofu"]

shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 8))
# With one channel every cosine is +-1: energies tie, and how ties rank is not part of the rule.
untied_shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(3, 8))


def _inputs(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, tokens, channels = shape
    metric = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    x = torch.randn(batch, tokens, 5, generator=generator, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=generator).to(torch.float64)
    return metric, x, size


def _groups_of(assignment, batch, tokens):
    """Groups (lists of input tokens per output token, in output order) of an assignment."""
    groups = []
    for b in range(batch):
        rows = [[] for _ in range(assignment.num_out)]
        for t in range(tokens):
            rows[int(assignment.dest[b, t])].append(t)
        groups.append(rows)
    return groups


# ----------------------------------------------------------------------------- the rules


@settings(max_examples=100, deadline=None)
@given(shape=shapes, protected=st.integers(0, 5), margin=st.floats(-0.95, 0.95), alpha=st.floats(0, 2), seed=st.integers(0, 9999))
def test_pitome_energy_matches_reference(shape, protected, margin, alpha, seed):
    metric, _, _ = _inputs(shape, seed)
    protected = min(protected, shape[1])
    energy = pitome_energy(metric, margin, alpha, protected)
    assert energy.shape == shape[:2]
    assert torch.all(energy[:, :protected] == -math.inf)
    expected = torch.tensor(reference_pitome_energy(metric, protected, margin, alpha), dtype=torch.float64)
    torch.testing.assert_close(energy[:, protected:], expected.view(shape[0], -1))


@settings(max_examples=150, deadline=None)
@given(shape=untied_shapes, r=st.integers(0, 30), protected=st.integers(0, 5), margin=st.floats(-0.95, 0.95),
       seed=st.integers(0, 9999))
def test_pitome_matching_matches_reference_and_keeps_invariants(shape, r, protected, margin, seed):
    metric, x, size = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    expected_r = max(0, min(r, (tokens - protected) // 2))
    assignment = match_pitome(metric, r, protected, margin, 1.0)
    groups, keepers, capped = reference_pitome_match(metric, r, protected, margin, 1.0)
    assert capped == expected_r
    if expected_r == 0:
        assert assignment is None
        return
    assert assignment.num_out == tokens - expected_r
    assert _groups_of(assignment, batch, tokens) == groups
    # One kept token per group; the reference's keepers (with two free tokens their
    # energies tie exactly, and which one is kept is not part of the rule).
    assert torch.all(assignment.merge(assignment.kept.unsqueeze(-1).double(), mode="sum") == 1)
    if tokens - protected > 2:
        kept = [[t for t in range(tokens) if assignment.kept[b, t]] for b in range(batch)]
        assert kept == [sorted(k) for k in keepers]
    merged, new_size = merge_wavg(assignment, x, size)
    ref_x, ref_size = reference_merge(x, size, groups)
    torch.testing.assert_close(merged, ref_x)
    torch.testing.assert_close(new_size, ref_size)
    # The same invariants as ToMe: prefix in front and untouched, sizes add up, sources partition.
    torch.testing.assert_close(merged[:, :protected], x[:, :protected])
    assert torch.equal(new_size.sum(dim=1), size.sum(dim=1))
    source = merge_source(assignment, x)
    assert torch.all(source.sum(dim=1) == 1)
    restored = assignment.unmerge(merged)
    assert torch.equal(restored, merged.gather(1, assignment.dest.unsqueeze(-1).expand(-1, -1, 5)))


def test_pitome_protects_isolated_tokens():
    # Twelve near-duplicates and four tokens pointing elsewhere: with r=4, only duplicates merge.
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 16, generator=generator)
    duplicates = base + 0.01 * torch.randn(1, 12, 16, generator=generator)
    isolated = torch.randn(1, 4, 16, generator=generator)
    metric = torch.cat([isolated[:, :2], duplicates, isolated[:, 2:]], dim=1)
    assignment = match_pitome(metric, 4, 0, margin=0.5)
    merged_away = (~assignment.kept[0]).nonzero().flatten().tolist()
    assert len(merged_away) == 4 and all(2 <= t < 14 for t in merged_away)
    # ToMe's alternating split has no such protection: with these positions it is free to pick any.
    assert match_bipartite(metric, 4, 0) is not None


@settings(max_examples=100, deadline=None)
@given(shape=shapes, r=st.integers(0, 30), protected=st.integers(0, 5), seed=st.integers(0, 9999))
def test_tofu_combines_match_reference(shape, r, protected, seed):
    metric, x, size = _inputs(shape, seed)
    batch, tokens, _ = shape
    protected = min(protected, tokens)
    assignment = match_bipartite(metric, r, protected)
    if assignment is None:
        assert reference_match(metric, r, protected)[1] == 0
        return
    groups = _groups_of(assignment, batch, tokens)  # the matching itself is checked in test_merge.py
    mlerp_x, mlerp_size = merge_mlerp(assignment, x, size)
    ref_x, ref_size = reference_mlerp(x, size, groups)
    torch.testing.assert_close(mlerp_x, ref_x)
    torch.testing.assert_close(mlerp_size, ref_size)
    prune_x, prune_size = merge_prune(assignment, x, size)
    ref_x, ref_size = reference_prune(x, size, groups, reference_keepers(groups))
    assert torch.equal(prune_x, ref_x)  # pruning copies values: exact
    torch.testing.assert_close(prune_size, ref_size)
    # Invariants: prefix untouched, sizes add up, MLERP keeps the largest norm of each group.
    assert torch.equal(prune_x[:, :protected], x[:, :protected])
    torch.testing.assert_close(mlerp_x[:, :protected], x[:, :protected])
    assert torch.equal(prune_size.sum(dim=1), size.sum(dim=1))
    largest = assignment.merge(x.norm(dim=-1, keepdim=True), mode="amax")
    torch.testing.assert_close(mlerp_x.norm(dim=-1, keepdim=True), largest)


def test_prune_equals_merge_on_exact_duplicates():
    x = torch.randn(2, 6, 4).repeat_interleave(2, dim=1)  # pairs (0,1), (2,3), ... identical
    assignment = match_bipartite(x, 6, 0)
    merged, size = merge_wavg(assignment, x)
    pruned, pruned_size = merge_prune(assignment, x)
    mlerped, _ = merge_mlerp(assignment, x)
    torch.testing.assert_close(pruned, merged)
    torch.testing.assert_close(mlerped, merged)
    assert torch.equal(pruned_size, size)


def test_prune_needs_a_kept_mask():
    from tome.merge import TokenAssignment

    assignment = TokenAssignment(torch.zeros(1, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="kept"):
        assignment.prune(torch.randn(1, 3, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_state_merge_in_low_precision(method, dtype):
    rule = MergeMethod(method).rule(1, 4)
    x = (100 * torch.randn(2, 33, 8)).to(dtype)
    state = ToMeState.start(33, 1, True, True)
    merged, state = state.merge(x, torch.randn(2, 33, 4), 8, rule)
    merged, state = state.merge(merged, torch.randn(2, 25, 4), 8, rule)
    assert merged.dtype == dtype and merged.shape == (2, 17, 8) and torch.isfinite(merged).all()
    assert torch.all(state.size.sum(dim=1) == 33)


# ----------------------------------------------------------------------------- padded batches

# Every rule that can run on a padded batch (all but the random matchings), as a block holds it.
PADDED_RULES = {
    "tome": LayerRule(),
    "pitome": LayerRule("pitome", "wavg", 0.5, 1.0),
    "tofu_prune": LayerRule("bipartite", "prune"),
    "tofu_mlerp": LayerRule("bipartite", "mlerp"),
    "kth": LayerRule("kth", kth=3),
    "greedy": LayerRule("greedy"),
    "amax": LayerRule("bipartite", "amax"),
    "mean": LayerRule("bipartite", "mean"),
    "evit": LayerRule("evit", "drop"),
    "evit_fuse": LayerRule("evit_fuse", "fuse"),
}


def _metric_of(x, rule, projection):
    """What a block would match on: a projection of the tokens, or for EViT a positive
    stand-in for the class token's attention, ``(batch, tokens, 1)``."""
    metric = x @ projection
    return metric[..., :1].exp() if rule.match.startswith("evit") else metric


@pytest.mark.parametrize("name", list(PADDED_RULES))
@pytest.mark.parametrize("seed", range(4))
def test_padded_state_merges_each_sample_as_it_merges_alone(name, seed):
    rule = PADDED_RULES[name]
    generator = torch.Generator().manual_seed(seed)
    lengths, schedule = [23, 16, 13], [4, 3, 2]  # within what the shortest sample allows (1 protected token)
    x = torch.randn(3, 23, 8, generator=generator, dtype=torch.float64)
    projection = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    valid = torch.arange(23) < torch.tensor(lengths).unsqueeze(1)
    x = torch.where(valid.unsqueeze(-1), x, 10 * torch.randn_like(x))  # padding holds anything
    batch = ToMeState(valid.unsqueeze(-1).double(), None, 23, 1, True, False, padded=True)
    singles = [ToMeState.start(n, 1, True, False) for n in lengths]
    merged_batch, merged_singles = x, [x[i : i + 1, :n] for i, n in enumerate(lengths)]
    for r in schedule:
        merged_batch, batch = batch.merge(merged_batch, _metric_of(merged_batch, rule, projection), r, rule)
        for i in range(3):
            merged_singles[i], singles[i] = singles[i].merge(
                merged_singles[i], _metric_of(merged_singles[i], rule, projection), r, rule
            )
    for i, (alone, state) in enumerate(zip(merged_singles, singles)):
        real = alone.shape[1]
        torch.testing.assert_close(merged_batch[i, :real], alone[0])
        torch.testing.assert_close(batch.size[i, :real], state.sizes(alone)[0].to(batch.size.dtype))
        assert torch.all(batch.size[i, real:] == 0)  # padding, behind the real tokens
    assert merged_batch.shape[1] == 23 - sum(schedule)


@pytest.mark.parametrize("name", list(PADDED_RULES))
def test_padded_state_without_padding_is_the_plain_state(name):
    # SigLIP 2 always passes a mask: with nothing padded, every rule must run as it does unpadded.
    rule = PADDED_RULES[name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 21, 8, generator=generator, dtype=torch.float64)
    metric = _metric_of(x, rule, torch.randn(8, 6, generator=generator, dtype=torch.float64))
    plain, plain_state = ToMeState.start(21, 1, True, False).merge(x, metric, 6, rule)
    padded, padded_state = ToMeState(torch.ones(2, 21, 1), None, 21, 1, True, False, padded=True).merge(
        x, metric, 6, rule
    )
    torch.testing.assert_close(padded, plain)
    torch.testing.assert_close(padded_state.size, plain_state.size.float())


def test_a_real_token_without_a_real_partner_keeps_its_value():
    # Sample 1 holds the protected token and one patch, at an even position (set A) with padding
    # at every odd one: beyond what its real tokens allow, the patch merges into padding. Whatever
    # the rule, the merged token is that patch (value and size): padding counts for nothing, and
    # nothing divides 0 by 0.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, generator=generator, dtype=torch.float64)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1] = False
    valid[1, [0, 2]] = True
    for name, rule in PADDED_RULES.items():
        state = ToMeState(valid.unsqueeze(-1).double(), None, 16, 1, True, False, padded=True)
        merged, state = state.merge(x, _metric_of(x, rule, torch.eye(8, 6, dtype=torch.float64)), 7, rule)
        assert torch.isfinite(merged).all(), name
        if rule.match.startswith("evit"):  # pruning: the patch is dropped (alone, r would be 0)
            continue
        torch.testing.assert_close(state.size[1, :, 0], torch.tensor([1.0, 1.0] + [0.0] * 7, dtype=torch.float64))
        torch.testing.assert_close(merged[1, :2], x[1, [0, 2]], msg=name)


def test_matchers_check_the_validity_mask():
    metric = torch.randn(2, 9, 4)
    for bad in (torch.ones(2, 9), torch.ones(2, 8, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(batch=2, tokens=9\)"):
            match_bipartite(metric, 2, 1, bad)
        with pytest.raises(ValueError, match="valid must be a bool tensor"):
            match_pitome(metric, 2, 1, valid=bad)


# ----------------------------------------------------------------------------- the setting


def test_method_options_and_errors():
    assert MergeMethod("pitome").rule(0, 12) == LayerRule("pitome", "wavg", 0.9, 1.0)
    assert MergeMethod("pitome").rule(6, 12).margin == pytest.approx(0.45)
    assert MergeMethod("pitome", margin=0.5, alpha=2.0).rule(11, 12) == LayerRule("pitome", "wavg", 0.5, 2.0)
    assert [MergeMethod("tofu").rule(i, 12).combine for i in range(5)] == ["prune"] * 3 + ["mlerp"] * 2
    assert MergeMethod("tofu", prune_layers=0).rule(0, 12).combine == "mlerp"
    assert MergeMethod().rule(3, 12) == LayerRule()
    with pytest.raises(ValueError, match=r"method='bogus'.*'tome', 'pitome', 'tofu'"):
        MergeMethod("bogus")
    with pytest.raises(ValueError, match="prune_layers=2 is an option of method 'tofu'"):
        MergeMethod("pitome", prune_layers=2)
    with pytest.raises(ValueError, match="margin=2"):
        MergeMethod("pitome", margin=2)
    with pytest.raises(ValueError, match="prune_layers=-1"):
        MergeMethod("tofu", prune_layers=-1)
    assert str(MergeMethod("tofu", prune_layers=2)) == "tofu(prune_layers=2)"


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def _timm(seed=0, **overrides):
    model = timm.create_model("vit_tiny_patch16_224", **{**TINY, **overrides})
    return trained_like_(model, seed).eval()


def _images(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_apply_patch_rejects_a_bad_method_and_leaves_the_model_alone():
    model = _timm()
    with pytest.raises(ValueError, match="'tome', 'pitome', 'tofu'"):
        tome.apply_patch(model, r=2, method="pitomee")
    assert not tome.patch.is_patched(model)
    tome.apply_patch(model, r=2)
    with pytest.raises(ValueError, match="not a merge method"):
        model.tome_method = 3
    assert model.tome_method == MergeMethod()


def test_setting_lives_on_the_model():
    model = _timm()
    tome.apply_patch(model, r=2, method="tofu")
    assert model.tome_method.name == "tofu" and model._tome_info["method"] == MergeMethod("tofu")
    assert "method=tofu" in repr(model)
    tome.patch.timm(model)  # re-patching keeps the method, like r
    assert model.tome_method.name == "tofu" and model.r == 2
    with tome.merging(model, 3, method="pitome"):
        assert model.tome_method.name == "pitome" and model.r == 3
    assert model.tome_method.name == "tofu" and model.r == 2
    clone = pickle.loads(pickle.dumps(model))
    assert clone.tome_method.name == "tofu"
    torch.testing.assert_close(clone(_images()), model(_images()))
    tome.remove_patch(model)
    assert all("_tome_rule" not in block.__dict__ for block in model.blocks)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("config", [{}, {"reg_tokens": 2, "class_token": True}, {"global_pool": "avg"}])
def test_timm_matches_plain_reference(method, config):
    model = _timm(**config)
    x = _images()
    tome.apply_patch(model, r=3, method=method, trace_source=True)
    with torch.no_grad():
        out = model(x)
        ref, ref_size, ref_source = reference_timm_vit(model, x, [3] * 4, method=method)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model._tome_info["size"], ref_size)
    assert torch.equal(model._tome_info["source"], ref_source)


def test_methods_differ_from_each_other():
    model = _timm()
    x = _images()
    tome.apply_patch(model, r=3)
    outs = {}
    for method in METHODS:
        model.tome_method = method
        outs[method] = model(x)
    assert not torch.allclose(outs["tome"], outs["pitome"])
    assert not torch.allclose(outs["tome"], outs["tofu"])


# ----------------------------------------------------------------------------- every family


def _torchvision():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=5)
    return trained_like_(model).eval(), _images()


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=2, num_labels=5)
    model = ViTForImageClassification(config)
    return trained_like_(model).eval(), _images()


def _hf_dinov2_registers():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=4, num_attention_heads=2, num_register_tokens=2)
    return trained_like_(Dinov2WithRegistersModel(config)).eval(), _images()


def _timm_deit():
    model = timm.create_model("deit_tiny_distilled_patch16_224", **TINY)
    return trained_like_(model).eval(), _images()


def _mae():
    model = timm.create_model("vit_tiny_patch16_224", **TINY, global_pool="avg", fc_norm=True)
    return trained_like_(model).eval(), _images()


FAMILIES = {"timm_deit": (_timm_deit, None), "mae": (_mae, "mae"), "torchvision": (_torchvision, None),
            "hf_vit": (_hf_vit, None), "hf_dinov2_registers": (_hf_dinov2_registers, None)}


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.last_hidden_state[:, 0]  # the class token: the same position with any r


@pytest.mark.parametrize("method", ["pitome", "tofu"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_gets_every_method(family, method):
    build, family_name = FAMILIES[family]
    model, x = build()
    with torch.no_grad():
        base = _output(model(x))
    patched = copy.deepcopy(model)
    tome.apply_patch(patched, r=0, method=method, family=family_name, trace_source=True)
    with torch.no_grad():
        assert torch.equal(_output(patched(x)), base)  # r=0 is the unpatched model
        patched.r = 3
        out = _output(patched(x))
        patched.tome_method = "tome"
        tome_out = _output(patched(x))
    assert not torch.allclose(out, base, atol=1e-3)
    assert not torch.allclose(out, tome_out, atol=1e-5)  # the method reached the blocks
    patched.tome_method = method
    with torch.no_grad():
        patched(x)
    info = patched._tome_info
    protected = info["protected_tokens"]
    size, source = info["size"], info["source"]
    tokens = source.shape[-1]
    assert torch.all(size.sum(dim=1) == tokens)
    assert torch.all(size[:, :protected] == 1)
    assert torch.all(source.sum(dim=1) == 1)
    assert torch.equal(source.sum(dim=2, keepdim=True), size)
    assert torch.equal(source[:, :protected, :protected], torch.eye(protected).expand(x.shape[0], -1, -1))
    assert sum(info["r"]) == tokens - size.shape[1]


@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_traced_graphs_follow_the_method(method):
    model = _timm()
    tome.apply_patch(model, r=3, method=method)
    x = _images()
    with torch.no_grad():
        eager = model(x)
        graph = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(graph(x), eager)
        with warnings.catch_warnings():  # TracerWarnings: the merge is recorded for this input size
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), eager)
