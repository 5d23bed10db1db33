"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``) as a family of visual-token
reduction: an adapter on the core (:mod:`tome.patch._vlm`).

Images: the SigLIP tower encodes a base view and the any-res crops; ``pack_image_features``
lays one image out as the base view (``s * s`` tokens, row-major), then the unpadded grid of
the crops with the learned ``image_newline`` ending every row (an image of a multi-image
prompt is the base view and one newline). Videos: every frame's grid is bilinearly halved
(``s' = ceil(s / 2)``), frames follow each other, one ``image_newline`` ends the video.

Units of reduction: the base view of an image (grid ``(1, s, s)``), the any-res grid of an
image (grid ``(1, h, w)``, ``h`` = its newlines), and a video (grid ``(frames, s', s')``);
``visual_tokens=K`` passes at most ``K`` tokens for each, so an any-res image passes at most
``2 K``. The ``image_newline`` tokens are not image content: they are always passed on,
never merged and not counted in the budget, and stay after the kept tokens of their row.
Positions are 1-D.

``"visionzip"``: SigLIP has no class token, so a patch's score is the attention it receives
from every patch of its crop (or frame) at the layer whose output is the feature
(``vision_feature_layer``), averaged over heads. The scores and the keys (averaged over heads)
then go through the model's own layout as extra feature channels: ``pack_image_features``
(base view, unpadded any-res grid, downscaled like the features where the grid is too large,
a zero row at each newline) for images, ``apply_pooling`` (the bilinear 2x downsampling of a
frame: the mean of each 2 x 2 cell for an even side) for videos. So every token the language
model reads has the score of the tower tokens it was made of, and the views split alike.
``"fastv"``: the language model's layers.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._vlm import Modality, VLMAdapter, register_adapter
from ._vlm_attention import Scores, capture_attention, feature_layer, tower_attention
from ._vlm_families import _one_d_positions

__all__ = ["LLAVA_ONEVISION"]


def _image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_image_features(
        call["pixel_values"], call.get("image_sizes"), vision_feature_layer=call.get("vision_feature_layer"),
        vision_feature_select_strategy=call.get("vision_feature_select_strategy"),
        batch_num_images=call.get("batch_num_images"), return_dict=True)


def _video(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_video_features(
        call["pixel_values_videos"], vision_feature_layer=call.get("vision_feature_layer"),
        vision_feature_select_strategy=call.get("vision_feature_select_strategy"), return_dict=True)


def _base_side(inner: nn.Module) -> int:
    return int(inner.config.vision_config.image_size) // int(inner.config.vision_config.patch_size)


def _views(inner: nn.Module, call: Dict[str, Any], output: Any) -> List[torch.Tensor]:
    """An any-res image as two items (its base view, then its crops' grid with the newlines);
    an image without crops (base view and one newline) as one."""
    base = _base_side(inner) ** 2
    items: List[torch.Tensor] = []
    for image in output.pooler_output:
        items.extend([image] if image.shape[0] == base + 1 else [image[:base], image[base:]])
    return items


def _newlines(inner: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``features`` that are the model's ``image_newline`` (copied as is)."""
    newline = inner.image_newline.to(device=features.device, dtype=features.dtype)
    return (features == newline).all(-1).nonzero()[:, 0]


def _image_separators(inner: nn.Module, call: Dict[str, Any], index: int,
                      features: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[int, int, int]]]:
    """The newlines of an image item and the grid of its other tokens: ``(1, h, w)`` with one
    newline ending each of the ``h`` rows (a base view has none: ``(1, s, s)``)."""
    rows = _newlines(inner, features)
    count = features.shape[0] - rows.numel()
    side = _base_side(inner)
    if count == side * side and rows.numel() <= 1:
        return rows, (1, side, side)
    width = count // max(rows.numel(), 1)
    expected = torch.arange(1, rows.numel() + 1, device=rows.device) * (width + 1) - 1
    if rows.numel() and width * rows.numel() == count and torch.equal(rows, expected):
        return rows, (1, rows.numel(), width)
    return rows, None


def _video_separators(inner: nn.Module, call: Dict[str, Any], index: int,
                      features: torch.Tensor) -> Tuple[torch.Tensor, Optional[Tuple[int, int, int]]]:
    """The closing newline of a video and the grid ``(frames, s', s')`` of its frames."""
    side = -(-_base_side(inner) // 2)
    frames, rest = divmod(features.shape[0] - 1, side * side)
    last = torch.tensor([features.shape[0] - 1], device=features.device)
    grid = (frames, side, side) if frames and not rest else None
    return last, grid


def _batched(items: List[torch.Tensor]) -> torch.Tensor:
    """``(1, K_total, C)``: the forward flattens ``pooler_output``'s first two dimensions."""
    return torch.cat(items)[None]


def _no_grid(inner: nn.Module, call: Dict[str, Any], index: int, num: int, *_: Any) -> None:
    return None


def _channels(inner: nn.Module, call: Dict[str, Any],
              encode: Callable[[nn.Module, Dict[str, Any]], Any]) -> Tuple[Any, torch.Tensor]:
    """``encode`` run under hooks at the feature layer: ``(encoder output, (crops or frames, T,
    1 + head_dim))``, each tower token's received attention then its keys, as the tokens the
    model selects (``vision_feature_select_strategy``)."""
    tower = inner.vision_tower
    chosen = call.get("vision_feature_layer")
    chosen = chosen if chosen is not None else inner.config.vision_feature_layer
    attn = feature_layer(getattr(tower, "vision_model", tower).encoder.layers, chosen).self_attn
    output, seen = capture_attention(attn, lambda: encode(inner, call))
    received, keys = tower_attention(attn, seen, class_token=False)
    channels = torch.cat([received[..., None], keys], dim=-1)
    strategy = call.get("vision_feature_select_strategy") or inner.config.vision_feature_select_strategy
    return output, channels[:, 1:] if strategy == "default" else channels


def _crops_per_image(inner: nn.Module, call: Dict[str, Any]) -> List[int]:
    """The crops of each image in the tower's batch, as ``get_image_features`` counts them
    (one for an image of a multi-image prompt)."""
    count = sys.modules[type(inner).__module__].image_size_to_num_patches
    sizes, per_sample = call["image_sizes"], call.get("batch_num_images")
    patched = [True] * len(sizes) if per_sample is None else [n == 1 for n in per_sample for _ in range(n)]
    return [count(image_size=size, grid_pinpoints=inner.config.image_grid_pinpoints,
                  patch_size=inner.config.vision_config.image_size) if crop else 1
            for size, crop in zip(sizes, patched)]


def _split_scores(items: List[torch.Tensor]) -> Scores:
    return [(item[:, 0], item[:, 1:]) for item in items]


def _image_tower(inner: nn.Module, call: Dict[str, Any]) -> Tuple[Any, Scores]:
    """``"visionzip"`` for images: the scores laid out by the model's own ``pack_image_features``."""
    output, channels = _channels(inner, call, _image)
    packed, _ = inner.pack_image_features(list(channels.split(_crops_per_image(inner, call))), call["image_sizes"],
                                          image_newline=channels.new_zeros(channels.shape[-1]),
                                          vision_aspect_ratio=inner.config.vision_aspect_ratio)
    return output, _split_scores(_views(inner, call, SimpleNamespace(pooler_output=packed)))


def _video_tower(inner: nn.Module, call: Dict[str, Any]) -> Tuple[Any, Scores]:
    """``"visionzip"`` for videos: the scores pooled by the model's own ``apply_pooling``."""
    output, channels = _channels(inner, call, _video)
    batch, frames = call["pixel_values_videos"].shape[:2]
    pooled = inner.apply_pooling(channels)
    pooled = pooled.reshape(batch, frames * pooled.shape[1], -1)
    pooled = torch.cat([pooled, pooled.new_zeros(batch, 1, pooled.shape[-1])], dim=1)  # the closing newline
    return output, _split_scores(list(pooled))


LLAVA_ONEVISION = register_adapter(VLMAdapter(
    name="llava_onevision", models=("LlavaOnevisionModel",), wrappers=("LlavaOnevisionForConditionalGeneration",),
    modalities=(
        Modality("image", "pixel_values", "image_token_id", _image, _no_grid, split=_views,
                 separators=_image_separators, tower=_image_tower),
        Modality("video", "pixel_values_videos", "video_token_id", _video, _no_grid, join=_batched,
                 separators=_video_separators, tower=_video_tower),
    ),
    positions=_one_d_positions, fastv=True,
))
