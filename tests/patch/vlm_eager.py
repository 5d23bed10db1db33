"""Eager-attention references for the attention-ranked visual-token methods (VisionZip, FastV),
shared by tests/patch/test_vlm_methods_wiring.py and test_vlm_family_methods.py.

The patched models compute the attention they rank by from queries and keys while the model
keeps its sdpa attention; these helpers read the weights transformers' own eager kernel
computes (in the tests only), and make the eager kernel fail while a patched model runs.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Iterable, List, Sequence, Tuple

import torch
from torch import nn


def eager_calls(monkeypatch, target: nn.Module, config: Any, run: Callable[[], Any]
                ) -> Tuple[Any, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``run()`` with ``config`` (a vision tower's) switched to eager attention; return its
    result and the ``(weights, key)`` the eager kernel of ``target``'s module computed for
    ``target``, one pair per call (weights ``(B, heads, N, N)``, keys ``(B, heads, N, d)``)."""
    module = sys.modules[type(target).__module__]
    eager, seen = module.eager_attention_forward, []

    def recording(attn, query, key, value, *args, **kwargs):
        out, weights = eager(attn, query, key, value, *args, **kwargs)
        if attn is target:
            seen.append((weights.detach(), key.detach()))
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            result = run()
    finally:
        config._attn_implementation = before
        monkeypatch.setattr(module, "eager_attention_forward", eager)
    return result, seen


def last_token_row(model: nn.Module, inputs: dict, layer: int) -> torch.Tensor:
    """``(B, L)``: the last token's attention at language-model ``layer``, mean over heads, from
    an eager copy of the unpatched model asked for its attention weights."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    return out.attentions[layer][:, :, -1, :].float().mean(1)


def forbid_eager(monkeypatch, modules: Iterable[str]) -> None:
    """Make the eager attention kernel of each module (by name) fail if it is called."""

    def refuse(*args, **kwargs):
        raise AssertionError("the patched model ran eager attention")

    for name in set(modules):
        monkeypatch.setattr(sys.modules[name], "eager_attention_forward", refuse)


def assert_scores_close(got: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                        expected: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Per item, the patched ``(attention, keys)`` equal the reference's to float rounding, and
    the four tokens ranked first are the same."""
    assert len(got) == len(expected)
    for (attention, keys), (ref_attention, ref_keys) in zip(got, expected):
        torch.testing.assert_close(attention, ref_attention, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(keys, ref_keys, rtol=1e-4, atol=1e-5)
        assert torch.equal(attention.argsort(descending=True, stable=True)[:4],
                           ref_attention.argsort(descending=True, stable=True)[:4])
