"""MAE fine-tuned models: timm average-pooled ViTs and the MAE code base's own ViT subclass."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import tome
from tome.patch._mae_layout import VisionTransformer as MAEStyleViT  # the MAE code base's layout

from conftest import trained_like_
from reference import reference_timm_vit

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def equivalent_timm(model: MAEStyleViT) -> VisionTransformer:
    """A stock timm ViT computing the same function (avg pool, fc_norm, no final norm)."""
    twin = VisionTransformer(**TINY, global_pool="avg", fc_norm=True).eval()  # norm is then Identity
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("global_pool", [True, False])
def test_mae_codebase_model(global_pool):
    model = trained_like_(MAEStyleViT(global_pool=global_pool, **TINY)).eval()
    x = images()
    with torch.no_grad():
        base = model(x)
        tome.apply_patch(model)  # detected as the MAE family
        assert type(model).__name__ == "ToMeVisionTransformer"  # the MAE code base's class, swapped
        assert model._tome_info["prop_attn"] is False
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
        model.r = 3
        out = model(x)
    assert (out - base).abs().max() > 1e-2
    if global_pool:
        with torch.no_grad():
            expected, size, _ = reference_timm_vit(equivalent_timm(model), x, [3, 3, 3], prop_attn=False)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model._tome_info["size"], size)
    tome.remove_patch(model)
    with torch.no_grad():
        assert torch.equal(model(x), base)


def test_timm_avg_pool_mae_defaults():
    model = trained_like_(timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="avg", **TINY)).eval()
    x = images()
    with torch.no_grad():
        expected, _, _ = reference_timm_vit(model, x, [4, 4, 4], prop_attn=False)
        tome.patch.mae(model)
        assert model._tome_info["prop_attn"] is False
        model.r = 4
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_mae_prop_attn_can_be_enabled():
    model = trained_like_(MAEStyleViT(global_pool=True, **TINY)).eval()
    twin = equivalent_timm(model)
    x = images()
    tome.patch.mae(model, prop_attn=True)
    model.r = 2
    with torch.no_grad():
        expected, _, _ = reference_timm_vit(twin, x, [2, 2, 2], prop_attn=True)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_mae_state_dict_and_repatch():
    model = MAEStyleViT(global_pool=True, **TINY).eval()
    keys = list(model.state_dict())
    tome.patch.mae(model)
    tome.patch.mae(model, trace_source=True)
    assert list(model.state_dict()) == keys
    copy.deepcopy(model)


def test_mae_rejects_non_vit():
    with pytest.raises(TypeError, match="ResNet"):
        tome.patch.mae(timm.create_model("resnet18", pretrained=False))


@pytest.mark.parametrize("route", ["apply_patch", "timm", "mae"])
def test_timm_mae_weights_get_mae_defaults_on_every_route(route):
    # timm's own MAE weights (the ".mae" tags) keep a string global_pool; their tag says MAE.
    model = trained_like_(timm.create_model("vit_base_patch16_224.mae", pretrained=False, **TINY)).eval()
    x = images()
    with torch.no_grad():
        expected, _, _ = reference_timm_vit(model, x, [3, 3, 3], prop_attn=False)
        if route == "apply_patch":
            assert tome.patch.family_of(model) == "mae"
            tome.apply_patch(model, r=3)
        else:
            getattr(tome.patch, route)(model)
            model.r = 3
        assert model._tome_info["prop_attn"] is False
        assert "prop_attn=False (off by default for MAE" in repr(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_supervised_timm_weights_keep_proportional_attention():
    model = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=False, **TINY)
    tome.apply_patch(model)
    assert model._tome_info["prop_attn"] is True
    assert "prop_attn=True," in repr(model)
