"""The merge step at small batch: how many operations one ToMe merge dispatches, and a
compiled model that switches r without recompiling on every call."""

from __future__ import annotations

import collections

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tome
from tome.patch._shared import ToMeState


class CountWork(TorchDispatchMode):
    """Counts dispatched aten ops that do work: views and no-op casts (which return an alias
    of their input) are left out; in-place ops count."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        aliasing = bool(schema.returns) and schema.returns[0].alias_info is not None and not schema.name.endswith("_")
        if not aliasing:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_a_tome_merge_step_dispatches_at_most_32_operations():
    """ViT-B/16 shapes at batch 1: matching, merge, sizes and the next block's bias.
    Each operation is at least one kernel launch on a GPU, and at batch 1 launches are the cost.
    The step took 46 before the slots of the class-token layout were computed directly."""
    tokens = 197
    state = ToMeState.start(tokens, 1, True, False)
    x, metric = torch.randn(1, tokens, 768), torch.randn(1, tokens, 64)
    x, state = state.merge(x, metric, 16)  # a later merge: sizes are no longer all ones
    metric = torch.randn(1, tokens - 16, 64)
    with torch.inference_mode(), CountWork() as count:
        merged, after = state.merge(x, metric, 16)
        after.attn_bias(torch.float32)
    assert merged.shape == (1, tokens - 32, 768)
    assert sum(count.ops.values()) <= 32, dict(count.ops)


def test_compiled_model_switches_r_without_recompiling_each_call():
    """One graph per schedule, cached: switching back and forth reuses them (CUDA graphs of
    mode="reduce-overhead" are recorded per graph, so they are reused the same way)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4).eval()
    tome.apply_patch(model, r=2)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for r in (2, 4):  # the first call of each schedule compiles it
            model.r = r
            compiled(x)
        assert counters["stats"]["unique_graphs"] == 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            for r in (2, 4, 2, 4):
                model.r = r
                out = compiled(x)
                torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()
