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
item the core reduces (an image, a video, a crop or tile, a view), in the core's order.

Towers with a class token (CLIP, InternViT) rank by the class token's attention, as the paper
does for CLIP; towers without one (the Qwen towers, SigLIP) by the attention each token
receives from all queries, as the paper does for SigLIP (VisionZip sec. 3.2). Where the
connector turns a group of tower tokens into one token (Qwen's 2x2 merger, Gemma 3's average
pool, the pixel shuffle of Idefics3 and InternVL), the token's attention is the sum over its
group (:func:`grouped`) and its keys the group's mean; the families' modules say which group.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["qwen_tower", "clip_tower", "received_attention", "feature_layer", "capture_attention",
           "tower_attention", "grouped"]

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


def _masked(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``scores`` with an attention mask as the model's kernels apply it: a bool mask keeps
    ``True``, a float mask is added."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.float()


def received_attention(query: torch.Tensor, key: torch.Tensor, scale: float,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(N,)``: the attention each of ``N`` tokens receives, averaged over all ``N`` queries
    and all heads: the column means of ``softmax(q k^T * scale + mask)``, computed a block of
    queries at a time (about ``2 ** 25`` weights at once, at least one query per block).

    Args:
        query, key: ``(heads, N, head_dim)``.
        scale: the attention's scaling (``head_dim ** -0.5``).
        mask: None, or the mask the layer is given, broadcastable to ``(heads, N, N)``: bool
            (True attends) or additive float (Idefics3's padded patches).
    """
    heads, num = query.shape[:2]
    total = torch.zeros(num, dtype=torch.float32, device=query.device)
    key = key.float()
    step = max(1, _BLOCK_WEIGHTS // (heads * num))
    for start in range(0, num, step):
        block = query[:, start: start + step].float()
        rows = mask if mask is None or mask.shape[-2] == 1 else mask[..., start: start + step, :]
        total += torch.softmax(_masked(block @ key.transpose(1, 2) * scale, rows), dim=-1).sum(dim=(0, 1))
    return total / (heads * num)


# ----------------------------------------------------------------------------- towers of q_proj / k_proj layers


def feature_layer(layers: Sequence[nn.Module], chosen: Union[int, Sequence[int]]) -> nn.Module:
    """The encoder layer whose output is ``hidden_states[chosen]`` (``hidden_states[0]`` being
    the embeddings, as in transformers); of a list of layers, the last. ``ValueError`` for the
    embeddings or an index out of range."""
    chosen = chosen[-1] if isinstance(chosen, (list, tuple)) else chosen
    if chosen == 0 or not -len(layers) <= chosen <= len(layers):
        raise ValueError(f"method='visionzip' reads the attention of the layer vision_feature_layer={chosen} "
                         f"names; expected a layer's output: 1..{len(layers)} or -{len(layers)}..-1")
    return layers[chosen - 1 if chosen >= 0 else len(layers) + chosen]


def capture_attention(attn: nn.Module, run: Callable[[], Any]) -> Tuple[Any, Dict[str, Any]]:
    """``(run(), seen)``: ``seen`` holds the queries ``"q"`` and keys ``"k"`` ``(B, N, heads *
    head_dim)`` of the attention module ``attn`` (after its ``q_norm`` / ``k_norm`` where it
    has them, InternViT's) and the ``"mask"`` it was given (or None), from forward hooks."""
    seen: Dict[str, Any] = {"mask": None}
    hooks = [(attn, "pre", lambda module, args, kwargs: seen.update(mask=kwargs.get("attention_mask")))]
    for name in ("q", "k"):
        norm = getattr(attn, f"{name}_norm", None)
        source = norm if isinstance(norm, nn.Module) else getattr(attn, f"{name}_proj")
        hooks.append((source, "post", lambda module, args, out, name=name: seen.update({name: out})))
    with _captured(hooks):
        output = run()
    return output, seen


def tower_attention(attn: nn.Module, seen: Dict[str, Any], class_token: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(attention (B, N), keys (B, N, head_dim))`` float32 from :func:`capture_attention`:
    the attention each token receives, averaged over heads, from the class token (token 0,
    ``class_token``) or from every query; and the keys averaged over heads."""
    batch, length = seen["q"].shape[:2]
    heads = attn.num_heads
    query = seen["q"].reshape(batch, length, heads, -1).transpose(1, 2).float()  # (B, heads, N, d)
    key = seen["k"].reshape(batch, length, heads, -1).transpose(1, 2).float()
    scale = getattr(attn, "scaling", None) or attn.scale
    mask = seen["mask"]
    if class_token:
        scores = (query[:, :, :1] @ key.transpose(-1, -2)) * scale  # (B, heads, 1, N)
        rows = None if mask is None else (mask if mask.shape[-2] == 1 else mask[..., :1, :])
        received = torch.softmax(_masked(scores, rows), dim=-1)[:, :, 0].mean(1)
    else:
        received = torch.stack([received_attention(query[b], key[b], scale, None if mask is None else mask[b])
                                for b in range(batch)])
    return received, key.mean(1)


def grouped(attention: torch.Tensor, keys: torch.Tensor, members: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores of the tokens a connector makes of groups of tower tokens.

    Args:
        attention: ``(B, N)``; keys: ``(B, N, D)``.
        members: ``(N', g)`` long: the tower tokens each output token is made of.

    Returns:
        ``(attention (B, N'), keys (B, N', D))``: the group's total attention and mean key.
    """
    members = members.to(attention.device)
    return attention[:, members].sum(-1), keys[:, members].mean(-2)


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
        attn = feature_layer(layers, chosen).self_attn
        output, seen = capture_attention(attn, lambda: encode(inner, call))
        received, keys = tower_attention(attn, seen, class_token=True)
        strategy = call.get("vision_feature_select_strategy") or inner.config.vision_feature_select_strategy
        first = 1 if strategy == "default" else 0
        return output, [(received[i, first:], keys[i, first:]) for i in range(received.shape[0])]

    return tower

