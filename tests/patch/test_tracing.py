"""Tracing and scripting a patched model: what works, and clear refusals for what cannot."""

from __future__ import annotations

import warnings

import pytest
import torch

import tome

from test_timm import images, make
from test_torchvision import make_vit as make_torchvision

# torch marks jit.trace / jit.script as deprecated; users still call them.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.parametrize("build", [lambda: make("token"), lambda: make("class_avg"), make_torchvision])
@torch.no_grad()
def test_jit_trace_records_the_merge(build):
    model = tome.apply_patch(build(), r=3)
    x = images()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x), atol=1e-5, rtol=0)
    assert not torch.allclose(traced(x), tome.remove_patch(model)(x), atol=1e-3)


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


@torch.no_grad()
def test_fx_traces_at_r0_and_refuses_merging_clearly():
    model = tome.apply_patch(make("token"), r=0)
    x = images()
    graph = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(graph(x), model(x), atol=1e-6, rtol=0)
    model.r = 2
    with pytest.raises(NotImplementedError, match="symbolic tracing cannot follow token merging"):
        torch.fx.symbolic_trace(model)
