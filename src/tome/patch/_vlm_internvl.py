"""InternVL (``InternVLForConditionalGeneration``) as a family of visual-token reduction: an
adapter on the core (:mod:`tome.patch._vlm`).

The processor cuts an image into tiles (plus a thumbnail when there are several); the
InternViT tower encodes each tile, the pixel shuffle (``downsample_ratio`` 0.5) turns its
patch grid into ``image_seq_length`` tokens per tile (row-major over a square grid) and the
MLP projector maps them. One image is ``<img> <IMG_CONTEXT> * (tiles * image_seq_length)
</img>``: one run of placeholders, its tiles in order. The unit of reduction is the image:
its tokens on the grid ``(tiles, s, s)`` (``"pool"`` pools within tiles before it pools
across them), at most ``visual_tokens`` per image. Positions are 1-D.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._vlm import Modality, VLMAdapter, _placeholders, register_adapter
from ._vlm_families import _one_d_positions

__all__ = ["INTERNVL"]


def _image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_image_features(
        pixel_values=call["pixel_values"], vision_feature_layer=call.get("vision_feature_layer"),
        vision_feature_select_strategy=call.get("vision_feature_select_strategy"), return_dict=True)


def _runs(mask: torch.Tensor) -> List[int]:
    """Lengths of the runs of True in ``mask`` (B, L), row by row (a run never spans two rows)."""
    padded = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1).reshape(-1).to(torch.int8)
    edges = torch.diff(padded, prepend=padded.new_zeros(1))
    starts = (edges == 1).nonzero()[:, 0]
    ends = (edges == -1).nonzero()[:, 0]
    return (ends - starts).tolist()


def _images(inner: nn.Module, call: Dict[str, Any], output: Any) -> List[torch.Tensor]:
    """One ``(tiles * image_seq_length, C)`` item per image: the tiles of each run of placeholders.

    Raises:
        ValueError: when the runs of placeholders do not hold whole tiles.
    """
    tiles = output.pooler_output  # (tiles, T, C)
    runs = _runs(_placeholders(inner, call, inner.config.image_token_id))
    per_tile = tiles.shape[1]
    if sum(runs) != tiles.shape[0] * per_tile or any(run % per_tile for run in runs):
        raise ValueError(f"image placeholders in runs of {runs} do not hold whole tiles of {per_tile} tokens "
                         f"({tiles.shape[0]} tiles)")
    return list(tiles.flatten(0, 1).split(runs))


def _tile_grid(inner: nn.Module, call: Dict[str, Any], index: int, num: int, *_: Any) -> Optional[Tuple[int, int, int]]:
    """``(tiles, s, s)`` of one image, from the tower's patch grid and the pixel shuffle."""
    vision = inner.config.vision_config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    side = int(size // patch * inner.config.downsample_ratio)
    per_tile = side * side
    if per_tile == 0 or num % per_tile:
        side = math.isqrt(num)
        return (1, side, side) if side * side == num else None
    return (num // per_tile, side, side)


def _batched(items: List[torch.Tensor]) -> torch.Tensor:
    """``(1, K_total, C)``: the forward reads ``pooler_output`` as one tensor and scatters it flat."""
    return torch.cat(items)[None]


INTERNVL = register_adapter(VLMAdapter(
    name="internvl", models=("InternVLModel",), wrappers=("InternVLForConditionalGeneration",),
    modalities=(Modality("image", "pixel_values", "image_token_id", _image, _tile_grid, split=_images,
                         join=_batched),),
    positions=_one_d_positions,
))
