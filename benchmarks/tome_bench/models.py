"""Models, schedules and precisions the suite knows by short name."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["MODELS", "ModelSpec", "build_model", "patched_twin", "parse_schedule", "schedule_label", "autocast", "dtype_supported", "cpu_flags"]


@dataclass(frozen=True)
class ModelSpec:
    timm_name: str
    image_size: int


MODELS: Dict[str, ModelSpec] = {
    "vit_s16": ModelSpec("vit_small_patch16_224", 224),
    "vit_b16": ModelSpec("vit_base_patch16_224", 224),
    "vit_l16": ModelSpec("vit_large_patch16_224", 224),
    "vit_b16_384": ModelSpec("vit_base_patch16_384", 384),
    "vit_l16_384": ModelSpec("vit_large_patch16_384", 384),
    # timm Eva with rotary positions (tome.patch.eva); dynamic image size, so one model serves 224 and 448.
    "dinov3_s16": ModelSpec("vit_small_patch16_dinov3", 224),
    "dinov3_b16": ModelSpec("vit_base_patch16_dinov3", 224),
    "dinov3_s16_448": ModelSpec("vit_small_patch16_dinov3", 448),
    "dinov3_b16_448": ModelSpec("vit_base_patch16_dinov3", 448),
}


def build_model(key: str, device: torch.device, seed: int = 0) -> Tuple[nn.Module, ModelSpec]:
    """An unpatched timm ViT (or Eva) with random weights (``pretrained=False``), in eval mode.

    Args:
        key: A short name from :data:`MODELS` or any timm ViT name (then 224 px
            unless the name ends in ``_384`` etc.).
        device: Where to put it.
        seed: Seed for the random weights.
    """
    import timm

    spec = MODELS.get(key)
    if spec is None:
        match = re.search(r"_(\d{3})$", key)
        spec = ModelSpec(key, int(match.group(1)) if match else 224)
    torch.manual_seed(seed)
    model = timm.create_model(spec.timm_name, pretrained=False).eval().to(device)
    return model, spec


def patched_twin(model: nn.Module) -> nn.Module:
    """A ToMe-patched copy of ``model`` that shares its parameter and buffer tensors.

    Sharing the very same weight memory keeps the comparison fair: two separate
    copies of a model can differ by a few percent in speed from memory layout alone.
    """
    import copy

    import tome

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo)
    return tome.apply_patch(twin)  # the family (timm ViT, Eva) is detected


Schedule = Union[int, Tuple[int, float]]


def parse_schedule(text: str) -> Schedule:
    """``"16"`` -> 16, ``"16d"`` -> (16, -1.0) (decreasing), ``"16:-0.5"`` -> (16, -0.5)."""
    text = text.strip()
    if text.endswith("d"):
        return (int(text[:-1]), -1.0)
    if ":" in text:
        r, inflection = text.split(":")
        return (int(r), float(inflection))
    return int(text)


def schedule_label(schedule: Schedule) -> str:
    if isinstance(schedule, tuple):
        return f"r=({schedule[0]},{schedule[1]:g})"
    return f"r={schedule}"


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def dtype_supported(name: str, device: torch.device) -> Optional[str]:
    """None if ``name`` ("fp32", "bf16", "fp16") runs well on ``device``, else why not."""
    if name == "fp32":
        return None
    if device.type == "cuda":
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16"
        return None
    if name == "fp16":
        return "fp16 autocast is not a fast path on CPU"
    flags = cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return "this CPU has no native bf16 (avx512_bf16 / amx_bf16)"
    return None


def autocast(name: str, device: torch.device):
    """Context for the precision: nothing for fp32, ``torch.autocast`` otherwise."""
    if name == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return torch.autocast(device.type, dtype=dtype)
