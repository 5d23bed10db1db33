"""FastV in the VLM core: the attention the last token pays each token at a language-model
layer, computed from that layer's queries and keys (never eager attention, never returned
attention weights), and the two ways the sequence is shortened by it.

Source: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models" (FastV), ECCV 2024, sec. 3-4.

- *FastV-select* (``fastv_mode="select"``, :func:`last_token_attention`): a probe runs the
  model's own forward on the full sequence until layer ``K`` (``fastv_layer``), where a forward
  pre-hook takes the layer's input, projects the last token's query and every key (the layer's
  own ``q_proj``/``k_proj``, ``q_norm``/``k_norm`` where it has them, and its module's
  ``apply_rotary_pos_emb`` with the cos/sin the layer is given) and stops the forward. The
  selection then shortens the sequence for the whole language model.
- *FastV-drop* (``fastv_mode="drop"``, :func:`prefill_with_drop`, :func:`decode_with_drop`),
  the paper's in-layer drop: one forward; layers ``0 .. K-1`` run on the full sequence and
  fill their KV cache with it; the attention row of layer ``K-1`` (the paper's code ranks by
  the layer before the drop) picks the kept tokens; forward pre-hooks give layer ``K`` the
  kept rows of the hidden states and of the rotary cos/sin (the kept tokens keep the positions
  of the full sequence, M-RoPE's included) and every layer from ``K`` on the causal mask of
  the short sequence, sized against its own cache (transformers' ``create_causal_mask`` with
  ``layer_idx=K``). While decoding, those layers get the mask of their short cache; the
  layers before keep the model's own.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["language_layers", "last_token_attention", "prefill_with_drop", "decode_with_drop"]


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
        with torch.no_grad():  # a ranking: no gradient flows through it, even while training
            run(**dict(call, past_key_values=None, use_cache=False))
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["row"]


# ----------------------------------------------------------------------------- FastV-drop (the paper's in-layer drop)


def _take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` gathered at ``index`` ``(B, L')`` along its sequence dimension ``dim`` (the batch
    dimension right before it, of size B or 1; other dimensions broadcast)."""
    dim = dim % x.dim()
    shape = [1] * x.dim()
    shape[dim - 1], shape[dim] = index.shape
    return torch.take_along_dim(x, index.to(x.device).view(shape), dim=dim)


def _short_mask(language_model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, cache: Any,
                layer: int) -> Any:
    """The attention mask of the layers from ``layer`` on, as the language model would build it
    for a sequence of ``hidden``'s length with padding ``mask`` ``(B, keys)``: the model's own
    ``create_causal_mask``, sized against cache layer ``layer`` (the caches of the layers before
    it hold the full sequence)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=language_model.config, inputs_embeds=hidden, attention_mask=mask,
                              past_key_values=cache, position_ids=None, layer_idx=layer)


def _hidden_of(args: tuple, kwargs: Dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: Dict[str, Any], hidden: torch.Tensor) -> tuple:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


Decision = Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _Drop:
    """The hooks of one FastV-drop prefill (see :func:`prefill_with_drop`) and what they decided."""

    def __init__(self, language_model: nn.Module, layer: int, real: torch.Tensor,
                 decide: Callable[[torch.Tensor], Decision]) -> None:
        self.language_model, self.layer, self.real, self.decide = language_model, layer, real, decide
        self.row: Optional[torch.Tensor] = None
        self.decision: Decision = None
        self.short: Optional[Dict[str, Any]] = None  # the short sequence's layer arguments

    def rank(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Pre-hook of layer K-1's attention: the last token's attention row there."""
        with torch.no_grad():  # a ranking: no gradient flows through it
            self.row = _row(module, kwargs, self.real)

    def enter(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[tuple]:
        """Pre-hook of layer K: decide, then hand it the kept rows and the short sequence's mask."""
        self.decision = self.decide(self.row)
        if self.decision is None:
            return None
        keep, index, valid = self.decision
        hidden = _take(_hidden_of(args, kwargs), index, 1)
        short: Dict[str, Any] = {"attention_mask": _short_mask(self.language_model, hidden, valid.to(torch.long),
                                                               kwargs.get("past_key_values"), self.layer)}
        if kwargs.get("position_embeddings") is not None:  # kept tokens keep their positions
            short["position_embeddings"] = tuple(_take(x, index, -2) for x in kwargs["position_embeddings"])
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            short["position_ids"] = _take(kwargs["position_ids"], index, -1)
        self.short = short
        new_args, new_kwargs = _with_hidden(args, kwargs, hidden)
        return new_args, dict(new_kwargs, **short)

    def follow(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[tuple]:
        """Pre-hook of the layers after K: the short sequence's arguments."""
        return None if self.short is None else (args, dict(kwargs, **self.short))

    def deepstack(self, hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor) -> Any:
        """Qwen3-VL's ``_deepstack_process`` after the drop: only the kept visual tokens' rows."""
        if self.decision is not None and hidden.shape[1] != visual_pos_masks.shape[1]:
            keep, index, valid = self.decision
            visual_pos_masks = visual_pos_masks.to(keep.device)
            visual_embeds = visual_embeds[keep[visual_pos_masks].to(visual_embeds.device)]
            visual_pos_masks = visual_pos_masks.gather(1, index) & valid
        return type(self.language_model)._deepstack_process(self.language_model, hidden, visual_pos_masks,
                                                            visual_embeds)


def prefill_with_drop(inner: nn.Module, layer: int, real: torch.Tensor,
                      decide: Callable[[torch.Tensor], Decision], run: Callable[..., Any],
                      call: Dict[str, Any]) -> Tuple[Any, Decision]:
    """The model's own forward ``run(**call)`` on the full sequence, with FastV's in-layer drop:
    layers ``0 .. layer - 1`` see every token; a pre-hook on layer ``layer - 1``'s attention
    computes the last token's attention row there (from its queries and keys, as
    :func:`last_token_attention`); ``decide(row)`` returns ``(keep (B, L) bool, index (B, L'),
    valid (B, L'))`` (the kept columns, left-padded) or None (nothing dropped); a pre-hook on
    layer ``layer`` gathers the hidden states, the rotary cos/sin and the positions at
    ``index`` and gives it and the layers after it the mask of the short sequence, so they run
    (and fill their KV cache) on ``L'`` tokens. Qwen3-VL's deepstack features, added after its
    first layers, follow the drop.

    Args:
        inner: the inner VLM (``inner.language_model.layers``); layer: ``1 <= layer < depth``;
        real: ``(B, L)`` bool, the real tokens (the last column real).

    Returns:
        ``(output of run, the decision)``.
    """
    language_model = inner.language_model
    layers = language_model.layers
    drop = _Drop(language_model, layer, real, decide)
    handles = [layers[layer - 1].self_attn.register_forward_pre_hook(drop.rank, with_kwargs=True),
               layers[layer].register_forward_pre_hook(drop.enter, with_kwargs=True)]
    handles += [later.register_forward_pre_hook(drop.follow, with_kwargs=True) for later in layers[layer + 1:]]
    deepstack = hasattr(type(language_model), "_deepstack_process")  # Qwen3-VL: added after the first layers
    if deepstack:
        object.__setattr__(language_model, "_deepstack_process", drop.deepstack)
    try:
        return run(**call), drop.decision
    finally:
        for handle in handles:
            handle.remove()
        if deepstack:
            object.__delattr__(language_model, "_deepstack_process")


def decode_with_drop(inner: nn.Module, layer: int, mask: torch.Tensor, run: Callable[..., Any],
                     call: Dict[str, Any]) -> Any:
    """A decoding step after a FastV-drop prefill: the model's own forward ``run(**call)``; the
    layers from ``layer`` on, whose KV cache holds the short sequence, get the mask built from
    ``mask`` ``(B, short keys + new tokens)`` (the layers before keep the model's own, full one)."""
    language_model = inner.language_model
    state: Dict[str, Any] = {}

    def follow(module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> tuple:
        if "mask" not in state:
            state["mask"] = _short_mask(language_model, _hidden_of(args, kwargs), mask,
                                        kwargs.get("past_key_values"), layer)
        return args, dict(kwargs, attention_mask=state["mask"])

    handles = [later.register_forward_pre_hook(follow, with_kwargs=True) for later in language_model.layers[layer:]]
    try:
        return run(**call)
    finally:
        for handle in handles:
            handle.remove()
