"""InternVL (``InternVLForConditionalGeneration``) as a family of visual-token reduction: an
adapter on the core (:mod:`tome.patch._vlm`).

The processor cuts an image into tiles (plus a thumbnail when there are several); the
InternViT tower encodes each tile alone, the pixel shuffle (``downsample_ratio`` 0.5) turns
its patch grid into ``image_seq_length`` tokens (row-major over a square grid) and the MLP
projector maps them. One image is ``<img> <IMG_CONTEXT> * (tiles * image_seq_length)
</img>``, its tiles one after the other.

The unit of reduction is the tile, as SmolVLM's crop: ``visual_tokens=K`` passes at most
``K`` tokens per tile (an image of 6 tiles and its thumbnail at most ``7 K``); a float
budget keeps that fraction of every tile and so of every image. Per image, the tiles would
be a ``(tiles, s, s)`` grid whose first axis is not time: ``"pool"`` (the default method)
would average the same cell of different tiles, which are different parts of the image
(and the thumbnail). Positions are 1-D.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._vlm import Modality, VLMAdapter, register_adapter
from ._vlm_families import _one_d_positions

__all__ = ["INTERNVL"]


def _image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_image_features(
        pixel_values=call["pixel_values"], vision_feature_layer=call.get("vision_feature_layer"),
        vision_feature_select_strategy=call.get("vision_feature_select_strategy"), return_dict=True)


def _tile_grid(inner: nn.Module, call: Dict[str, Any], index: int, num: int, *_: Any) -> Optional[Tuple[int, int, int]]:
    """The square grid ``(1, s, s)`` of one tile after the pixel shuffle."""
    side = math.isqrt(num)
    return (1, side, side) if side * side == num else None


def _batched(items: List[torch.Tensor]) -> torch.Tensor:
    """``(1, K_total, C)``: the forward reads ``pooler_output`` as one tensor and scatters it flat."""
    return torch.cat(items)[None]


INTERNVL = register_adapter(VLMAdapter(
    name="internvl", models=("InternVLModel",), wrappers=("InternVLForConditionalGeneration",),
    modalities=(Modality("image", "pixel_values", "image_token_id", _image, _tile_grid, join=_batched),),
    positions=_one_d_positions,
))
