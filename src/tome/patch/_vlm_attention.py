"""The attention the attention-ranked visual-token methods need, computed from a layer's
queries and keys: never by switching the model to eager attention or asking it to return
attention weights (which would cost the speed the reduction is for).

* VisionZip (:func:`tome.visual_tokens.visionzip`): the attention each visual token receives
  in the vision tower, from the layer the features come from. A forward hook captures that
  layer's query and key projections while the model's own ``get_image_features`` runs; the
  softmax rows are recomputed here, a block of queries at a time.
* FastV (:func:`tome.visual_tokens.fastv`): see ``_vlm_fastv``.

Each ``*_tower`` function runs one modality's encoder (the adapter's ``encode``) under its
hooks and returns ``(encoder output, [(attention (N,), keys (N, D)), ...])``, one pair per
image or video, in the order of ``pooler_output``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import nn

__all__ = ["qwen_tower", "clip_tower", "received_attention"]

Scores = List[Tuple[torch.Tensor, torch.Tensor]]
_BLOCK_WEIGHTS = 2 ** 25  # softmax weights computed at once (128 MiB in float32)


@contextlib.contextmanager
def _captured(hooks: List[Tuple[nn.Module, str, Callable[..., None]]]) -> Iterator[None]:
    """Register ``(module, "pre" | "post", fn)`` hooks for the duration of the block."""
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def received_attention(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """``(N,)``: the attention each of ``N`` tokens receives, averaged over all ``N`` queries
    and all heads: the column means of ``softmax(q k^T * scale)``, computed a block of
    queries at a time (about ``2 ** 25`` weights at once, at least one query per block).

    Args:
        query, key: ``(heads, N, head_dim)``.
        scale: the attention's scaling (``head_dim ** -0.5``).
    """
    heads, num = query.shape[:2]
    total = torch.zeros(num, dtype=torch.float32, device=query.device)
    key = key.float()
    step = max(1, _BLOCK_WEIGHTS // (heads * num))
    for start in range(0, num, step):
        block = query[:, start: start + step].float()
        total += torch.softmax(block @ key.transpose(1, 2) * scale, dim=-1).sum(dim=(0, 1))
    return total / (heads * num)


# ----------------------------------------------------------------------------- Qwen2.5-VL / Qwen3-VL


def qwen_tower(encode: Callable[[nn.Module, Dict[str, Any]], Any], grids: str) -> Callable[..., Tuple[Any, Scores]]:
    """The VisionZip scores of a Qwen vision tower's last block (the one the patch merger
    reads): its fused ``qkv`` output is captured, the tower's 2-D rotary embedding applied
    to it here (with the model's own ``apply_rotary_pos_emb_vision``, from the cos/sin the
    block is given), and the attention each patch receives computed within the spans that
    block attends over (its ``cu_seqlens``: the whole image or frame in a full-attention
    block, a window in a windowed one). A merged token's score is the sum over the
    ``merge x merge`` patches it covers, its keys their mean (over heads and patches); the
    window order of Qwen2.5-VL is undone as the tower undoes it."""

    def tower(inner: nn.Module, call: Dict[str, Any]) -> Tuple[Any, Scores]:
        visual = inner.visual
        attn = visual.blocks[-1].attn
        seen: Dict[str, Any] = {}
        hooks = [(attn, "pre", lambda module, args, kwargs: seen.update(kwargs)),
                 (attn.qkv, "post", lambda module, args, out: seen.update(qkv=out))]
        with _captured(hooks):
            output = encode(inner, call)
        return output, _qwen_scores(visual, attn, seen, call[grids])

    return tower


def _qwen_scores(visual: nn.Module, attn: nn.Module, seen: Dict[str, Any], grid_thw: torch.Tensor) -> Scores:
    qkv = seen["qkv"]
    length = qkv.shape[0]
    query, key, _ = qkv.reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    query, key = rotate(query, key, *seen["position_embeddings"])
    query, key = query.transpose(0, 1), key.transpose(0, 1)  # (heads, N, head_dim)
    bounds = seen["cu_seqlens"].tolist()
    received = torch.cat([received_attention(query[:, a:b], key[:, a:b], attn.scaling)
                          for a, b in zip(bounds[:-1], bounds[1:])])
    unit = visual.spatial_merge_size ** 2
    received = received.reshape(-1, unit).sum(1)
    keys = key.float().mean(0).reshape(-1, unit, key.shape[-1]).mean(1)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL runs its blocks in window order
        window = sys.modules[type(visual).__module__].get_vision_window_index(
            grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size)[0]
        order = torch.argsort(window.to(received.device))
        received, keys = received[order], keys[order]
    counts = (grid_thw.prod(-1) // unit).tolist()
    return list(zip(received.split(counts), keys.split(counts)))


# ----------------------------------------------------------------------------- LLaVA (CLIP)


def clip_tower(encode: Callable[[nn.Module, Dict[str, Any]], Any]) -> Callable[..., Tuple[Any, Scores]]:
    """The VisionZip scores of LLaVA's CLIP tower, as the paper takes them: at the layer whose
    output is the feature (``vision_feature_layer``, -2 in LLaVA-1.5), the attention the class
    token pays each patch, averaged over heads (CLIP has no rotary embedding: the projections
    are the keys and queries). Keys: that layer's, averaged over heads. With the ``"full"``
    feature strategy the class token is a token too and gets its own self-attention."""

    def tower(inner: nn.Module, call: Dict[str, Any]) -> Tuple[Any, Scores]:
        tower_model = inner.vision_tower
        layers = getattr(tower_model, "vision_model", tower_model).encoder.layers
        chosen = call.get("vision_feature_layer")
        chosen = chosen if chosen is not None else inner.config.vision_feature_layer
        chosen = chosen[-1] if isinstance(chosen, (list, tuple)) else chosen
        if chosen == 0 or not -len(layers) <= chosen <= len(layers):
            raise ValueError(f"method='visionzip' reads the attention of the layer vision_feature_layer={chosen} "
                             f"names; expected a layer's output: 1..{len(layers)} or -{len(layers)}..-1")
        attn = layers[chosen - 1 if chosen >= 0 else len(layers) + chosen].self_attn
        seen: Dict[str, Any] = {}
        hooks = [(attn.q_proj, "post", lambda module, args, out: seen.update(q=out)),
                 (attn.k_proj, "post", lambda module, args, out: seen.update(k=out))]
        with _captured(hooks):
            output = encode(inner, call)
        strategy = call.get("vision_feature_select_strategy") or inner.config.vision_feature_select_strategy
        return output, _clip_scores(attn, seen, strategy == "default")

    return tower


def _clip_scores(attn: nn.Module, seen: Dict[str, Any], drop_cls: bool) -> Scores:
    images, length = seen["q"].shape[:2]
    query = seen["q"].reshape(images, length, attn.num_heads, -1).float()
    key = seen["k"].reshape(images, length, attn.num_heads, -1).float()
    weights = torch.softmax(torch.einsum("bhd,bnhd->bhn", query[:, 0], key) * attn.scale, dim=-1)
    received, keys = weights.mean(1), key.mean(2)  # (images, tokens), (images, tokens, head_dim)
    first = 1 if drop_cls else 0
    return [(received[i, first:], keys[i, first:]) for i in range(images)]
