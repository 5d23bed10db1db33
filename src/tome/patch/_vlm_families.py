"""The VLM families of visual-token reduction, each a small declared adapter on the core
(:mod:`tome.patch._vlm`): Qwen2.5-VL, Qwen3-VL (3-D M-RoPE positions, the 2x2 patch merger,
images and video) and LLaVA-1.5 (CLIP tower, 1-D positions).

An adapter says where each image's features come from (the model's own
``get_image_features`` / ``get_video_features``: one ``(N, C)`` tensor per image or video,
after the projector or patch merger), their grid, the placeholder token ids, and how the
unpatched model computes the positions of the full sequence. Nothing here imports
transformers at import time.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ._lifecycle import Example
from ._vlm import Modality, VLMAdapter, register_adapter

__all__ = ["QWEN2_5_VL", "QWEN3_VL", "LLAVA", "examples"]


# ----------------------------------------------------------------------------- Qwen (M-RoPE)


def _qwen_image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_image_features(call["pixel_values"], call.get("image_grid_thw"), return_dict=True)


def _qwen_video(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_video_features(call["pixel_values_videos"], call.get("video_grid_thw"), return_dict=True)


def _merged_grid(key: str):
    """The grid of item ``index`` after the patch merger: ``(t, h / m, w / m)`` of ``call[key]``;
    without it (``generate`` encodes the pixels first and drops the grids), read from the
    item's M-RoPE positions."""

    def grid(inner: nn.Module, call: Dict[str, Any], index: int, num: int,
             positions: torch.Tensor) -> Optional[Tuple[int, int, int]]:
        if call.get(key) is None:
            return _grid_from_positions(positions, num)
        merge = inner.config.vision_config.spatial_merge_size
        t, h, w = (int(v) for v in call[key][index])
        return (t, h // merge, w // merge) if t * (h // merge) * (w // merge) == num else None

    return grid


def _grid_from_positions(positions: torch.Tensor, num: int) -> Optional[Tuple[int, int, int]]:
    """``(t, h, w)`` of ``num`` tokens at M-RoPE positions ``(num, 3)``: the first frame (the
    tokens sharing the first temporal position) spans ``h`` rows and ``w`` columns."""
    frame = positions[positions[:, 0] == positions[0, 0]]
    height = int(frame[:, 1].max() - frame[:, 1].min()) + 1
    width = int(frame[:, 2].max() - frame[:, 2].min()) + 1
    if frame.shape[0] != height * width or num % (height * width):
        return None
    return (num // (height * width), height, width)


def _mrope_positions(inner: nn.Module, call: Dict[str, Any], batch: int, length: int) -> torch.Tensor:
    """``(3, B, L)`` the full sequence's M-RoPE positions as the unpatched model computes them:
    the ones passed (``generate`` passes ``(4, B, L)``: text row first), else the model's own
    ``compute_3d_position_ids`` (which calls ``get_rope_index``), else 1-D ones, as the model
    falls back to without ``mm_token_type_ids``."""
    positions = call.get("position_ids")
    reference = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
    if positions is None:
        names = inspect.signature(inner.compute_3d_position_ids).parameters
        kwargs = {name: call.get(name) for name in names if name != "inputs_embeds"}
        embeds = call.get("inputs_embeds")
        kwargs["inputs_embeds"] = embeds if embeds is not None else reference.new_empty(batch, length, 0, dtype=torch.float32)
        positions = inner.compute_3d_position_ids(**kwargs)
    if positions is None:
        positions = torch.arange(length, device=reference.device).expand(3, batch, length)
    if positions.dim() == 3 and positions.shape[0] == 4:
        positions = positions[1:]
    elif positions.dim() == 2:
        positions = positions.unsqueeze(0).expand(3, -1, -1)
    return positions


def _store_rope_deltas(inner: nn.Module, deltas: torch.Tensor) -> None:
    inner.rope_deltas = deltas


_QWEN_MODALITIES = (
    Modality("image", "pixel_values", "image_token_id", _qwen_image, _merged_grid("image_grid_thw")),
    Modality("video", "pixel_values_videos", "video_token_id", _qwen_video, _merged_grid("video_grid_thw")),
)

QWEN2_5_VL = register_adapter(VLMAdapter(
    name="qwen2_5_vl", models=("Qwen2_5_VLModel",), wrappers=("Qwen2_5_VLForConditionalGeneration",),
    modalities=_QWEN_MODALITIES, positions=_mrope_positions, mrope=True, finish=_store_rope_deltas,
))

QWEN3_VL = register_adapter(VLMAdapter(
    name="qwen3_vl", models=("Qwen3VLModel",), wrappers=("Qwen3VLForConditionalGeneration",),
    modalities=_QWEN_MODALITIES, positions=_mrope_positions, mrope=True, finish=_store_rope_deltas,
    item_fields=("deepstack_features",),  # added to the hidden states at the visual tokens of early layers
))


# ----------------------------------------------------------------------------- LLaVA (1-D)


def _llava_image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_image_features(
        pixel_values=call["pixel_values"], vision_feature_layer=call.get("vision_feature_layer"),
        vision_feature_select_strategy=call.get("vision_feature_select_strategy"),
        image_sizes=call.get("image_sizes"), return_dict=True)


def _clip_grid(inner: nn.Module, call: Dict[str, Any], index: int, num: int,
               positions: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """The square patch grid of the CLIP tower (the class token dropped by the ``"default"``
    feature strategy), or None when the tokens are not that grid (``"full"`` keeps it)."""
    vision = inner.config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    return (1, side, side) if side * side == num else None


def _one_d_positions(inner: nn.Module, call: Dict[str, Any], batch: int, length: int) -> torch.Tensor:
    """``(1, B, L)``: the positions passed, or the unpatched language model's default (0 .. L-1)."""
    positions = call.get("position_ids")
    if positions is None:
        reference = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
        positions = torch.arange(length, device=reference.device).expand(batch, length)
    return positions.reshape(1, batch, length)


LLAVA = register_adapter(VLMAdapter(
    name="llava", models=("LlavaModel",), wrappers=("LlavaForConditionalGeneration",),
    modalities=(Modality("image", "pixel_values", "image_token_id", _llava_image, _clip_grid),),
    positions=_one_d_positions,
))


# ----------------------------------------------------------------------------- conformance examples


def examples() -> Sequence[Example]:
    """Tiny models for the conformance suite (see ``tests/patch/vlm_cases.py`` for the builders)."""
    return ()
