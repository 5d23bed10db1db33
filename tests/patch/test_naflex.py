"""The timm NaFlexVit family: exactness at r=0, padded variable-resolution batches that
merge per sample (each sample as if run alone), the fixed-size path, training and bad
input. What every family must do (hooks, pickling, remove_patch, compile, settings) is
in test_conformance.py."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.naflexvit import batch_patchify

import tome

from conftest import trained_like_

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)

# name -> (timm architecture, overrides)
CONFIGS = {
    "gap": ("naflexvit_base_patch16_gap", {}),  # 4 registers, LayerScale, avg pool, learned pos embed
    "map": ("naflexvit_base_patch16_map", {}),  # 1 register, attention pooling
    "siglip": ("naflexvit_base_patch16_siglip", {}),  # no prefix tokens, attention pooling
    "factorized": ("naflexvit_base_patch16_parfac_gap", {}),  # factorized, aspect-preserving pos embed
    "token": ("naflexvit_base_patch16_radio_v3", {}),  # class + 7 registers, class-token pooling
    "max": ("naflexvit_base_patch16_gap", dict(global_pool="max", fc_norm=False)),
    "dinov3": ("vit_small_patch16_dinov3", dict(use_naflex=True)),  # EvaBlock, RoPE (DINOv3), 4 registers
    "eva02": ("eva02_tiny_patch14_224", dict(use_naflex=True, ref_feat_shape=(4, 4))),  # RoPE (axial), SwiGLU
}
PATCH = TINY["patch_size"]


def make(name: str = "gap", seed: int = 0, **overrides) -> torch.nn.Module:
    architecture, config = CONFIGS[name]
    model = timm.create_model(architecture, pretrained=False, **{**TINY, **config, **overrides})
    return trained_like_(model, seed).eval()


def image(height: int, width: int, seed: int) -> torch.Tensor:
    """One image of ``height x width`` patches, ``(1, 3, height * PATCH, width * PATCH)``."""
    return torch.randn(1, 3, height * PATCH, width * PATCH, generator=torch.Generator().manual_seed(seed))


def naflex(images, length=None):
    """A NaFlex batch as timm's collator lays it out: each image's patches in row-major
    order, then padding. Returns ``(patches, patch_coord, patch_valid)``."""
    pieces = []
    for img in images:
        patches, (height, width) = batch_patchify(img, (PATCH, PATCH))
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        pieces.append((patches[0], torch.stack([rows, cols], dim=-1).reshape(-1, 2)))
    length = length or max(p.shape[0] for p, _ in pieces)
    patches = torch.zeros(len(pieces), length, pieces[0][0].shape[-1])
    coord = torch.zeros(len(pieces), length, 2, dtype=torch.long)
    valid = torch.zeros(len(pieces), length, dtype=torch.bool)
    for index, (p, c) in enumerate(pieces):
        patches[index, : p.shape[0]], coord[index, : c.shape[0]], valid[index, : p.shape[0]] = p, c, True
    return patches, coord, valid


def alone(model, img):
    patches, coord, valid = naflex([img])
    return model(patches, patch_coord=coord, patch_valid=valid)


GRIDS = [(4, 4), (3, 3), (2, 5)]  # 16, 9 and 10 real patches, padded to 16


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_r0_equals_unpatched_bit_for_bit(name):
    model = make(name)
    x = image(4, 4, 1).expand(2, -1, -1, -1).contiguous()
    batch = naflex([image(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    expected = model(x)
    expected_padded = model(*batch[:1], patch_coord=batch[1], patch_valid=batch[2])
    tome.apply_patch(model)
    assert tome.patch.family_of(model) == "naflexvit" and model.r == 0
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(batch[0], patch_coord=batch[1], patch_valid=batch[2]), expected_padded, rtol=0, atol=0)


# ----------------------------------------------------------------------------- padded batches


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("schedule", [2, [3, 1, 2]])
@torch.no_grad()
def test_each_sample_of_a_padded_batch_merges_as_if_alone(name, schedule):
    model = tome.apply_patch(make(name), r=schedule)
    images = [image(h, w, i) for i, (h, w) in enumerate(GRIDS)]
    patches, coord, valid = naflex(images)
    out = model(patches, patch_coord=coord, patch_valid=valid)
    for index, img in enumerate(images):
        torch.testing.assert_close(out[index], alone(model, img)[0], rtol=0, atol=2e-5)
    model.r = 0
    assert (model(patches, patch_coord=coord, patch_valid=valid) - out).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["gap", "dinov3"])
@torch.no_grad()
def test_padded_batch_as_if_alone_without_proportional_attention(name):
    model = tome.patch.naflexvit(make(name), prop_attn=False)
    model.r = [3, 1, 2]  # within what every sample's real tokens allow
    images = [image(h, w, i) for i, (h, w) in enumerate(GRIDS)]
    patches, coord, valid = naflex(images)
    out = model(patches, patch_coord=coord, patch_valid=valid)
    for index, img in enumerate(images):
        torch.testing.assert_close(out[index], alone(model, img)[0], rtol=0, atol=2e-5)


# Every merge method, and the ablations that can run padded (all but the random matchings).
METHODS = {
    "tome": "tome",
    "pitome": "pitome",
    "tofu": tome.MergeMethod("tofu", prune_layers=2),  # pruning in blocks 0-1, MLERP in block 2
    "kth": tome.MergeMethod("ablation", match="kth", kth=3),
    "greedy": tome.MergeMethod("ablation", match="greedy"),
    "keep": tome.MergeMethod("ablation", combine="keep"),
    "amax": tome.MergeMethod("ablation", combine="amax"),
    "mean": tome.MergeMethod("ablation", combine="mean"),
    "metric_x": tome.MergeMethod("ablation", metric="x"),
    "metric_q": tome.MergeMethod("ablation", metric="q"),
    "evit": tome.MergeMethod("ablation", match="evit"),
    "evit_fuse": tome.MergeMethod("ablation", match="evit_fuse"),
}
METHOD_CASES = [(m, n) for m in ("tome", "pitome", "tofu") for n in ("gap", "siglip", "dinov3")] + [
    (m, "token") for m in METHODS  # class token (EViT ranks by its attention), 7 registers
]


@pytest.mark.parametrize("method, name", METHOD_CASES)
@torch.no_grad()
def test_every_method_merges_each_padded_sample_as_if_alone(method, name):
    # [3, 1, 2] stays within what every sample's real tokens allow (9 patches: at most 4 in block 0).
    model = tome.apply_patch(make(name), r=[3, 1, 2], method=METHODS[method])
    images = [image(h, w, i) for i, (h, w) in enumerate(GRIDS)]
    patches, coord, valid = naflex(images)
    out = model(patches, patch_coord=coord, patch_valid=valid)
    assert model._tome_info["r"] == [3, 1, 2]
    if not method.startswith("evit"):  # pruning drops patches and their sizes; every merge keeps them
        torch.testing.assert_close(model._tome_info["size"].sum(dim=(1, 2)),
                                   valid.sum(1).float() + model.num_prefix_tokens)
    for index, img in enumerate(images):
        torch.testing.assert_close(out[index], alone(model, img)[0], rtol=0, atol=2e-5)
    model.r = 0
    unmerged = model(patches, patch_coord=coord, patch_valid=valid)
    for index in (1, 2):  # the samples with padding merge too
        assert (out[index] - unmerged[index]).abs().max() > 1e-2


@pytest.mark.parametrize("match", ["random", "random_drop"])
@torch.no_grad()
def test_random_ablations_refuse_padded_batches_and_say_why(match):
    model = tome.apply_patch(make("token"), r=2, method=tome.MergeMethod("ablation", match=match))
    patches, coord, valid = naflex([image(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    with pytest.raises(ValueError, match=f"{match}.*draws its tokens at random.*padded length"):
        model(patches, patch_coord=coord, patch_valid=valid)
    assert torch.isfinite(alone(model, image(3, 3, 1))).all()  # no padding: runs


@pytest.mark.parametrize("method", ["tome", "pitome", "tofu", "greedy"])
@torch.no_grad()
def test_a_sample_of_padding_only_stays_finite_and_average_pooling_matches_r0(method):
    # Sample 1 is padding only: the "gap" model average-pools no patch at all (timm: 0), the
    # "siglip" model (no prefix tokens, attention pooling) has not one key to attend to.
    images = [image(4, 4, 0), image(3, 3, 1)]
    patches, coord, valid = naflex(images)
    valid[1] = False
    for name in ("gap", "siglip"):
        model = tome.apply_patch(make(name), r=[3, 1, 2], method=METHODS[method])
        for block in model.blocks:
            block.attn.fused_attn = False  # the explicit softmax: a row with no key would be 0 / 0
        out = model(patches, patch_coord=coord, patch_valid=valid)
        assert torch.isfinite(out).all(), name
        torch.testing.assert_close(out[0], alone(model, images[0])[0], rtol=0, atol=2e-5)
        model.r = 0
        if name == "gap":  # what r = 0 gives, exactly
            torch.testing.assert_close(out[1], model(patches, patch_coord=coord, patch_valid=valid)[1], rtol=0, atol=0)


@torch.no_grad()
def test_padding_never_merges_with_real_tokens_and_has_no_size():
    model = tome.apply_patch(make("gap"), r=[3, 2, 2], trace_source=True)
    patches, coord, valid = naflex([image(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    model(patches, patch_coord=coord, patch_valid=valid)
    size, source = model._tome_info["size"], model._tome_info["source"]
    prefix = model.num_prefix_tokens
    real = torch.cat([torch.ones(3, prefix, dtype=torch.bool), valid], dim=1).float()
    # Sizes add up to each sample's real tokens; a token is all real patches or all padding.
    torch.testing.assert_close(size.sum(dim=(1, 2)), real.sum(1))
    holds_real = source @ real.unsqueeze(-1)
    holds_any = source.sum(-1, keepdim=True)
    assert torch.all((holds_real == 0) | (holds_real == holds_any))
    torch.testing.assert_close(holds_real, size)
    # Real tokens first, padding behind them.
    is_real = (size[..., 0] > 0).int()
    assert torch.all(is_real[:, 1:] <= is_real[:, :-1])


@torch.no_grad()
def test_what_padding_holds_does_not_matter():
    model = tome.apply_patch(make("dinov3"), r=3)
    patches, coord, valid = naflex([image(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    out = model(patches, patch_coord=coord, patch_valid=valid)
    scrambled = torch.where(valid[..., None], patches, 10 * torch.randn_like(patches))
    torch.testing.assert_close(model(scrambled, patch_coord=coord, patch_valid=valid), out, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_sample_with_too_few_real_tokens_for_r():
    # r = 4 in the first block; 4 registers in front (even), so set A holds a sample's real
    # patches at even positions. Alone, r is capped at half the real patches.
    model = tome.apply_patch(make("gap"), r=[4, 0, 0])
    images = [image(4, 4, 0), image(2, 2, 1), image(1, 5, 2)]
    patches, coord, valid = naflex(images)
    out = model(patches, patch_coord=coord, patch_valid=valid)
    assert torch.isfinite(out).all()
    # Padding never counts, whatever merged into what.
    torch.testing.assert_close(model._tome_info["size"].sum(dim=(1, 2)), torch.tensor([20.0, 8.0, 9.0]))
    torch.testing.assert_close(out[0], alone(model, images[0])[0], rtol=0, atol=2e-5)
    # 4 patches: both of its set-A patches merge, in the batch (plus 2 padding tokens) as alone (r capped at 2).
    torch.testing.assert_close(out[1], alone(model, images[1])[0], rtol=0, atol=2e-5)
    assert model._tome_info["r"] == [2, 0, 0]
    # 5 patches: alone r is capped at 2, in the batch all 3 of its set-A patches merge: not the same.
    assert (out[2] - alone(model, images[2])[0]).abs().max() > 1e-3


@torch.no_grad()
def test_key_padding_attn_mask_equals_patch_valid():
    model = tome.apply_patch(make("gap"), r=2)
    patches, coord, valid = naflex([image(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    expected = model(patches, patch_coord=coord, patch_valid=valid)
    from timm.models.naflexvit import create_attention_mask

    for symmetric in (True, False):
        mask = create_attention_mask(valid, model.num_prefix_tokens, symmetric=symmetric, q_len=None if symmetric else 1)
        got = model({"patches": patches, "patch_coord": coord, "patch_valid": valid, "attn_mask": mask})
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    causal = torch.zeros(20, 20).masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    with pytest.raises(ValueError, match="not a key-padding mask"):
        model(patches, patch_coord=coord, patch_valid=valid, attn_mask=causal)


# ----------------------------------------------------------------------------- fixed-size path, features


@pytest.mark.parametrize("name", ["gap", "map", "token", "max", "dinov3", "eva02"])
@torch.no_grad()
def test_fixed_size_images_schedules_and_head(name):
    model = make(name)
    x = torch.randn(2, 3, 32, 48)  # 4 x 6 patches
    base = model(x)
    tome.apply_patch(model, r=(3, -1.0), trace_source=True)
    out = model(x)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats), out)
    assert model._tome_info["r"] == [6, 3, 0]
    assert feats.shape[1] == 24 + model.num_prefix_tokens - 9
    assert (out - base).abs().max() > 1e-2
    size = model._tome_info["size"]
    assert torch.all(size[:, : model.num_prefix_tokens] == 1)
    torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((2,), 24.0 + model.num_prefix_tokens))


@pytest.mark.parametrize("name", ["gap", "dinov3"])
@torch.no_grad()
def test_forward_intermediates_full_grid_and_naflex_rows(name):
    model = tome.apply_patch(make(name), r=3, trace_source=True)
    x = torch.randn(2, 3, 32, 32)
    final, maps = model.forward_intermediates(x, indices=[0, 2], norm=True)
    torch.testing.assert_close(model.forward_head(final), model(x))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 4)] * 2
    # The last map is the model's own merged output, each patch reading its token.
    dense = tome.unmerge_tokens(model.forward_features(x), model._tome_info["source"])[:, model.num_prefix_tokens:]
    torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), dense)
    patches, coord, valid = naflex([image(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    result = model.forward_intermediates({"patches": patches, "patch_coord": coord, "patch_valid": valid},
                                         indices=1, output_fmt="NLC", output_dict=True)
    assert [tuple(m.shape) for m in result["image_intermediates"]] == [(3, 16, 32)]
    assert torch.equal(result["patch_valid"], valid)
    with pytest.raises(ValueError, match="NLC"):
        model.forward_intermediates({"patches": patches, "patch_coord": coord, "patch_valid": valid})


@torch.no_grad()
def test_padded_rope_batch_stopping_before_the_first_merge():
    # The blocks run (stop_early) merge nothing, but padding already makes the state carry sizes:
    # the rotary positions must be carried all the same (they were not, and block 0 raised).
    model = tome.apply_patch(make("dinov3"), r=[0, 0, 2])
    patches, coord, valid = naflex([image(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    inputs = {"patches": patches, "patch_coord": coord, "patch_valid": valid}
    early = model.forward_intermediates(inputs, indices=[0], stop_early=True, output_fmt="NLC", intermediates_only=True)
    full = model.forward_intermediates(inputs, indices=[0], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(early[0], full[0], rtol=0, atol=0)
    model.r = 0  # nothing merges before block 2: block 0's real rows are the unpatched model's
    expected = model.forward_intermediates(inputs, indices=[0], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(early[0][valid], expected[0][valid], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- training


def test_gradient_checkpointing_and_training():
    model = tome.apply_patch(make("gap"), r=3)
    model.train()
    patches, coord, valid = naflex([image(h, w, i) for i, (h, w) in enumerate(GRIDS)])
    losses, grads = [], []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        loss = model(patches, patch_coord=coord, patch_valid=valid).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


# ----------------------------------------------------------------------------- bad input


def test_unsupported_variants_raise_type_error():
    rope_attention = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, rope_type="axial", **TINY)
    with pytest.raises(TypeError, match="AttentionRope"):
        tome.apply_patch(rope_attention)
    mixed = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, rope_type="mixed", attn_type="eva", **TINY)
    with pytest.raises(TypeError, match="RotaryEmbeddingMixed"):
        tome.apply_patch(mixed)
    assert not tome.patch.is_patched(mixed)


def test_bad_settings_and_training_with_patch_dropout():
    with pytest.raises(ValueError, match="'middle'"):
        tome.patch.naflexvit(make("dinov3"), rope_position="middle")
    model = tome.apply_patch(make("gap", patch_drop_rate=0.25), r=2)
    model.train()
    with pytest.raises(ValueError, match="patch dropout"):
        model(torch.randn(2, 3, 32, 32))
