"""tome.unmerge_tokens: merged tokens back at full resolution, for every family."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import timm
import torch
import transformers

import tome
from tome.merge import match_bipartite

from conftest import trained_like_

GRID = 4  # 32 x 32 images, 8 x 8 patches
TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _hf(name: str, **extra) -> torch.nn.Module:
    configs = {
        "Dinov2Model": lambda: transformers.Dinov2Config(mlp_ratio=2, **TINY_HF, **extra),
        "Dinov2WithRegistersModel": lambda: transformers.Dinov2WithRegistersConfig(mlp_ratio=2, **TINY_HF, **extra),
        "DeiTModel": lambda: transformers.DeiTConfig(**TINY_HF),
        "SiglipVisionModel": lambda: transformers.SiglipVisionConfig(**TINY_HF),
    }
    return trained_like_(getattr(transformers, name)(configs[name]())).eval()


def _timm(**extra) -> torch.nn.Module:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=5, **extra,
    )
    return trained_like_(model).eval()


def _run(family: str):
    """(tokens, source, prefix tokens) after a merging forward of a tiny model of ``family``."""
    images = _images()
    if family.startswith("timm"):
        model = _timm(reg_tokens=2) if family == "timm_registers" else _timm()
        tome.apply_patch(model, r=4, trace_source=True)
        tokens = model.forward_features(images)
        return tokens, model._tome_info["source"], model.num_prefix_tokens
    model = _hf(family, num_register_tokens=2) if family == "Dinov2WithRegistersModel" else _hf(family)
    tome.apply_patch(model, r=4, trace_source=True)
    tokens = model(images).last_hidden_state
    return tokens, model._tome_info["source"], model._tome_info["protected_tokens"]


@torch.no_grad()
def test_dinov2_patch_features_back_on_the_grid():
    model = tome.apply_patch(_hf("Dinov2Model"), r=4, trace_source=True)
    tokens = model(_images()).last_hidden_state
    source = model._tome_info["source"]
    size = model._tome_info["size"]
    assert tokens.shape[1] < 1 + GRID * GRID  # merging happened

    dense = tome.unmerge_tokens(tokens, source)
    grid = dense[:, 1:].reshape(2, GRID, GRID, -1)
    assert grid.shape == (2, GRID, GRID, 32)
    # The sources partition the grid: every patch lies in exactly one token ...
    assert torch.equal(source.sum(dim=1), torch.ones(2, 1 + GRID * GRID))
    # ... each patch carries the features of that token, and the class token maps to itself.
    owner = source.argmax(dim=1)
    for b in range(2):
        for original in range(1 + GRID * GRID):
            assert torch.equal(dense[b, original], tokens[b, owner[b, original]])
    assert torch.equal(dense[:, 0], tokens[:, 0])
    # Averaging the grid is the size-weighted average of the merged patch tokens.
    weighted = (tokens[:, 1:] * size[:, 1:]).sum(1) / size[:, 1:].sum(1)
    torch.testing.assert_close(grid.mean(dim=(1, 2)), weighted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family", ["timm", "timm_registers", "Dinov2Model", "Dinov2WithRegistersModel", "DeiTModel", "SiglipVisionModel"]
)
@torch.no_grad()
def test_every_family_unmerges_to_the_original_tokens(family):
    tokens, source, prefix = _run(family)
    original = source.shape[-1]
    assert original == prefix + GRID * GRID
    dense = tome.unmerge_tokens(tokens, source)
    assert dense.shape == (tokens.shape[0], original, tokens.shape[-1])
    assert torch.equal(dense[:, :prefix], tokens[:, :prefix])
    # Every merged token appears at every original position it contains, and nowhere else.
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            members = source[b, t].nonzero().flatten()
            assert len(members) > 0
            assert torch.equal(dense[b, members], tokens[b, t].expand(len(members), -1))
    patches = dense[:, prefix:].reshape(tokens.shape[0], GRID, GRID, -1)
    assert patches.shape[1:3] == (GRID, GRID)


def test_identity_without_merging():
    tokens = torch.randn(2, 5, 3)
    source = torch.eye(5).expand(2, -1, -1)
    assert torch.equal(tome.unmerge_tokens(tokens, source), tokens)


def test_matches_assignment_unmerge_and_group_index():
    metric = torch.randn(3, 11, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 11, 6)
    assignment = match_bipartite(metric, 4, protected_tokens=1)
    merged = assignment(x, mode="mean")
    source = assignment(torch.eye(11).expand(3, -1, -1).contiguous(), mode="amax")
    expected = assignment.unmerge(merged)
    assert torch.equal(tome.unmerge_tokens(merged, source), expected)
    assert torch.equal(tome.unmerge_tokens(merged, assignment.dest), expected)


def test_gradients_flow_back_to_the_merged_tokens():
    tokens = torch.randn(1, 3, 2, requires_grad=True)
    source = torch.tensor([[[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]])
    tome.unmerge_tokens(tokens, source).sum().backward()
    assert torch.equal(tokens.grad, torch.tensor([[[2.0, 2.0], [1.0, 1.0], [1.0, 1.0]]]))


@pytest.mark.parametrize(
    "tokens, source, message",
    [
        (torch.randn(2, 3), torch.eye(3).expand(2, -1, -1), "tokens must have shape"),
        (torch.randn(2, 3, 4), torch.eye(3).expand(1, -1, -1), "batch"),
        (torch.randn(2, 3, 4), torch.eye(4)[:3].expand(2, -1, -1) * 0, "exactly one"),
        (torch.randn(2, 2, 4), torch.ones(2, 2, 3), "exactly one"),
        (torch.randn(2, 3, 4), torch.eye(5).expand(2, -1, -1), "rows"),
        (torch.randn(2, 3, 4), torch.zeros(2, 5), "source must be"),
        (torch.randn(2, 3, 4), torch.full((2, 5), 3), r"\[0, 3\)"),
    ],
)
def test_bad_inputs_raise_value_error(tokens, source, message):
    with pytest.raises(ValueError, match=message):
        tome.unmerge_tokens(tokens, source)


def test_dense_module_imports_torch_only():
    tree = ast.parse(Path(tome._dense.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or "").split(".")[0])
    assert imported <= {"torch", "__future__"}
    assert "unmerge_tokens" in tome.__all__
