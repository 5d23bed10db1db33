"""tome.merging: a temporary schedule that is always restored."""

from __future__ import annotations

import pytest
import timm
import torch

import tome


def _model():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3,
                             num_heads=2, num_classes=5).eval()


def test_merging_sets_and_restores_r():
    model = tome.apply_patch(_model(), r=2)
    x = torch.randn(2, 3, 32, 32)
    with tome.merging(model, r=5) as same:
        assert same is model and model.r == 5
        model(x)
        assert model._tome_info["r"] == [5, 5, 3]  # what ran: the last layer caps r at 3
    assert model.r == 2


def test_merging_restores_after_an_error():
    model = tome.apply_patch(_model(), r=(2, -1.0))
    with pytest.raises(RuntimeError, match="boom"):
        with tome.merging(model, r=7):
            raise RuntimeError("boom")
    assert model.r == (2, -1.0)


def test_merging_rejects_bad_input():
    model = _model()
    with pytest.raises(TypeError, match="apply_patch"):
        with tome.merging(model, r=4):
            pass
    tome.apply_patch(model, r=1)
    with pytest.raises(ValueError, match="-3"):
        with tome.merging(model, r=-3):
            pass
    assert model.r == 1
