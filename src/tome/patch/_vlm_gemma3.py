"""Gemma 3 (``Gemma3ForConditionalGeneration``) as a family of visual-token reduction: an
adapter on the core (:mod:`tome.patch._vlm`).

The SigLIP tower's patch grid is average-pooled by ``Gemma3MultiModalProjector`` to
``mm_tokens_per_image`` tokens (256: a 16 x 16 grid, row-major); reduction starts there, so
the projector still pools the full grid. Positions are 1-D. ``token_type_ids`` (1 on image
tokens) give every contiguous run of image tokens bidirectional attention inside the run;
they are shortened with the sequence, so each image's kept tokens still see each other both
ways. Gemma 3's sliding-window layers count sequence indices, so after a reduction a local
layer's window of ``W`` tokens reaches as far as it would on the shorter prompt.

``"visionzip"``: SigLIP has no class token, so a patch's score is the attention it receives
from every patch at the tower's last layer (whose output the projector pools), averaged over
heads; a pooled token's score is the sum over the ``k x k`` patches the projector's average
pool makes it of, its keys their mean. ``"fastv"``: the language model's layers as they are
(a sliding-window layer's last token sees only its window).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._vlm import Modality, VLMAdapter, register_adapter
from ._vlm_attention import Scores, capture_attention, grouped, tower_attention
from ._vlm_families import _one_d_positions

__all__ = ["GEMMA3"]


def _image(inner: nn.Module, call: Dict[str, Any]) -> Any:
    return inner.get_image_features(call["pixel_values"], return_dict=True)


def _pooled_grid(inner: nn.Module, call: Dict[str, Any], index: int, num: int, *_: Any) -> Optional[Tuple[int, int, int]]:
    """The projector's square output grid, ``(1, s, s)`` with ``s * s = mm_tokens_per_image``."""
    side = math.isqrt(num)
    return (1, side, side) if side * side == num else None


def pool_members(patches: int, kernel: int) -> torch.Tensor:
    """``(side * side, kernel * kernel)``: the patches (row-major over the ``patches x patches``
    grid) each cell of a ``kernel x kernel`` average pool with stride ``kernel`` covers, cells
    row-major (``Gemma3MultiModalProjector.avg_pool``)."""
    side = patches // kernel
    return torch.arange(patches * patches).view(side, kernel, side, kernel).permute(0, 2, 1, 3).reshape(
        side * side, kernel * kernel)


def _tower(inner: nn.Module, call: Dict[str, Any]) -> Tuple[Any, Scores]:
    """``"visionzip"``: the encoder output and, per image, each pooled token's attention and keys."""
    tower = inner.vision_tower
    attn = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    output, seen = capture_attention(attn, lambda: _image(inner, call))
    received, keys = tower_attention(attn, seen, class_token=False)
    projector = inner.multi_modal_projector
    received, keys = grouped(received, keys, pool_members(projector.patches_per_image, projector.kernel_size))
    return output, list(zip(received, keys))


def _batched(items: List[torch.Tensor]) -> torch.Tensor:
    """``(1, K_total, C)``: the forward reads ``pooler_output`` as one tensor and scatters it flat."""
    return torch.cat(items)[None]


GEMMA3 = register_adapter(VLMAdapter(
    name="gemma3", models=("Gemma3Model",), wrappers=("Gemma3ForConditionalGeneration",),
    modalities=(Modality("image", "pixel_values", "image_token_id", _image, _pooled_grid, join=_batched,
                         tower=_tower),),
    positions=_one_d_positions, token_fields=("token_type_ids",), fastv=True,
))
