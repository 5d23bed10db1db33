"""FastV's ranking in the VLM core: the attention the last token pays each token at a
language-model layer, computed from that layer's queries and keys (never eager attention,
never returned attention weights).

The variant implemented is *FastV-select*: a probe runs the model's own forward on the full
sequence until layer ``K`` (``fastv_layer``), where a forward pre-hook takes the layer's
input, projects the last token's query and every key (the layer's own ``q_proj``/``k_proj``,
``q_norm``/``k_norm`` where it has them, and its module's ``apply_rotary_pos_emb`` with the
cos/sin the layer is given) and stops the forward. The selection then shortens the sequence
for the whole language model. The paper's in-layer drop instead keeps the first ``K`` layers
on the full sequence (their KV cache full) and drops only for the layers after; the two differ
in the first ``K`` layers' view of the dropped tokens.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict

import torch
from torch import nn

__all__ = ["language_layers", "last_token_attention"]


class _Stop(Exception):
    """Raised by the probe's hook once layer K's queries and keys are taken."""


def language_layers(inner: nn.Module) -> nn.ModuleList:
    """The decoder layers of a VLM's language model (``inner.language_model.layers``; Idefics3
    and SmolVLM call it ``text_model``)."""
    language_model = getattr(inner, "language_model", None)
    return (language_model if language_model is not None else inner.text_model).layers


def _project(attn: nn.Module, hidden: torch.Tensor, name: str) -> torch.Tensor:
    """``(B, heads, L, head_dim)``: ``hidden`` through ``attn``'s ``q`` or ``k`` projection (and norm)."""
    states = getattr(attn, f"{name}_proj")(hidden).view(*hidden.shape[:-1], -1, attn.head_dim)
    norm = getattr(attn, f"{name}_norm", None)
    return (norm(states) if norm is not None else states).transpose(1, 2)


def _row(attn: nn.Module, kwargs: Dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """``(B, L)``: the last token's softmax attention over the tokens it sees (the real ones,
    within the layer's sliding window if it has one), the mean over heads."""
    hidden = kwargs["hidden_states"]
    query, key = _project(attn, hidden[:, -1:], "q"), _project(attn, hidden, "k")
    cos, sin = kwargs["position_embeddings"]
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    query, _ = rotate(query, query, cos[..., -1:, :], sin[..., -1:, :])
    _, key = rotate(key, key, cos, sin)
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query attention
    scores = (query.float() @ key.float().transpose(-1, -2))[:, :, 0] * attn.scaling  # (B, heads, L)
    visible = mask
    window = getattr(attn, "sliding_window", None)
    if window is not None:  # a sliding-window layer (Gemma 3's local ones): the last W tokens, by index
        length = visible.shape[1]
        visible = visible & (torch.arange(length, device=visible.device) > length - 1 - window)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(1)


def last_token_attention(inner: nn.Module, layer: int, call: Dict[str, Any], mask: torch.Tensor,
                         run: Callable[..., Any]) -> torch.Tensor:
    """``(B, L)``: the attention the last token of each sample pays every token at language-model
    layer ``layer``, from a probe of the model's own forward ``run(**call)`` stopped there.

    Args:
        inner: the inner VLM; layer: ``0 <= layer < depth``; call: the full prefill's arguments
            (the encoder outputs already in ``mm_encoder_outputs``); mask: ``(B, L)`` bool, the
            real tokens (the last column must be real: left padding).
    """
    attn = language_layers(inner)[layer].self_attn
    seen: Dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        seen["row"] = _row(module, kwargs, mask)
        raise _Stop

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run(**dict(call, past_key_values=None, use_cache=False))
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["row"]
