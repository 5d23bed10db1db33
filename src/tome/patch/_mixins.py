"""The model, block and attention mixins every family builds on, and :func:`patch_model`,
which swaps a model's classes for them and records its settings.

A patched model runs one block loop (``ToMeModelMixin._tome_run``); a patched block is
an attention branch, a merge and an MLP branch (Bolya et al., ICLR 2023, sec. 3).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._methods import TOME_RULE, LayerRule, MergeMethod, as_method
from .._schedule import RSchedule, parse_r
from ._info import ToMeInfo
from ._registry import (
    _REGISTRY,
    KEEP,
    ToMeSettings,
    _read_info,
    configure,
    default_prop_attn,
    passed,
    registered,
    remove_patch,
)
from ._shared import AttentionCall, BlockCall, ToMeForward, ToMeState, merge_block, run_blocks
from ._swap import swap_class

if TYPE_CHECKING:
    from ._rope import RotaryPositions

class ToMeAttentionMixin:
    """Patched attention module: with ``tome=AttentionCall(bias)`` it adds the bias to
    its logits and reports the mean key; without it, it is the original module.

    A family whose attention reports every feature of :data:`ATTENTION_FEATURES`
    (through :meth:`AttentionCall.report`) lists them in ``_tome_features``, so the
    ablations that match on queries, values or concatenated keys, or rank tokens by
    the class token's attention, can run on it; the others report the mean key only.
    """

    _tome_features: Tuple[str, ...] = ("k",)
    _tome_feature: str = "k"  # what this module's block asks for (its LayerRule.attention_feature)

    def forward(self, *args: Any, tome: Optional[AttentionCall] = None, **kwargs: Any) -> Any:
        if tome is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        return self._tome_attention(args[0], tome)

    def _tome_attention(self, x: torch.Tensor, call: AttentionCall) -> Any:
        """Attention of ``x`` ``(batch, tokens, channels)`` with ``call.bias``; sets ``call.metric``."""
        raise NotImplementedError


_MASK_NAMES = ("attn_mask", "attention_mask", "causal_attention_mask", "is_causal")


def _families_with_features() -> str:
    """The registered families whose attention reports more than the keys, for an error message."""
    declared = [f"{spec.name} ({spec.attention_features})" for spec in registered() if spec.attention_features]
    return ", ".join(declared or ["none registered"]) + "; metric='x' and match='random_drop' work with every family"


def _check_features(model: nn.Module, method: MergeMethod, rules: Sequence[LayerRule],
                    attentions: Sequence[Sequence[nn.Module]]) -> None:
    """Raise ``ValueError`` if a rule needs a feature the model's attention cannot report."""
    for index, (rule, modules) in enumerate(zip(rules, attentions)):
        feature = rule.attention_feature
        if feature == "cls_attn" and model._tome_info["protected_tokens"] < 1:  # type: ignore[attr-defined]
            raise ValueError(
                f"method {method} ranks tokens by the class token's attention, but "
                f"{type(model).__name__} has no protected class token at index 0"
            )
        if feature == "k":
            continue
        missing = [m for m in modules if feature not in type(m)._tome_features]
        if not modules or missing:
            where = type(missing[0]).__name__ if missing else "no patched attention module"
            raise ValueError(
                f"method {method} needs the attention of block {index} to report {feature!r}, but "
                f"{type(model).__name__}'s attention ({where}) reports only the keys averaged over heads. "
                f"Supported: {_families_with_features()}"
            )


def _masked(args: tuple, kwargs: Dict[str, Any]) -> bool:
    """Whether a block call passes a mask (positionally, as the frameworks' blocks take it,
    or by name) or ``is_causal=True``."""
    return any(a is not None and a is not False for a in args) or any(
        kwargs.get(name) is not None and kwargs.get(name) is not False for name in _MASK_NAMES
    )


class ToMeBlockMixin:
    """Patched block: an attention branch, a merge, an MLP branch.

    Called by a patched model with ``tome=BlockCall(state, r)``. Called on its own
    (no ``tome``), it merges its own ``r`` from a fresh state (every token one
    patch), or is the original block when its r is 0 or a mask is passed.
    A family implements :meth:`_tome_attn_branch` and :meth:`_tome_mlp_branch`.
    """

    _tome_block_r: int = 0
    _tome_index: int = 0
    _tome_protected: int = 0
    _tome_prop_attn: bool = True
    _tome_rule: LayerRule = TOME_RULE  # this block's merge rule, from model.tome_method
    # Whether the original forward may run a block that merges nothing before any
    # merge happened (exact, and as fast as the original); its output must be a tensor.
    _tome_native_when_idle: bool = True

    def forward(
        self, x: torch.Tensor, *args: Any, tome: Union[BlockCall, ToMeForward, None] = None, **kwargs: Any
    ) -> Any:
        if isinstance(tome, ToMeForward):  # called by the framework's own loop
            call = tome.enter(self._tome_index, x, self._tome_block_r)
            out = self._tome_call(x, args, kwargs, call, tome.caller_mask is None)
            tome.leave(self._tome_index, call)
            return out
        if tome is None:
            if self._tome_block_r <= 0 or _masked(args, kwargs):
                return super().forward(x, *args, **kwargs)  # type: ignore[misc]
            tome = BlockCall(self._tome_start(x), self._tome_block_r)
        return self._tome_call(x, args, kwargs, tome)

    def _tome_call(
        self, x: torch.Tensor, args: tuple, kwargs: Dict[str, Any], call: BlockCall, masks_mask_nothing: bool = False
    ) -> Any:
        # torch.fx traces our own branches: it would treat a swapped torch.nn module inside the
        # block's own forward as code to trace, not as the leaf torch.nn modules are.
        native = self._tome_native_when_idle and not isinstance(x, torch.fx.Proxy)
        if call.r <= 0 and call.state.size is None and native:
            call.out = call.state  # nothing merged yet, nothing to merge: the block's own forward
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        # masks_mask_nothing: the caller passed no mask, so a mask the model built itself masks
        # nothing (transformers builds one of ones while torch.export traces it).
        if not masks_mask_nothing and _masked(args, kwargs):
            raise ValueError(
                "an attention mask (attention_mask / attn_mask / is_causal) cannot be combined with token "
                "merging: merged tokens no longer line up with the mask. Set model.r = 0 to use a mask."
            )
        attn_branch = self._tome_attn_branch_for(call.state, x, kwargs)
        x, call.out = merge_block(x, call.state, call.r, attn_branch, self._tome_mlp_branch, self._tome_rule)
        return x

    def _tome_attn_branch_for(
        self, state: ToMeState, x: torch.Tensor, kwargs: Dict[str, Any]
    ) -> Callable[[torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]:
        """The attention branch for a merging call with the block's keyword arguments ``kwargs``
        (a block whose attention takes more than ``x`` and the bias binds it here)."""
        return self._tome_attn_branch

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x, bias) -> (residual, metric)``: the whole attention residual branch."""
        raise NotImplementedError

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``x -> residual``: the whole MLP residual branch."""
        raise NotImplementedError

    def _tome_start(self, x: torch.Tensor) -> ToMeState:
        return ToMeState.start(x.shape[1], self._tome_protected, self._tome_prop_attn, False)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        tome = f"tome_r={self._tome_block_r}"
        return f"{base}, {tome}" if base else tome


def call_attention(
    attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor], *args: Any, **kwargs: Any
) -> Tuple[Any, torch.Tensor]:
    """Call a patched attention module through ``__call__`` (so its hooks fire), with the
    arguments the original block passes it (``*args``, ``**kwargs``) and the bias.

    Returns:
        The module's output and the metric it reported.
    """
    call = AttentionCall(bias, getattr(attn, "_tome_feature", "k"))
    out = attn(x, *args, tome=call, **kwargs)
    return out, call.metric  # type: ignore[return-value]


_NO_TAG = object()


class ToMeModelMixin:
    """Model-level ToMe settings (``model.r``, ``model._tome_info``) and the block loop."""

    _tome_r: RSchedule = 0

    def _tome_blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _tome_full_tokens(self) -> Optional[int]:
        """Tokens entering the first block when nothing is merged, if fixed (else None)."""
        return None

    @property
    def r(self) -> RSchedule:
        """Tokens to merge away per layer: an int, a list, or ``(r, inflection)``."""
        return self._tome_r

    @r.setter
    def r(self, value: RSchedule) -> None:
        blocks = self._tome_blocks()
        schedule = parse_r(len(blocks), value)  # raises ValueError quoting a bad value
        object.__setattr__(self, "_tome_r", value)
        for block, block_r in zip(blocks, schedule):
            object.__setattr__(block, "_tome_block_r", block_r)

    @property
    def tome_method(self) -> MergeMethod:
        """The merge method every block follows: a :class:`tome.MergeMethod`; set it
        to a name (``"tome"``, ``"pitome"``, ``"tofu"``) or a ``MergeMethod``.

        Raises:
            ValueError: on assignment of an unknown name (the valid ones are listed).
        """
        return self._tome_info.get("method") or MergeMethod()

    @tome_method.setter
    def tome_method(self, value: Any) -> None:
        method = as_method(value)
        blocks = self._tome_blocks()
        rules = [method.rule(index, len(blocks)) for index in range(len(blocks))]
        attentions = [[m for m in block.modules() if isinstance(m, ToMeAttentionMixin)] for block in blocks]
        _check_features(self, method, rules, attentions)  # refuse before changing anything
        for block, rule, modules in zip(blocks, rules, attentions):
            object.__setattr__(block, "_tome_rule", rule)
            for module in modules:
                if module.__dict__.get("_tome_feature", "k") != rule.attention_feature:
                    object.__setattr__(module, "_tome_feature", rule.attention_feature)
        dict.__setitem__(self._tome_info, "method", method)

    @property
    def trace_source(self) -> bool:
        """Whether forwards track which original patches each token contains (see
        :func:`tome.last_forward`). Setting it re-patches with only this setting changed."""
        return self._tome_info["trace_source"]

    @trace_source.setter
    def trace_source(self, value: bool) -> None:
        configure(self, trace_source=value)

    @property
    def prop_attn(self) -> bool:
        """Whether proportional attention is on (``log(size)`` added to the attention logits).
        Setting it re-patches with only this setting changed; ``None`` takes the default rule
        (:func:`tome.patch.default_prop_attn`)."""
        return self._tome_info["prop_attn"]

    @prop_attn.setter
    def prop_attn(self, value: Optional[bool]) -> None:
        configure(self, prop_attn=value)

    def _tome_schedule(self) -> List[int]:
        return parse_r(len(self._tome_blocks()), self._tome_r)

    def _tome_begin(
        self, x: torch.Tensor, trace_source: Optional[bool] = None, padding: Optional[torch.Tensor] = None
    ) -> ToMeState:
        """The state entering the first block for tokens ``x`` ``(batch, tokens, channels)``.

        ``padding``: ``(batch, tokens, 1)`` float32, 1 for real tokens and 0 for padding
        (a key-padding mask, carried as token sizes: see ``ToMeState.padded``), or None.
        """
        info = self._tome_info
        trace = info["trace_source"] if trace_source is None else trace_source
        state = ToMeState.start(x.shape[1], info["protected_tokens"], info["prop_attn"], trace)
        if padding is None:
            return state
        if tuple(padding.shape) != (x.shape[0], x.shape[1], 1):
            raise ValueError(f"padding of shape {tuple(padding.shape)} does not cover the {x.shape[0]} x "
                             f"{x.shape[1]} tokens entering the first block")
        return replace(state, size=padding.to(device=x.device, dtype=torch.float32), padded=True)

    def _tome_run(
        self,
        x: torch.Tensor,
        grad_checkpointing: bool = False,
        *,
        stop_after: Optional[int] = None,
        trace_source: Optional[bool] = None,
        after_block: Optional[Callable[[int, torch.Tensor, ToMeState], None]] = None,
        padding: Optional[torch.Tensor] = None,
        positions: Optional[RotaryPositions] = None,
        block_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Tuple[torch.Tensor, ToMeState]:
        """Embedded tokens ``(batch, tokens, channels)`` through the blocks, merging on the schedule.

        Args:
            x: Tokens entering the first block.
            grad_checkpointing: Recompute blocks in backward.
            stop_after: Run blocks ``0 .. stop_after`` only.
            trace_source: Keep source groups even if ``trace_source`` is off.
            after_block: Passed to :func:`run_blocks`.
            padding: Key padding as token sizes (see :meth:`_tome_begin`).
            positions: The tokens' rotary positions, carried from the first block on when
                a block of the run merges or tokens are padded (:mod:`tome.patch._rope`).
            block_kwargs: Passed to every block, as the framework's own loop passes them.

        Returns:
            The tokens after the last block run and the final state, which is
            also recorded in ``model._tome_info``.
        """
        blocks = list(self._tome_blocks())
        schedule = parse_r(len(blocks), self._tome_r)
        if stop_after is not None:
            blocks = blocks[: stop_after + 1]
        state = self._tome_begin(x, trace_source, padding)
        if positions is not None and (state.padded or any(schedule[: len(blocks)])):
            state = positions.start(state, x)
        x, state, removed = run_blocks(blocks, x, state, schedule, grad_checkpointing, after_block, block_kwargs)
        if not isinstance(x, torch.fx.Proxy):  # a traced graph's runs do not report here
            self._tome_info.record(state, x, removed + [0] * (len(schedule) - len(removed)))
        return x, state

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script asks for this first. Scripting cannot follow the merge state, so
        # script the original model when nothing merges and refuse clearly otherwise.
        if any(self._tome_schedule()):
            raise NotImplementedError(
                "torch.jit.script cannot compile a model that merges tokens (r > 0); use torch.jit.trace "
                "or torch.export.export (they record the merge for a fixed input size), or set model.r = 0"
            )
        import copy

        return remove_patch(copy.deepcopy(self))  # type: ignore[arg-type]

    @staticmethod
    def _tome_tag(features: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """Attach the token sizes to the features they describe (for ``forward_head``)."""
        features._tome_size = size  # type: ignore[attr-defined]
        return features

    def _tome_sizes_of(self, features: torch.Tensor) -> Optional[torch.Tensor]:
        """The sizes of features returned by this model's ``forward_features``.

        Raises:
            ValueError: if the features carry no sizes and may be merged, so a
                size-weighted pool would be a guess.
        """
        size = getattr(features, "_tome_size", _NO_TAG)
        if size is not _NO_TAG:
            return size  # type: ignore[return-value]
        full = self._tome_full_tokens()
        if features.dim() == 3 and (features.shape[1] == full or (full is None and not any(self._tome_schedule()))):
            return None  # unmerged features: every token is one patch
        # A detached tensor shares the tagged one's memory but not its attributes; a lookup by shape
        # could hand it another forward's sizes, so the caller is told what works instead.
        raise ValueError(
            f"forward_head cannot weight these features ({tuple(features.shape)}) by token size: they are "
            "not the tensor this model's forward_features returned (sizes travel with that tensor only; "
            ".detach(), a copy, slice or cast loses them). Pass forward_features' output unchanged: "
            "forward_head(features); to drop gradients, run both under torch.no_grad() instead of "
            "calling .detach() in between, and detach forward_head's result; or call the model itself."
        )

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        info = self._tome_info
        family = self.__dict__.get("_tome_family")
        default, why = default_prop_attn(self, family if family in _REGISTRY else None)
        prop = f"prop_attn={info['prop_attn']}" + (f" ({why})" if why and info["prop_attn"] == default else "")
        tome = f"tome: r={self._tome_r!r}, {prop}, trace_source={info['trace_source']}"
        method = info.get("method")
        if method is not None and method.name != "tome":
            tome += f", method={method}"
        return f"{base}, {tome}" if base else tome


def _kept_settings(model: nn.Module, info: Any, trace_source: Optional[bool],
                   prop_attn: Optional[bool]) -> ToMeSettings:
    """The settings of a re-patch by a :func:`register_family` patch function: the model's
    current ones, with ``trace_source`` and ``prop_attn`` changed where given (not None);
    proportional attention on when nothing decided it yet."""
    current = _read_info(model, ToMeSettings) if isinstance(info, ToMeInfo) else ToMeSettings()
    settings = replace(current, **passed(trace_source=KEEP if trace_source is None else trace_source,
                                         prop_attn=KEEP if prop_attn is None else prop_attn))
    if settings.prop_attn is None:
        settings = replace(settings, prop_attn=True)
    return settings


def _swap_blocks(blocks: Sequence[nn.Module], block_mixin: Callable[[nn.Module], type],
                 attention: Optional[Callable[[nn.Module], Tuple[nn.Module, type]]],
                 protected_tokens: int, prop_attn: bool) -> None:
    """Swap the class of every block (and its attention module) and tell it its index and settings."""
    for index, block in enumerate(blocks):
        swap_class(block, block_mixin(block))
        object.__setattr__(block, "_tome_index", index)
        if attention is not None:
            attn, attn_mixin = attention(block)
            swap_class(attn, attn_mixin)
        object.__setattr__(block, "_tome_protected", protected_tokens)
        object.__setattr__(block, "_tome_prop_attn", prop_attn)


def patch_model(
    model: nn.Module,
    model_mixin: Union[type, Tuple[type, ...]],
    blocks: Sequence[nn.Module],
    block_mixin: Callable[[nn.Module], type],
    *,
    attention: Optional[Callable[[nn.Module], Tuple[nn.Module, type]]] = None,
    encoder: Optional[Tuple[nn.Module, type]] = None,
    protected_tokens: int,
    class_token: bool,
    distill_token: bool = False,
    settings: Optional[ToMeSettings] = None,
    trace_source: Optional[bool] = None,
    prop_attn: Optional[bool] = None,
) -> nn.Module:
    """Swap the classes of a model, its blocks and their attention modules; record the settings.

    Args:
        model: The model to patch in place.
        model_mixin: Mixin class (or classes) for the model.
        blocks: The transformer blocks, in order.
        block_mixin: Gives the mixin class for each block.
        attention: Gives ``(attention module, its mixin)`` for a block.
        encoder: ``(module, mixin)`` for a module between the model and its blocks
            that the model calls (so its hooks fire) to run the block loop.
        protected_tokens: Leading tokens that never merge.
        class_token, distill_token: Recorded for code written against the original release.
        settings: The family's settings, complete (``prop_attn`` decided): what a
            :class:`FamilySpec`'s ``patch`` is handed. ``r`` becomes ``model.r``, ``method``
            ``model.tome_method`` and every other one ``model._tome_info[name]``.
        trace_source, prop_attn: Instead of ``settings``, for patch functions registered
            with :func:`register_family`: these two change, everything else is kept.

    Re-patching keeps the model's ``_tome_info`` (and what its last forward left there).

    Raises:
        ValueError: if ``settings.r`` does not fit the blocks or the method cannot run
            on them (the model is then as it was, unless it was unpatched: see :func:`configure`).
    """
    info = model.__dict__.get("_tome_info")
    if settings is None:  # a register_family patch function: keep what it does not pass
        settings = _kept_settings(model, info, trace_source, prop_attn)
    parse_r(len(blocks), settings.r)  # a bad r raises before anything changes
    swap_class(model, model_mixin)
    if encoder is not None:
        swap_class(*encoder)
    _swap_blocks(blocks, block_mixin, attention, protected_tokens, bool(settings.prop_attn))
    if not isinstance(info, ToMeInfo):
        info = ToMeInfo(r=None, size=None, source=None, method=MergeMethod())
        object.__setattr__(model, "_tome_info", info)
    for key, value in (("class_token", bool(class_token)), ("distill_token", bool(distill_token)),
                       ("protected_tokens", int(protected_tokens))):
        dict.__setitem__(info, key, value)
    for option in fields(settings):
        if option.name not in ("r", "method"):
            dict.__setitem__(info, option.name, getattr(settings, option.name))
    model.r = settings.r  # type: ignore[attr-defined]
    model.tome_method = settings.method  # type: ignore[attr-defined]
    return model
