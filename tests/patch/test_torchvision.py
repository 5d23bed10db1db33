"""tome.patch.torchvision on tiny torchvision VisionTransformers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import tome
from tome.patch._torchvision import ToMeEncoderBlock

from conftest import trained_like_
from mha_reference import reference_mha_encoder

NUM_LAYERS = 3
NUM_TOKENS = 17  # 16 patches + class token


def make_vit(representation_size=None, seed: int = 0) -> VisionTransformer:
    model = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=NUM_LAYERS,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=5,
        representation_size=representation_size,
    )
    return trained_like_(model, seed).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_forward(model: VisionTransformer, images: torch.Tensor, r, prop_attn: bool = True):
    """Plain ToMe forward of a torchvision ViT; returns (logits, size, source)."""
    x = model._process_input(images)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1) + model.encoder.pos_embedding
    schedule = tome.parse_r(NUM_LAYERS, r)
    x, size, source = reference_mha_encoder(model.encoder.layers, x, schedule, 1, prop_attn)
    return model.heads(model.encoder.ln(x)[:, 0]), size, source


def test_detected_and_patched_by_apply_patch():
    model = make_vit()
    assert tome.patch.family_of(model) == "torchvision"
    tome.apply_patch(model, r=2)
    assert model.r == 2
    assert all(isinstance(block, ToMeEncoderBlock) for block in model.encoder.layers)
    assert "tome: r=2" in repr(model)


@torch.no_grad()
def test_r0_matches_unpatched(images):
    model = make_vit()
    expected = model(images)  # nn.MultiheadAttention's fused fast path (eval, no grad)
    patched = tome.patch.torchvision(copy.deepcopy(model))
    torch.testing.assert_close(patched(images), expected, atol=1e-5, rtol=0)


def test_r0_matches_unpatched_slow_path(images):
    # With gradients on, nn.MultiheadAttention takes its Python path, which runs the
    # same scaled_dot_product_attention as the patch: the outputs agree to the bit.
    model = make_vit()
    expected = model(images)
    patched = tome.patch.torchvision(copy.deepcopy(model))
    assert torch.equal(patched(images), expected)


@torch.no_grad()
def test_merging_changes_output(images):
    model = make_vit()
    expected = model(images)
    tome.apply_patch(model, r=4)
    out = model(images)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() > 1e-2
    assert model._tome_info["size"].shape == (2, 5, 1)  # 17 -> 13 -> 9 -> 5 (last layer capped)


@pytest.mark.parametrize("r", [2, 4, [5, 0, 3], (3, -1.0)])
@pytest.mark.parametrize("prop_attn", [True, False])
@torch.no_grad()
def test_matches_reference(images, r, prop_attn):
    model = make_vit()
    expected, size, _ = reference_forward(model, images, r, prop_attn)
    tome.apply_patch(model, r=r, prop_attn=prop_attn)
    torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model._tome_info["size"], size)


@torch.no_grad()
def test_matches_reference_with_pre_logits(images):
    model = make_vit(representation_size=16)
    expected, _, _ = reference_forward(model, images, 3)
    tome.apply_patch(model, r=3)
    torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_trace_source(images):
    model = make_vit()
    _, size, expected_source = reference_forward(model, images, 3)
    tome.apply_patch(model, r=3, trace_source=True)
    model(images)
    source = model._tome_info["source"]
    assert source.shape == (2, NUM_TOKENS - 3 * NUM_LAYERS, NUM_TOKENS)
    # Every original token lies in exactly one current token.
    assert torch.equal(source.sum(dim=1), torch.ones(2, NUM_TOKENS))
    assert torch.equal(source, expected_source)
    torch.testing.assert_close(source.sum(dim=-1, keepdim=True), size)
    assert torch.equal(source[:, 0, 0], torch.ones(2))  # the class token stays alone at index 0
    assert torch.equal(source[:, 0].sum(-1), torch.ones(2))


@torch.no_grad()
def test_remove_patch_round_trip(images):
    model = make_vit()
    expected = model(images)
    tome.apply_patch(model, r=4, trace_source=True)
    model(images)
    tome.remove_patch(model)
    assert type(model) is VisionTransformer
    assert all(type(block).__name__ == "EncoderBlock" for block in model.encoder.layers)
    assert not any(attr.startswith("_tome") for module in model.modules() for attr in vars(module))
    assert torch.equal(model(images), expected)


@torch.no_grad()
def test_patching_twice_is_harmless(images):
    model = make_vit()
    tome.apply_patch(model, r=3)
    once = model(images)
    tome.patch.torchvision(model)
    assert model.r == 3
    assert type(model).__dict__["_tome_parent"] is VisionTransformer  # not wrapped twice
    assert torch.equal(model(images), once)


def test_state_dict_keys_unchanged():
    model = make_vit()
    keys = list(model.state_dict())
    patched = tome.apply_patch(copy.deepcopy(model), r=2)
    assert list(patched.state_dict()) == keys
    model.load_state_dict(patched.state_dict())
    patched.load_state_dict(model.state_dict())


def test_bad_r_values():
    model = tome.patch.torchvision(make_vit())
    with pytest.raises(ValueError, match="-1"):
        model.r = -1
    with pytest.raises(ValueError, match="4 entries"):
        model.r = [1, 1, 1, 1]
    assert model.r == 0


@torch.no_grad()
def test_block_called_directly(images):
    model = tome.apply_patch(make_vit(), r=3)
    block = model.encoder.layers[0]
    x = torch.randn(2, NUM_TOKENS, 32)
    assert block(x).shape == (2, NUM_TOKENS - 3, 32)
    model.r = 0
    assert torch.equal(block(x), type(block).__dict__["_tome_parent"].forward(block, x))


def test_training_backward(images):
    model = tome.apply_patch(make_vit(), r=3).train()
    model(images).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def _with_attention(model: VisionTransformer, batch_first: bool = True, **options) -> VisionTransformer:
    model.encoder.layers[1].self_attention = nn.MultiheadAttention(32, 2, batch_first=batch_first, **options)
    return model


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kdim": 16, "vdim": 16}, "separate q/k/v"),
        ({"add_bias_kv": True}, "add_bias_kv"),
        ({"add_zero_attn": True}, "add_zero_attn"),
        ({"batch_first": False}, "batch_first=False"),
    ],
)
def test_unsupported_attention_raises(options, message):
    model = _with_attention(make_vit(), **options)
    with pytest.raises(TypeError, match=message) as info:
        tome.patch.torchvision(model)
    assert "layers[1].self_attention" in str(info.value)
    assert not tome.patch.is_patched(model)


def test_unsupported_models_raise():
    class Overridden(VisionTransformer):
        def forward(self, x):
            return super().forward(x)

    model = Overridden(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    with pytest.raises(TypeError, match="overrides VisionTransformer.forward"):
        tome.patch.torchvision(model)
    with pytest.raises(TypeError, match="Sequential.*Supported families: .*torchvision"):
        tome.patch.torchvision(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="Supported families"):
        tome.apply_patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="tome.patch.swag expects"):
        tome.patch.swag(make_vit())
