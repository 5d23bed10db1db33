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
be a ``(tiles, s, s)`` grid whose first axis is not time: ``"pool"`` would average the same
cell of different tiles, and ``"tome"``'s temporal rule would merge them first, though they
are different parts of the image (and the thumbnail). Positions are 1-D.

``"visionzip"``: InternViT has a class token, so, as the paper does for CLIP, a patch's
score is the attention the class token pays it at the layer whose output is the feature
(``vision_feature_layer``), averaged over heads (queries and keys after the layer's
``q_norm`` / ``k_norm`` where it has them); a shuffled token's score is the sum over the 4
patches the model's own ``pixel_shuffle`` puts into it, its keys their mean. ``"fastv"``:
the language model's layers.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._vlm import Modality, VLMAdapter, register_adapter
from ._vlm_attention import Scores, capture_attention, feature_layer, grouped, tower_attention
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


def _shuffle_members(inner: nn.Module, tokens: int) -> torch.Tensor:
    """``(tokens / 4, 4)``: the patches each token of the model's own ``pixel_shuffle`` is made of."""
    side = math.isqrt(tokens)
    shuffled = inner.pixel_shuffle(torch.arange(tokens).view(1, side, side, 1),
                                   scale_factor=inner.config.downsample_ratio)
    return shuffled.reshape(-1, shuffled.shape[-1])


def _tower(inner: nn.Module, call: Dict[str, Any]) -> Tuple[Any, Scores]:
    """``"visionzip"``: the encoder output and, per tile, each shuffled token's attention and keys."""
    chosen = call.get("vision_feature_layer")
    chosen = chosen if chosen is not None else inner.config.vision_feature_layer
    attn = feature_layer(inner.vision_tower.encoder.layer, chosen).attention
    output, seen = capture_attention(attn, lambda: _image(inner, call))
    received, keys = tower_attention(attn, seen, class_token=True)
    strategy = call.get("vision_feature_select_strategy") or inner.config.vision_feature_select_strategy
    if strategy == "default":  # the model drops the class token before the shuffle
        received, keys = received[:, 1:], keys[:, 1:]
    received, keys = grouped(received, keys, _shuffle_members(inner, received.shape[1]))
    return output, list(zip(received, keys))


INTERNVL = register_adapter(VLMAdapter(
    name="internvl", models=("InternVLModel",), wrappers=("InternVLForConditionalGeneration",),
    modalities=(Modality("image", "pixel_values", "image_token_id", _image, _tile_grid, join=_batched,
                         tower=_tower),),
    positions=_one_d_positions, fastv=True,
))
