"""The VLM families of visual-token reduction, each a small declared adapter on the core
(:mod:`tome.patch._vlm`): Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (3-D M-RoPE positions, the 2x2
patch merger, images and video) and LLaVA-1.5 (CLIP tower, 1-D positions).

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
from ._vlm_attention import clip_tower, qwen_tower

__all__ = ["QWEN2_5_VL", "QWEN3_VL", "QWEN3_VL_MOE", "LLAVA", "examples"]


# ----------------------------------------------------------------------------- Qwen (M-RoPE)


def _qwen_image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    # By keyword, as the model's forward passes them (torch.compile guards on how a method is called).
    return inner.get_image_features(pixel_values=call["pixel_values"], image_grid_thw=call.get("image_grid_thw"),
                                    return_dict=True)


def _qwen_video(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_video_features(pixel_values_videos=call["pixel_values_videos"],
                                    video_grid_thw=call.get("video_grid_thw"), return_dict=True)


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
    if frame.shape[0] != height * width or num % (height * width) or (height * width == 1 and num > 1):
        return None  # not a grid (1-D positions: Qwen without mm_token_type_ids falls back to them)
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
    Modality("image", "pixel_values", "image_token_id", _qwen_image, _merged_grid("image_grid_thw"),
             tower=qwen_tower(_qwen_image, "image_grid_thw")),
    Modality("video", "pixel_values_videos", "video_token_id", _qwen_video, _merged_grid("video_grid_thw"),
             tower=qwen_tower(_qwen_video, "video_grid_thw")),
)

QWEN2_5_VL = register_adapter(VLMAdapter(
    name="qwen2_5_vl", models=("Qwen2_5_VLModel",), wrappers=("Qwen2_5_VLForConditionalGeneration",),
    modalities=_QWEN_MODALITIES, positions=_mrope_positions, mrope=True, finish=_store_rope_deltas, fastv=True,
))

QWEN3_VL = register_adapter(VLMAdapter(
    name="qwen3_vl", models=("Qwen3VLModel",), wrappers=("Qwen3VLForConditionalGeneration",),
    modalities=_QWEN_MODALITIES, positions=_mrope_positions, mrope=True, finish=_store_rope_deltas,
    fastv=True, item_fields=("deepstack_features",),  # added to the hidden states at the visual tokens of early layers
))

# Qwen3-VL with a mixture-of-experts language model: the same vision tower, merger, deepstack and
# M-RoPE code as Qwen3-VL (transformers generates it from Qwen3-VL's); only the decoder MLPs differ.
QWEN3_VL_MOE = register_adapter(VLMAdapter(
    name="qwen3_vl_moe", models=("Qwen3VLMoeModel",), wrappers=("Qwen3VLMoeForConditionalGeneration",),
    modalities=_QWEN_MODALITIES, positions=_mrope_positions, mrope=True, finish=_store_rope_deltas,
    fastv=True, item_fields=("deepstack_features",),
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
    modalities=(Modality("image", "pixel_values", "image_token_id", _llava_image, _clip_grid,
                         tower=clip_tower(_llava_image)),),
    positions=_one_d_positions, fastv=True,
))


# ----------------------------------------------------------------------------- conformance examples


_TINY_IMAGE, _TINY_START, _TINY_END = 60, 62, 63


def _tiny_qwen2_5_vl() -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=_TINY_IMAGE, video_token_id=61,
                              vision_start_token_id=_TINY_START, vision_end_token_id=_TINY_END,
                              tie_word_embeddings=False)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def _tiny_qwen_inputs(batch: int, seed: int) -> Dict[str, torch.Tensor]:
    """One 112 x 112 px image (an 8 x 8 patch grid: 16 visual tokens) per sample, text around it."""
    generator = torch.Generator().manual_seed(seed)
    row = [5, 7, _TINY_START] + [_TINY_IMAGE] * 16 + [_TINY_END, 9, 11, 13]
    ids = torch.tensor([row] * batch)
    ids[:, :2] = torch.randint(1, 60, (batch, 2), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == _TINY_IMAGE).long(),
            "pixel_values": torch.randn(batch * 64, 3 * 2 * 14 * 14, generator=generator),
            "image_grid_thw": torch.tensor([[1, 8, 8]] * batch)}


def _last_logits(out: Any) -> torch.Tensor:
    return out.logits[:, -1]  # the sequence shrinks with the visual tokens; the last token stays


def examples() -> Sequence[Example]:
    """A tiny Qwen2.5-VL for the conformance suite (tests/patch/vlm_cases.py builds the others)."""
    return (Example("qwen2_5_vl", _tiny_qwen2_5_vl, _tiny_qwen_inputs, merging={"visual_tokens": 4},
                    output=_last_logits, requires=("transformers",), exports=False, fullgraph=False),)
