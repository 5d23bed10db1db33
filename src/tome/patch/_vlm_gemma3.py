"""Gemma 3 (``Gemma3ForConditionalGeneration``) as a family of visual-token reduction: an
adapter on the core (:mod:`tome.patch._vlm`).

The SigLIP tower's patch grid is average-pooled by ``Gemma3MultiModalProjector`` to
``mm_tokens_per_image`` tokens (256: a 16 x 16 grid, row-major); reduction starts there, so
the projector still pools the full grid. Positions are 1-D. ``token_type_ids`` (1 on image
tokens) give every contiguous run of image tokens bidirectional attention inside the run;
they are shortened with the sequence, so each image's kept tokens still see each other both
ways. Gemma 3's sliding-window layers count sequence indices, so after a reduction a local
layer's window of ``W`` tokens reaches as far as it would on the shorter prompt.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._vlm import Modality, VLMAdapter, register_adapter
from ._vlm_families import _one_d_positions

__all__ = ["GEMMA3"]


def _image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_image_features(call["pixel_values"], return_dict=True)


def _pooled_grid(inner: nn.Module, call: Dict[str, Any], index: int, num: int, *_: Any) -> Optional[Tuple[int, int, int]]:
    """The projector's square output grid, ``(1, s, s)`` with ``s * s = mm_tokens_per_image``."""
    side = math.isqrt(num)
    return (1, side, side) if side * side == num else None


def _batched(items: List[torch.Tensor]) -> torch.Tensor:
    """``(1, K_total, C)``: the forward reads ``pooler_output`` as one tensor and scatters it flat."""
    return torch.cat(items)[None]


GEMMA3 = register_adapter(VLMAdapter(
    name="gemma3", models=("Gemma3Model",), wrappers=("Gemma3ForConditionalGeneration",),
    modalities=(Modality("image", "pixel_values", "image_token_id", _image, _pooled_grid, join=_batched),),
    positions=_one_d_positions, token_fields=("token_type_ids",),
))
