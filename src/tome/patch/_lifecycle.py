"""Patching and unpatching: class swaps that remember their parent.

Patching replaces ``module.__class__`` with a subclass that mixes in the ToMe
behaviour; the subclass records the class it replaced, so ``remove_patch``
restores it exactly. No parameter, buffer or submodule is added or renamed, so
``state_dict()`` keys are unchanged and checkpoints move freely between patched
and unpatched models.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Type

import torch
from torch import nn

from .._schedule import RSchedule, parse_r
from ._shared import ToMeState, sources_from_groups

__all__ = [
    "ToMeInfo",
    "ToMeModelMixin",
    "ToMeBlockMixin",
    "swap_class",
    "is_patched",
    "original_class",
    "supported_families",
    "remove_patch",
    "patch_model",
]

# Instance attributes that patching adds; removed again by remove_patch.
_INSTANCE_ATTRS = ("_tome_info", "_tome_r", "_tome_block_r", "_tome_protected", "_tome_prop_attn")

_CLASS_CACHE: Dict[tuple, type] = {}


class ToMeInfo(dict):
    """``model._tome_info``: the settings and what the last forward left behind.

    Keys (compatible with the original release): ``"r"`` (the per-layer schedule
    of the last forward), ``"size"`` ((batch, tokens, 1) sizes), ``"source"``
    ((batch, tokens, original tokens) 0/1 map, only with ``trace_source``),
    ``"trace_source"``, ``"prop_attn"``, ``"class_token"``, ``"distill_token"``,
    ``"protected_tokens"``. The source map is built when read: internally every
    forward keeps one group index per original token.

    With several threads running one model, each forward's result is still its
    own; only this after-the-fact report is shared, and it describes whichever
    forward finished last.
    """

    _report: Optional[tuple] = None

    def record(self, state: ToMeState, x: torch.Tensor, schedule: List[int]) -> None:
        """Remember the final state of a forward whose output tokens are ``x``."""
        dict.__setitem__(self, "r", schedule)
        self._report = (state, x.shape[0], x.device, x.dtype)

    def _computed(self, key: str) -> Any:
        if self._report is None:
            return None
        state, batch, device, dtype = self._report
        if key == "size":
            if state.size is not None:
                return state.size
            return torch.ones(batch, state.num_tokens, 1, device=device)
        if not state.trace_source:
            return None
        groups = state.group_index(batch, device)
        return sources_from_groups(groups, state.num_tokens, dtype if dtype.is_floating_point else torch.float32)

    def __getitem__(self, key: str) -> Any:
        if key in ("size", "source"):
            return self._computed(key)
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in ("size", "source"):
            return self._computed(key)
        return dict.get(self, key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        if key in ("size", "source"):
            if value is None:
                self._report = None
                return
            raise KeyError(f"_tome_info[{key!r}] is filled in by the model's forward and cannot be set")
        if key in ("trace_source", "prop_attn"):
            value = bool(value)
        dict.__setitem__(self, key, value)

    def __deepcopy__(self, memo: dict) -> "ToMeInfo":
        copied = ToMeInfo(dict(self))
        return copied

    def __reduce__(self):  # pickling drops the per-forward report
        return (ToMeInfo, (dict(self),))


def original_class(module: nn.Module) -> type:
    """The module's class before any ToMe swap (its own class when unpatched)."""
    cls = type(module)
    return cls.__dict__.get("_tome_parent", cls)


def supported_families() -> str:
    """Comma-separated names of the families ``tome.apply_patch`` knows, for error messages."""
    from . import FAMILIES

    return ", ".join(FAMILIES)


def is_patched(module: nn.Module) -> bool:
    """Whether ``module``'s class is a ToMe swap."""
    return "_tome_parent" in type(module).__dict__


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``mixin + type(module)``; no-op if already patched."""
    if is_patched(module):
        return
    parent = type(module)
    key = (mixin, parent)
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        cls = type(f"ToMe{parent.__name__}", (mixin, parent), {"_tome_parent": parent})
        _CLASS_CACHE[key] = cls
    module.__class__ = cls


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo any ToMe patch in place: original classes back, ToMe attributes gone.

    Outputs are then bit-identical to a model that was never patched. Calling it
    on an unpatched model does nothing.

    Args:
        model: A model patched by any ``tome.patch`` function.

    Returns:
        The same model, for chaining.
    """
    for module in model.modules():
        while is_patched(module):
            module.__class__ = type(module).__dict__["_tome_parent"]
        for attr in _INSTANCE_ATTRS:
            module.__dict__.pop(attr, None)
    return model


class ToMeBlockMixin:
    """Settings a patched block needs when it is called on its own."""

    _tome_block_r: int = 0
    _tome_protected: int = 0
    _tome_prop_attn: bool = True

    def _tome_start(self, x: torch.Tensor) -> ToMeState:
        return ToMeState.start(x.shape[1], self._tome_protected, self._tome_prop_attn, False)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        tome = f"tome_r={self._tome_block_r}"
        return f"{base}, {tome}" if base else tome


class ToMeModelMixin:
    """Model-level ToMe settings: ``model.r`` and ``model._tome_info``."""

    _tome_r: RSchedule = 0

    def _tome_blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

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

    def _tome_schedule(self) -> List[int]:
        return parse_r(len(self._tome_blocks()), self._tome_r)

    def _tome_begin(self, x: torch.Tensor) -> ToMeState:
        info = self._tome_info
        return ToMeState.start(x.shape[1], info["protected_tokens"], info["prop_attn"], info["trace_source"])

    def _tome_last_size(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Sizes of the last forward in this model, if they describe ``x``'s tokens."""
        report = self._tome_info._report
        if report is None:
            return None
        state, batch, _, _ = report
        if state.size is None or batch != x.shape[0] or state.num_tokens != x.shape[1]:
            return None
        return state.size

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        info = self._tome_info
        tome = f"tome: r={self._tome_r!r}, prop_attn={info['prop_attn']}, trace_source={info['trace_source']}"
        return f"{base}, {tome}" if base else tome


def patch_model(
    model: nn.Module,
    model_mixin: Type[ToMeModelMixin],
    blocks: Sequence[nn.Module],
    block_mixin: Callable[[nn.Module], type],
    *,
    protected_tokens: int,
    trace_source: bool,
    prop_attn: bool,
    class_token: bool,
    distill_token: bool = False,
) -> nn.Module:
    """Swap the classes of a model and its blocks and record the settings.

    Args:
        model: The model to patch in place.
        model_mixin: Mixin class for the model.
        blocks: The transformer blocks, in order.
        block_mixin: Gives the mixin class for each block.
        protected_tokens: Leading tokens that never merge.
        trace_source, prop_attn: Settings recorded in ``model._tome_info``.
        class_token, distill_token: Recorded for code written against the original release.

    Re-patching an already patched model only updates the settings and keeps ``model.r``.
    """
    previous_r = model.__dict__.get("_tome_r", 0)
    swap_class(model, model_mixin)
    for block in blocks:
        swap_class(block, block_mixin(block))
        object.__setattr__(block, "_tome_protected", protected_tokens)
        object.__setattr__(block, "_tome_prop_attn", bool(prop_attn))
    info = ToMeInfo(
        r=None,
        size=None,
        source=None,
        trace_source=bool(trace_source),
        prop_attn=bool(prop_attn),
        class_token=bool(class_token),
        distill_token=bool(distill_token),
        protected_tokens=int(protected_tokens),
    )
    object.__setattr__(model, "_tome_info", info)
    model.r = previous_r  # type: ignore[attr-defined]
    return model
