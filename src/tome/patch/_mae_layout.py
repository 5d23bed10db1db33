"""The MAE code base's fine-tuning ViT (``models_vit.VisionTransformer`` of
facebookresearch/mae) at toy size: an example of the MAE family.

That code base is not a package, so the example needs this class: a timm
``VisionTransformer`` subclass with a boolean ``global_pool``, an ``fc_norm`` in
place of the final ``norm`` when pooling, and a ``forward_features`` that returns
the pooled feature, written here from its published description. Imported only
by the example's builder.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer


class VisionTransformer(TimmVisionTransformer):
    def __init__(self, global_pool: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.global_pool = global_pool
        if global_pool:
            self.fc_norm = LayerNorm(kwargs["embed_dim"])
            del self.norm

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        tokens = self.pos_drop(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        if self.global_pool:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return self.norm(tokens)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
