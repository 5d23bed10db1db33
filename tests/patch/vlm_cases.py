"""Tiny vision-language models built from configs (no download, no tokenizer) and their inputs,
for tests/patch/test_vlm.py: Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and LLaVA-1.5 with hidden size 64, two
layers, and ``input_ids`` holding the placeholder tokens written out by hand.

Token ids: 0 pads, 1..59 are text, then the placeholders below.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from conftest import trained_like_

VOCAB = 64
IMAGE, VIDEO, START, END = 60, 61, 62, 63
PAD = 0
TEXT = 64
HEADS = 4


def _text(**extra: Any) -> Dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=TEXT, intermediate_size=2 * TEXT, num_hidden_layers=2,
                 num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD,
                 eos_token_id=1, bos_token_id=1, **extra)


def qwen2_5_vl() -> nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = _text(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                              vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=False)
    return _ready(Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa"))


_QWEN3_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}


def _qwen3_vision() -> dict:
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])


def qwen3_vl() -> nn.Module:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = _text(head_dim=TEXT // HEADS, rope_parameters=dict(_QWEN3_ROPE))
    config = Qwen3VLConfig(text_config=text, vision_config=_qwen3_vision(), image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=False)
    return _ready(Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="sdpa"))


def qwen3_vl_moe() -> nn.Module:
    """Qwen3-VL with a mixture-of-experts language model: 4 experts, 2 per token."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = _text(head_dim=TEXT // HEADS, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=TEXT,
                 decoder_sparse_step=1, rope_parameters=dict(_QWEN3_ROPE))
    config = Qwen3VLMoeConfig(text_config=text, vision_config=_qwen3_vision(), image_token_id=IMAGE,
                              video_token_id=VIDEO,
                              vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=False)
    return _ready(Qwen3VLMoeForConditionalGeneration._from_config(config, attn_implementation="sdpa"))


LLAVA_SIDE = 8  # 56 px images, 7 px patches: an 8 x 8 grid of 64 visual tokens


def llava() -> nn.Module:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=7 * LLAVA_SIDE, patch_size=7, projection_dim=32)
    text = Qwen2Config(**_text(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=LLAVA_SIDE ** 2, tie_word_embeddings=False)
    return _ready(LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa"))


BUILDERS = {"qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "qwen3_vl_moe": qwen3_vl_moe, "llava": llava}


def _ready(model: nn.Module) -> nn.Module:
    return trained_like_(model, seed=0).eval()


# ----------------------------------------------------------------------------- inputs


def _words(generator: torch.Generator, count: int) -> List[int]:
    return torch.randint(1, 60, (count,), generator=generator).tolist()


def qwen_inputs(model: nn.Module, samples: Sequence[Sequence[Tuple[int, int]]], seed: int = 0,
                videos: Optional[Sequence[Sequence[Tuple[int, int, int]]]] = None, pad: str = "left",
                prompt: Tuple[int, int] = (3, 4), frames_apart: bool = False) -> Dict[str, torch.Tensor]:
    """Inputs of a tiny Qwen VLM: per sample, a list of images as ``(h, w)`` patch grids (even
    numbers; ``h * w / 4`` tokens each) and optionally videos as ``(t, h, w)``; text around them;
    left padding (``frames_apart``: each video frame in its own ``<start> ... <end>`` after a
    timestamp word, as Qwen3-VL writes videos). Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, the pixel
    values and grids."""
    generator = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    channels = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    videos = videos if videos is not None else [[] for _ in samples]
    rows, types, images, image_grids, clips, video_grids = [], [], [], [], [], []
    for n, (sample_images, sample_videos) in enumerate(zip(samples, videos)):
        ids, kinds = _words(generator, prompt[0] + n), []
        kinds = [0] * len(ids)
        for (h, w) in sample_images:
            ids += [START] + [IMAGE] * (h * w // 4) + [END] + _words(generator, 2)
            kinds += [0] + [1] * (h * w // 4) + [0, 0, 0]
            image_grids.append([1, h, w])
            images.append(torch.randn(h * w, channels, generator=generator))
        for (t, h, w) in sample_videos:
            for frames in ([1] * t if frames_apart else [t]):
                ids += _words(generator, 1) + [START] + [VIDEO] * (frames * h * w // 4) + [END]
                kinds += [0, 0] + [2] * (frames * h * w // 4) + [0]
            video_grids.append([t, h, w])
            clips.append(torch.randn(t * h * w, channels, generator=generator))
        ids += _words(generator, prompt[1])
        kinds += [0] * prompt[1]
        rows.append(ids)
        types.append(kinds)
    inputs = _padded(rows, types, pad)
    if images:
        inputs["pixel_values"] = torch.cat(images)
        inputs["image_grid_thw"] = torch.tensor(image_grids)
    if clips:
        inputs["pixel_values_videos"] = torch.cat(clips)
        inputs["video_grid_thw"] = torch.tensor(video_grids)
    return inputs


def llava_inputs(model: nn.Module, images_per_sample: Sequence[int], seed: int = 0,
                 prompt: Tuple[int, int] = (3, 4)) -> Dict[str, torch.Tensor]:
    """Inputs of the tiny LLaVA: per sample, that many images of 64 tokens each, text around them."""
    generator = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    rows, types = [], []
    for n, count in enumerate(images_per_sample):
        ids = _words(generator, prompt[0] + n)
        for _ in range(count):
            ids += [IMAGE] * LLAVA_SIDE ** 2 + _words(generator, 2)
        ids += _words(generator, prompt[1])
        rows.append(ids)
        types.append([int(i == IMAGE) for i in ids])
    inputs = _padded(rows, types, "left")
    del inputs["mm_token_type_ids"]
    inputs["pixel_values"] = torch.randn(sum(images_per_sample), 3, size, size, generator=generator)
    return inputs


def _padded(rows: List[List[int]], types: List[List[int]], side: str) -> Dict[str, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    kinds = torch.zeros(len(rows), length, dtype=torch.long)
    for n, (row, kind) in enumerate(zip(rows, types)):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[n, span], mask[n, span], kinds[n, span] = torch.tensor(row), 1, torch.tensor(kind)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": kinds}


def sample(inputs: Dict[str, torch.Tensor], index: int, images: Sequence[int], videos: Sequence[int] = ()) -> Dict[str, torch.Tensor]:
    """The inputs of one sample of a batch (padding removed), given which images and videos it holds."""
    keep = inputs["attention_mask"][index].bool()
    out = {key: inputs[key][index][keep][None] for key in ("input_ids", "attention_mask", "mm_token_type_ids")
           if key in inputs}
    for pixels, grid, chosen in (("pixel_values", "image_grid_thw", images),
                                 ("pixel_values_videos", "video_grid_thw", videos)):
        if grid in inputs and chosen:
            sizes = inputs[grid].prod(-1).tolist()
            parts = inputs[pixels].split(sizes)
            out[pixels] = torch.cat([parts[i] for i in chosen])
            out[grid] = inputs[grid][list(chosen)]
        elif pixels in inputs and grid not in inputs and chosen:  # LLaVA: one image per row
            out[pixels] = inputs[pixels][list(chosen)]
    return out


def text_labels(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels for training: the input ids, -100 at the image and video placeholders, the padding
    and each sample's first token (with left padding, transformers' shifted loss would have the
    last padding row predict it)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    first = torch.zeros_like(mask, dtype=torch.bool).scatter_(1, mask.argmax(1, keepdim=True), True)
    return ids.masked_fill((ids == IMAGE) | (ids == VIDEO) | (mask == 0) | first, -100)
