"""Small vision-language models for the generated question task (:mod:`tome.data.vqa`).

Two architectures, both real transformers classes built from configs (no download), so the
library's VLM patching applies to them as to the published checkpoints:

- ``"qwen2_5_vl"``: ``Qwen2_5_VLForConditionalGeneration``: a windowed-attention ViT with
  2-D rotary positions, the 2x2 patch merger, and a language model with 3-D M-RoPE positions.
- ``"llava"``: ``LlavaForConditionalGeneration``: a CLIP vision tower, LLaVA-1.5's two-layer
  MLP projector, and a Qwen2 language model with 1-D positions.

The shipped models trained on the task (``docs/vlm.md``) load with :func:`load_demo_vlm`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from .data import vqa

__all__ = ["ARCHS", "SIZES", "build_config", "build_model", "build_processor", "load_demo_vlm", "SHIPPED_VLMS",
           "VLM_ASSETS"]

ARCHS: Tuple[str, ...] = ("qwen2_5_vl", "llava")
"""The two architectures."""

# Widths per size: "tiny" is for tests (seconds), "small" is what the shipped models use.
SIZES: Dict[str, Dict[str, int]] = {
    "tiny": {"vision_hidden": 32, "vision_layers": 2, "vision_heads": 2, "hidden": 32, "layers": 1, "heads": 2,
             "kv_heads": 1},
    "small": {"vision_hidden": 128, "vision_layers": 4, "vision_heads": 4, "hidden": 128, "layers": 3, "heads": 4,
              "kv_heads": 2},
}
# Standard deviation of the initial weights (config.initializer_range), about 1 / sqrt(width).
# The transformers default (0.02, made for widths in the thousands) left these narrow models at
# the answer prior for the first 1 000 steps (docs/vlm.md); at ~1/sqrt(width) a batch of 8
# questions is fitted in 50 steps instead of not at all in 150.
_INIT_STD = 0.08
"""Model widths and depths by size name."""

VLM_ASSETS = Path(__file__).resolve().parent / "assets" / "vlm"
"""Where the shipped models live in the package."""

SHIPPED_VLMS: Dict[str, Path] = {
    "vqa-qwen2_5_vl": VLM_ASSETS / "vqa-qwen2_5_vl",
    "vqa-llava": VLM_ASSETS / "vqa-llava",
}
"""The shipped models by name: ``save_pretrained`` folders (weights, config, processor, model card)."""

LLAVA_PATCH = 28
"""Patch size of the LLaVA model's CLIP tower: 224 px -> 8 x 8 = 64 visual tokens, as Qwen's merger gives."""


def _check(arch: str, size: str) -> Dict[str, int]:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    return SIZES[size]


def build_config(arch: str, size: str = "small") -> Any:
    """The transformers config of one architecture at one size, for the task's vocabulary.

    Args:
        arch: One of :data:`ARCHS`.
        size: One of :data:`SIZES` (``"tiny"`` for tests, ``"small"`` for training).

    Returns:
        A ``Qwen2_5_VLConfig`` or a ``LlavaConfig``.

    Raises:
        ValueError: for an unknown ``arch`` or ``size``.
    """
    widths = _check(arch, size)
    tokenizer_ids = {token: i for i, token in enumerate(vqa.VOCAB)}
    head_dim = widths["hidden"] // widths["heads"]
    text = {
        "vocab_size": len(vqa.VOCAB), "hidden_size": widths["hidden"], "intermediate_size": 3 * widths["hidden"],
        "num_hidden_layers": widths["layers"], "num_attention_heads": widths["heads"],
        "num_key_value_heads": widths["kv_heads"], "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "pad_token_id": tokenizer_ids[vqa.PAD], "eos_token_id": tokenizer_ids[vqa.EOS],
        "bos_token_id": tokenizer_ids[vqa.EOS], "tie_word_embeddings": True, "initializer_range": _INIT_STD,
    }
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        half = head_dim // 2  # rotary frequencies per head, split over (time, height, width)
        section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        vision = {
            "depth": widths["vision_layers"], "hidden_size": widths["vision_hidden"],
            "intermediate_size": 2 * widths["vision_hidden"], "num_heads": widths["vision_heads"],
            "out_hidden_size": widths["hidden"], "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112,
            # Windowed attention in all blocks but these, as Qwen2.5-VL's (7, 15, 23, 31) of 32.
            "fullatt_block_indexes": list(range(1, widths["vision_layers"], 2)), "initializer_range": _INIT_STD,
        }
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=tokenizer_ids[vqa.IMAGE_TOKEN],
            video_token_id=tokenizer_ids[vqa.VIDEO_TOKEN], vision_start_token_id=tokenizer_ids[vqa.VISION_START],
            vision_end_token_id=tokenizer_ids[vqa.VISION_END], tie_word_embeddings=True,
            initializer_range=_INIT_STD)
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    vision = CLIPVisionConfig(
        hidden_size=widths["vision_hidden"], intermediate_size=2 * widths["vision_hidden"],
        num_hidden_layers=widths["vision_layers"], num_attention_heads=widths["vision_heads"], image_size=224,
        patch_size=LLAVA_PATCH, projection_dim=widths["vision_hidden"], initializer_range=_INIT_STD)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return LlavaConfig(
        vision_config=vision, text_config=Qwen2Config(**text), image_token_id=tokenizer_ids[vqa.LLAVA_IMAGE_TOKEN],
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(224 // LLAVA_PATCH) ** 2, tie_word_embeddings=True, initializer_range=_INIT_STD)


def build_model(arch: str, size: str = "small", seed: int = 0) -> Any:
    """A freshly initialised model of :func:`build_config` (float32, ``sdpa`` attention).

    Args:
        arch: One of :data:`ARCHS`.
        size: One of :data:`SIZES`.
        seed: Seed of the initial weights.

    Raises:
        ValueError: for an unknown ``arch`` or ``size``.
    """
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    config = build_config(arch, size)
    cls = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else LlavaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation="sdpa")
    return model


def build_processor(arch: str, image_size: int = 224) -> Any:
    """The task's processor for ``arch`` (:func:`tome.data.vqa.build_qwen2_5_vl_processor` or ``build_llava_processor``).

    Raises:
        ValueError: for an unknown ``arch`` or an image size the processor cannot take.
    """
    _check(arch, "small")
    if arch == "qwen2_5_vl":
        return vqa.build_qwen2_5_vl_processor(image_size)
    if image_size != 224:
        raise ValueError(f"the LLaVA model's CLIP tower takes 224 px images, got image_size={image_size!r}")
    return vqa.build_llava_processor(image_size, LLAVA_PATCH)


def load_demo_vlm(name: str = "vqa-qwen2_5_vl") -> Tuple[Any, Any]:
    """A shipped model trained on the question task, and its processor, from the package (offline).

    Args:
        name: A key of :data:`SHIPPED_VLMS`.

    Returns:
        ``(model in eval mode, processor)``; ``model.generate(**processor(text=..., images=...))``
        answers questions written with :func:`tome.data.vqa.prompt_text`.

    Raises:
        ValueError: for a name that is not a shipped model.
        FileNotFoundError: if the package was installed without the model's files.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if name not in SHIPPED_VLMS:
        raise ValueError(f"no shipped VLM is called {name!r}; choose one of {sorted(SHIPPED_VLMS)}")
    folder = SHIPPED_VLMS[name]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the shipped model {name!r} is missing from {folder}")
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval(), processor
