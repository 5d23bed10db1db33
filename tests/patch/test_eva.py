"""The timm Eva family (DINOv3, EVA-02): exactness at r=0, agreement with a plain
reference at r>0 (rotary positions of merged tokens included), the rotary settings,
dense features, training and bad input. What every family must do (hooks, pickling,
remove_patch, compile, settings) is in test_conformance.py."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import tome
from tome.patch._eva import DEFAULT_ROPE_METRIC, rope_angles, rope_table

from conftest import trained_like_
from reference import reference_attention, reference_compose_sources, reference_match, reference_merge

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)

# name -> (timm architecture, overrides)
CONFIGS = {
    "dinov3": ("vit_small_patch16_dinov3", {}),  # class + 4 registers, avg pool, LayerScale, dynamic size
    "dinov3_token": ("vit_small_patch16_dinov3", dict(global_pool="token")),
    "dinov3_qkv_bias": ("vit_small_patch16_dinov3", dict(qkv_bias=True)),
    "eva02": ("eva02_tiny_patch14_224", dict(ref_feat_shape=(4, 4))),  # abs + rope, SwiGLU, interleaved
    "eva02_no_class": ("eva02_tiny_patch14_224", dict(ref_feat_shape=(4, 4), class_token=False)),
    "eva02_swiglu_norm": ("eva02_tiny_patch14_224", dict(scale_mlp=True)),
    "eva02_map": ("eva02_tiny_patch14_224", dict(global_pool="map")),
    "post_norm": ("eva02_tiny_patch14_224", dict(use_post_norm=True)),
    "no_rope": ("eva02_tiny_patch14_224", dict(use_rot_pos_emb=False)),
}
# Configurations the plain reference forward covers.
REFERENCE_CONFIGS = ["dinov3", "dinov3_token", "dinov3_qkv_bias", "eva02", "eva02_no_class"]


def make(name: str = "dinov3", seed: int = 0, **overrides) -> torch.nn.Module:
    architecture, config = CONFIGS[name]
    model = timm.create_model(architecture, pretrained=False, **{**TINY, **config, **overrides})
    return trained_like_(model, seed).eval()


def images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- a plain reference


def _coords(model: torch.nn.Module, height: int, width: int) -> torch.Tensor:
    """(height * width, 2) patch coordinates in the units the model's rotary module uses."""
    rope = model.rope
    if type(rope).__name__ == "RotaryEmbeddingDinoV3":  # patch centres mapped to [-1, 1] per axis
        rows = (torch.arange(height) + 0.5) / height * 2 - 1
        cols = (torch.arange(width) + 0.5) / width * 2 - 1
    else:  # EVA-02: patch indices, rescaled to the reference grid
        rows, cols = torch.arange(height).float(), torch.arange(width).float()
        if rope.ref_feat_shape is not None:
            rows, cols = rows / height * rope.ref_feat_shape[0], cols / width * rope.ref_feat_shape[1]
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def _rotate(x: torch.Tensor, coords: torch.Tensor, model: torch.nn.Module, half: bool) -> torch.Tensor:
    """Rotate x (B, H, N, d) by the 2-D positions coords (B, N, 2), written out from RoPE's definition."""
    rope = model.rope
    if type(rope).__name__ == "RotaryEmbeddingDinoV3":
        freqs = 2 * math.pi / rope.periods
    else:
        freqs = rope.bands
    angles = (coords[..., None] * freqs).flatten(-2)  # (B, N, d/2): axis 0's frequencies, then axis 1's
    angles = angles[:, None]
    if half:  # pairs (i, i + d/2)
        first, second = x.chunk(2, dim=-1)
        cos, sin = angles.cos(), angles.sin()
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    even, odd = x[..., 0::2], x[..., 1::2]  # interleaved pairs (2i, 2i + 1)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def reference_eva(model, x, schedule, prop_attn=True, position="mean", metric="plain"):
    """Plain ToMe forward of a timm Eva (pre-norm EvaBlock, fused qkv): returns (logits, size, source)."""
    protected = model.num_prefix_tokens
    feats = model.patch_embed(x)
    height, width = feats.shape[1:3] if model.dynamic_img_size else model.patch_embed.grid_size
    x, _ = model._pos_embed(feats)
    x = model.norm_pre(x)
    batch, n, _ = x.shape
    size = torch.ones(batch, n, 1)
    source = torch.eye(n).expand(batch, -1, -1)
    coords = torch.cat([torch.zeros(protected, 2), _coords(model, height, width)]).expand(batch, -1, -1)
    for block, block_r in zip(model.blocks, schedule):
        attn = block.attn
        h = block.norm1(x)
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = torch.nn.functional.linear(h, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(batch, h.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        plain_k = k
        if model.rope is not None:
            patch_coords = coords[:, protected:]
            q = torch.cat([q[:, :, :protected], _rotate(q[:, :, protected:], patch_coords, model, attn.rotate_half)], 2)
            k = torch.cat([k[:, :, :protected], _rotate(k[:, :, protected:], patch_coords, model, attn.rotate_half)], 2)
        o = reference_attention(q, k, v, size if prop_attn else None, attn.scale)
        o = attn.proj(attn.norm(o.transpose(1, 2).reshape(batch, h.shape[1], -1)))
        x = x + (block.gamma_1 * o if block.gamma_1 is not None else o)
        groups, _ = reference_match((k if metric == "rotated" else plain_k).mean(1), block_r, protected)
        if position == "mean":
            coords, _ = reference_merge(coords, size, groups)
        else:  # the destination: the odd-indexed member of a merged group, or the token left alone
            coords = torch.stack([
                torch.stack([coords[b, [i for i in g if i % 2 == 1][0] if len(g) > 1 else g[0]] for g in token_groups])
                for b, token_groups in enumerate(groups)
            ])
        x, size = reference_merge(x, size, groups)
        source = reference_compose_sources(source, groups)
        m = block.mlp(block.norm2(x))
        x = x + (block.gamma_2 * m if block.gamma_2 is not None else m)
    x = model.norm(x)
    if model.global_pool == "token":
        pooled = x[:, 0]
    else:
        feats, s = x[:, protected:], size[:, protected:]
        pooled = (feats * s).sum(1) / s.sum(1)
    return model.head(model.fc_norm(pooled)), size, source


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(CONFIGS))
def test_r0_equals_unpatched_bit_for_bit(name):
    model = make(name)
    x = images()
    with torch.no_grad():
        expected = model(x)
        expected_maps = model.forward_intermediates(x, indices=2, intermediates_only=True)
        tome.apply_patch(model)
        assert tome.patch.family_of(model) == "eva" and model.r == 0
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        for got, want in zip(model.forward_intermediates(x, indices=2, intermediates_only=True), expected_maps):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
@pytest.mark.parametrize("position", ["mean", "destination"])
@pytest.mark.parametrize("metric", ["plain", "rotated"])
def test_r_positive_matches_reference(name, position, metric):
    model = make(name)
    x = images()
    schedule = [3, 2, 4]
    with torch.no_grad():
        unmerged = model(x)
        expected, size, source = reference_eva(model, x, schedule, position=position, metric=metric)
        tome.patch.eva(model, trace_source=True, rope_position=position, rope_metric=metric)
        model.r = schedule
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model._tome_info["size"], size)
    torch.testing.assert_close(model._tome_info["source"], source)
    assert (out - unmerged).abs().max() > 1e-2


def test_the_position_rule_matters():
    # Mean and destination positions give different answers once tokens merged twice or more.
    x = images()
    outs = []
    for position in ("mean", "destination"):
        model = tome.patch.eva(make("dinov3"), rope_position=position)
        model.r = 4
        with torch.no_grad():
            outs.append(model(x))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["dinov3", "eva02"])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)])
def test_rope_angles_reproduce_the_model_table(name, grid):
    model = make(name, dynamic_img_size=True)
    table = rope_table(rope_angles(model.rope, grid)[None], model.blocks[0].attn.rotate_half)[0, 0]
    torch.testing.assert_close(table, model.rope.get_embed(shape=list(grid)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dinov3", "eva02"])
def test_dynamic_img_size_non_square(name):
    model = make(name, dynamic_img_size=True)
    x = images(height=24, width=48)  # a 3 x 6 patch grid
    with torch.no_grad():
        base = model(x)
        tome.apply_patch(model)
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)
        model.r = 3
        expected, _, _ = reference_eva(model, x, [3, 3, 3], metric=DEFAULT_ROPE_METRIC)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["dinov3", "eva02_map", "post_norm", "no_rope", "eva02_swiglu_norm"])
def test_schedules_pooling_and_head(name):
    model = tome.apply_patch(make(name), r=(3, -1.0), trace_source=True)
    x = images()
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        again = model.forward_head(feats)
    assert model._tome_info["r"] == [5, 3, 0] or model._tome_info["r"][0] > 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(again, out)
    size = model._tome_info["size"]
    assert torch.all(size[:, : model.num_prefix_tokens] == 1)  # prefix tokens never merge
    assert float(size.sum(1).max()) == feats.shape[1] + sum(model._tome_info["r"])


def test_size_weighted_average_pool_equals_plain_mean_when_nothing_merged():
    model = tome.apply_patch(make("dinov3"), r=[0, 0, 4])
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        size = model._tome_info["size"][:, 5:]
        pooled = model.forward_head(feats, pre_logits=True)
    manual = (feats[:, 5:] * size).sum(1) / size.sum(1)
    torch.testing.assert_close(pooled, model.fc_norm(manual))


# ----------------------------------------------------------------------------- dense features


@pytest.mark.parametrize("name", ["dinov3", "eva02_no_class"])
def test_forward_intermediates_full_grid_consistent_with_forward(name):
    model = tome.apply_patch(make(name), r=3, trace_source=True)
    x = images()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[0, 2], norm=True)
        out = model(x)
        source = model._tome_info["source"]
        feats = model.forward_features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 2
    torch.testing.assert_close(model.forward_head(final), out)
    # The last map is the model's own merged output, each patch reading its token.
    dense = tome.unmerge_tokens(feats, source)[:, model.num_prefix_tokens:]
    torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), dense)
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True,
                                      return_prefix_tokens=True)
    if model.num_prefix_tokens:
        assert nlc[0][0].shape == (2, 16, 32) and nlc[0][1].shape == (2, model.num_prefix_tokens, 32)
    else:
        assert nlc[0].shape == (2, 16, 32)
    with pytest.raises(ValueError, match="'NHWC'"):
        model.forward_intermediates(x, output_fmt="NHWC")


# ----------------------------------------------------------------------------- settings and training


def test_block_called_on_its_own_merges_with_the_table_it_is_given():
    model = make("dinov3")
    block = model.blocks[0]
    with torch.no_grad():
        tokens, rope = model._pos_embed(model.patch_embed(images()))
        expected = block(tokens, rope=rope)
        tome.apply_patch(model, r=0)
        torch.testing.assert_close(block(tokens, rope=rope), expected, rtol=0, atol=0)
        model.r = 3
        merged = block(tokens, rope=rope)
    assert merged.shape[1] == tokens.shape[1] - 3


def test_repatching_changes_the_metric_and_keeps_r():
    model = tome.patch.eva(make("dinov3"), rope_metric="rotated")
    model.r = 3
    tome.patch.eva(model, rope_metric="plain")
    assert model.r == 3 and model._tome_info["rope_metric"] == "plain"
    assert type(model.blocks[0].attn).__name__ == "ToMeEvaAttention"
    assert not type(model.blocks[0].attn)._tome_rotated_metric


def test_gradient_checkpointing_and_training():
    model = tome.apply_patch(make("dinov3"), r=3)
    model.train()
    x = images()
    losses = []
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------- bad input


def test_bad_settings_raise_value_error_naming_the_value():
    with pytest.raises(ValueError, match="'middle'"):
        tome.patch.eva(make("dinov3"), rope_position="middle")
    with pytest.raises(ValueError, match="'keys'"):
        tome.patch.eva(make("dinov3"), rope_metric="keys")


def test_mask_with_merging_raises():
    model = tome.apply_patch(make("dinov3"), r=2)
    mask = torch.zeros(1, 1, 21, 21)
    with pytest.raises(ValueError, match="attn_mask"):
        model(images(), attn_mask=mask)
    model.r = 0
    with torch.no_grad():
        model(images(), attn_mask=mask)  # timm's own masked forward


def test_unsupported_variants_raise_type_error():
    mixed = timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False, **TINY)
    with pytest.raises(TypeError, match="RotaryEmbeddingMixed"):
        tome.apply_patch(mixed)
    pe = timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, **{**TINY, "embed_dim": 64})
    with pytest.raises(TypeError, match="AttentionRope"):
        tome.apply_patch(pe)
    assert not tome.patch.is_patched(pe)


def test_training_with_patch_dropout_refuses_merging():
    model = tome.apply_patch(make("dinov3", patch_drop_rate=0.25), r=2)
    model.train()
    with pytest.raises(ValueError, match="patch dropout"):
        model(images())
    model.eval()
    with torch.no_grad():
        model(images())


def test_features_only_model_gives_full_grids():
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, features_only=True, out_indices=(1, 2),
                              **{**TINY, "num_classes": 0})
    model = trained_like_(model).eval()
    x = images()
    with torch.no_grad():
        base = model(x)
        tome.apply_patch(model.model, r=3)
        merged = model(x)
    assert [tuple(m.shape) for m in merged] == [tuple(m.shape) for m in base] == [(2, 32, 4, 4)] * 2
    assert (merged[1] - base[1]).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_every_merge_method_reaches_eva_blocks(method):
    model = make()
    x = torch.randn(2, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    with torch.no_grad():
        before = model(x)
        tome.apply_patch(model, r=4)
        merged = model(x)
        model.tome_method = method
        other = model(x)
        model.r = 0
        assert torch.equal(model(x), before)
    assert (other - merged).abs().max() > 1e-4  # the method changes which tokens merge, or how
