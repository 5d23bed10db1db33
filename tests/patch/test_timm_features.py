"""timm's feature APIs on a patched model: forward_features/forward_head pairs,
forward_intermediates, get_intermediate_layers and features_only models carry the
merge state and return patch-grid features."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import tome

from test_timm import images, make

GRID = 4  # 32 px images, 8 px patches


def _truncated(model, depth: int, r):
    """A copy of ``model`` with only its first ``depth`` blocks, patched with ``r``."""
    short = tome.remove_patch(copy.deepcopy(model))
    short.blocks = short.blocks[:depth]
    return tome.apply_patch(short, r=r, trace_source=True)


@pytest.mark.parametrize("name", ["token", "registers", "no_class_avg", "map"])
@pytest.mark.parametrize("output_fmt", ["NCHW", "NLC"])
@torch.no_grad()
def test_intermediates_are_each_blocks_tokens_on_the_patch_grid(name, output_fmt):
    model = tome.apply_patch(make(name), r=3)
    x = images()
    final, intermediates = model.forward_intermediates(x, indices=[0, 1, 2], norm=True, output_fmt=output_fmt)
    prefix = model.num_prefix_tokens
    for depth, got in enumerate(intermediates, start=1):
        short = _truncated(model, depth, [3] * depth)
        tokens = short.forward_features(x)
        expected = tome.unmerge_tokens(tokens, short._tome_info["source"])[:, prefix:]
        if output_fmt == "NCHW":
            expected = expected.reshape(2, GRID, GRID, -1).permute(0, 3, 1, 2)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The final features are the model's own, merged, and its head pools them exactly.
    torch.testing.assert_close(final, model.forward_features(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.forward_head(final), model(x), atol=1e-6, rtol=0)


@torch.no_grad()
def test_intermediates_without_merging_are_timms():
    model = make("registers")
    x = images()
    expected = model.forward_intermediates(x, indices=2, return_prefix_tokens=True)
    tome.apply_patch(model, r=0)
    got = model.forward_intermediates(x, indices=2, return_prefix_tokens=True)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    for (a, pa), (b, pb) in zip(got[1], expected[1]):
        assert torch.equal(a, b) and torch.equal(pa, pb)


@torch.no_grad()
def test_intermediate_options_match_timms_layout():
    model = tome.apply_patch(make("registers"), r=2)
    x = images()
    only = model.forward_intermediates(x, indices=1, intermediates_only=True, return_prefix_tokens=True)
    assert isinstance(only, list) and len(only) == 1
    spatial, prefix = only[0]
    assert spatial.shape == (2, 32, GRID, GRID) and prefix.shape == (2, model.num_prefix_tokens, 32)
    out = model.forward_intermediates(x, indices=[1, 2], output_dict=True, return_prefix_tokens=True, stop_early=True)
    assert set(out) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
    with pytest.raises(ValueError, match="NHWC"):
        model.forward_intermediates(x, output_fmt="NHWC")


@torch.no_grad()
def test_get_intermediate_layers_and_features_only():
    x = images()
    model = tome.apply_patch(make("token"), r=3)
    expected = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    layers = model.get_intermediate_layers(x, n=[1, 2], reshape=True)
    for got, want in zip(layers, expected):
        assert torch.equal(got, want)
    flat = model.get_intermediate_layers(x, n=1)
    assert flat[0].shape == (2, GRID * GRID, 32)

    features = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, features_only=True, out_indices=(1, 2),
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
    ).eval()
    features.model.load_state_dict(make("token").state_dict(), strict=False)
    unmerged = features(x)
    tome.apply_patch(features.model, r=3)
    maps = features(x)
    assert [m.shape for m in maps] == [(2, 32, GRID, GRID)] * 2
    assert not torch.allclose(maps[1], unmerged[1])
    for got, want in zip(maps, features.model.forward_intermediates(x, indices=(1, 2), intermediates_only=True)):
        assert torch.equal(got, want)


@torch.no_grad()
def test_forward_head_pools_the_features_it_is_given():
    model = tome.apply_patch(make("class_avg"), r=3)
    x1, x2 = images(seed=1), images(seed=2)
    f1 = model.forward_features(x1)
    model(x2)  # a forward in between must not change what f1's sizes are
    torch.testing.assert_close(model.forward_head(f1), model(x1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="forward_features"):
        model.forward_head(f1.clone())
    # Unmerged features (same token count as the input) need no sizes.
    model.r = 0
    f0 = model.forward_features(x1).clone()
    model.r = 3
    torch.testing.assert_close(model.forward_head(f0), tome.remove_patch(copy.deepcopy(model))(x1), atol=1e-6, rtol=0)


def test_forward_head_of_detached_features_says_what_works():
    model = tome.apply_patch(make("class_avg"), r=3)
    x = images(seed=1)
    features = model.forward_features(x)  # with gradients
    with pytest.raises(ValueError, match=r"\.detach\(\), a copy.*forward_head\(features\).*torch\.no_grad\(\)"):
        model.forward_head(features.detach())
    # What the message offers works, and agrees with the model.
    expected = model(x).detach()
    torch.testing.assert_close(model.forward_head(features).detach(), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_forward_head_of_a_class_token_model_needs_no_sizes():
    model = tome.apply_patch(make("token"), r=3)
    x = images()
    torch.testing.assert_close(model.forward_head(model.forward_features(x).clone()), model(x), atol=1e-6, rtol=0)
