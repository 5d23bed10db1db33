"""SWAG's module layout at toy size: the SWAG family's conformance example.

SWAG's models come through ``torch.hub`` (facebookresearch/SWAG), not a package, so
the family's tiny example needs these classes: the names, attributes, parameter
shapes and sequence-first forward of SWAG's ``models/vision_transformer.py``,
written here from its published description. Only the example's builder and
the family's tests (``tests/patch/test_swag.py``) import this module.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn


class MLPBlock(nn.Sequential):
    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__(OrderedDict(linear_1=nn.Linear(dim, mlp_dim), act=nn.GELU(), dropout_1=nn.Dropout(0.0),
                                     linear_2=nn.Linear(mlp_dim, dim), dropout_2=nn.Dropout(0.0)))


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, num_heads)  # sequence-first
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.num_heads = num_heads

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (tokens, batch, channels)
        h = self.ln_1(input)
        h, _ = self.self_attention(query=h, key=h, value=h, need_weights=False)
        x = self.dropout(h) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.zeros(seq_length, 1, dim))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(
            (f"layer_{i}", EncoderBlock(num_heads, dim, mlp_dim)) for i in range(num_layers)
        ))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformerHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int = 32, patch_size: int = 8, num_layers: int = 2, num_heads: int = 2,
                 hidden_dim: int = 32, mlp_dim: int = 64, classifier: str = "token",
                 num_classes: Optional[int] = 5) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim, self.classifier = image_size, patch_size, hidden_dim, classifier
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2
        if classifier == "token":
            self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
            seq_length += 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
        self.trunk_output = nn.Identity()
        self.head = VisionTransformerHead(hidden_dim, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(2, 0, 1)  # (tokens, batch, channels)
        if self.classifier == "token":
            x = torch.cat([self.class_token.expand(-1, n, -1), x], dim=0)
        x = self.encoder(x)
        x = self.trunk_output(x[0] if self.classifier == "token" else x.mean(dim=0))
        return x if self.head is None else self.head(x)
