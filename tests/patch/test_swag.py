"""tome.patch.swag on a tiny model with SWAG's published module layout.

SWAG (facebookresearch/SWAG, loaded with torch.hub) is not a package; the library's
toy-size copy of its layout, ``tome.patch._swag_layout`` (the family's conformance
example), stands in for it here.
"""

from __future__ import annotations

import copy
import sys
from typing import Optional

import pytest
import torch
from torch import nn

import tome
from tome.patch._shared import BlockCall
from tome.patch._swag import ToMeSwagEncoderBlock
from tome.patch._swag_layout import EncoderBlock, VisionTransformer  # SWAG's layout, toy size

from conftest import trained_like_
from mha_reference import reference_mha_encoder

NUM_LAYERS = 3
NUM_PATCHES = 16


class ViTTiny(VisionTransformer):
    """Like SWAG's ViTB16 / ViTL16 / ViTH14: a subclass that only fixes the sizes."""

    def __init__(self, classifier: str = "token", num_classes: Optional[int] = 5) -> None:
        super().__init__(
            image_size=32, patch_size=8, num_layers=NUM_LAYERS, num_heads=2, hidden_dim=32, mlp_dim=64,
            classifier=classifier, num_classes=num_classes,
        )


# ---- tests ----


def make_swag(classifier: str = "token", num_classes: Optional[int] = 5, seed: int = 0) -> ViTTiny:
    return trained_like_(ViTTiny(classifier, num_classes), seed).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_forward(model: VisionTransformer, images: torch.Tensor, r, prop_attn: bool = True):
    """Plain ToMe forward of the SWAG layout, batch-first; returns (output, size, source)."""
    batch = images.shape[0]
    x = model.conv_proj(images).flatten(2).transpose(1, 2)
    protected = int(model.classifier == "token")
    if protected:
        x = torch.cat([model.class_token.expand(batch, -1, -1), x], dim=1)
    x = x + model.encoder.pos_embedding[:, 0]
    schedule = tome.parse_r(NUM_LAYERS, r)
    x, size, source = reference_mha_encoder(model.encoder.layers, x, schedule, protected, prop_attn)
    x = model.encoder.ln(x)
    pooled = x[:, 0] if protected else (x * size).sum(1) / size.sum(1)
    return (pooled if model.head is None else model.head(pooled)), size, source


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_detected_and_patched_by_apply_patch(classifier):
    model = make_swag(classifier)
    assert tome.patch.family_of(model) == "swag"
    tome.apply_patch(model, r=2)
    assert model.r == 2
    assert model._tome_info["protected_tokens"] == int(classifier == "token")
    assert model._tome_info["prop_attn"] is True
    assert all(isinstance(block, ToMeSwagEncoderBlock) for block in model.encoder.layers)


@pytest.mark.parametrize("classifier", ["token", "gap"])
@torch.no_grad()
def test_r0_matches_unpatched(images, classifier):
    model = make_swag(classifier)
    expected = model(images)
    patched = tome.patch.swag(copy.deepcopy(model))
    torch.testing.assert_close(patched(images), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("classifier", ["token", "gap"])
@torch.no_grad()
def test_merging_changes_output(images, classifier):
    model = make_swag(classifier)
    expected = model(images)
    tome.apply_patch(model, r=4)
    out = model(images)
    assert out.shape == expected.shape
    assert (out - expected).abs().max() > 1e-2


@pytest.mark.parametrize("classifier", ["token", "gap"])
@pytest.mark.parametrize("r", [3, [5, 0, 2], (3, -1.0)])
@pytest.mark.parametrize("prop_attn", [True, False])
@torch.no_grad()
def test_matches_reference(images, classifier, r, prop_attn):
    model = make_swag(classifier)
    expected, size, _ = reference_forward(model, images, r, prop_attn)
    tome.apply_patch(model, r=r, prop_attn=prop_attn)
    torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model._tome_info["size"], size)


@torch.no_grad()
def test_gap_pooling_is_size_weighted(images):
    # A plain mean over merged tokens would undercount patches that merged: it must differ.
    model = tome.apply_patch(make_swag("gap", num_classes=None), r=4)
    pooled = model(images)
    expected, size, _ = reference_forward(model, images, 4)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert size.amax() > 1
    assert pooled.shape == (2, 32)


@pytest.mark.parametrize("classifier", ["token", "gap"])
@torch.no_grad()
def test_trace_source(images, classifier):
    model = make_swag(classifier)
    num_tokens = NUM_PATCHES + (classifier == "token")
    _, size, expected_source = reference_forward(model, images, 2)
    tome.apply_patch(model, r=2, trace_source=True)
    model(images)
    source = model._tome_info["source"]
    assert source.shape == (2, num_tokens - 2 * NUM_LAYERS, num_tokens)
    assert torch.equal(source.sum(dim=1), torch.ones(2, num_tokens))  # each column sums to 1
    assert torch.equal(source, expected_source)
    torch.testing.assert_close(source.sum(dim=-1, keepdim=True), size)


@pytest.mark.parametrize("classifier", ["token", "gap"])
@torch.no_grad()
def test_remove_patch_round_trip(images, classifier):
    model = make_swag(classifier)
    expected = model(images)
    tome.apply_patch(model, r=4, trace_source=True)
    model(images)
    tome.remove_patch(model)
    assert type(model) is ViTTiny
    assert all(type(block) is EncoderBlock for block in model.encoder.layers)
    assert not any(attr.startswith("_tome") for module in model.modules() for attr in vars(module))
    assert torch.equal(model(images), expected)


@torch.no_grad()
def test_patching_twice_is_harmless(images):
    model = make_swag()
    tome.apply_patch(model, r=3)
    once = model(images)
    tome.patch.swag(model)
    assert model.r == 3
    assert type(model).__dict__["_tome_parent"] is ViTTiny  # not wrapped twice
    assert torch.equal(model(images), once)


def test_state_dict_keys_unchanged():
    model = make_swag()
    keys = list(model.state_dict())
    patched = tome.apply_patch(copy.deepcopy(model), r=2)
    assert list(patched.state_dict()) == keys
    model.load_state_dict(patched.state_dict())


def test_bad_r_values():
    model = tome.patch.swag(make_swag())
    with pytest.raises(ValueError, match="-2"):
        model.r = -2
    with pytest.raises(ValueError, match="4 entries"):
        model.r = [0, 1, 2, 3]
    assert model.r == 0


@torch.no_grad()
def test_block_called_directly_is_sequence_first():
    model = tome.apply_patch(make_swag(), r=3)
    block = model.encoder.layers[0]
    x = torch.randn(NUM_PATCHES + 1, 2, 32)  # (tokens, batch, channels)
    out = block(x)
    assert out.shape == (NUM_PATCHES + 1 - 3, 2, 32)
    call = BlockCall(block._tome_start(x.transpose(0, 1)), 3)
    expected = block(x.transpose(0, 1), tome=call)
    assert call.out.num_tokens == NUM_PATCHES + 1 - 3
    assert torch.equal(out, expected.transpose(0, 1))
    model.r = 0
    assert torch.equal(block(x), EncoderBlock.forward(block, x))


def test_training_backward(images):
    model = tome.apply_patch(make_swag("gap"), r=3).train()
    model(images).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_wrong_image_size_raises():
    model = tome.apply_patch(make_swag(), r=1)
    with pytest.raises(ValueError, match="32"):
        model(torch.randn(1, 3, 16, 16))


def test_unsupported_classifier_raises():
    model = make_swag()
    model.classifier = "map"
    with pytest.raises(TypeError, match="classifier='map'"):
        tome.patch.swag(model)
    assert not tome.patch.is_patched(model)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kdim": 16, "vdim": 16}, "separate q/k/v"),
        ({"add_bias_kv": True}, "add_bias_kv"),
        ({"batch_first": True}, "batch_first=True"),
    ],
)
def test_unsupported_attention_raises(options, message):
    model = make_swag()
    model.encoder.layers[2].self_attention = nn.MultiheadAttention(32, 2, **options)
    with pytest.raises(TypeError, match=message) as info:
        tome.apply_patch(model, r=1)
    assert "ViTTiny.encoder.layers[2].self_attention" in str(info.value)
    assert not tome.patch.is_patched(model)


def test_overridden_forward_raises():
    class Custom(ViTTiny):
        def forward(self, x):
            return super().forward(x)

    with pytest.raises(TypeError, match="Custom.forward is overridden"):
        tome.patch.swag(Custom())


def test_other_models_are_not_swag():
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    torchvision_vit = TorchvisionViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    assert not tome.patch._swag.is_swag_vit(torchvision_vit)
    assert not tome.patch._swag.is_swag_vit(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="tome.patch.swag expects.*Linear"):
        tome.patch.swag(nn.Linear(2, 2))


def test_detection_and_patching_import_no_optional_library(images, monkeypatch):
    # SWAG models need torch only: make every timm / torchvision import fail and patch anyway.
    for name in [m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")] + ["timm", "torchvision"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import torchvision.models.vision_transformer  # noqa: F401
    model = make_swag()
    assert tome.patch.family_of(model) == "swag"
    tome.apply_patch(model, r=2)
    with torch.no_grad():
        assert model(images).shape == (2, 5)
