"""Tracing and scripting a patched model: what works, and clear refusals for what cannot."""

from __future__ import annotations

import warnings

import pytest
import torch

import tome
from tome.patch._shared import merge_tokens

from registry_cases import build, call, cases, output, patch
from test_timm import images, make

# torch marks jit.trace / jit.script as deprecated; users still call them.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("spec, example", cases(traceable=True, first_only=True))
@torch.no_grad()
def test_jit_trace_records_the_merge(spec, example):
    model = patch(spec, example, build(example))
    x = example.inputs(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), output(example, call(model, x)), atol=1e-5, rtol=0)
    assert not torch.allclose(traced(x), output(example, call(tome.remove_patch(model), x)), atol=1e-3)


@torch.no_grad()
def test_jit_script_at_r0_scripts_the_original_and_refuses_merging():
    model = tome.apply_patch(make("token"), r=0)
    x = images()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), atol=1e-6, rtol=0)
    assert tome.patch.is_patched(model)  # scripting left the model itself alone
    model.r = 2
    with pytest.raises(NotImplementedError, match="torch.jit.script.*r > 0.*torch.jit.trace"):
        torch.jit.script(model)


@pytest.mark.parametrize("merging", [False, True])
@pytest.mark.parametrize("spec, example", cases(traceable=True))
@torch.no_grad()
def test_fx_graph_matches_eager_at_any_batch(spec, example, merging):
    model = patch(spec, example, build(example), merging=merging)
    graph = torch.fx.symbolic_trace(model)
    # The merge is one graph node per merging block, so the graph is not tied to the traced shapes.
    for inputs in (example.inputs(2, 1), example.inputs(3, 5)):
        torch.testing.assert_close(output(example, call(graph, inputs)), output(example, call(model, inputs)),
                                   atol=1e-5, rtol=0)
    merges = sum(node.target is merge_tokens for node in graph.graph.nodes)
    assert merges == (sum(r > 0 for r in tome.parse_r(len(model._tome_blocks()), model.r)) if merging else 0)
    if merging:
        inputs = example.inputs(2, 1)
        assert not torch.allclose(output(example, call(graph, inputs)),
                                  output(example, call(tome.remove_patch(model), inputs)), atol=1e-3)


def test_timm_feature_extractor_traces_a_merging_model():
    from timm.models._features_fx import create_feature_extractor

    model = tome.apply_patch(make("registers"), r=3)
    x = images()
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "block1", "head": "logits"})
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["logits"], model(x), atol=1e-5, rtol=0)
    assert out["block1"].shape[1] < 16 + model.num_prefix_tokens  # merged tokens
    model.train()
    extractor = create_feature_extractor(model, return_nodes={"head": "logits"})
    extractor(x)["logits"].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("r", [0, 3])
@torch.no_grad()
def test_fx_graph_scripts(r):
    # timm's own model tests script FX graphs; the merge node runs in Python there.
    model = tome.apply_patch(make("class_avg"), r=r)
    scripted = torch.jit.script(torch.fx.symbolic_trace(model))
    x = images()
    torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [0, 3])
def test_timm_tracer_keeps_dynamic_img_size_leaves(r):
    # timm's tracer (its model tests, feature extraction) treats resample_abs_pos_embed as a
    # leaf only when it finds it among the root forward's globals: the patched forward runs
    # in timm's module, so a dynamic_img_size model traces as it does unpatched.
    from timm.models._features_fx import create_feature_extractor

    model = tome.apply_patch(make("token", dynamic_img_size=True), r=r)
    assert type(model).forward.__globals__ is type(model)._tome_parent.forward.__globals__
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "block1", "head": "logits"})
    with torch.no_grad():
        for x in (images(), images(batch=3, size=48, seed=5)):
            out = extractor(x)
            torch.testing.assert_close(out["logits"], model(x), atol=1e-5, rtol=0)
    if r:
        assert any(node.target is merge_tokens for node in extractor.graph.nodes)


def test_in_parent_module_refuses_a_forward_that_reads_module_names():
    from tome.patch._lifecycle import in_parent_module

    def forward(self, x):
        return torch.relu(x)

    with pytest.raises(TypeError, match=r"may not read module names \['torch'\]"):
        in_parent_module(forward)


def test_fx_refuses_a_merging_eva_with_dynamic_image_size():
    from test_eva import make as make_eva

    model = tome.apply_patch(make_eva("dinov3"), r=3)
    with pytest.raises(TypeError, match="dynamic_img_size=False"):
        torch.fx.symbolic_trace(model)
