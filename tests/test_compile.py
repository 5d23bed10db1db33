"""torch.compile of a patched timm ViT: one full graph, no recompiles, same outputs as eager.

The dynamo-only tests (``backend="eager"`` / ``"aot_eager"``) trace the whole
patched forward and take a few seconds. The inductor test generates and builds
C++ kernels: it needs a C compiler and takes ~30-40 s on 2 shared CPU cores, so
it is skipped where no compiler is found (and where torch.compile is unavailable).
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

import tome  # noqa: E402

from conftest import trained_like_  # noqa: E402

_DYNAMO_OK = hasattr(torch, "compile") and sys.version_info < (3, 14)
pytestmark = pytest.mark.skipif(not _DYNAMO_OK, reason="torch.compile (dynamo) is not available here")


def _has_c_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++"))


def _tiny_vit(**kwargs) -> torch.nn.Module:
    config = dict(img_size=32, patch_size=4, embed_dim=32, num_heads=2, depth=3, num_classes=10)
    config.update(kwargs)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **config).eval()
    return trained_like_(model)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Every schedule form and both trace_source values (each pair is a graph of its own; every
# family's patched model also compiles in tests/patch/test_conformance.py).
@pytest.mark.parametrize("schedule, trace_source", [(5, True), ((4, -1.0), False), ([6, 0, 3], True)])
def test_fullgraph_matches_eager_without_recompiles(schedule, trace_source):
    from torch._dynamo.utils import counters

    model = tome.patch.timm(_tiny_vit(), trace_source=trace_source)
    model.r = schedule
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    counters.clear()
    with torch.no_grad():
        for _ in range(3):  # same shape, new data: must reuse the one graph
            x = torch.randn(2, 3, 32, 32)
            out = compiled(x)
            compiled_size = model._tome_info["size"]
            eager = model(x)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled_size, model._tome_info["size"])
            assert compiled_size.shape[1] < 65  # it did merge
    assert counters["stats"]["unique_graphs"] == 1


def test_explain_finds_no_graph_break():
    model = tome.patch.timm(_tiny_vit(reg_tokens=2, global_pool="avg", qk_norm=True, init_values=0.1))
    model.r = 4
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_aot_autograd_gradients_match_eager():
    model = tome.patch.timm(_tiny_vit())
    model.r = 5
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    eager_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    compiled_grads = torch.autograd.grad(compiled(x).square().sum(), list(model.parameters()))
    for eager, comp in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _has_c_compiler(), reason="inductor on CPU needs a C compiler")
def test_inductor_fullgraph_matches_eager():
    from torch._dynamo.utils import counters

    model = tome.patch.timm(_tiny_vit())
    model.r = 5
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    counters.clear()
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 3, 32, 32)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
