"""timm ViT attention masks while merging: a mask that masks nothing changes nothing, a
key-padding mask merges with the tokens (padding has size 0, never pairs with real
tokens, and a padded sample merges as it would without its padding), other masks are
refused with a ValueError that says what to do."""

from __future__ import annotations

import pytest
import timm
import torch

import tome

from conftest import trained_like_

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
CONFIGS = {
    "token": {},
    "class_avg": dict(global_pool="avg"),
    "no_class_avg": dict(class_token=False, global_pool="avg"),
    "registers_map": dict(reg_tokens=2, global_pool="map"),
    "max": dict(global_pool="max"),
}
PADDING = 5  # sample 0's last 5 patches are padding


def make(name: str) -> torch.nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **CONFIGS[name]})
    return trained_like_(model).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def key_validity(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    tokens = 16 + model.num_prefix_tokens
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    valid[0, -PADDING:] = False
    return valid


def mask_forms(valid: torch.Tensor):
    """The same key-padding mask written the ways timm's attention accepts."""
    symmetric = valid[:, None, :, None] & valid[:, None, None, :]
    finfo_min = torch.zeros(symmetric.shape).masked_fill(~symmetric, torch.finfo(torch.float32).min)
    return {
        "bool key-only": valid[:, None, None, :],
        "bool symmetric": symmetric,
        "float -inf key-only": torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))[:, None, None, :],
        "float min symmetric": finfo_min,
        "float -1e4 key-only": torch.zeros(valid.shape).masked_fill(~valid, -1e4)[:, None, None, :],
    }


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_a_mask_that_masks_nothing_changes_nothing(name):
    model = tome.apply_patch(make(name), r=3)
    x = images()
    expected = model(x)
    valid = torch.ones_like(key_validity(model))
    for form, mask in mask_forms(valid).items():
        torch.testing.assert_close(model(x, attn_mask=mask), expected, rtol=0, atol=0, msg=form)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_key_padding_merges_as_if_the_padding_were_not_there(name):
    model = tome.apply_patch(make(name), r=[3, 2, 2], trace_source=True)
    x = images()
    valid = key_validity(model)
    outputs = {form: model(x, attn_mask=mask) for form, mask in mask_forms(valid).items()}
    size, source = model._tome_info["size"], model._tome_info["source"]
    reference = outputs["bool key-only"]
    for form, out in outputs.items():
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5, msg=form)
    # Padding has no size and never shares a token with real patches.
    torch.testing.assert_close(size.sum(dim=(1, 2)), valid.sum(1).float())
    holds_real = source @ valid.float().unsqueeze(-1)
    assert torch.all((holds_real == 0) | (holds_real == source.sum(-1, keepdim=True)))
    # Sample 0 equals its run on the real tokens only (padding cut off after the embedding);
    # sample 1 (no padding) equals its run without a mask.
    handle = model.norm_pre.register_forward_hook(lambda module, args, out: out[:, :-PADDING])
    try:
        alone = model(x[:1])
    finally:
        handle.remove()
    torch.testing.assert_close(reference[0], alone[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(reference[1], model(x[1:])[0], rtol=0, atol=2e-5)
    assert (reference[0] - model(x[:1])[0]).abs().max() > 1e-3  # the padding did change sample 0


def run_without_padding(model, x):
    """Sample 0 alone, its padding cut off after the embedding."""
    handle = model.norm_pre.register_forward_hook(lambda module, args, out: out[:, :-PADDING])
    try:
        return model(x[:1])[0]
    finally:
        handle.remove()


METHODS = {
    "tome": "tome",
    "pitome": "pitome",
    "tofu": tome.MergeMethod("tofu", prune_layers=2),  # pruning in blocks 0-1, MLERP in block 2
    "kth": tome.MergeMethod("ablation", match="kth", kth=3),
    "greedy": tome.MergeMethod("ablation", match="greedy"),
    "mean": tome.MergeMethod("ablation", combine="mean"),
    "evit_fuse": tome.MergeMethod("ablation", match="evit_fuse"),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["class_avg", "registers_map"])
@torch.no_grad()
def test_every_method_merges_a_padded_sample_as_without_its_padding(method, name):
    model = tome.apply_patch(make(name), r=[3, 2, 2], method=METHODS[method])
    x = images()
    out = model(x, attn_mask=key_validity(model)[:, None, None, :])
    torch.testing.assert_close(out[0], run_without_padding(model, x), rtol=0, atol=2e-5)
    torch.testing.assert_close(out[1], model(x[1:])[0], rtol=0, atol=2e-5)
    model.r = 0
    assert (out[0] - run_without_padding(model, x)).abs().max() > 1e-2  # the padded sample merged


@pytest.mark.parametrize("method", ["tome", "pitome", "tofu"])
@pytest.mark.parametrize("name", ["class_avg", "no_class_avg", "registers_map"])
@pytest.mark.parametrize("fused", [True, False])
@torch.no_grad()
def test_a_sample_of_padding_only_stays_finite(method, name, fused):
    model = tome.apply_patch(make(name), r=[3, 2, 2], method=METHODS[method])
    for block in model.blocks:
        block.attn.fused_attn = fused  # explicit softmax: a row with no key to attend to would be 0 / 0
    x = images()
    valid = key_validity(model)
    valid[0] = False  # not one key, prefix tokens included
    out = model(x, attn_mask=valid[:, None, None, :])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], model(x[1:])[0], rtol=0, atol=2e-5)


@torch.no_grad()
def test_what_padding_holds_does_not_matter():
    model = tome.apply_patch(make("class_avg"), r=3)
    x = images()
    mask = key_validity(model)[:, None, None, :]
    expected = model(x, attn_mask=mask)

    def scramble(module, args, out):
        out = out.clone()
        out[0, -PADDING:] = 10 * torch.randn(PADDING, out.shape[-1], generator=torch.Generator().manual_seed(3))
        return out

    handle = model.norm_pre.register_forward_hook(scramble)
    try:
        torch.testing.assert_close(model(x, attn_mask=mask), expected, rtol=0, atol=1e-5)
    finally:
        handle.remove()


@torch.no_grad()
def test_forward_intermediates_and_features_take_a_key_padding_mask():
    model = tome.apply_patch(make("class_avg"), r=3)
    x = images()
    mask = key_validity(model)[:, None, None, :]
    final, maps = model.forward_intermediates(x, indices=[2], norm=True, attn_mask=mask)
    assert maps[0].shape == (2, 32, 4, 4)
    torch.testing.assert_close(model.forward_head(final), model(x, attn_mask=mask))
    torch.testing.assert_close(model.forward_head(model.forward_features(x, attn_mask=mask)), model(x, attn_mask=mask))


@torch.no_grad()
def test_masks_that_are_not_key_padding_are_refused_while_merging():
    model = tome.apply_patch(make("token"), r=2)
    x = images()
    tokens = 17
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    block_diagonal = torch.zeros(tokens, tokens, dtype=torch.bool)
    block_diagonal[:9, :9] = block_diagonal[9:, 9:] = True
    for mask in (causal, block_diagonal):
        with pytest.raises(ValueError, match="not a key-padding mask"):
            model(x, attn_mask=mask)
    with pytest.raises(ValueError, match="biases other than 0"):
        model(x, attn_mask=torch.full((tokens, tokens), 0.5))
    with pytest.raises(ValueError, match="does not broadcast"):
        model(x, attn_mask=torch.ones(2, 1, 1, tokens + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        model(x, is_causal=True)
    # Without merging they are timm's business.
    model.r = 0
    model(x, attn_mask=causal)
