"""Shared test fixtures: trained-like weights for tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn


def trained_like_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw weights at the scale of a trained network, in place.

    Freshly initialised ViTs have tiny weights (std 0.02) and zero heads, so a
    wrong merge barely moves outputs. Here every matrix ~ N(0, 1/fan_in), norm
    weights ~ 1 +- 0.1, biases and LayerScale values small but non-zero, and
    token parameters (class, registers, position embeddings) ~ N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2 and "token" not in name and "pos_embed" not in name and "latent" not in leaf:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif leaf in ("gamma",) or name.endswith("ls1.gamma") or name.endswith("ls2.gamma"):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1 and leaf == "weight":
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator))
    return model


# Tiny models run faster on one thread than on two contending ones.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
