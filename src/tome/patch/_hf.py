"""ToMe for Hugging Face ``transformers`` vision models (transformers 5.x layouts).

Supported, whole models and task heads: ViT, DeiT (class + distillation
tokens, also ``DeiTForImageClassificationWithTeacher``), DINOv2 (LayerScale),
DINOv2 with registers, CLIP's vision tower (``CLIPVisionModel``,
``CLIPVisionModelWithProjection``, ``CLIPForImageClassification`` and the vision
side of ``CLIPModel``), SigLIP 2's vision tower with NaFlex inputs
(``Siglip2VisionModel`` and the vision side of ``Siglip2Model``; its
``pixel_attention_mask`` merges like ``attention_mask`` below), SigLIP's vision tower (no class token; attention-pooling
head), VideoMAE (tubelet tokens) and the Audio Spectrogram Transformer (AST).

How it is wired. transformers models hand their keyword arguments to every
layer, so the model's own forward runs unchanged: the *runner* (the module
above the layers: ``ViTModel``, ``Dinov2Encoder``, ``CLIPVisionModel``, ...)
adds one :class:`~tome.patch._shared.ToMeForward` as ``tome=`` to its keyword
arguments, and every layer reads its entry state from it, runs the shared
attention-then-merge step and writes its exit state back. Embeddings, final
norms, class-token pooling, hidden-state capture and gradient checkpointing
are the model's own code. Task heads that pool over patch tokens (DINOv2, CLIP
and SigLIP classifiers, VideoMAE's mean pooling) weight the pool by token size;
SigLIP's attention-pooling head adds ``log(size)`` to its key logits. Adding a
model is one row in ``_RUNNERS`` (and ``SUPPORTED_MODELS``) plus whatever is
really different about it (its layer's branches, its attention's attribute names:
:mod:`tome.patch._hf_layers`).

What changes in the outputs with merging (``model.r`` > 0): ``last_hidden_state``
and ``hidden_states`` have fewer tokens (``model._tome_info["size"]`` and, with
``trace_source=True``, ``["source"]`` describe them), ``output_attentions=True`` is
refused, and a ``(batch, tokens)`` key-padding ``attention_mask`` is carried as token
sizes; ``docs/huggingface.md`` says it in full.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from ._checks import check_class
from ._hf_layers import (  # the layer and attention classes, also by their old names here (pickles)
    ToMeCLIPAttention,
    ToMeCLIPLayer,
    ToMeDinov2Layer,
    ToMeHFAttention,
    ToMeHFLayer,  # noqa: F401  (used by _hf_dinov3 and the tests as _hf.ToMeHFLayer)
    ToMeVideoMAELayer,
    ToMeVideoMAESelfAttention,
    ToMeViTLayer,
)
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ToMeModelMixin,
    ToMeSettings,
    configure,
    example_images,
    is_patched,
    original_class,
    patch_model,
    register,
    supported_families,
    swap_class,
    with_parent_signature,
)
from ._rope import RotaryPositions
from ._shared import ToMeForward, padding_bias, weighted_mean

__all__ = ["hf", "is_hf_vision", "SUPPORTED_MODELS"]

LAYOUT = " (ToMe supports the layout of transformers 5.x)"

# The forward under way in this thread, for modules the model calls without its keyword
# arguments (VideoMAE's encoder, SigLIP's pooling head). Only read where the forward's own
# ledger is meant (checked against the model's _tome_info).
_ACTIVE: contextvars.ContextVar[Optional[ToMeForward]] = contextvars.ContextVar("tome_hf_forward", default=None)


# ----------------------------------------------------------------------------- the forward: one ledger each


def _refuse_unsupported_outputs(module: nn.Module, kwargs: Dict[str, Any]) -> None:
    """While merging, refuse the options whose results would not line up with merged tokens.
    (A padding mask is refused by the layers, after the model has turned a mask that masks
    nothing into None.)"""
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = getattr(module.config, "output_attentions", False)
    if output_attentions:
        raise ValueError(
            f"output_attentions={output_attentions!r} cannot be combined with token merging (model.r > 0): "
            "merged layers run fused attention and their token counts shrink. Set model.r = 0 to get "
            "attention maps."
        )


class _Ledger:
    """Context for one forward: reuse the active ledger of this model, or start (and record) one."""

    def __init__(
        self, module: nn.Module, given: Optional[ToMeForward], kwargs: Dict[str, Any],
        positions: Optional[RotaryPositions] = None,
    ) -> None:
        info = module._tome_info
        # Only models with a module that is called without keyword arguments use the context
        # variable: torch.compile cannot trace ContextVar.set (it would break the graph).
        self.use_context = module.__dict__.get("_tome_context", False)
        active = given if given is not None or not self.use_context else _ACTIVE.get()
        self.own = active is None or active.info is not info
        if self.own:
            active = ToMeForward(info["protected_tokens"], info["prop_attn"], info["trace_source"])
            active.info = info
            # What the user passed, not what the model built. Beside input_ids (CLIP, SigLIP) the
            # mask is the text tower's padding, and the merging vision tower never sees it; SigLIP 2
            # names its image padding pixel_attention_mask.
            padding_arg = _padding_arg(module)
            text_padding = padding_arg == "attention_mask" and "input_ids" in kwargs
            active.caller_mask = None if text_padding else kwargs.get(padding_arg)
        self.ledger = active
        blocks = module._tome_blocks()
        self.num_blocks = len(blocks)
        if self.own and any(b._tome_block_r > 0 for b in blocks):
            active.positions = positions  # carried from the first layer on
            if active.caller_mask is not None:
                # While merging, a key-padding mask rides along as token sizes (padding: size 0), so
                # it merges with the tokens; the masks the model builds from it need not line up.
                active.padding = key_padding(active.caller_mask)
                active.caller_mask = None

    def __enter__(self) -> ToMeForward:
        if self.use_context:
            self._token = _ACTIVE.set(self.ledger)
        return self.ledger  # type: ignore[return-value]

    def __exit__(self, *exc: Any) -> None:
        if self.use_context:
            _ACTIVE.reset(self._token)
        ledger = self.ledger
        if self.own and exc[0] is None and ledger.final is not None:  # type: ignore[union-attr]
            removed = [ledger.removed.get(i, 0) for i in range(self.num_blocks)]  # type: ignore[union-attr]
            ledger.info.record(ledger.final, ledger.like, removed)  # type: ignore[union-attr]


def key_padding(mask: torch.Tensor) -> torch.Tensor:
    """The caller's ``attention_mask`` as first-layer token sizes.

    Args:
        mask: ``(batch, tokens)`` key-padding mask over the tokens entering the first
            layer (prefix tokens included), nonzero / True for tokens to keep.

    Returns:
        ``(batch, tokens, 1)`` float32: 1 for valid tokens, 0 for padding.

    Raises:
        ValueError: quoting the shape when ``mask`` is not ``(batch, tokens)``.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask of shape {shape} cannot be combined with token merging (model.r > 0): pass a "
            "(batch, tokens) key-padding mask over the tokens entering the first layer (1 = keep, 0 = padding), "
            "or set model.r = 0"
        )
    return (mask != 0).to(torch.float32).unsqueeze(-1)


class ToMeHFRunner:
    """The module above the layers: its own forward, with a ledger among the keyword arguments."""

    _tome_keep_name = True  # transformers recognises classes by name and module

    def _tome_blocks(self) -> Sequence[nn.Module]:
        return list(_resolve(self, _RUNNER_LAYERS[original_class(self).__name__]))  # type: ignore[arg-type]

    @with_parent_signature
    def forward(self, *args: Any, tome: Optional[ToMeForward] = None, **kwargs: Any) -> Any:
        with _Ledger(self, tome, kwargs) as ledger:  # type: ignore[arg-type]
            return super().forward(*args, tome=ledger, **kwargs)  # type: ignore[misc]


class ToMeSiglip2Runner(ToMeHFRunner):
    """``Siglip2VisionModel`` as the runner: its NaFlex arguments by name, wherever the caller put them."""

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_attention_mask: Optional[torch.Tensor] = None,
        spatial_shapes: Optional[torch.Tensor] = None,
        tome: Optional[ToMeForward] = None,
        **kwargs: Any,
    ) -> Any:
        return super().forward(pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes,
                               tome=tome, **kwargs)


class ToMeSiglipHead:
    """SigLIP's and SigLIP 2's attention-pooling head: every key counts once per patch it stands
    for, and padding (size 0) not at all (SigLIP 2's padding mask covers the tokens before merging)."""

    _tome_keep_name = True

    def forward(self, hidden_state: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ledger = _ACTIVE.get()
        final = ledger.final if ledger is not None and ledger.info is self._tome_info else None
        if final is None or final.size is None or final.num_tokens != hidden_state.shape[1]:
            return super().forward(hidden_state, *args, **kwargs)  # type: ignore[misc]
        return siglip_pool(self, hidden_state, final.size)


def siglip_pool(head: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """SigLIP's attention-pooling head with ``log(size)`` added to its key logits.

    Args:
        head: A ``SiglipMultiheadAttentionPoolingHead``.
        x: ``(batch, tokens, channels)`` final tokens.
        size: ``(batch, tokens, 1)`` token sizes, or None (nothing merged).

    Returns:
        ``(batch, channels)`` pooled features.
    """
    batch = x.shape[0]
    probe = head.probe.repeat(batch, 1, 1)
    mask = None
    if size is not None:
        # nn.MultiheadAttention adds a float mask of shape (batch * heads, queries, keys) to its logits.
        # SigLIP 2's padding (size 0) gets no weight; an image of padding only attends as if unmasked.
        mask = padding_bias(size, x.dtype).squeeze(1).repeat_interleave(head.attention.num_heads, dim=0)
    pooled = head.attention(probe, x, x, attn_mask=mask)[0]
    residual = pooled
    pooled = residual + head.mlp(head.layernorm(pooled))
    return pooled[:, 0]


# ----------------------------------------------------------------------------- models and task heads


class ToMeHFModel(ToMeModelMixin):
    """The patched model the user holds: ``model.r`` and ``model._tome_info``."""

    _tome_keep_name = True  # transformers recognises classes by name and module

    def _tome_blocks(self) -> Sequence[nn.Module]:
        spec = _spec_of(self)  # type: ignore[arg-type]
        return _resolve(self, spec.runner)._tome_blocks()  # type: ignore[arg-type]

    @with_parent_signature
    def forward(self, *args: Any, tome: Optional[ToMeForward] = None, **kwargs: Any) -> Any:
        if any(self._tome_schedule()):
            _refuse_unsupported_outputs(self, kwargs)  # type: ignore[arg-type]
        with _Ledger(self, tome, kwargs, self._tome_positions(args, kwargs)) as ledger:  # type: ignore[arg-type]
            return super().forward(*args, tome=ledger, **kwargs)  # type: ignore[misc]

    def _tome_positions(self, args: tuple, kwargs: Dict[str, Any]) -> Optional[RotaryPositions]:
        """The rotary positions of this forward's tokens (None: the model has no rotary embeddings)."""
        return None

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """The original class's ``from_pretrained``, patched again (``r = 0``): what
        ``type(model).from_pretrained(...)`` means for a patched ``model``."""
        parent = cls.__dict__.get("_tome_parent")
        if parent is None:
            return super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        loaded = parent.from_pretrained(*args, **kwargs)
        if isinstance(loaded, tuple):  # output_loading_info=True
            return (cls._tome_patch_again(loaded[0]),) + loaded[1:]
        return cls._tome_patch_again(loaded)

    @staticmethod
    def _tome_patch_again(model: nn.Module) -> nn.Module:
        return hf(model)


class ToMePoolingHead(ToMeHFModel):
    """Task heads that pool over patch tokens: the model's head, with the pool weighted
    by token size (``sum(x * size) / sum(size)`` in place of the mean). The pooling
    itself is the spec's ``pool`` function."""

    @with_parent_signature
    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        if not any(self._tome_schedule()):
            return super().forward(pixel_values, labels=labels, **kwargs)
        from transformers.modeling_outputs import ImageClassifierOutput

        _refuse_unsupported_outputs(self, kwargs)  # type: ignore[arg-type]
        return_dict = kwargs.pop("return_dict", None)
        return_dict = getattr(self.config, "return_dict", True) if return_dict is None else return_dict
        spec = _spec_of(self)  # type: ignore[arg-type]
        runner = _resolve(self, spec.runner)  # type: ignore[arg-type]
        with _Ledger(runner, None, kwargs) as ledger:
            outputs = _resolve(self, spec.backbone)(pixel_values, tome=ledger, **kwargs)  # type: ignore[arg-type]
        size = ledger.final.size if ledger.final is not None else None
        logits = self.classifier(spec.pool(self, outputs.last_hidden_state, size))
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


def _mean_after(tokens: torch.Tensor, size: Optional[torch.Tensor], start: int) -> torch.Tensor:
    """Size-weighted mean of ``tokens[:, start:]`` (the plain mean when nothing merged)."""
    return weighted_mean(tokens[:, start:], None if size is None else size[:, start:])


def _dinov2_pool(head: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    # Class token concatenated with the mean of the patch tokens (after class and registers).
    start = 1 + getattr(head.config, "num_register_tokens", 0)
    return torch.cat([x[:, 0], _mean_after(x, size, start)], dim=1)


def _clip_pool(head: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    return _mean_after(x, size, 1)  # the patch tokens; SigLIP (no class token): _mean_after(x, size, 0)


def _videomae_pool(head: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    if head.fc_norm is not None:
        return head.fc_norm(_mean_after(x, size, 0))
    return x[:, 0]  # protected from merging in this configuration


# ----------------------------------------------------------------------------- what is supported, and where


@dataclass(frozen=True)
class _RunnerKind:
    """A runner: its classes, where it keeps its layers and their attention, which tokens are protected."""

    runner_classes: Tuple[str, ...]
    layers: str
    layer_classes: Tuple[str, ...]
    layer_mixin: type
    attention: str  # path of the attention module inside a layer
    attention_mixin: Type[ToMeHFAttention]
    protected_tokens: Callable[[Any], int]
    class_token: bool
    distill_token: bool = False
    pooling_head: str = ""  # path (in the runner) of an attention-pooling head weighted by size
    # Whether a module on the way is called without keyword arguments, so the ledger
    # travels in a context variable (VideoMAE's encoder, SigLIP's pooling head).
    context: bool = False
    runner_mixin: type = ToMeHFRunner
    pooling_mixin: type = ToMeSiglipHead
    # The keyword of the model's forward that carries a (batch, tokens) key-padding mask.
    padding_arg: str = "attention_mask"


def _class_and_registers(config: Any) -> int:
    return 1 + getattr(config, "num_register_tokens", 0)


def _videomae_protected(config: Any) -> int:
    # Without mean pooling the classifier reads token 0 (a patch): keep it from merging.
    return 0 if config.use_mean_pooling else 1


_RUNNERS: Dict[str, _RunnerKind] = {
    "vit": _RunnerKind(
        ("ViTModel",), "layers", ("ViTLayer",), ToMeViTLayer, "attention", ToMeHFAttention,
        protected_tokens=lambda config: 1, class_token=True,
    ),
    "deit": _RunnerKind(
        ("DeiTModel",), "layers", ("DeiTLayer",), ToMeViTLayer, "attention", ToMeHFAttention,
        protected_tokens=lambda config: 2, class_token=True, distill_token=True,
    ),
    "ast": _RunnerKind(
        ("ASTModel",), "layers", ("ASTLayer",), ToMeViTLayer, "attention", ToMeHFAttention,
        protected_tokens=lambda config: 2, class_token=True, distill_token=True,
    ),
    "dinov2": _RunnerKind(
        ("Dinov2Encoder", "Dinov2WithRegistersEncoder"), "layer", ("Dinov2Layer", "Dinov2WithRegistersLayer"),
        ToMeDinov2Layer, "attention", ToMeHFAttention, protected_tokens=_class_and_registers, class_token=True,
    ),
    "clip": _RunnerKind(
        ("CLIPVisionModel",), "encoder.layers", ("CLIPEncoderLayer",), ToMeCLIPLayer, "self_attn", ToMeCLIPAttention,
        protected_tokens=lambda config: 1, class_token=True,
    ),
    "siglip": _RunnerKind(
        ("SiglipVisionModel",), "encoder.layers", ("SiglipEncoderLayer",), ToMeCLIPLayer, "self_attn",
        ToMeCLIPAttention, protected_tokens=lambda config: 0, class_token=False, pooling_head="head", context=True,
    ),
    # NaFlex inputs: patchified pixel_values, pixel_attention_mask (batch, patches), spatial_shapes.
    "siglip2": _RunnerKind(
        ("Siglip2VisionModel",), "encoder.layers", ("Siglip2EncoderLayer",), ToMeCLIPLayer, "self_attn",
        ToMeCLIPAttention, protected_tokens=lambda config: 0, class_token=False, pooling_head="head", context=True,
        runner_mixin=ToMeSiglip2Runner, padding_arg="pixel_attention_mask",
    ),
    # VideoMAEModel calls its encoder without keyword arguments: the encoder is the runner.
    "videomae": _RunnerKind(
        ("VideoMAEEncoder",), "layer", ("VideoMAELayer",), ToMeVideoMAELayer, "attention.attention",
        ToMeVideoMAESelfAttention, protected_tokens=_videomae_protected, class_token=False, context=True,
    ),
}
_RUNNER_LAYERS = {name: kind.layers for kind in _RUNNERS.values() for name in kind.runner_classes}


@dataclass(frozen=True)
class _ModelSpec:
    """A supported model class: its module, its runner's path and kind, and (for task heads
    that pool over patches) the pool and the backbone module the head's forward calls."""

    module: str
    runner: str
    kind: str
    pool: Optional[Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]] = None
    backbone: str = ""


def _m(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


SUPPORTED_MODELS: Dict[str, _ModelSpec] = {
    "ViTModel": _ModelSpec(_m("vit"), "", "vit"),
    "ViTForImageClassification": _ModelSpec(_m("vit"), "vit", "vit"),
    "DeiTModel": _ModelSpec(_m("deit"), "", "deit"),
    "DeiTForImageClassification": _ModelSpec(_m("deit"), "deit", "deit"),
    "DeiTForImageClassificationWithTeacher": _ModelSpec(_m("deit"), "deit", "deit"),
    "Dinov2Model": _ModelSpec(_m("dinov2"), "encoder", "dinov2"),
    "Dinov2ForImageClassification": _ModelSpec(_m("dinov2"), "dinov2.encoder", "dinov2", _dinov2_pool, "dinov2"),
    "Dinov2WithRegistersModel": _ModelSpec(_m("dinov2_with_registers"), "encoder", "dinov2"),
    "Dinov2WithRegistersForImageClassification": _ModelSpec(
        _m("dinov2_with_registers"), "dinov2_with_registers.encoder", "dinov2", _dinov2_pool, "dinov2_with_registers"
    ),
    "CLIPVisionModel": _ModelSpec(_m("clip"), "", "clip"),
    "CLIPVisionModelWithProjection": _ModelSpec(_m("clip"), "vision_model", "clip"),
    "CLIPModel": _ModelSpec(_m("clip"), "vision_model", "clip"),
    "CLIPForImageClassification": _ModelSpec(_m("clip"), "vision_model", "clip", _clip_pool, "vision_model"),
    "SiglipVisionModel": _ModelSpec(_m("siglip"), "", "siglip"),
    "SiglipModel": _ModelSpec(_m("siglip"), "vision_model", "siglip"),
    "SiglipForImageClassification": _ModelSpec(_m("siglip"), "vision_model", "siglip",
                                               lambda head, x, size: _mean_after(x, size, 0), "vision_model"),
    "Siglip2VisionModel": _ModelSpec(_m("siglip2"), "", "siglip2"),
    "Siglip2Model": _ModelSpec(_m("siglip2"), "vision_model", "siglip2"),
    "VideoMAEModel": _ModelSpec(_m("videomae"), "encoder", "videomae"),
    "VideoMAEForVideoClassification": _ModelSpec(
        _m("videomae"), "videomae.encoder", "videomae", _videomae_pool, "videomae"
    ),
    "ASTModel": _ModelSpec(_m("audio_spectrogram_transformer"), "", "ast"),
    "ASTForAudioClassification": _ModelSpec(_m("audio_spectrogram_transformer"), "audio_spectrogram_transformer", "ast"),
}


def _padding_arg(module: nn.Module) -> str:
    """The keyword under which ``module`` (a supported model or runner) takes a key-padding mask."""
    name = original_class(module).__name__
    spec = SUPPORTED_MODELS.get(name)
    if spec is not None:
        return _RUNNERS[spec.kind].padding_arg
    for kind in _RUNNERS.values():
        if name in kind.runner_classes:
            return kind.padding_arg
    return "attention_mask"


def _resolve(root: nn.Module, path: str) -> Any:
    target: Any = root
    for part in filter(None, path.split(".")):
        target = getattr(target, part)
    return target


def _spec_of(model: nn.Module) -> _ModelSpec:
    own = original_class(model)
    spec = SUPPORTED_MODELS.get(own.__name__)
    if spec is None or own.__module__ != spec.module:
        raise TypeError(
            f"tome.patch.hf does not support {own.__name__} ({own.__module__}). Supported transformers "
            f"models: {', '.join(SUPPORTED_MODELS)}. Other families: {supported_families()}"
        )
    return spec


def is_hf_vision(model: nn.Module) -> bool:
    """Whether ``model`` is one of the supported transformers vision models (by class; nothing imported)."""
    own = original_class(model)
    spec = SUPPORTED_MODELS.get(own.__name__)
    return spec is not None and own.__module__ == spec.module


def _check(model: nn.Module, spec: _ModelSpec, runner: nn.Module, layers: Sequence[nn.Module]) -> None:
    """The runner, layers and attention modules must be the transformers classes the table names."""
    kind = _RUNNERS[spec.kind]
    name = original_class(model).__name__
    check_class(runner, f"{name}.{spec.runner or '<self>'}", kind.runner_classes, "transformers", LAYOUT)
    where = f"{name}.{spec.runner}." if spec.runner else f"{name}."
    for index, layer in enumerate(layers):
        check_class(layer, f"{where}{kind.layers}[{index}]", kind.layer_classes, "transformers", LAYOUT)
        attn = _resolve(layer, kind.attention)
        missing = [attr for attr in kind.attention_mixin._tome_attrs if attr and not hasattr(attn, attr)]
        if missing:
            raise TypeError(f"{where}{kind.layers}[{index}]: {type(attn).__name__} lacks {missing};{LAYOUT}")


def _keep_output_capture(module: nn.Module) -> None:
    """Let transformers' output capture (``output_hidden_states``) find the swapped class.

    transformers keys its per-class record of capturable outputs by the class's
    name, so a swapped class has to be registered under its own name too.
    """
    if getattr(type(module), "_can_record_outputs", None) is None:
        return
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # older transformers: nothing to register
        return
    _CAN_RECORD_REGISTRY[module] = type(module)._can_record_outputs


def hf(model: nn.Module, trace_source: bool = KEEP, prop_attn: Optional[bool] = KEEP, **settings: Any) -> nn.Module:
    """Patch a Hugging Face transformers vision model in place to merge tokens; set ``model.r`` after.

    Called on a patched model, it changes only the settings given.

    Args:
        model: One of ``tome.patch._hf.SUPPORTED_MODELS``: ViT, DeiT (incl. with
            teacher), DINOv2 (incl. registers), CLIP and SigLIP vision towers and
            their dual-encoder models, VideoMAE, AST; base models and task heads.
        trace_source: Track which original tokens each token contains; read
            ``tome.last_forward(model).source`` ``(batch, tokens, original tokens)`` after a forward.
        prop_attn: Proportional attention (``log(size)`` added to attention logits;
            paper, Sec. 3); None: the default rule (on: :func:`tome.patch.default_prop_attn`).
        **settings: The other settings, ``r`` and ``method`` (:class:`tome.patch.ToMeSettings`).

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model (naming its class and the supported ones) or one
            of its layers is not something ToMe can run exactly.
        ValueError: for an unknown setting or an invalid value.
    """
    return configure(model, family="hf", caller="tome.patch.hf", trace_source=trace_source, prop_attn=prop_attn,
                     **settings)


def _patch(model: nn.Module, settings: ToMeSettings) -> nn.Module:
    spec = _spec_of(model)
    if is_patched(model) and not isinstance(model, ToMeHFModel):
        raise TypeError(
            f"{original_class(model).__name__} is already patched as the vision tower of a larger model; set r "
            "on that model, or call tome.remove_patch on it first"
        )
    kind = _RUNNERS[spec.kind]
    runner = _resolve(model, spec.runner)
    layers = list(_resolve(runner, kind.layers))
    _check(model, spec, runner, layers)

    head_mixin = ToMePoolingHead if spec.pool is not None else ToMeHFModel
    if runner is model:
        model_mixin: Any = (kind.runner_mixin, head_mixin)
    else:
        model_mixin = head_mixin
        swap_class(runner, kind.runner_mixin)
        _keep_output_capture(runner)
    patch_model(
        model,
        model_mixin,
        layers,
        lambda layer: kind.layer_mixin,
        attention=lambda layer: (_resolve(layer, kind.attention), kind.attention_mixin),
        protected_tokens=kind.protected_tokens(runner.config),
        settings=settings,
        class_token=kind.class_token,
        distill_token=kind.distill_token,
    )
    _keep_output_capture(model)
    # The runner (and a pooling head) report into the same record as the model the user holds.
    object.__setattr__(runner, "_tome_info", model._tome_info)
    for module in (model, runner):
        object.__setattr__(module, "_tome_context", kind.context)
    pooling_head = _resolve(runner, kind.pooling_head) if kind.pooling_head else None
    if pooling_head is not None:
        swap_class(pooling_head, kind.pooling_mixin)
        object.__setattr__(pooling_head, "_tome_info", model._tome_info)
    return model


_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2)


def _tiny(model_class: str, config_class: str, **config: Any) -> Callable[[], nn.Module]:
    """A builder of a tiny random transformers model from its config."""

    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()

    return build


def _pixels(batch: int, seed: int) -> Dict[str, torch.Tensor]:
    return {"pixel_values": example_images(batch, seed)}


def _video(batch: int, seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 4, 3, 32, 32, generator=generator)}


def _audio(batch: int, seed: int) -> Dict[str, torch.Tensor]:
    return {"input_values": torch.randn(batch, 32, 32, generator=torch.Generator().manual_seed(seed))}


def _naflex_patches(batch: int, seed: int) -> Dict[str, torch.Tensor]:
    """SigLIP 2's inputs for a 4 x 4 grid of 4 x 4-pixel patches, no padding."""
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 16, 48, generator=generator),
            "pixel_attention_mask": torch.ones(batch, 16, dtype=torch.long),
            "spatial_shapes": torch.tensor([[4, 4]] * batch)}


def _examples() -> Sequence[Example]:
    """One tiny model per runner kind of ``_RUNNERS``."""
    need = ("transformers",)
    return (
        Example("vit", _tiny("ViTForImageClassification", "ViTConfig", num_labels=5, **_VISION), _pixels,
                requires=need),
        Example("deit_teacher", _tiny("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=5, **_VISION),
                _pixels, requires=need),
        Example("dinov2_registers", _tiny("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", mlp_ratio=2,
                                          num_register_tokens=2, layerscale_value=0.5, **_VISION),
                _pixels, requires=need),
        Example("clip", _tiny("CLIPVisionModelWithProjection", "CLIPVisionConfig", projection_dim=16, **_VISION),
                _pixels, requires=need),
        Example("siglip", _tiny("SiglipVisionModel", "SiglipVisionConfig", **_VISION), _pixels, requires=need),
        # transformers' SigLIP 2 fixes the batch size when exported (unpatched too).
        Example("siglip2", _tiny("Siglip2VisionModel", "Siglip2VisionConfig", hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, patch_size=4, num_patches=16),
                _naflex_patches, requires=need, exports=False),
        Example("videomae", _tiny("VideoMAEForVideoClassification", "VideoMAEConfig", num_frames=4, tubelet_size=2,
                                  num_labels=5, use_mean_pooling=True, **_VISION), _video, requires=need),
        Example("ast", _tiny("ASTForAudioClassification", "ASTConfig", patch_size=8, frequency_stride=8, time_stride=8,
                             num_mel_bins=32, max_length=32, num_labels=5, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2), _audio, requires=need),
    )


register(FamilySpec(name="hf", detector=is_hf_vision, patch=_patch, priority=50, exports=True, examples=_examples))
