"""ToMe for Hugging Face ``transformers`` vision models (transformers 5.x layouts).

Supported, whole models and task heads: ViT, DeiT (class + distillation
tokens, also ``DeiTForImageClassificationWithTeacher``), DINOv2 (LayerScale),
DINOv2 with registers, CLIP's vision tower (``CLIPVisionModel``,
``CLIPVisionModelWithProjection``, ``CLIPForImageClassification`` and the vision
side of ``CLIPModel``), SigLIP's vision tower (no class token; attention-pooling
head), VideoMAE (tubelet tokens) and the Audio Spectrogram Transformer (AST).

How it is wired. Each model has one *runner*: the module whose forward loops
over the transformer layers (``ViTModel``, ``Dinov2Encoder``,
``CLIPVisionModel``, ...). Patching swaps the runner's class so that, when the
schedule merges anything, its forward threads one :class:`~tome.patch._shared.ToMeState`
through the layers with :func:`~tome.patch._shared.run_blocks`; each layer runs
the shared attention-then-merge step. Everything before and after the loop
(embeddings, final norms, class-token pooling) is the model's own code. Task
heads that pool over patch tokens (DINOv2 and CLIP classifiers, SigLIP's
classifier, VideoMAE's mean pooling) weight the pool by token size; SigLIP's
attention-pooling head adds ``log(size)`` to its key logits. When the schedule
is all zeros every forward is the model's own, unchanged.

Output semantics with merging (``model.r`` > 0):

- ``logits``, ``pooler_output``, ``image_embeds`` and the like keep their meaning.
- ``last_hidden_state`` has fewer tokens: prefix tokens (class, distillation,
  registers) first, then the merged tokens. ``model._tome_info["size"]`` gives
  how many patches each stands for and, with ``trace_source=True``,
  ``model._tome_info["source"]`` which ones; :func:`tome.unmerge_tokens` maps
  the tokens back to one row per original token.
- ``output_hidden_states=True`` returns the layer inputs and outputs as usual
  (embedding output first), each with the token count it had at that point:
  ``hidden_states[i]`` has as many tokens as entered layer ``i``.
- ``output_attentions=True`` and a non-None ``attention_mask`` raise
  ``ValueError``: merged tokens no longer line up with them. Set ``model.r = 0``
  to use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from ._lifecycle import (
    ToMeAttentionMixin,
    ToMeBlockMixin,
    ToMeModelMixin,
    call_attention,
    is_patched,
    original_class,
    patch_model,
    register_family,
    supported_families,
    swap_class,
)
from ._shared import AttentionCall, ToMeState, attention, run_blocks, size_bias, weighted_mean

__all__ = ["hf", "is_hf_vision", "SUPPORTED_MODELS"]

# Private keyword a task head hands down to its runner to learn the final token sizes.
_SINK = "_tome_sink"


# ----------------------------------------------------------------------------------------------
# Layers: the attention-then-merge step for each layer layout.
# ----------------------------------------------------------------------------------------------


class ToMeHFAttention(ToMeAttentionMixin):
    """A transformers self-attention module with separate q/k/v projections: with
    ``tome=AttentionCall(bias)`` it adds the ``log(size)`` bias to its logits and
    reports the mean key. Returns ``(output, None)`` like the module does.

    Subclasses name the module's attributes: ``_tome_attrs`` = (q, k, v, output
    projection or "", head_dim, scale, dropout probability).
    """

    _tome_keep_name = True  # transformers recognises classes by name and module

    _tome_attrs: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "attention_dropout")

    def _tome_attention(self, x: torch.Tensor, call: AttentionCall) -> Tuple[torch.Tensor, None]:
        q_name, k_name, v_name, out_name, dim_name, scale_name, dropout_name = self._tome_attrs
        batch, tokens, _ = x.shape
        shape = (batch, tokens, -1, getattr(self, dim_name))
        q = getattr(self, q_name)(x).view(shape).transpose(1, 2)
        k = getattr(self, k_name)(x).view(shape).transpose(1, 2)
        v = getattr(self, v_name)(x).view(shape).transpose(1, 2)
        # Models loaded with attn_implementation="eager" get the explicit softmax; every
        # other implementation gets scaled_dot_product_attention (which takes the bias).
        fused = getattr(self.config, "_attn_implementation", "sdpa") != "eager"
        dropout_p = getattr(self, dropout_name) if self.training else 0.0
        out = attention(q, k, v, call.bias, dropout_p=dropout_p, scale=getattr(self, scale_name), fused=fused)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        call.metric = k.mean(dim=1)
        return (getattr(self, out_name)(out) if out_name else out), None


class ToMeCLIPAttention(ToMeHFAttention):
    """``CLIPAttention`` and ``SiglipAttention``."""

    _tome_attrs = ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scale", "dropout")


class ToMeVideoMAESelfAttention(ToMeHFAttention):
    """``VideoMAESelfAttention`` (its output projection lives in a sibling module)."""

    _tome_attrs = ("query", "key", "value", "", "attention_head_size", "scaling", "dropout_prob")


class ToMeHFLayer(ToMeBlockMixin):
    """Common part of patched transformers layers (called through ``__call__``, so
    transformers' own gradient checkpointing and hooks apply)."""

    _tome_keep_name = True  # transformers recognises classes by name and module

    # transformers layers differ in what their own forward returns: always run the merge step.
    _tome_native_when_idle = False


class ToMeViTLayer(ToMeHFLayer):
    """``ViTLayer``, ``DeiTLayer``, ``ASTLayer``: pre-norm, dropout on both branches."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        (out, _), metric = call_attention(self.attention, self.layernorm_before(x), bias)
        return self.dropout(out), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp(self.layernorm_after(x)))


class ToMeDinov2Layer(ToMeHFLayer):
    """``Dinov2Layer`` and ``Dinov2WithRegistersLayer``: LayerScale and drop path on both branches."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        (out, _), metric = call_attention(self.attention, self.norm1(x), bias)
        return self.drop_path(self.layer_scale1(out)), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class ToMeCLIPLayer(ToMeHFLayer):
    """``CLIPEncoderLayer`` and ``SiglipEncoderLayer``: pre-norm, no dropout on the residuals."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        (out, _), metric = call_attention(self.self_attn, self.layer_norm1(x), bias)
        return out, metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.layer_norm2(x))


class ToMeVideoMAELayer(ToMeHFLayer):
    """``VideoMAELayer``: ``VideoMAEAttention`` passes ``tome`` on to its self-attention
    and applies its own output module."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        return call_attention(self.attention, self.layernorm_before(x), bias)

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        # VideoMAEOutput adds the residual itself; merge_block adds it here instead.
        return self.output.dropout(self.output.dense(self.intermediate(self.layernorm_after(x))))


# ----------------------------------------------------------------------------------------------
# Runners: the module that loops over the layers.
# ----------------------------------------------------------------------------------------------


class _FinalState:
    """Per-forward carrier a task head hands down to learn its runner's final state."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: Optional[ToMeState] = None


def _output_options(module: nn.Module, kwargs: Dict[str, Any], attention_mask: Optional[torch.Tensor]) -> Tuple[bool, Any]:
    """Pop the output switches from ``kwargs``; refuse the ones merging cannot honour.

    Returns:
        ``(return_dict, output_hidden_states)``.
    """
    config = module.config
    if attention_mask is not None:
        raise ValueError(
            "attention_mask cannot be combined with token merging (model.r > 0): merged tokens no "
            "longer line up with the mask. Set model.r = 0 to use a mask."
        )
    output_attentions = kwargs.pop("output_attentions", None)
    if output_attentions is None:
        output_attentions = getattr(config, "output_attentions", False)
    if output_attentions:
        raise ValueError(
            f"output_attentions={output_attentions!r} cannot be combined with token merging (model.r > 0): "
            "merged layers run fused attention and their token counts shrink. Set model.r = 0 to get "
            "attention maps."
        )
    output_hidden_states = kwargs.pop("output_hidden_states", None)
    if output_hidden_states is None:
        output_hidden_states = getattr(config, "output_hidden_states", False)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return bool(return_dict), output_hidden_states


def _padding_mask(module: nn.Module, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The attention mask as the model builds it: None when it masks nothing."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=module.config, inputs_embeds=x, attention_mask=attention_mask)


def _select_hidden_states(states: List[torch.Tensor], request: Any) -> Optional[Tuple[Optional[torch.Tensor], ...]]:
    """``output_hidden_states`` as transformers reads it: a flag, or indices to keep (others None)."""
    if request is None or request is False:
        return None
    if request is True:
        return tuple(states)
    indices = [request] if isinstance(request, int) else list(request)
    count = len(states)
    chosen = {i % count for i in indices if -count <= i < count}
    return tuple(s if i in chosen else None for i, s in enumerate(states))


def _finish(output: Any, return_dict: bool) -> Any:
    return output if return_dict else output.to_tuple()


class ToMeHFRunner:
    """Mixin for the module whose forward loops over the layers."""

    _tome_keep_name = True  # transformers recognises classes by name and module

    _tome_layers_path: str = ""

    def _tome_layers(self) -> Sequence[nn.Module]:
        return _resolve(self, self._tome_layers_path)  # type: ignore[arg-type]

    def _tome_active(self) -> bool:
        return any(layer._tome_block_r for layer in self._tome_layers())

    def _tome_unmerged(self, output: Any, sink: Optional[_FinalState]) -> Any:
        """Record the (trivial) state of a forward that merged nothing; returns ``output``."""
        tokens = output[0] if isinstance(output, tuple) else output.last_hidden_state
        info = self._tome_info
        state = ToMeState.start(tokens.shape[1], info["protected_tokens"], info["prop_attn"], info["trace_source"])
        info.record(state, tokens, [0] * len(self._tome_layers()))
        if sink is not None:
            sink.state = state
        return output

    def _tome_encode(
        self, x: torch.Tensor, hidden_request: Any, sink: Optional[_FinalState]
    ) -> Tuple[torch.Tensor, ToMeState, Optional[Tuple[Optional[torch.Tensor], ...]]]:
        """Run ``(batch, tokens, channels)`` through every layer, merging on the schedule.

        Returns:
            The final tokens, the final state and the selected hidden states (or None).
        """
        info = self._tome_info
        layers = self._tome_layers()
        schedule = [layer._tome_block_r for layer in layers]
        state = ToMeState.start(x.shape[1], info["protected_tokens"], info["prop_attn"], info["trace_source"])
        hidden = [x]
        # Layers checkpoint themselves (transformers' GradientCheckpointingLayer), with the
        # user's gradient_checkpointing_kwargs, when they are called through __call__.
        x, state, removed = run_blocks(layers, x, state, schedule, after_block=lambda i, y, s: hidden.append(y))
        info.record(state, x, removed)
        if sink is not None:
            sink.state = state
        return x, state, _select_hidden_states(hidden, hidden_request)


class ToMeViTRunner(ToMeHFRunner):
    """``ViTModel``, ``DeiTModel``: embeddings, layers, final norm and class-token pooler in one forward."""

    _tome_layers_path = "layers"

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        bool_masked_pos: Optional[torch.Tensor] = None,
        interpolate_pos_encoding: Optional[bool] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        sink = kwargs.pop(_SINK, None)
        if not self._tome_active():
            output = super().forward(  # type: ignore[misc]
                pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding,
                attention_mask=attention_mask, **kwargs,
            )
            return self._tome_unmerged(output, sink)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding)
        return_dict, hidden_request = _output_options(self, kwargs, _padding_mask(self, x, attention_mask))
        x, _, hidden_states = self._tome_encode(x, hidden_request, sink)
        sequence_output = self.layernorm(x)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(
            last_hidden_state=sequence_output, pooler_output=pooled_output, hidden_states=hidden_states
        )
        return _finish(output, return_dict)


class ToMeASTRunner(ToMeHFRunner):
    """``ASTModel``: pooled output is the mean of the class and distillation tokens."""

    _tome_layers_path = "layers"

    def forward(
        self, input_values: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> Any:
        sink = kwargs.pop(_SINK, None)
        if not self._tome_active():
            output = super().forward(input_values, attention_mask=attention_mask, **kwargs)  # type: ignore[misc]
            return self._tome_unmerged(output, sink)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        x = self.embeddings(input_values)
        return_dict, hidden_request = _output_options(self, kwargs, _padding_mask(self, x, attention_mask))
        x, _, hidden_states = self._tome_encode(x, hidden_request, sink)
        sequence_output = self.layernorm(x)
        pooled_output = (sequence_output[:, 0] + sequence_output[:, 1]) / 2
        output = BaseModelOutputWithPooling(
            last_hidden_state=sequence_output, pooler_output=pooled_output, hidden_states=hidden_states
        )
        return _finish(output, return_dict)


class ToMeDinov2Runner(ToMeHFRunner):
    """``Dinov2Encoder`` and ``Dinov2WithRegistersEncoder``: the layer loop only."""

    _tome_layers_path = "layer"

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        sink = kwargs.pop(_SINK, None)
        if not self._tome_active():
            output = super().forward(hidden_states, attention_mask, **kwargs)  # type: ignore[misc]
            return self._tome_unmerged(output, sink)
        from transformers.modeling_outputs import BaseModelOutput

        return_dict, hidden_request = _output_options(self, kwargs, attention_mask)
        x, _, hidden = self._tome_encode(hidden_states, hidden_request, sink)
        return _finish(BaseModelOutput(last_hidden_state=x, hidden_states=hidden), return_dict)


class ToMeCLIPRunner(ToMeHFRunner):
    """``CLIPVisionModel``: pre-norm, layers, class token through the post-norm."""

    _tome_layers_path = "encoder.layers"

    def forward(
        self, pixel_values: Optional[torch.Tensor] = None, interpolate_pos_encoding: Optional[bool] = False, **kwargs: Any
    ) -> Any:
        sink = kwargs.pop(_SINK, None)
        if not self._tome_active():
            output = super().forward(  # type: ignore[misc]
                pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
            )
            return self._tome_unmerged(output, sink)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return_dict, hidden_request = _output_options(self, kwargs, kwargs.pop("attention_mask", None))
        x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        x = self.pre_layrnorm(x)
        x, _, hidden_states = self._tome_encode(x, hidden_request, sink)
        pooled_output = self.post_layernorm(x[:, 0, :])
        output = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled_output, hidden_states=hidden_states)
        return _finish(output, return_dict)


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
        mask = size_bias(size, x.dtype).squeeze(1).repeat_interleave(head.attention.num_heads, dim=0)
    pooled = head.attention(probe, x, x, attn_mask=mask)[0]
    residual = pooled
    pooled = residual + head.mlp(head.layernorm(pooled))
    return pooled[:, 0]


class ToMeSiglipRunner(ToMeHFRunner):
    """``SiglipVisionModel``: layers, post-norm, attention pooling weighted by size."""

    _tome_layers_path = "encoder.layers"

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: Optional[bool] = False, **kwargs: Any
    ) -> Any:
        sink = kwargs.pop(_SINK, None)
        if not self._tome_active():
            output = super().forward(  # type: ignore[misc]
                pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
            )
            return self._tome_unmerged(output, sink)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return_dict, hidden_request = _output_options(self, kwargs, kwargs.pop("attention_mask", None))
        x = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        x, state, hidden_states = self._tome_encode(x, hidden_request, sink)
        x = self.post_layernorm(x)
        pooler_output = siglip_pool(self.head, x, state.size) if self.use_head else None
        output = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooler_output, hidden_states=hidden_states)
        return _finish(output, return_dict)


class ToMeVideoMAERunner(ToMeHFRunner):
    """``VideoMAEModel``: embeddings (visible tubelets only), layers, optional final norm."""

    _tome_layers_path = "encoder.layer"

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        sink = kwargs.pop(_SINK, None)
        if not self._tome_active():
            output = super().forward(pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)  # type: ignore[misc]
            return self._tome_unmerged(output, sink)
        from transformers.modeling_outputs import BaseModelOutput

        return_dict, hidden_request = _output_options(self, kwargs, kwargs.pop("attention_mask", None))
        x = self.embeddings(pixel_values, bool_masked_pos)
        x, _, hidden_states = self._tome_encode(x, hidden_request, sink)
        if self.layernorm is not None:
            x = self.layernorm(x)
        return _finish(BaseModelOutput(last_hidden_state=x, hidden_states=hidden_states), return_dict)


# ----------------------------------------------------------------------------------------------
# Models and task heads.
# ----------------------------------------------------------------------------------------------


class ToMeHFModel(ToMeModelMixin):
    """The patched model the user holds: ``model.r`` and ``model._tome_info``."""

    _tome_keep_name = True  # transformers recognises classes by name and module

    def _tome_blocks(self) -> Sequence[nn.Module]:
        spec = _spec_of(self)  # type: ignore[arg-type]
        runner = _resolve(self, spec.runner)  # type: ignore[arg-type]
        return list(_resolve(runner, _RUNNERS[spec.kind].layers))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """The original class's ``from_pretrained``, patched again (``r = 0``): what
        ``type(model).from_pretrained(...)`` means for a patched ``model``."""
        parent = cls.__dict__.get("_tome_parent")
        if parent is None:
            return super().from_pretrained(*args, **kwargs)  # type: ignore[misc]
        loaded = parent.from_pretrained(*args, **kwargs)
        if isinstance(loaded, tuple):  # output_loading_info=True
            return (hf(loaded[0]),) + loaded[1:]
        return hf(loaded)


class ToMePatchPoolHead(ToMeHFModel):
    """Task heads that pool over patch tokens: the pool is weighted by token size.

    The head's forward asks its runner for the final state, then pools as the
    original head does, with ``sum(x * size) / sum(size)`` in place of the mean.
    """

    def _tome_merging(self) -> bool:
        return any(self._tome_schedule())

    def _tome_call_runner(self, *args: Any, **kwargs: Any) -> Tuple[Any, ToMeState]:
        sink = _FinalState()
        backbone = _resolve(self, _spec_of(self).backbone)  # type: ignore[arg-type]
        outputs = backbone(*args, **{_SINK: sink}, **kwargs)
        if sink.state is None:
            raise RuntimeError(f"{type(self).__name__}: the patched vision model did not report its token sizes")
        return outputs, sink.state

    @staticmethod
    def _tome_return_dict(module: nn.Module, kwargs: Dict[str, Any]) -> bool:
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(module.config, "return_dict", True)
        return bool(return_dict)


def _pool_patches(tokens: torch.Tensor, size: Optional[torch.Tensor], start: int) -> torch.Tensor:
    """Size-weighted mean of ``tokens[:, start:]`` (the plain mean when nothing merged)."""
    return weighted_mean(tokens[:, start:], None if size is None else size[:, start:])


class ToMeDinov2Classifier(ToMePatchPoolHead):
    """``Dinov2ForImageClassification`` / ``Dinov2WithRegistersForImageClassification``:
    class token concatenated with the size-weighted mean of the patch tokens."""

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        if not self._tome_merging():
            return super().forward(pixel_values, labels=labels, attention_mask=attention_mask, **kwargs)  # type: ignore[misc]
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = self._tome_return_dict(self, kwargs)
        outputs, state = self._tome_call_runner(pixel_values, attention_mask=attention_mask, **kwargs)
        sequence_output = outputs.last_hidden_state
        start = 1 + getattr(self.config, "num_register_tokens", 0)
        linear_input = torch.cat([sequence_output[:, 0], _pool_patches(sequence_output, state.size, start)], dim=1)
        logits = self.classifier(linear_input)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return _finish(output, return_dict)


class ToMeMeanPoolClassifier(ToMePatchPoolHead):
    """``CLIPForImageClassification`` (mean over patch tokens) and
    ``SiglipForImageClassification`` (mean over all tokens), weighted by size."""

    def forward(
        self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> Any:
        if not self._tome_merging():
            return super().forward(pixel_values, labels=labels, **kwargs)  # type: ignore[misc]
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = self._tome_return_dict(self, kwargs)
        outputs, state = self._tome_call_runner(pixel_values, **kwargs)
        pooled = _pool_patches(outputs.last_hidden_state, state.size, self._tome_info["protected_tokens"])
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return _finish(output, return_dict)


class ToMeVideoMAEClassifier(ToMePatchPoolHead):
    """``VideoMAEForVideoClassification``: size-weighted mean pooling (or the first token)."""

    def forward(
        self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> Any:
        if not self._tome_merging():
            return super().forward(pixel_values, labels=labels, **kwargs)  # type: ignore[misc]
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = self._tome_return_dict(self, kwargs)
        outputs, state = self._tome_call_runner(pixel_values, **kwargs)
        sequence_output = outputs.last_hidden_state
        if self.fc_norm is not None:
            pooled = self.fc_norm(_pool_patches(sequence_output, state.size, 0))
        else:
            pooled = sequence_output[:, 0]  # protected from merging in this configuration
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return _finish(output, return_dict)


# ----------------------------------------------------------------------------------------------
# What is supported, and where its parts live.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunnerKind:
    """A runner: its classes, where it keeps its layers and their attention, which tokens are protected."""

    mixin: type
    runner_classes: Tuple[str, ...]
    layers: str
    layer_classes: Tuple[str, ...]
    layer_mixin: type
    attention: str  # path of the attention module inside a layer
    attention_mixin: Type[ToMeHFAttention]
    protected_tokens: Callable[[Any], int]
    class_token: bool
    distill_token: bool = False


def _class_and_registers(config: Any) -> int:
    return 1 + getattr(config, "num_register_tokens", 0)


def _videomae_protected(config: Any) -> int:
    # Without mean pooling the classifier reads token 0 (a patch): keep it from merging.
    return 0 if config.use_mean_pooling else 1


_RUNNERS: Dict[str, _RunnerKind] = {
    "vit": _RunnerKind(
        ToMeViTRunner, ("ViTModel",), "layers", ("ViTLayer",), ToMeViTLayer, "attention", ToMeHFAttention,
        protected_tokens=lambda config: 1, class_token=True,
    ),
    "deit": _RunnerKind(
        ToMeViTRunner, ("DeiTModel",), "layers", ("DeiTLayer",), ToMeViTLayer, "attention", ToMeHFAttention,
        protected_tokens=lambda config: 2, class_token=True, distill_token=True,
    ),
    "ast": _RunnerKind(
        ToMeASTRunner, ("ASTModel",), "layers", ("ASTLayer",), ToMeViTLayer, "attention", ToMeHFAttention,
        protected_tokens=lambda config: 2, class_token=True, distill_token=True,
    ),
    "dinov2": _RunnerKind(
        ToMeDinov2Runner, ("Dinov2Encoder", "Dinov2WithRegistersEncoder"), "layer",
        ("Dinov2Layer", "Dinov2WithRegistersLayer"), ToMeDinov2Layer, "attention", ToMeHFAttention,
        protected_tokens=_class_and_registers, class_token=True,
    ),
    "clip": _RunnerKind(
        ToMeCLIPRunner, ("CLIPVisionModel",), "encoder.layers", ("CLIPEncoderLayer",), ToMeCLIPLayer, "self_attn",
        ToMeCLIPAttention, protected_tokens=lambda config: 1, class_token=True,
    ),
    "siglip": _RunnerKind(
        ToMeSiglipRunner, ("SiglipVisionModel",), "encoder.layers", ("SiglipEncoderLayer",), ToMeCLIPLayer,
        "self_attn", ToMeCLIPAttention, protected_tokens=lambda config: 0, class_token=False,
    ),
    "videomae": _RunnerKind(
        ToMeVideoMAERunner, ("VideoMAEModel",), "encoder.layer", ("VideoMAELayer",), ToMeVideoMAELayer,
        "attention.attention", ToMeVideoMAESelfAttention, protected_tokens=_videomae_protected, class_token=False,
    ),
}


@dataclass(frozen=True)
class _ModelSpec:
    """A supported model class: its module, its runner's path and kind, and (for task heads
    that pool over patches) the head mixin and the backbone module its forward calls."""

    module: str
    runner: str
    kind: str
    head: Optional[type] = None
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
    "Dinov2ForImageClassification": _ModelSpec(
        _m("dinov2"), "dinov2.encoder", "dinov2", ToMeDinov2Classifier, "dinov2"
    ),
    "Dinov2WithRegistersModel": _ModelSpec(_m("dinov2_with_registers"), "encoder", "dinov2"),
    "Dinov2WithRegistersForImageClassification": _ModelSpec(
        _m("dinov2_with_registers"), "dinov2_with_registers.encoder", "dinov2",
        ToMeDinov2Classifier, "dinov2_with_registers",
    ),
    "CLIPVisionModel": _ModelSpec(_m("clip"), "", "clip"),
    "CLIPVisionModelWithProjection": _ModelSpec(_m("clip"), "vision_model", "clip"),
    "CLIPModel": _ModelSpec(_m("clip"), "vision_model", "clip"),
    "CLIPForImageClassification": _ModelSpec(
        _m("clip"), "vision_model", "clip", ToMeMeanPoolClassifier, "vision_model"
    ),
    "SiglipVisionModel": _ModelSpec(_m("siglip"), "", "siglip"),
    "SiglipModel": _ModelSpec(_m("siglip"), "vision_model", "siglip"),
    "SiglipForImageClassification": _ModelSpec(
        _m("siglip"), "vision_model", "siglip", ToMeMeanPoolClassifier, "vision_model"
    ),
    "VideoMAEModel": _ModelSpec(_m("videomae"), "", "videomae"),
    "VideoMAEForVideoClassification": _ModelSpec(
        _m("videomae"), "videomae", "videomae", ToMeVideoMAEClassifier, "videomae"
    ),
    "ASTModel": _ModelSpec(_m("audio_spectrogram_transformer"), "", "ast"),
    "ASTForAudioClassification": _ModelSpec(_m("audio_spectrogram_transformer"), "audio_spectrogram_transformer", "ast"),
}




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


def _check_layers(model_name: str, runner_path: str, kind: _RunnerKind, layers: Sequence[nn.Module]) -> None:
    where = f"{model_name}.{runner_path}." if runner_path else f"{model_name}."
    for index, layer in enumerate(layers):
        layer_cls = original_class(layer)
        if layer_cls.__name__ not in kind.layer_classes or not layer_cls.__module__.startswith("transformers."):
            raise TypeError(
                f"{where}{kind.layers}[{index}] is a {layer_cls.__name__}; ToMe expects one of {kind.layer_classes}"
            )
        attn = _resolve(layer, kind.attention)
        missing = [name for name in kind.attention_mixin._tome_attrs if name and not hasattr(attn, name)]
        if missing:
            raise TypeError(
                f"{where}{kind.layers}[{index}]: {type(attn).__name__} lacks {missing}; ToMe supports the "
                "layer layout of transformers 5.x"
            )


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


@register_family("hf", is_hf_vision, priority=50)
def hf(model: nn.Module, trace_source: bool = False, prop_attn: bool = True) -> nn.Module:
    """Patch a Hugging Face transformers vision model in place to merge tokens; set ``model.r`` after.

    Args:
        model: One of ``tome.patch._hf.SUPPORTED_MODELS``: ViT, DeiT (incl. with
            teacher), DINOv2 (incl. registers), CLIP and SigLIP vision towers and
            their dual-encoder models, VideoMAE, AST; base models and task heads.
        trace_source: Track which original tokens each token contains; read
            ``model._tome_info["source"]`` ``(batch, tokens, original tokens)`` after a forward.
        prop_attn: Proportional attention (``log(size)`` added to attention logits);
            keep it on for models trained without ToMe.

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model (naming its class and the supported ones) or one
            of its layers is not something ToMe can run exactly.
    """
    spec = _spec_of(model)
    if is_patched(model) and not isinstance(model, ToMeHFModel):
        raise TypeError(
            f"{original_class(model).__name__} is already patched as the vision tower of a larger model; set r "
            "on that model, or call tome.remove_patch on it first"
        )
    kind = _RUNNERS[spec.kind]
    runner = _resolve(model, spec.runner)
    layers = list(_resolve(runner, kind.layers))
    _check_layers(original_class(model).__name__, spec.runner, kind, layers)
    _check_runner(model, spec, runner)

    if runner is model:
        model_mixin: Any = (kind.mixin, ToMeHFModel)
    else:
        model_mixin = spec.head if spec.head is not None else ToMeHFModel
        swap_class(runner, kind.mixin)
        _keep_output_capture(runner)
    layer_mixin = kind.layer_mixin
    patch_model(
        model,
        model_mixin,
        layers,
        lambda layer: layer_mixin,
        attention=lambda layer: (_resolve(layer, kind.attention), kind.attention_mixin),
        protected_tokens=kind.protected_tokens(runner.config),
        trace_source=trace_source,
        prop_attn=prop_attn,
        class_token=kind.class_token,
        distill_token=kind.distill_token,
    )
    _keep_output_capture(model)
    # The runner reports into the same record as the model the user holds.
    object.__setattr__(runner, "_tome_info", model._tome_info)
    return model


def _check_runner(model: nn.Module, spec: _ModelSpec, runner: nn.Module) -> None:
    """The runner must be the transformers class the spec expects (not, e.g., a custom replacement)."""
    expected = _RUNNERS[spec.kind].runner_classes
    runner_cls = original_class(runner)
    if runner_cls.__name__ not in expected or not runner_cls.__module__.startswith("transformers."):
        raise TypeError(
            f"{original_class(model).__name__}.{spec.runner or '<self>'} is a {runner_cls.__name__}; "
            f"ToMe expects one of {expected} (the layout of transformers 5.x)"
        )
