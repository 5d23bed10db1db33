"""SmolVLM and Idefics3 (``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``)
as a family of visual-token reduction: an adapter on the core (:mod:`tome.patch._vlm`).

The processor splits a large image into ``rows x cols`` crops plus a downscaled global view;
the SigLIP tower encodes every crop alone and the connector pixel-shuffles each crop's patch
grid (``scale_factor`` 2 or 4) to ``image_seq_len`` tokens, row-major over a square grid. In
the prompt each crop is its own run of image tokens, led by text tokens
(``<fake_token_around_image><row_i_col_j>``, ``<global-img>``) and rows ended by a newline.

The unit of reduction is the crop: the model sees no image boundary (the forward's
``pixel_values`` are ``(batch, crops, 3, H, W)`` with every image's crops in a row, and the
tokens that tell images apart are the processor's, not the config's), so ``visual_tokens=K``
passes at most ``K`` tokens per crop (an image split 2 x 2 passes at most ``5 K``); a float
budget keeps that fraction of every crop and so of every image. The row/column and global
tokens are text: always kept, at their positions. Positions are 1-D.

``"visionzip"``: the SigLIP-like tower has no class token, so a patch's score is the
attention it receives from every patch of its crop at the tower's last layer (the padded
patches of a crop masked as the tower masks them), averaged over heads; a shuffled token's
score is the sum over the ``scale_factor ** 2`` patches the connector's own pixel shuffle
puts into it, its keys their mean. ``"fastv"``: the text model's layers.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._vlm import Modality, VLMAdapter, register_adapter
from ._vlm_attention import Scores, capture_attention, grouped, tower_attention
from ._vlm_families import _one_d_positions

__all__ = ["IDEFICS3"]


def _image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_image_features(call["pixel_values"], call.get("pixel_attention_mask"), return_dict=True)


def _crops(inner: nn.Module, call: Dict[str, Any], output: Any) -> List[torch.Tensor]:
    """One ``(image_seq_len, C)`` item per crop (the output holds one tensor per sample)."""
    per_crop = int(inner.image_seq_len)
    return [crop for sample in output.pooler_output for crop in sample.split(per_crop)]


def _crop_grid(inner: nn.Module, call: Dict[str, Any], index: int, num: int, *_: Any) -> Optional[Tuple[int, int, int]]:
    side = math.isqrt(num)
    return (1, side, side) if side * side == num else None


def shuffle_members(shuffle: Any, tokens: int) -> torch.Tensor:
    """``(tokens / g, g)``: the tower tokens each output token of a pixel shuffle is made of,
    read off the model's own ``shuffle`` applied to the token indices (one channel)."""
    shuffled = shuffle(torch.arange(tokens).view(1, tokens, 1))
    return shuffled.reshape(-1, shuffled.shape[-1])


def _tower(inner: nn.Module, call: Dict[str, Any]) -> Tuple[Any, Scores]:
    """``"visionzip"``: the encoder output and, per crop, each shuffled token's attention and keys."""
    attn = inner.vision_model.encoder.layers[-1].self_attn
    output, seen = capture_attention(attn, lambda: _image(inner, call))
    received, keys = tower_attention(attn, seen, class_token=False)
    connector = inner.connector
    members = shuffle_members(lambda x: connector.pixel_shuffle(x, connector.scale_factor), received.shape[1])
    received, keys = grouped(received, keys, members)
    return output, list(zip(received, keys))


IDEFICS3 = register_adapter(VLMAdapter(
    name="idefics3", models=("SmolVLMModel", "Idefics3Model"),
    wrappers=("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"),
    modalities=(Modality("image", "pixel_values", "image_token_id", _image, _crop_grid, split=_crops,
                         tower=_tower),),
    positions=_one_d_positions, fastv=True,
))
