"""What a patched model records: ``model._tome_info`` (its settings and what its last
forward left) and the public report of that forward, :func:`last_forward`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import nn

from ._shared import ToMeState, sources_from_groups


class ToMeInfo(dict):
    """``model._tome_info``: the settings and what the last forward left behind.

    Keys (compatible with the original release): ``"r"`` (the per-layer schedule
    of the last forward), ``"size"`` ((batch, tokens, 1) sizes), ``"source"``
    ((batch, tokens, original tokens) 0/1 map, only with ``trace_source``),
    ``"trace_source"``, ``"prop_attn"``, ``"class_token"``, ``"distill_token"``,
    ``"protected_tokens"``, ``"method"`` (the :class:`tome.MergeMethod`). The source map is built when read: internally every
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

    def report(self) -> Optional["ForwardReport"]:
        """What the last forward did, or None before the first forward (see :func:`last_forward`)."""
        if self._report is None:
            return None
        return ForwardReport(r=list(dict.get(self, "r") or []), size=self._computed("size"),
                             source=self._computed("source"))

    def __deepcopy__(self, memo: dict) -> "ToMeInfo":
        copied = ToMeInfo(dict(self))
        return copied

    def __reduce__(self):  # pickling drops the per-forward report
        return (ToMeInfo, (dict(self),))


@dataclass(frozen=True)
class ForwardReport:
    """What a patched model's last forward did: :func:`tome.last_forward`.

    Args:
        r: Tokens each block removed, one entry per block (the schedule as it ran,
            each layer's r capped by its tokens).
        size: ``(batch, tokens, 1)``: how many original tokens (patches) each output
            token stands for (0 for padding).
        source: ``(batch, tokens, original tokens)`` 0/1 map of which original tokens
            each output token holds, with ``trace_source`` on; else None.
    """

    r: List[int]
    size: torch.Tensor
    source: Optional[torch.Tensor]

    @property
    def tokens(self) -> int:
        """Tokens the last block put out (prefix tokens included)."""
        return int(self.size.shape[1])


def last_forward(model: nn.Module) -> Optional[ForwardReport]:
    """What the last forward of a patched model did: per-layer r, sizes, sources.

    ``model._tome_info["size"]``, ``["source"]`` and ``["r"]`` hold the same. With
    several threads running one model, this describes whichever forward finished last.

    Args:
        model: A model patched by a family that merges tokens for good.

    Returns:
        A :class:`ForwardReport`, or None before the model's first forward.

    Raises:
        TypeError: for an unpatched model, or a diffusion denoiser (it unmerges inside
            every block, so its forward leaves no merged tokens to report).
    """
    info = model.__dict__.get("_tome_info") if isinstance(model, nn.Module) else None
    if not isinstance(info, ToMeInfo):
        state = "not patched" if info is None else "patched by a family that unmerges inside its blocks"
        raise TypeError(f"tome.last_forward needs a model whose blocks merge tokens; {type(model).__name__} is {state}")
    return info.report()
