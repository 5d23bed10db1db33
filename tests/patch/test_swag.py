"""tome.patch.swag on a tiny model with SWAG's published module layout.

SWAG (facebookresearch/SWAG, loaded with torch.hub) is not a package, so the
module tree below reproduces its layout from the published description: the
same class names, attribute names, parameter shapes and sequence-first forward,
written for this test.
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from functools import partial
from typing import Optional

import pytest
import torch
from torch import nn

import tome
from tome.patch._shared import BlockCall
from tome.patch._swag import ToMeSwagEncoderBlock

from conftest import trained_like_
from mha_reference import reference_mha_encoder

NUM_LAYERS = 3
NUM_PATCHES = 16
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


# ---- SWAG's layout (models/vision_transformer.py of facebookresearch/SWAG) ----


class MLPBlock(nn.Sequential):
    def __init__(self, in_dim: int, mlp_dim: int, dropout_rate: float) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, mlp_dim)
        self.act = nn.GELU()
        self.dropout_1 = nn.Dropout(dropout_rate)
        self.linear_2 = nn.Linear(mlp_dim, in_dim)
        self.dropout_2 = nn.Dropout(dropout_rate)


class EncoderBlock(nn.Module):
    def __init__(
        self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout_rate: float, attention_dropout_rate: float
    ) -> None:
        super().__init__()
        self.ln_1 = _LayerNorm(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout_rate)
        self.dropout = nn.Dropout(dropout_rate)
        self.ln_2 = _LayerNorm(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout_rate)
        self.num_heads = num_heads

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (tokens, batch, channels)
        h = self.ln_1(input)
        h, _ = self.self_attention(query=h, key=h, value=h, need_weights=False)
        x = self.dropout(h) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout_rate: float,
        attention_dropout_rate: float,
    ) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(seq_length, 1, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout_rate)
        blocks = [
            (f"layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout_rate, attention_dropout_rate))
            for i in range(num_layers)
        ]
        self.layers = nn.Sequential(OrderedDict(blocks))
        self.ln = _LayerNorm(hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformerHead(nn.Module):
    def __init__(self, in_plane: int, num_classes: Optional[int] = None) -> None:
        super().__init__()
        layers = [] if num_classes is None else [("head", nn.Linear(in_plane, num_classes))]
        self.layers = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout_rate: float = 0.0,
        attention_dropout_rate: float = 0.0,
        classifier: str = "token",
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.classifier = classifier
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2
        if classifier == "token":
            self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
            seq_length += 1
        self.encoder = Encoder(
            seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout_rate, attention_dropout_rate
        )
        self.trunk_output = nn.Identity()
        self.seq_length = seq_length
        self.head = VisionTransformerHead(hidden_dim, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        assert h == w == self.image_size
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1)
        x = x.permute(2, 0, 1)  # (tokens, batch, channels)
        if self.classifier == "token":
            x = torch.cat([self.class_token.expand(-1, n, -1), x], dim=0)
        x = self.encoder(x)
        x = x[0] if self.classifier == "token" else x.mean(dim=0)
        x = self.trunk_output(x)
        if self.head is not None:
            x = self.head(x)
        return x


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
