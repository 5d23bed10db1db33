"""Test cases drawn from the family registry: every registered family's tiny models.

A family declares its tiny models (``FamilySpec.examples``); the conformance suite,
the export tests and the tracing tests take their cases from here, so registering a
family enrols it in all of them.
"""

from __future__ import annotations

from typing import Any, List

import pytest
import torch
from torch import nn

import tome
from tome.patch import Example, FamilySpec

from conftest import trained_like_


def cases(*, exports: bool = False, traceable: bool = False, first_only: bool = False) -> List[Any]:
    """``pytest.param(spec, example)`` for every registered family and each of its examples.

    Args:
        exports: Only examples the family declares exportable.
        traceable: Only families that torch.fx and torch.jit.trace follow.
        first_only: One example per family (for the expensive checks).
    """
    params = []
    for spec in tome.patch.registered():
        if traceable and not spec.traceable:
            continue
        examples = [e for e in spec.examples() if not exports or (spec.exports if e.exports is None else e.exports)]
        for example in examples[:1] if first_only else examples:
            params.append(pytest.param(spec, example, id=f"{spec.name}-{example.name}"))
    return params


def build(example: Example, seed: int = 0) -> nn.Module:
    """The example's model with weights re-drawn at a trained-like scale (see conftest)."""
    for module in example.requires:
        pytest.importorskip(module)
    return trained_like_(example.build(), seed).eval()


def call(model: Any, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def output(example: Example, out: Any) -> torch.Tensor:
    """The tensor a user reads from the model's output."""
    if example.output is not None:
        return example.output(out)
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "image_embeds", "pooler_output", "last_hidden_state", "sample"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0]


@torch.no_grad()
def run(example: Example, model: Any, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return output(example, call(model, example.inputs(batch, seed)))


def patch(spec: FamilySpec, example: Example, model: nn.Module, merging: bool = True) -> nn.Module:
    """Patch ``model`` with the example's merging settings (or the family's no-merging ones)."""
    return tome.apply_patch(model, **(example.merging if merging else spec.no_merging))
