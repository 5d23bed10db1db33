"""Visual-token reduction in Hugging Face vision-language models: the core of the ``vlm`` family.

A VLM turns each image (and video) into visual tokens that enter its language model in place
of placeholder tokens. Patched, the model passes at most ``visual_tokens`` of them per image
or video: each image's tokens, as they leave the projector / patch merger (so spatial merges
inside the model still see their grid), go through a method of :mod:`tome.visual_tokens`,
and the sequence shrinks with them (input ids, embeddings, attention mask, token types,
positions). The user keeps calling ``model(**inputs)`` and ``model.generate(**inputs)``.

What is wrapped, not copied: the inner model's own ``get_image_features`` /
``get_video_features`` compute the features (hooks on the vision tower fire), its own
position code (``compute_3d_position_ids`` / ``get_rope_index`` for M-RoPE models) gives
the positions of the full sequence, and its own ``forward`` runs on the shortened inputs,
with the reduced features handed in as ``mm_encoder_outputs`` (so its own placeholder check
and scatter run, on matching counts) and explicit ``position_ids``.

Positions: kept tokens keep the position they had in the full sequence (M-RoPE: all three
rows), text tokens keep theirs, and decoding continues at the positions of the unreduced
model (``rope_deltas`` is recomputed for the shortened sequence). A merged token gets the
size-weighted mean of its members' positions (float: the rotary embeddings of these models
take float positions). 1-D models may instead renumber consecutively (``positions="renumber"``).
With ``prop_attn=True`` every language-model layer adds ``log(size)`` to the attention logits of
each merged visual token's key (ToMe's proportional attention, Bolya et al., ICLR 2023, Sec. 3,
carried from the vision tower to the language model), in prefill and in every decoding step.

Between a prefill and its decoding steps the layout of the shortened prefill travels on the
KV cache object (``past_key_values._tome_vlm_layout``): a decoding step's attention mask,
which ``generate`` keeps at the full length, is shortened to match the cache.

The per-family part is a :class:`VLMAdapter` (``_vlm_families.py``): which classes, where
the features come from, their grid, the placeholder token ids, and how positions are computed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import visual_tokens as vt
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ToMeInfo,
    check_choice,
    check_flag,
    configure,
    register,
    setting,
    swap_class,
    with_parent_signature,
)

__all__ = ["VLMAdapter", "VisualTokenSettings", "VisualTokenReport", "register_adapter", "adapters", "POSITIONS",
           "FASTV_MODES", "vlm"]

POSITIONS = ("keep", "renumber")
FASTV_MODES = ("select", "drop")
_DROP_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")  # where FastV's in-layer drop is tested against a reference

# Methods that need more than the features and what they need; refused at patch time
# where the family does not provide it.
_UNWIRED = {
    "visionzip": "the attention each token receives in the vision tower",
    "fastv": "a drop inside the language model",
}
_TOWER_METHODS = ("visionzip",)  # ranked by the vision tower's attention (Modality.tower)


@dataclass
class VisualTokenSettings:
    """The options of the ``vlm`` family: arguments of ``tome.apply_patch`` and ``tome.merging``,
    and properties of the patched model (``model.visual_tokens``, ``model.tome_method`` for
    ``method``, ``model.trace_source``, ``model.positions``, ``model.fastv_layer``,
    ``model.fastv_mode``, ``model.seed``).

    Args:
        visual_tokens: Tokens each image or video passes on: an int ``K >= 1``, a float in
            ``(0, 1]`` (the fraction kept, rounded up), or None (all: the unpatched model).
        method: A method of :data:`tome.visual_tokens.METHODS` (``"tome"``, ``"pool"``,
            ``"random"``, ...). The default, ``"tome"`` (bipartite merging of the visual tokens
            after the projector, size-weighted), beats ``"pool"`` and ``"random"`` at every budget
            on the two small VLMs trained here (docs/vlm_study.md, session 10, 500 questions: at
            11 % of the tokens 62.6 % of the Qwen2.5-VL's accuracy kept, ``"pool"`` 53.5 %,
            ``"random"`` 50.9 %; 67.7 % of the LLaVA's, ``"pool"`` 43.5 %, ``"random"`` 51.7 %;
            97.0 % of the Qwen2.5-VL's on 8-frame clips, where no other method passes 83.1 %).
            On images at 25 % of the tokens and below ``"visionzip"`` and ``"divprune"`` keep
            more on both (at 11 %: 75.0-80.6 % of the Qwen2.5-VL's, 76.2-80.0 % of the LLaVA's),
            ``"fastv"`` on the Qwen2.5-VL (81.3 %). Until session 6 the default was ``"pool"``,
            which loses most on fine patch tokens.
        trace_source: After a forward, ``model._tome_info["source"]`` is a list with one
            ``(tokens passed on, tokens before)`` 0/1 tensor per image or video, in batch order.
        positions: 1-D models: ``"keep"`` (each kept token keeps its position in the full
            sequence) or ``"renumber"`` (consecutive). M-RoPE models keep theirs.
        fastv_layer: ``"fastv"``'s layer K (0-based, below the language model's depth). With
            ``fastv_mode="select"``: the layer whose attention from the last token ranks the
            tokens; with ``"drop"``: the first layer that runs on the shortened sequence (ranked
            by the layer before it, as the paper's code does; K >= 1).
        fastv_mode: ``"select"`` (a probe ranks at layer K, then the whole language model runs
            on the shortened sequence) or ``"drop"`` (the paper's in-layer drop: layers
            ``0 .. K-1`` run, and cache, the full sequence, layers ``K ..`` the shortened one).
            Source: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2" (FastV), ECCV 2024,
            sec. 4 (see ``docs/vlm_reduction.md``).
        seed: Seed of ``"random"``, drawn afresh every forward (None: torch's global generator).
        prop_attn: Proportional attention in the language model: ``log(size)`` added to every
            attention logit of a passed-on token that stands for ``size`` visual tokens (merging
            methods: ``"tome"``, ``"pool"``; a selected token has size 1, so selections are
            unchanged), as if its members were all still there (Bolya et al., "Token Merging:
            Your ViT but Faster", ICLR 2023, Sec. 3). It enters as an additive 4-D float mask
            of each decoder layer (needs the language model's ``"sdpa"`` or ``"eager"``
            attention; on CUDA a float mask rules out SDPA's FlashAttention backend). Measured
            on the two small VLMs trained here (docs/vlm_study.md, 500 questions): on session
            7's models +1.8 to +4.0 points of accuracy at 11 % of the tokens, +3.8 to +5.8 at
            5 %; on session 9's, +2.2 to +4.2 on Qwen2.5-VL at 25-11 %, -1.6 to +1.0 for ``"tome"``
            on LLaVA; off by default (not yet timed on a GPU).
    """

    visual_tokens: Optional[Union[int, float]] = field(default=None, metadata={"example": 0.5})
    method: str = field(default="tome", metadata={"example": "random"})
    trace_source: bool = False
    positions: str = field(default="keep", metadata={"choices": POSITIONS})
    fastv_layer: int = field(default=2, metadata={"example": 1})
    fastv_mode: str = field(default="select", metadata={"choices": FASTV_MODES})
    seed: Optional[int] = field(default=None, metadata={"example": 0})
    prop_attn: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        vt.check_budget(self.visual_tokens)
        if not isinstance(self.method, str) or self.method not in vt.METHODS:
            raise ValueError(f"method={self.method!r} is not a visual-token method; expected one of {sorted(vt.METHODS)}")
        check_flag("trace_source", self.trace_source)
        check_flag("prop_attn", self.prop_attn)
        check_choice("positions", self.positions, POSITIONS)
        check_choice("fastv_mode", self.fastv_mode, FASTV_MODES)
        for name, low in (("fastv_layer", 0),):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low} (a language-model layer index)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be None or an int")


@dataclass(frozen=True)
class Modality:
    """One kind of visual input of a family (images, videos).

    Args:
        name: ``"image"`` or ``"video"`` (the key of ``mm_encoder_outputs``).
        pixels: The forward argument holding its pixels (``"pixel_values"``).
        token: The config attribute of its placeholder token id (``"image_token_id"``).
        encode: ``(inner model, call) -> encoder output`` whose ``pooler_output`` holds one
            ``(N, C)`` tensor per image or video, through the model's own method.
        grid: ``(inner model, call, item index, N, positions (N, D)) -> (t, h, w)`` or None
            (``positions``: the item's tokens' positions in the full sequence).
        split: ``(inner model, call, encoder output) -> [(N, C), ...]`` the items when they
            are not the entries of ``pooler_output`` (SmolVLM: one tensor per sample, split
            into crops; LLaVA-OneVision: an image, split into its views).
        join: ``[(K, C), ...] -> pooler_output`` in the form the model's forward reads back
            (default: a tuple of the items).
        separators: ``(inner model, call, item index, features (N, C)) -> (indices (P,), grid)``:
            an item's tokens that are structure, not image content (LLaVA-OneVision's
            ``image_newline``), always passed on, never merged, not counted in the budget; and
            the grid of its other ``N - P`` tokens (used instead of ``grid``). None: no such tokens.
        tower: ``(inner model, call) -> (encoder output, [(attention (N,), keys (N, D)), ...])``:
            ``encode`` run while the vision tower's attention each token receives is computed
            from its queries and keys (``"visionzip"``; see ``_vlm_attention``), one pair per
            item (per entry of ``split`` where the modality splits), mapped onto the tokens the
            language model reads. None: not wired.
    """

    name: str
    pixels: str
    token: str
    encode: Callable[[nn.Module, Dict[str, Any]], Any]
    grid: Callable[[nn.Module, Dict[str, Any], int, int, torch.Tensor], Optional[Tuple[int, int, int]]]
    split: Optional[Callable[[nn.Module, Dict[str, Any], Any], List[torch.Tensor]]] = None
    join: Optional[Callable[[List[torch.Tensor]], Any]] = None
    separators: Optional[Callable[[nn.Module, Dict[str, Any], int, torch.Tensor],
                                  Tuple[torch.Tensor, Optional[Tuple[int, int, int]]]]] = None
    tower: Optional[Callable[[nn.Module, Dict[str, Any]], Tuple[Any, List[Tuple[torch.Tensor, torch.Tensor]]]]] = None


@dataclass(frozen=True)
class VLMAdapter:
    """What the core must know about one VLM family.

    Args:
        name: The family's name in messages (``"qwen2_5_vl"``).
        models: Class names of the inner model: the one with ``get_image_features`` whose
            ``forward`` takes ``mm_encoder_outputs`` (``Qwen2_5_VLModel``).
        wrappers: Class names of models that hold the inner one as ``.model``
            (``Qwen2_5_VLForConditionalGeneration``).
        modalities: Its visual inputs.
        positions: ``(inner, call, batch, length) -> (D, batch, length)`` positions of the full
            sequence as the unpatched model computes them (``D`` = 3 for M-RoPE, 1 for 1-D).
        mrope: Whether positions are M-RoPE's 3 rows (else 1-D, ``positions`` may renumber).
        item_fields: Encoder-output fields besides ``pooler_output`` that hold per-layer lists
            of per-item tensors to reduce alike (Qwen3-VL's ``deepstack_features``).
        finish: ``(inner, rope_deltas (batch, 1)) -> None`` after a reduced prefill (Qwen:
            store ``rope_deltas`` so decoding without explicit positions continues right).
        token_fields: Other ``(batch, tokens)`` forward arguments shortened with the sequence
            (Gemma 3's ``token_type_ids``, which make each image attend to itself both ways).
        fastv: Whether ``"fastv"`` is wired: the language model's decoder layers are
            ``inner.language_model.layers``, their ``self_attn`` has ``q_proj``/``k_proj`` and
            its module an ``apply_rotary_pos_emb(q, k, cos, sin)`` (see ``_vlm_fastv``).
    """

    name: str
    models: Tuple[str, ...]
    wrappers: Tuple[str, ...]
    modalities: Tuple[Modality, ...]
    positions: Callable[[nn.Module, Dict[str, Any], int, int], torch.Tensor]
    mrope: bool = False
    item_fields: Tuple[str, ...] = ()
    finish: Optional[Callable[[nn.Module, torch.Tensor], None]] = None
    token_fields: Tuple[str, ...] = ()
    fastv: bool = False


_ADAPTERS: Dict[str, VLMAdapter] = {}


def register_adapter(adapter: VLMAdapter) -> VLMAdapter:
    """Register a VLM family adapter (replacing one of the same name)."""
    _ADAPTERS[adapter.name] = adapter
    return adapter


def adapters() -> List[VLMAdapter]:
    """The registered adapters."""
    return list(_ADAPTERS.values())


def _names(obj: Any) -> List[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def find_adapter(model: Any) -> Optional[Tuple[VLMAdapter, nn.Module]]:
    """``(adapter, inner model)`` for a supported VLM, by class names only; else None."""
    names = _names(model)
    for adapter in _ADAPTERS.values():
        if any(name in adapter.models for name in names):
            return adapter, model
        inner = getattr(model, "model", None) if any(name in adapter.wrappers for name in names) else None
        if isinstance(inner, nn.Module) and any(name in adapter.models for name in _names(inner)):
            return adapter, inner
    return None


def is_vlm(model: Any) -> bool:
    """Whether ``model`` is a VLM the ``vlm`` family supports (by class name; nothing is imported)."""
    return isinstance(model, nn.Module) and find_adapter(model) is not None


def supported_vlms() -> str:
    """The supported classes, for messages."""
    return ", ".join(name for adapter in _ADAPTERS.values() for name in adapter.wrappers + adapter.models)


# ----------------------------------------------------------------------------- what a forward did


@dataclass(frozen=True)
class VisualTokenReport:
    """What the last forward of a patched VLM did (:func:`tome.last_forward`).

    Attributes:
        items: One dict per image or video, in batch order: ``modality``, ``sample`` (batch
            index), ``tokens`` (before), ``budget``, ``passed`` (tokens passed on), ``reduced``
            (False when the budget was at least the image's tokens: nothing was reduced).
        source: With ``trace_source``, one ``(passed, tokens)`` 0/1 tensor per item; else None.
        length: ``(before, after)`` the sequence length entering the language model.
    """

    items: List[Dict[str, Any]]
    source: Optional[List[torch.Tensor]]
    length: Tuple[int, int]


class VisualTokenInfo(ToMeInfo):
    """``model._tome_info`` of a patched VLM: a plain dict of what the last forward did
    (``"items"``, ``"source"``, ``"length"``); :func:`tome.last_forward` reads it."""

    def __getitem__(self, key: str) -> Any:
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)

    def report(self) -> Optional[VisualTokenReport]:  # type: ignore[override]
        if dict.get(self, "items") is None:
            return None
        return VisualTokenReport(items=list(self["items"]), source=self.get("source"), length=self["length"])

    def __deepcopy__(self, memo: dict) -> "VisualTokenInfo":
        return VisualTokenInfo(dict(self))

    def __reduce__(self):  # type: ignore[override]
        return (VisualTokenInfo, (dict(self),))


# ----------------------------------------------------------------------------- the patched classes


class ToMeVLMMixin:
    """The patched model ``tome.apply_patch`` was given: its settings are properties, and with
    ``labels`` while reducing, its loss is computed on the labels shortened with the sequence."""

    _tome_keep_name = True  # transformers looks classes up by name (pipelines, from_pretrained)

    @with_parent_signature  # generate and Trainer read what the forward takes from its signature
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__["_tome_settings"].visual_tokens is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        parent = type(self).__dict__["_tome_parent"]
        call = _bind(parent, args, kwargs)
        labels = call.pop("labels", None)
        if labels is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        # The logits follow the shortened sequence: the loss is the model's own, on the labels
        # shortened alike (a passed-on token takes its first member's label, -100 for visual ones).
        info = self.__dict__["_tome_info"]
        info["_layout"] = None
        out = super().forward(**call)  # type: ignore[misc]
        layout = info.get("_layout")
        if layout is not None:
            labels = _shortened_labels(labels, layout)
        logits = out.logits if hasattr(out, "logits") else out[0]
        extra = {name: value for name, value in call.items() if name not in _SIGNATURES[parent][0].parameters}
        loss = self.loss_function(logits=logits, labels=labels,  # type: ignore[attr-defined]
                                  vocab_size=self.config.get_text_config().vocab_size, **extra)  # type: ignore[attr-defined]
        if isinstance(out, tuple):
            return (loss,) + out
        return type(out)(**dict({"loss": loss}, **{k: v for k, v in out.items() if k != "loss"}))

    def _supports_mm_encoder_outputs(self) -> bool:
        """transformers' ``generate`` encodes the pixels before the prefill when the forward takes
        ``mm_encoder_outputs``; the tower-attention methods need the pixels to reach the patched
        forward (the attention is computed while the tower runs), so not for them."""
        settings: VisualTokenSettings = self.__dict__["_tome_settings"]
        if settings.visual_tokens is not None and settings.method in _TOWER_METHODS:
            return False
        return super()._supports_mm_encoder_outputs()  # type: ignore[misc]


for _option in fields(VisualTokenSettings):
    setattr(ToMeVLMMixin, "tome_method" if _option.name == "method" else _option.name,
            setting(_option.name, f"Visual-token option ``{_option.name}`` (see ``VisualTokenSettings``); "
                                  "setting it re-patches with only this option changed."))


_SIGNATURES: Dict[type, Tuple[inspect.Signature, Optional[str]]] = {}


def _bind(parent: type, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The call's arguments by name (the parent forward's signature; extra keywords merged)."""
    if parent not in _SIGNATURES:
        signature = inspect.signature(parent.forward)
        var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        _SIGNATURES[parent] = (signature, var_kw)
    signature, var_kw = _SIGNATURES[parent]
    call = dict(signature.bind(None, *args, **kwargs).arguments)
    call.pop(next(iter(signature.parameters)))  # self
    if var_kw is not None:
        call.update(call.pop(var_kw, {}))
    return call


def _shortened_labels(labels: torch.Tensor, layout: "_Layout") -> torch.Tensor:
    """``(B, L')``: ``labels`` ``(B, L)`` of the full sequence at the shortened sequence's
    columns (-100 at the padding the shortening added). ``ValueError`` when a visual token that
    was dropped or merged carries a label: its loss has no row in the shortened sequence."""
    if labels.dim() != 2 or labels.shape[1] != layout.full_length:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the sequence of {layout.full_length} "
                         "tokens (labels (batch, tokens) aligned with input_ids)")
    index, valid = layout.index.to(labels.device), layout.valid.to(labels.device)
    kept = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    kept.scatter_(1, index, valid)
    lost = (labels != -100) & ~kept
    if bool(lost.any()):
        raise ValueError(f"{int(lost.sum())} tokens the shortened sequence has no row for (visual tokens dropped or "
                         "merged, padding) carry labels other than -100: set the labels of image and video "
                         "placeholder tokens (and of padding) to -100 to train while reducing")
    return torch.where(valid, labels.gather(1, index), torch.full_like(index, -100))


class ToMeVLMInnerMixin:
    """The inner model (the one whose forward scatters the visual features): reduces them."""

    _tome_keep_name = True

    # The bookkeeping is data-dependent (which tokens, how many per sample): torch.compile of the
    # whole model runs it eagerly; the language model and the vision tower compile on their own.
    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        parent = type(self).__dict__["_tome_parent"]
        call = _bind(parent, args, kwargs)
        settings: VisualTokenSettings = self.__dict__["_tome_settings"]
        adapter = _ADAPTERS[self.__dict__["_tome_adapter"]]
        run = super().forward  # type: ignore[misc]
        cache = call.get("past_key_values")
        layout = getattr(cache, "_tome_vlm_layout", None) if cache is not None else None
        visual = [m for m in adapter.modalities if call.get(m.pixels) is not None
                  or (call.get("mm_encoder_outputs") or {}).get(m.name) is not None]
        if visual and settings.visual_tokens is not None:
            return _prefill(self, adapter, settings, call, visual, run)
        if layout is not None and not visual:
            return _decode(self, adapter, layout, call, run)
        if visual:
            self.__dict__["_tome_info"].update(items=None, source=None, length=None)
        return run(**call)


# ----------------------------------------------------------------------------- prefill


@dataclass
class _Layout:
    """How a reduced prefill shortened the sequence (kept on the KV cache for decoding)."""

    full_length: int  # L: the prefill's length before
    index: torch.Tensor  # (B, L') long: the full-sequence column of each shortened slot (0 for padding)
    valid: torch.Tensor  # (B, L') bool: False for the left padding the shortening added
    dropped: torch.Tensor  # (B,) long: visual tokens removed from each sample
    renumber: bool  # 1-D positions renumbered consecutively (else the full sequence's kept)
    one_d: bool  # 1-D positions the core computes at decoding (else the model's own M-RoPE code)
    drop_layer: Optional[int] = None  # FastV-drop: the first layer whose cache holds the short sequence
    key_bias: Optional[torch.Tensor] = None  # (B, L') float: prop_attn's log(size) of each cached prefill token

    def expanded(self, batch: int) -> "_Layout":
        """The layout for ``batch`` rows (beam search repeats each sample's rows)."""
        rows = self.index.shape[0]
        if batch == rows:
            return self
        if batch % rows:
            raise ValueError(f"a decoding step of batch {batch} does not continue the reduced prefill of batch {rows}")
        k = batch // rows
        bias = self.key_bias.repeat_interleave(k, 0) if self.key_bias is not None else None
        return _Layout(self.full_length, self.index.repeat_interleave(k, 0), self.valid.repeat_interleave(k, 0),
                       self.dropped.repeat_interleave(k, 0), self.renumber, self.one_d, self.drop_layer, bias)


def _apply(reduction: vt.Reduction, x: torch.Tensor) -> torch.Tensor:
    """Another per-token tensor ``(N, ...)`` of the same image reduced alike: the kept rows,
    or each merged token's members' mean."""
    if reduction.index is not None:
        return x[reduction.index.to(x.device)]
    weights = reduction.source.to(device=x.device, dtype=x.dtype)
    flat = weights @ x.reshape(x.shape[0], -1)
    return (flat / weights.sum(-1, keepdim=True).clamp(min=1)).reshape((weights.shape[0],) + tuple(x.shape[1:]))


def _in_order(reduction: vt.Reduction) -> vt.Reduction:
    """The reduction with its rows in the order of their first member (the model's order)."""
    first = reduction.source.argmax(-1)
    order = first.argsort()
    if bool((order == torch.arange(len(order), device=order.device)).all()):
        return reduction
    index = None if reduction.index is None else reduction.index[order]
    return vt.Reduction(features=reduction.features[order], source=reduction.source[order], index=index)


def _with_protected(reduction: vt.Reduction, free: torch.Tensor, protected: torch.Tensor,
                    features: torch.Tensor) -> vt.Reduction:
    """An item's reduction from that of its free tokens (``free``: their indices) plus its
    protected tokens passed on as they are, in the model's order."""
    num = features.shape[0]
    source = reduction.source.new_zeros(reduction.source.shape[0] + protected.numel(), num)
    source[: reduction.source.shape[0], free.to(source.device)] = reduction.source
    source[torch.arange(protected.numel(), device=source.device) + reduction.source.shape[0],
           protected.to(source.device)] = 1
    index = None if reduction.index is None else torch.cat([free.to(reduction.index.device)[reduction.index],
                                                             protected.to(reduction.index.device)])
    return _in_order(vt.Reduction(features=torch.cat([reduction.features, features[protected]]),
                                  source=source, index=index))


def _reduced_output(output: Any, reductions: List[vt.Reduction], item_fields: Sequence[str],
                    join: Optional[Callable[[List[torch.Tensor]], Any]] = None) -> Any:
    """A copy of an encoder output with every per-item field reduced."""
    new = type(output)(**dict(output.items()))
    features = [r.features for r in reductions]
    new.pooler_output = join(features) if join is not None else tuple(features)
    for name in item_fields:
        layers = getattr(output, name, None)
        if layers is not None:
            setattr(new, name, [tuple(_apply(r, x) for r, x in zip(reductions, layer)) for layer in layers])
    return new


def _placeholders(inner: nn.Module, call: Dict[str, Any], token_id: int) -> torch.Tensor:
    """``(B, L)`` where the placeholder tokens are (from the ids, or the embeddings as the models do)."""
    if call.get("input_ids") is not None:
        return call["input_ids"] == token_id
    embeds = call["inputs_embeds"]
    token = inner.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
    return (embeds == token).all(-1)


def _pad_id(inner: nn.Module, taken: Sequence[int]) -> int:
    """A token id for the left padding the shortening adds (masked; never a placeholder)."""
    config = inner.config
    for candidate in (getattr(getattr(config, "text_config", None), "pad_token_id", None),
                      getattr(config, "pad_token_id", None)):
        if isinstance(candidate, int) and candidate not in taken:
            return candidate
    return next(i for i in range(len(taken) + 1) if i not in taken)


@dataclass
class _Plan:
    """What the reductions of one prefill decided, on the full ``(B, L)`` sequence."""

    real: torch.Tensor  # (B, L) bool: not padding
    keep: torch.Tensor  # (B, L) bool: passed on (each passed-on token at its first member's place)
    full: torch.Tensor  # (D, B, L): the full sequence's positions
    positions: torch.Tensor  # (D, B, L): the positions the passed-on tokens take
    size: torch.Tensor  # (B, L) float: how many original tokens each passed-on token stands for (1 for text)
    reduced: Dict[str, List[vt.Reduction]] = field(default_factory=dict)
    items: List[Dict[str, Any]] = field(default_factory=list)
    sources: List[torch.Tensor] = field(default_factory=list)


def _check_prefill(call: Dict[str, Any]) -> None:
    cache, mask = call.get("past_key_values"), call.get("attention_mask")
    if cache is not None and (getattr(cache, "_tome_vlm_layout", None) is not None or cache.get_seq_length() > 0):
        raise ValueError("visual-token reduction of a prefill that continues a KV cache is not supported; "
                         "start from an empty cache (or set model.visual_tokens = None)")
    if isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
        raise ValueError("visual-token reduction needs a 2-D attention_mask (batch, tokens) or None; "
                         "a prepared 4-D mask or mask dict cannot be shortened")


def _plan(inner: nn.Module, adapter: VLMAdapter, settings: VisualTokenSettings, call: Dict[str, Any],
          outputs: Dict[str, Any], scores: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]]) -> _Plan:
    """Reduce every image and video, in batch order, and mark what the sequence keeps
    (``scores``: each item's tower attention and keys, for the methods that rank by them)."""
    reference = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
    batch, length = reference.shape[:2]
    mask = call.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=reference.device)
    full = adapter.positions(inner, call, batch, length)  # (D, B, L)
    plan = _Plan(real=real, keep=real.clone(), full=full, positions=full.clone(),
                 size=torch.ones(batch, length, dtype=torch.float32, device=reference.device))
    generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
    text = _TextContext(inner, call, [_placeholders(inner, call, getattr(inner.config, m.token)) for m in adapter.modalities])
    for modality in (m for m in adapter.modalities if m.name in outputs):
        output = outputs[modality.name]
        features = modality.split(inner, call, output) if modality.split else list(output.pooler_output)
        slots = _placeholders(inner, call, getattr(inner.config, modality.token)).reshape(-1).nonzero()[:, 0]
        counts = [int(f.shape[0]) for f in features]
        if slots.numel() != sum(counts):
            raise ValueError(f"{modality.name} features and {modality.name} tokens do not match: "
                             f"{slots.numel()} placeholder tokens, {sum(counts)} features")
        plan.reduced[modality.name] = []
        for index, (feats, item_slots) in enumerate(zip(features, slots.split(counts))):
            sample = int(item_slots[0]) // length
            columns = item_slots - sample * length
            item_positions = full[:, sample, columns].t()
            free, protected, grid = _free_tokens(inner, call, modality, index, feats, item_positions)
            context = vt.VisualContext(grid=grid, text=text(sample), generator=generator)
            if modality.name in scores:
                context.attention, context.metric = scores[modality.name][index]
            if "row" in scores:  # FastV: the last token's attention to this item's tokens
                context.attention = scores["row"][sample, columns]
            _reduce_item(plan, settings, modality.name, feats, sample, columns, context, free, protected)
    return plan


def _free_tokens(inner: nn.Module, call: Dict[str, Any], modality: Modality, index: int, features: torch.Tensor,
                 positions: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Any]:
    """``(free, protected, grid)`` of one item: the indices of the tokens the budget applies to and
    of its separators (None, None when it has none), and the grid of the free tokens."""
    if modality.separators is None:
        return None, None, modality.grid(inner, call, index, features.shape[0], positions)
    protected, grid = modality.separators(inner, call, index, features)
    protected = protected.to(features.device)
    is_free = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    is_free[protected] = False
    return is_free.nonzero()[:, 0], protected, grid


def _reduce_item(plan: _Plan, settings: VisualTokenSettings, modality: str, features: torch.Tensor, sample: int,
                 columns: torch.Tensor, context: vt.VisualContext, free: Optional[torch.Tensor] = None,
                 protected: Optional[torch.Tensor] = None) -> None:
    """Reduce one image's (or video's) ``features`` (only its ``free`` tokens when given; the
    ``protected`` ones pass on as they are) and record it in ``plan``."""
    num = features.shape[0]
    count = num if free is None else free.numel()
    budget = vt.resolve_budget(settings.visual_tokens, count)
    if free is None:
        reduction = _in_order(vt.reduce_tokens(settings.method, features, budget, context))
    else:  # the per-token context (attention, keys) is the item's: the free tokens' rows
        rows = {}
        for name in ("attention", "metric"):
            value = getattr(context, name)
            if value is not None and value.shape[0] == num:
                rows[name] = value[free.to(value.device)]
        context = replace(context, **rows)
        reduction = _with_protected(vt.reduce_tokens(settings.method, features[free], budget, context),
                                    free, protected, features)
    plan.reduced[modality].append(reduction)
    first = columns[reduction.source.argmax(-1).to(columns.device)]
    plan.keep[sample, columns] = False
    plan.keep[sample, first] = True
    plan.size[sample, first] = reduction.size.to(plan.size)
    if settings.positions != "renumber":
        mean = reduction.positions(plan.full[:, sample, columns].t().to(torch.float32)).t()
        if reduction.index is None:  # merged tokens sit at their members' mean position
            plan.positions = plan.positions.to(torch.float32)
        plan.positions[:, sample, first] = mean.to(plan.positions.dtype)
    plan.items.append({"modality": modality, "sample": sample, "tokens": num, "budget": budget,
                       "passed": int(reduction.features.shape[0]), "reduced": budget < count})
    if settings.trace_source:
        plan.sources.append(reduction.source)


def _left_padded(keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(index, valid)`` ``(B, L')``: the kept columns of each row, left-padded to the longest."""
    short = int(keep.sum(1).max())
    index = torch.zeros(keep.shape[0], short, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], short, dtype=torch.bool, device=keep.device)
    for row in range(keep.shape[0]):
        kept = keep[row].nonzero()[:, 0]
        index[row, short - kept.numel():] = kept
        valid[row, short - kept.numel():] = True
    return index, valid


def _shortened(inner: nn.Module, adapter: VLMAdapter, settings: VisualTokenSettings, call: Dict[str, Any],
               outputs: Dict[str, Any], plan: _Plan, index: torch.Tensor, valid: torch.Tensor) -> Dict[str, Any]:
    """The call of the model's own forward on the shortened sequence."""
    new = dict(call)
    for modality in adapter.modalities:
        if modality.name in outputs:
            new[modality.pixels] = None
    new["mm_encoder_outputs"] = {m.name: _reduced_output(outputs[m.name], plan.reduced[m.name], adapter.item_fields,
                                                         m.join) for m in adapter.modalities if m.name in outputs}
    taken = [getattr(inner.config, m.token) for m in adapter.modalities]
    if call.get("input_ids") is not None:
        ids = call["input_ids"].gather(1, index)
        new["input_ids"] = torch.where(valid, ids, torch.full_like(ids, _pad_id(inner, taken)))
    if call.get("inputs_embeds") is not None:
        embeds = call["inputs_embeds"].gather(1, index[..., None].expand(-1, -1, call["inputs_embeds"].shape[-1]))
        new["inputs_embeds"] = embeds * valid[..., None].to(embeds.dtype)
    for name in ("mm_token_type_ids",) + adapter.token_fields:
        if call.get(name) is not None:
            types = call[name].gather(1, index)
            new[name] = torch.where(valid, types, torch.zeros_like(types))
    mask = call.get("attention_mask")
    if mask is not None:
        new["attention_mask"] = torch.where(valid, mask.gather(1, index), torch.zeros_like(mask[:, :1]))
    elif not bool(valid.all()) or (not adapter.mrope and settings.positions == "keep"):
        new["attention_mask"] = valid.to(torch.long)  # 1-D positions with gaps must not read as packed sequences
    positions = plan.positions
    if settings.positions == "renumber":
        positions = positions - (plan.real & ~plan.keep).cumsum(1).unsqueeze(0).to(positions.dtype)
    short = positions.gather(2, index.unsqueeze(0).expand(positions.shape[0], -1, -1))
    short = torch.where(valid.unsqueeze(0), short, torch.ones_like(short))
    new["position_ids"] = short if adapter.mrope else short[0]
    return new


def _encode(inner: nn.Module, settings: VisualTokenSettings, call: Dict[str, Any], visual: List[Modality]
            ) -> Tuple[Dict[str, Any], Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]]]:
    """Each modality's encoder output (the one given in ``mm_encoder_outputs``, else the
    model's own) and, for the methods ranked by the vision tower's attention, the
    ``(attention, keys)`` of each item, computed while the tower runs."""
    given = call.get("mm_encoder_outputs") or {}
    outputs, scores = {}, {}
    for modality in visual:
        if settings.method not in _TOWER_METHODS:
            output = given.get(modality.name)
            outputs[modality.name] = output if output is not None else modality.encode(inner, call)
        elif given.get(modality.name) is not None:
            raise ValueError(f"method={settings.method!r} needs the vision tower's attention, which precomputed "
                             f"mm_encoder_outputs[{modality.name!r}] do not carry; pass the pixels instead")
        else:
            outputs[modality.name], scores[modality.name] = modality.tower(inner, call)
    return outputs, scores


def _last_token_real(call: Dict[str, Any]) -> torch.Tensor:
    """``(B, L)`` bool, the real tokens; ``ValueError`` unless every sample's last token is real."""
    mask = call.get("attention_mask")
    reference = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
    real = mask.bool() if mask is not None else torch.ones(reference.shape[:2], dtype=torch.bool,
                                                           device=reference.device)
    if not bool(real[:, -1].all()):
        raise ValueError("method='fastv' ranks by the last token's attention, so every sample's last token must be "
                         "real: pad on the left (processor(..., padding_side='left'))")
    return real


def _fastv_row(inner: nn.Module, settings: VisualTokenSettings, call: Dict[str, Any], outputs: Dict[str, Any],
               visual: List[Modality], run: Callable[..., Any]) -> torch.Tensor:
    """``(B, L)``: the last token's attention to every token at layer ``fastv_layer`` (FastV)."""
    from ._vlm_fastv import last_token_attention

    real = _last_token_real(call)
    probe = dict(call, mm_encoder_outputs=outputs, **{m.pixels: None for m in visual})
    return last_token_attention(inner, settings.fastv_layer, probe, real, run)


def _prefill_drop(inner: nn.Module, adapter: VLMAdapter, settings: VisualTokenSettings, call: Dict[str, Any],
                  visual: List[Modality], run: Callable[..., Any]) -> Any:
    """FastV's in-layer drop: the model's own forward on the full sequence, whose layers from
    ``fastv_layer`` on run on the kept tokens (``_vlm_fastv.prefill_with_drop``)."""
    from ._vlm_fastv import prefill_with_drop

    if call.get("past_key_values") is not None and type(call["past_key_values"]).__name__ != "DynamicCache":
        raise ValueError(f"fastv_mode='drop' keeps a full-length KV cache for the first layers and a short one for "
                         f"the others, which needs a DynamicCache, not {type(call['past_key_values']).__name__}")
    outputs, _ = _encode(inner, settings, call, visual)
    real = _last_token_real(call)
    plans: List[_Plan] = []

    def decide(row: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        plans.append(_plan(inner, adapter, settings, call, outputs, {"row": row}))
        if not any(item["reduced"] for item in plans[0].items):
            return None
        return (plans[0].keep,) + _left_padded(plans[0].keep)

    full = dict(call, mm_encoder_outputs=outputs, **{m.pixels: None for m in visual})
    out, decision = prefill_with_drop(inner, settings.fastv_layer, real, decide, run, full)
    plan, info, length = plans[0], inner.__dict__["_tome_info"], real.shape[1]
    source = plan.sources if settings.trace_source else None
    if decision is None:
        info.update(items=plan.items, source=source, length=(length, length), _layout=None)
        return out
    keep, index, valid = decision
    layout = _Layout(length, index, valid, (plan.real & ~keep).sum(1), False, False, settings.fastv_layer)
    for holder in (getattr(out, "past_key_values", None), call.get("past_key_values")):
        if holder is not None:
            holder._tome_vlm_layout = layout
    info.update(items=plan.items, source=source, length=(length, index.shape[1]), _layout=layout)
    return out


def _prefill(inner: nn.Module, adapter: VLMAdapter, settings: VisualTokenSettings, call: Dict[str, Any],
             visual: List[Modality], run: Callable[..., Any]) -> Any:
    _check_prefill(call)
    if settings.method == "fastv" and settings.fastv_mode == "drop":
        return _prefill_drop(inner, adapter, settings, call, visual, run)
    outputs, scores = _encode(inner, settings, call, visual)
    if settings.method == "fastv":
        scores["row"] = _fastv_row(inner, settings, call, outputs, visual, run)
    plan = _plan(inner, adapter, settings, call, outputs, scores)
    info = inner.__dict__["_tome_info"]
    source = plan.sources if settings.trace_source else None
    length = plan.keep.shape[1]
    if not any(item["reduced"] for item in plan.items):  # nothing reduced: the model's own forward, as unpatched
        info.update(items=plan.items, source=source, length=(length, length), _layout=None)
        return run(**dict(call, mm_encoder_outputs=outputs, **{m.pixels: None for m in visual}))
    index, valid = _left_padded(plan.keep)
    bias = None
    if settings.prop_attn and bool((plan.size > 1).any()):
        bias = torch.where(valid, plan.size.gather(1, index), torch.ones_like(index, dtype=plan.size.dtype)).log()
    with _KeyBias(inner, bias):
        out = run(**_shortened(inner, adapter, settings, call, outputs, plan, index, valid))
    passed = (plan.keep & plan.real).sum(1)
    if adapter.finish is not None:  # the largest position + 1 - the tokens kept: decoding continues as unreduced
        top = torch.where(plan.real.unsqueeze(0), plan.full, torch.zeros_like(plan.full)).amax(dim=(0, 2))
        adapter.finish(inner, (top + 1 - passed).unsqueeze(1))
    layout = _Layout(length, index, valid, (plan.real & ~plan.keep).sum(1), settings.positions == "renumber",
                     not adapter.mrope, key_bias=bias)
    for holder in (getattr(out, "past_key_values", None), call.get("past_key_values")):
        if holder is not None:
            holder._tome_vlm_layout = layout
    info.update(items=plan.items, source=source, length=(length, index.shape[1]), _layout=layout)
    return out


class _TextContext:
    """The instruction's embeddings of each sample (its real, non-visual tokens), made when asked."""

    def __init__(self, inner: nn.Module, call: Dict[str, Any], placeholders: List[torch.Tensor]) -> None:
        self.inner, self.call, self.cache = inner, call, {}
        visual = placeholders[0].clone()
        for other in placeholders[1:]:
            visual |= other
        self.text = ~visual
        if call.get("attention_mask") is not None:
            self.text &= call["attention_mask"].bool()

    def __call__(self, sample: int) -> Optional[torch.Tensor]:
        if sample not in self.cache:
            if self.call.get("inputs_embeds") is not None:
                self.cache[sample] = self.call["inputs_embeds"][sample][self.text[sample]]
            else:
                ids = self.call["input_ids"][sample][self.text[sample]]
                with torch.no_grad():
                    self.cache[sample] = self.inner.get_input_embeddings()(ids)
        return self.cache[sample]


# ----------------------------------------------------------------------------- decoding


def _decode(inner: nn.Module, adapter: VLMAdapter, layout: _Layout, call: Dict[str, Any],
            run: Callable[..., Any]) -> Any:
    cache = call["past_key_values"]
    reference = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
    batch, steps = reference.shape[:2]
    layout = layout.expanded(batch)
    short = layout.index.shape[1]
    cached = cache.get_seq_length()
    if layout.drop_layer is not None:
        return _decode_drop(inner, layout, call, run, batch, steps, cached)
    new = dict(call)
    mask = call.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("decoding after a reduced prefill needs a 2-D attention_mask (batch, tokens) or None "
                             "(a static cache's prepared masks cannot be shortened)")
        if mask.shape[1] - layout.full_length != cached - short + steps:
            raise ValueError(f"attention_mask of length {mask.shape[1]} does not continue the reduced prefill "
                             f"({layout.full_length} tokens before reduction, {cached} cached, {steps} new)")
        head = torch.where(layout.valid, mask[:, : layout.full_length].gather(1, layout.index),
                           torch.zeros_like(mask[:, :1]))
        new["attention_mask"] = torch.cat([head, mask[:, layout.full_length:]], dim=1)
    elif not bool(layout.valid.all()):
        tail = torch.ones(batch, cached - short + steps, dtype=torch.long, device=layout.valid.device)
        new["attention_mask"] = torch.cat([layout.valid.to(torch.long), tail], dim=1)
    if layout.one_d:
        positions = call.get("position_ids")
        if positions is None:  # the unpatched model's default: the full sequence's next positions
            start = cached + layout.full_length - short
            positions = (torch.arange(steps, device=reference.device) + start).expand(batch, -1)
        if layout.renumber:
            positions = positions - layout.dropped[:, None].to(positions.device)
        new["position_ids"] = positions
    bias = None
    if layout.key_bias is not None:  # the prefill's merged tokens keep their weight; new tokens have size 1
        bias = torch.cat([layout.key_bias, layout.key_bias.new_zeros(batch, cached - short + steps)], dim=1)
    with _KeyBias(inner, bias):
        return run(**new)


class _KeyBias:
    """While active, every decoder layer of ``inner``'s language model gets ``bias`` ``(B, keys)``
    added to its attention mask, for all queries and heads (``prop_attn``); None: nothing.

    A forward pre-hook per layer rewrites its ``attention_mask`` keyword: None (SDPA's causal
    shortcut) becomes the causal mask, a boolean mask becomes additive (0 or the dtype's
    minimum), and the bias is added over the key axis. Hooks are removed on exit."""

    def __init__(self, inner: nn.Module, bias: Optional[torch.Tensor]) -> None:
        self.inner, self.bias, self.handles = inner, bias, []
        self._made: List[Tuple[Any, torch.Tensor]] = []  # (mask given, mask made): layers share their masks

    def __enter__(self) -> "_KeyBias":
        if self.bias is not None:
            from ._vlm_fastv import language_layers

            self.handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True)
                            for layer in language_layers(self.inner)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self._made = [], []

    def _hook(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any]]:
        bias = self.bias
        hidden = args[0] if args else kwargs["hidden_states"]
        queries, keys = hidden.shape[1], bias.shape[1]
        given = kwargs.get("attention_mask")
        for source, made in self._made:
            if source is given and made.shape[-2] == queries:
                kwargs["attention_mask"] = made
                return args, kwargs
        mask = given
        if mask is None:
            mask = torch.ones(queries, keys, dtype=torch.bool, device=hidden.device).tril(keys - queries)[None, None]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-1] != keys:
            raise ValueError(f"prop_attn needs each decoder layer's 4-D attention mask over the {keys} cached and new "
                             f"tokens, got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
                ~mask, torch.finfo(hidden.dtype).min)
        kwargs["attention_mask"] = mask + bias[:, None, None, :].to(device=mask.device, dtype=mask.dtype)
        self._made.append((given, kwargs["attention_mask"]))
        return args, kwargs


def _decode_drop(inner: nn.Module, layout: _Layout, call: Dict[str, Any], run: Callable[..., Any], batch: int,
                 steps: int, cached: int) -> Any:
    """A decoding step after a FastV-drop prefill: the model's own forward (its positions and
    the first layers' mask are those of the full sequence, as unreduced); the layers from
    ``drop_layer`` on get the mask of their short cache (the prefill's kept columns, then
    every token decoded since)."""
    from ._vlm_fastv import decode_with_drop

    mask = call.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, cached + steps, dtype=torch.long, device=layout.valid.device)
    elif not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("decoding after a reduced prefill needs a 2-D attention_mask (batch, tokens) or None "
                         "(a static cache's prepared masks cannot be shortened)")
    if mask.shape[1] != cached + steps:
        raise ValueError(f"attention_mask of length {mask.shape[1]} does not continue the reduced prefill "
                         f"({cached} tokens cached in the first layers, {steps} new)")
    head = torch.where(layout.valid, mask[:, : layout.full_length].gather(1, layout.index),
                       torch.zeros_like(mask[:, :1]))
    short = torch.cat([head, mask[:, layout.full_length:]], dim=1)
    return decode_with_drop(inner, layout.drop_layer, short, run, call)


# ----------------------------------------------------------------------------- patching


def vlm(model: nn.Module, visual_tokens: Optional[Union[int, float]] = KEEP, method: str = KEEP,
        trace_source: bool = KEEP, positions: str = KEEP, fastv_layer: int = KEEP, fastv_mode: str = KEEP,
        seed: Optional[int] = KEEP, prop_attn: bool = KEEP) -> nn.Module:
    """Patch a transformers VLM in place so that each image and video passes at most
    ``visual_tokens`` tokens to its language model (``tome.apply_patch`` detects it too).

    Patching again changes only the options given; see :class:`VisualTokenSettings` for each
    option and ``docs/vlm_reduction.md`` for positions and decoding.

    Args:
        model: A supported VLM (``Qwen2_5_VLForConditionalGeneration``,
            ``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``,
            ``LlavaForConditionalGeneration``, ``Gemma3ForConditionalGeneration``,
            ``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``,
            ``InternVLForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``)
            or its inner ``...Model``.

    Returns:
        ``model``, patched.

    Raises:
        TypeError: if ``model`` is not a supported VLM (its class and the supported ones named).
        ValueError: for an invalid option (named, with what is valid).
    """
    options = {name: value for name, value in locals().items() if name != "model"}
    return configure(model, family="vlm", caller="tome.patch.vlm", **options)


def _patch(model: nn.Module, settings: VisualTokenSettings) -> nn.Module:
    found = find_adapter(model)
    if found is None:
        raise TypeError(f"{type(model).__name__} ({type(model).__module__}) is not a vision-language model the vlm "
                        f"family supports; supported: {supported_vlms()}")
    adapter, inner = found
    if settings.method in _UNWIRED and not _wired(adapter, settings.method):
        raise ValueError(f"method={settings.method!r} needs {_UNWIRED[settings.method]}, which is not wired for the "
                         f"{adapter.name} family yet; choose one of "
                         f"{sorted(m for m in vt.METHODS if m not in _UNWIRED or _wired(adapter, m))}")
    if settings.method == "fastv":
        from ._vlm_fastv import language_layers

        depth = len(language_layers(inner))
        if settings.fastv_layer >= depth:
            raise ValueError(f"fastv_layer={settings.fastv_layer} is beyond the language model's {depth} layers; "
                             f"expected 0 <= fastv_layer <= {depth - 1}")
        if settings.fastv_mode == "drop":
            _check_drop(adapter, inner, settings)
    if settings.prop_attn:
        implementation = inner.config.get_text_config()._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"prop_attn=True adds log(size) to the language model's attention mask, which its "
                             f"{implementation!r} attention does not take; load the model with "
                             "attn_implementation='sdpa' or 'eager'")
    if adapter.mrope and settings.positions != "keep":
        raise ValueError(f"positions={settings.positions!r} applies to 1-D positions; {adapter.name} keeps each "
                         "token's 3-D M-RoPE position (use positions='keep')")
    if inner is model:
        swap_class(model, (ToMeVLMMixin, ToMeVLMInnerMixin))
    else:
        swap_class(model, ToMeVLMMixin)
        swap_class(inner, ToMeVLMInnerMixin)
    info = model.__dict__.get("_tome_info")
    if not isinstance(info, VisualTokenInfo):
        info = VisualTokenInfo(items=None, source=None, length=None)
    for module in {id(model): model, id(inner): inner}.values():
        for name, value in (("_tome_settings", settings), ("_tome_info", info), ("_tome_adapter", adapter.name)):
            object.__setattr__(module, name, value)
    return model


def _check_drop(adapter: VLMAdapter, inner: nn.Module, settings: VisualTokenSettings) -> None:
    """``ValueError`` where FastV's in-layer drop cannot run as the paper's."""
    if adapter.name not in _DROP_FAMILIES:
        raise ValueError(f"fastv_mode='drop' is built and tested for {', '.join(_DROP_FAMILIES)}, not yet for "
                         f"{adapter.name}; use fastv_mode='select' (the default)")
    if settings.fastv_layer < 1:
        raise ValueError("fastv_layer=0 with fastv_mode='drop': the drop at layer K ranks by the attention of layer "
                         "K - 1, so K >= 1 (fastv_mode='select' ranks at layer 0)")
    if settings.positions != "keep":
        raise ValueError(f"positions={settings.positions!r} with fastv_mode='drop': the first layers see the full "
                         "sequence, so the kept tokens keep their positions (use positions='keep')")
    config = inner.language_model.config
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if any(kind != "full_attention" for kind in kinds[settings.fastv_layer:]):
        raise ValueError(f"fastv_mode='drop' builds one causal mask for the layers after fastv_layer, but "
                         f"{adapter.name}'s language model has layers of types {sorted(set(kinds))}; "
                         "use fastv_mode='select'")


def _wired(adapter: VLMAdapter, method: str) -> bool:
    """Whether ``adapter`` provides what ``method`` needs, for every visual input it has."""
    if method in _TOWER_METHODS:
        return all(modality.tower is not None for modality in adapter.modalities)
    return method == "fastv" and adapter.fastv


def _examples() -> Sequence[Example]:
    from ._vlm_families import examples

    return examples()


register(FamilySpec(
    name="vlm",
    detector=is_vlm,
    patch=_patch,
    settings=VisualTokenSettings,
    priority=8,
    instance_attrs=("_tome_settings", "_tome_adapter"),
    no_merging={"visual_tokens": None},
    read=lambda model: model.__dict__["_tome_settings"],
    examples=_examples,
))
