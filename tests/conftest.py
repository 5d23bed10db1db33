"""Shared test fixtures: trained-like weights for tiny random models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class KeyLengths(TorchFunctionMode):
    """Inside ``with KeyLengths() as spy:``, ``spy.lengths`` lists the key length of every
    ``scaled_dot_product_attention`` call (how many keys attention really saw)."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.lengths.append((kwargs["key"] if "key" in kwargs else args[1]).shape[-2])
        return func(*args, **kwargs)


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
