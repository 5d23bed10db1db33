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
from typing import Any, Dict, Optional, Tuple

from .data import vqa

__all__ = ["ARCHS", "SIZES", "build_config", "build_model", "build_processor", "load_demo_vlm", "SHIPPED_VLMS",
           "VLM_ASSETS", "LLAVA_PATCH", "VISION_INITS", "vit_tower_shape", "init_llava_tower_from_vit"]

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


def _qwen2_5_vl_config(text: Dict[str, Any], widths: Dict[str, int], head_dim: int,
                       tokenizer_ids: Dict[str, int]) -> Any:
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


def build_config(arch: str, size: str = "small", patch_size: Optional[int] = None,
                 tower: Optional[Dict[str, Any]] = None, lm_layers: Optional[int] = None) -> Any:
    """The transformers config of one architecture at one size, for the task's vocabulary.

    Args:
        arch: One of :data:`ARCHS`.
        size: One of :data:`SIZES` (``"tiny"`` for tests, ``"small"`` for training).
        patch_size: LLaVA only: the CLIP tower's patch size at 224 px (default
            :data:`LLAVA_PATCH`, 64 visual tokens; 14 gives 256).
        tower: LLaVA only: the CLIP tower's shape as :func:`vit_tower_shape` gives it
            (``hidden``, ``layers``, ``heads``, ``intermediate``, ``act``, ``eps``), to take a
            pretrained ViT's weights; by default the size's own.
        lm_layers: Decoder layers of the language model (a positive int); by default the size's.

    Returns:
        A ``Qwen2_5_VLConfig`` or a ``LlavaConfig``.

    Raises:
        ValueError: for an unknown ``arch`` or ``size``; for ``patch_size`` or ``tower`` with
            ``qwen2_5_vl``, or a ``patch_size`` that does not divide 224; for ``lm_layers`` that
            is not a positive int.
    """
    widths = dict(_check(arch, size))
    if lm_layers is not None:
        if isinstance(lm_layers, bool) or not isinstance(lm_layers, int) or lm_layers <= 0:
            raise ValueError(f"lm_layers must be a positive int, got {lm_layers!r}")
        widths["layers"] = lm_layers
    if arch != "llava" and (patch_size is not None or tower is not None):
        raise ValueError(f"patch_size and tower are options of the llava tower, not of {arch!r}")
    patch = LLAVA_PATCH if patch_size is None else patch_size
    if isinstance(patch, bool) or not isinstance(patch, int) or patch <= 0 or 224 % patch:
        raise ValueError(f"patch_size must be a positive divisor of 224 (e.g. 14, 16, 28), got {patch_size!r}")
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
        return _qwen2_5_vl_config(text, widths, head_dim, tokenizer_ids)
    from transformers import CLIPVisionConfig, LlavaConfig, Qwen2Config

    shape = tower if tower is not None else {
        "hidden": widths["vision_hidden"], "layers": widths["vision_layers"], "heads": widths["vision_heads"],
        "intermediate": 2 * widths["vision_hidden"], "act": "quick_gelu", "eps": 1e-5}
    vision = CLIPVisionConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], hidden_act=shape["act"], layer_norm_eps=shape["eps"], image_size=224,
        patch_size=patch, projection_dim=shape["hidden"], initializer_range=_INIT_STD)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return LlavaConfig(
        vision_config=vision, text_config=Qwen2Config(**text), image_token_id=tokenizer_ids[vqa.LLAVA_IMAGE_TOKEN],
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(224 // patch) ** 2, tie_word_embeddings=True, initializer_range=_INIT_STD)


def build_model(arch: str, size: str = "small", seed: int = 0, patch_size: Optional[int] = None,
                vision_tower: Optional[Any] = None, lm_layers: Optional[int] = None) -> Any:
    """A freshly initialised model of :func:`build_config` (float32, ``sdpa`` attention).

    Args:
        arch: One of :data:`ARCHS`.
        size: One of :data:`SIZES`.
        seed: Seed of the initial weights.
        patch_size: LLaVA only: the tower's patch size (:func:`build_config`).
        vision_tower: LLaVA only: ``None`` (random tower) or a timm ViT (e.g. the shipped one a
            key of :data:`VISION_INITS` names): the tower takes its shape and weights
            (:func:`init_llava_tower_from_vit`), the rest stays random.
        lm_layers: Decoder layers of the language model (:func:`build_config`).

    Raises:
        ValueError: for an unknown ``arch`` or ``size``, options of the LLaVA tower given
            for ``qwen2_5_vl``, or a bad ``lm_layers``.
        TypeError: for a ``vision_tower`` that is not a ViT CLIP's blocks can express.
    """
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    vit = vision_tower
    if vit is not None and arch != "llava":
        raise ValueError(f"vision_tower is an option of the llava tower, not of {arch!r}")
    config = build_config(arch, size, patch_size, None if vit is None else vit_tower_shape(vit), lm_layers)
    cls = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else LlavaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation="sdpa")
    if vit is not None:
        init_llava_tower_from_vit(model, vit)
    return model


VISION_INITS: Dict[str, str] = {"shapes-vit": "shapes-long"}
"""Pretrained towers :func:`build_model` can start the LLaVA model from: the shipped shapes
classifier (``tome.tools.demo_model.load_demo_model(VISION_INITS[name])``, timm ViT, width 128, 6 blocks, patch 8 at 64 px, 95.85 %
on the shapes task), the analogue here of LLaVA's pretrained CLIP tower."""


def vit_tower_shape(vit: Any) -> Dict[str, Any]:
    """The CLIP tower shape (for :func:`build_config`'s ``tower``) that takes a timm ViT's blocks.

    All blocks but the last: a classifier that reads the class token trains its last block's
    patch-token outputs on nothing (only the class token's row reaches the head), so the
    patch features of the block before it are the ones worth passing on; this is also why
    LLaVA-1.5 takes its CLIP tower's second-to-last layer.

    Args:
        vit: A ``timm.models.vision_transformer.VisionTransformer`` with a class token,
            GELU MLPs and no layer scale or q/k norms (as the shipped shapes models).

    Raises:
        TypeError: for another model class or a ViT whose blocks CLIP cannot express.
    """
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    if not isinstance(vit, VisionTransformer) or vit.cls_token is None or len(vit.blocks) < 2:
        raise TypeError(f"the tower is taken from a timm VisionTransformer with a class token and at least two "
                        f"blocks, got {type(vit).__name__}")
    block = vit.blocks[0]
    plain = all(isinstance(module, nn.Identity) for b in vit.blocks for module in (b.ls1, b.ls2, b.attn.q_norm))
    if not plain or type(block.mlp.act).__name__ != "GELU" or getattr(block.mlp.act, "approximate", "none") != "none":
        raise TypeError("the tower is taken from a ViT with plain pre-norm blocks (GELU MLP, no layer scale, "
                        "no q/k norm), as CLIP's")
    return {"hidden": vit.embed_dim, "layers": len(vit.blocks) - 1, "heads": block.attn.num_heads,
            "intermediate": block.mlp.fc1.out_features, "act": "gelu", "eps": block.norm1.eps}


def init_llava_tower_from_vit(model: Any, vit: Any, calibration: Optional[Any] = None) -> None:
    """Copy a timm ViT's weights into a LLaVA model's CLIP tower, in place.

    The patch embedding is resampled to the tower's patch size with timm's
    ``resample_patch_embed`` (the pseudo-inverse resize of FlexiViT, Beyer et al., CVPR 2023,
    Sec. 3.4: the token of an upscaled patch matches the original one), the position
    embedding to its grid with ``resample_abs_pos_embed``; the patch embedding's bias (CLIP's
    has none) is added to every patch position. Attention (``qkv`` split into q, k, v), MLP and
    norms map one to one for the tower's blocks (the ViT's first ones; :func:`vit_tower_shape`
    takes all but the last). CLIP normalises the embedded tokens (``pre_layrnorm``) where the ViT does not: its
    weight and bias are set to the mean per-token standard deviation and mean of the ViT's
    embedded tokens on ``calibration`` images (by default four of the question task's
    training images), so the residual stream starts at the ViT's scale.

    Args:
        model: A ``LlavaForConditionalGeneration`` built with ``tower=vit_tower_shape(vit)``.
        vit: The timm ``VisionTransformer``.
        calibration: Optional float tensor ``(n, 3, 224, 224)`` of normalised images.

    Raises:
        ValueError: if the tower's widths are not the ViT's, or it has more blocks.
    """
    import torch
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    config = model.config.vision_config
    expected = {**vit_tower_shape(vit), "layers": config.num_hidden_layers}
    if config.num_hidden_layers > len(vit.blocks) or expected != {
            "hidden": config.hidden_size, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "intermediate": config.intermediate_size, "act": config.hidden_act, "eps": config.layer_norm_eps}:
        raise ValueError(f"the llava tower's shape is not the ViT's {vit_tower_shape(vit)}: build the model with "
                         "build_config(..., tower=vit_tower_shape(vit))")
    grid = config.image_size // config.patch_size
    with torch.no_grad():
        emb = tower.embeddings
        emb.patch_embedding.weight.copy_(resample_patch_embed(vit.patch_embed.proj.weight,
                                                              [config.patch_size, config.patch_size]))
        emb.class_embedding.copy_(vit.cls_token[0, 0])
        patches = resample_abs_pos_embed(vit.pos_embed, [grid, grid], num_prefix_tokens=1)[0].clone()
        patches[1:] += vit.patch_embed.proj.bias
        emb.position_embedding.weight.copy_(patches)
        for layer, block in zip(tower.encoder.layers, vit.blocks):
            _copy_block(layer, block)
        tower.post_layernorm.weight.copy_(vit.norm.weight)
        tower.post_layernorm.bias.copy_(vit.norm.bias)
        _calibrate_pre_layrnorm(tower, config.image_size, calibration)


def _copy_block(layer: Any, block: Any) -> None:
    """A timm ViT block's weights into a CLIP encoder layer (``qkv`` split into q, k, v)."""
    q, k, v = block.attn.qkv.weight.chunk(3)
    qb, kb, vb = block.attn.qkv.bias.chunk(3)
    for proj, w, b in ((layer.self_attn.q_proj, q, qb), (layer.self_attn.k_proj, k, kb),
                       (layer.self_attn.v_proj, v, vb),
                       (layer.self_attn.out_proj, block.attn.proj.weight, block.attn.proj.bias),
                       (layer.mlp.fc1, block.mlp.fc1.weight, block.mlp.fc1.bias),
                       (layer.mlp.fc2, block.mlp.fc2.weight, block.mlp.fc2.bias),
                       (layer.layer_norm1, block.norm1.weight, block.norm1.bias),
                       (layer.layer_norm2, block.norm2.weight, block.norm2.bias)):
        proj.weight.copy_(w)
        proj.bias.copy_(b)


def _calibrate_pre_layrnorm(tower: Any, image_size: int, calibration: Optional[Any]) -> None:
    """Set CLIP's ``pre_layrnorm`` to the scale and offset of the embedded tokens (see
    :func:`init_llava_tower_from_vit`)."""
    import numpy as np
    import torch

    with torch.no_grad():
        emb = tower.embeddings
        if calibration is None:
            from .data import synthetic

            mean = torch.tensor(synthetic.MEAN).view(1, 3, 1, 1)
            std = torch.tensor(synthetic.STD).view(1, 3, 1, 1)
            images = [vqa.make_sample(i, "train", 0, image_size).image for i in range(4)]
            calibration = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 255 - mean) / std
        pre_layrnorm = tower.pre_layrnorm
        tower.pre_layrnorm = torch.nn.Identity()
        tokens = emb(calibration.float())
        tower.pre_layrnorm = pre_layrnorm
        pre_layrnorm.weight.fill_(float(tokens.std(-1).mean()))
        pre_layrnorm.bias.fill_(float(tokens.mean()))


def build_processor(arch: str, image_size: int = 224, patch_size: Optional[int] = None) -> Any:
    """The task's processor for ``arch`` (:func:`tome.data.vqa.build_qwen2_5_vl_processor` or ``build_llava_processor``).

    Args:
        arch: One of :data:`ARCHS`.
        image_size: Image side in pixels.
        patch_size: LLaVA only: the tower's patch size (default :data:`LLAVA_PATCH`).

    Raises:
        ValueError: for an unknown ``arch`` or an image size the processor cannot take.
    """
    _check(arch, "small")
    if arch == "qwen2_5_vl":
        if patch_size is not None:
            raise ValueError("patch_size is an option of the llava tower, not of 'qwen2_5_vl'")
        return vqa.build_qwen2_5_vl_processor(image_size)
    if image_size != 224:
        raise ValueError(f"the LLaVA model's CLIP tower takes 224 px images, got image_size={image_size!r}")
    return vqa.build_llava_processor(image_size, LLAVA_PATCH if patch_size is None else patch_size)


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
