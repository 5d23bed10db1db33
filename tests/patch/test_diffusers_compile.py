"""torch.compile and torch.export of patched diffusers denoisers: whole-model capture with
``fullgraph=True`` (UNet, Wan, Flux, Flux.2 and the newer rows), ``torch.export``, and diffusers' regional
compilation (``compile_repeated_blocks``). Dynamo-only backend (``"eager"``), so no C
compiler is needed; tiny random models built from configs, nothing is downloaded."""

from __future__ import annotations

import contextlib
import sys
import warnings

import pytest
import torch

import tome

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not hasattr(torch, "compile") or sys.version_info >= (3, 14),
                                reason="torch.compile (dynamo) is not available here")

from test_diffusers import flux_inputs, make_flux, make_flux_controlnet, make_unet, unet_inputs  # noqa: E402
from test_dit_rows import NEWER_ROWS, flux2_inputs, later, make_flux2, newer_row, sample  # noqa: E402
from test_wan import cogvideox_inputs, make_wan, wan_inputs  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def _no_warnings():
    """RuntimeWarnings (a patched model reporting that nothing merged) raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def _sample(model, args=(), kwargs=None):
    with torch.no_grad():
        return model(*args, **(kwargs or {})).sample


def _transposed(kwargs):
    """Flux (Flux.2) inputs whose img_ids lay the same number of tokens out as a width x height grid."""
    ids = kwargs["img_ids"].clone()
    ids[..., [1, 2]] = ids[..., [2, 1]]
    return {**kwargs, "img_ids": ids}


# --- whole-model capture ------------------------------------------------------------------------


def test_flux_compiles_fullgraph_with_a_declared_grid_and_equals_eager():
    model = make_flux()
    args, kwargs = flux_inputs()  # a 6 x 4 grid
    unpatched = _sample(model, args, kwargs)
    tome.patch.diffusers(model, ratio=0.5)
    tome.patch.set_token_grid(model, 6, 4)  # before any eager call: the first call is traced
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _sample(compiled, args, kwargs)
        _sample(compiled, (args[0] + 1,), {**kwargs, "timestep": torch.tensor([0.2, 0.2])})  # same graph
    assert torch.equal(got, _sample(model, args, kwargs))
    assert (got - unpatched).abs().max() > 1e-2  # it merged


def test_flux_controlnet_compiles_fullgraph_with_a_declared_grid():
    # packed tokens like Flux, and its state travels in the context variable (see Wan below)
    model = make_flux_controlnet()
    args, kwargs = flux_inputs()
    kwargs["controlnet_cond"] = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(6))
    unpatched = model(*args, **kwargs).controlnet_block_samples[0].detach()
    tome.patch.diffusers(model, ratio=0.5)
    tome.patch.set_token_grid(model, 6, 4)
    with torch.no_grad():
        got = torch.compile(model, backend="eager", fullgraph=True)(*args, **kwargs).controlnet_block_samples[0]
        assert torch.equal(got, model(*args, **kwargs).controlnet_block_samples[0])
    assert (got - unpatched).abs().max() > 1e-2


def test_flux_remembers_the_grid_of_an_eager_call_for_traced_ones():
    model = tome.patch.diffusers(make_flux(), ratio=0.5)
    args, kwargs = flux_inputs()
    eager = _sample(model, args, kwargs)  # reads the grid from img_ids, once
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(_sample(compiled, args, kwargs), eager)


def test_a_traced_flux_call_without_a_known_grid_is_refused():
    model = tome.patch.diffusers(make_flux(), ratio=0.5)
    args, kwargs = flux_inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"tome.patch.set_token_grid\(model, height, width\)"):
        _sample(compiled, args, kwargs)


def test_a_traced_flux_call_whose_ids_are_another_grid_fails_instead_of_merging_wrong_neighbours():
    model = tome.patch.diffusers(make_flux(), ratio=0.5)
    args, kwargs = flux_inputs()
    tome.patch.set_token_grid(model, 6, 4)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    _sample(compiled, args, kwargs)
    with pytest.raises(RuntimeError, match="img_ids are not the 6 x 4 token grid"):
        _sample(compiled, args, _transposed(kwargs))  # 4 x 6, the same 24 tokens
    # eager reads the values (a host sync) and merges on the grid they give
    assert _sample(model, args, _transposed(kwargs)).isfinite().all()


def test_set_token_grid_refuses_bad_values_and_other_denoisers():
    model = tome.patch.diffusers(make_flux(), ratio=0.5)
    with pytest.raises(ValueError, match="height=0 must be a positive int"):
        tome.patch.set_token_grid(model, 0, 4)
    with pytest.raises(TypeError, match="UNet2DConditionModel holds no patched denoiser that reads"):
        tome.patch.set_token_grid(tome.patch.diffusers(make_unet(), ratio=0.5), 4, 4)
    tome.patch.set_token_grid(model, 6, 4)
    tome.remove_patch(model)
    assert "_tome_packed_grids" not in model.__dict__  # removed with the patch


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_flux_exports_with_a_declared_grid(strict):
    model = make_flux()
    args, kwargs = flux_inputs()
    unpatched = _sample(model, args, kwargs)
    tome.patch.diffusers(model, ratio=0.5)
    tome.patch.set_token_grid(model, 6, 4)
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs, strict=strict)
        got = program.module()(*args, **kwargs).sample
    assert torch.equal(got, _sample(model, args, kwargs))
    assert (got - unpatched).abs().max() > 1e-2
    with pytest.raises(RuntimeError, match="img_ids are not the 6 x 4 token grid"):
        program.module()(*args, **_transposed(kwargs))


@pytest.mark.parametrize("make, inputs", [(make_unet, lambda: (unet_inputs(), {})), (make_wan, lambda: ((), wan_inputs()))],
                         ids=["unet", "wan"])
def test_unet_and_wan_export_and_equal_eager(make, inputs):
    model = make()
    args, kwargs = inputs()
    unpatched = _sample(model, args, kwargs)
    tome.patch.diffusers(model, ratio=0.5)
    with torch.no_grad():
        got = torch.export.export(model, args, kwargs).module()(*args, **kwargs).sample
    assert torch.equal(got, _sample(model, args, kwargs))
    assert (got - unpatched).abs().max() > 1e-2


# --- Flux.2: the target grid is one block of img_ids (t, h, w, l), reference tokens around it ---------


def test_flux2_compiles_fullgraph_with_a_declared_grid_and_equals_eager():
    model = make_flux2()
    inputs = flux2_inputs(8, 4)
    unpatched = _sample(model, kwargs=inputs)
    tome.patch.diffusers(model, ratio=0.5)
    tome.patch.set_token_grid(model, 8, 4)  # before any eager call: the first call is traced
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _sample(compiled, kwargs=inputs)
        again = _sample(compiled, kwargs={**flux2_inputs(8, 4, seed=1), "timestep": torch.tensor([0.2, 0.2])})
    assert torch.equal(got, _sample(model, kwargs=inputs))
    assert not torch.equal(again, got)
    assert (got - unpatched).abs().max() > 1e-3  # it merged


@pytest.mark.parametrize("references_first", [False, True], ids=["edit", "references_first"])
def test_flux2_with_reference_tokens_remembers_the_layout_of_an_eager_call(references_first):
    # editing: the grid and the reference tokens around it, remembered per token count
    model = make_flux2()
    inputs = flux2_inputs(8, 4, references=((4, 4), (4, 8)), references_first=references_first)
    unpatched = _sample(model, kwargs=inputs)
    tome.patch.diffusers(model, ratio=0.5)
    eager = _sample(model, kwargs=inputs)  # reads the layout from img_ids, once
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(_sample(compiled, kwargs=inputs), eager)
        _sample(compiled, kwargs={**inputs, "timestep": torch.tensor([0.2, 0.2])})
    assert (eager - unpatched).abs().max() > 1e-3


def test_a_traced_flux2_call_whose_ids_are_another_layout_fails_instead_of_merging_wrong_neighbours():
    model = tome.patch.diffusers(make_flux2(), ratio=0.5)
    edit = flux2_inputs(8, 4, references=((4, 4),))  # [grid, references]
    _sample(model, kwargs=edit)  # remembers the layout of these 48 tokens
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    _sample(compiled, kwargs=edit)
    others = {  # the same 48 tokens in another layout
        "references first": flux2_inputs(8, 4, references=((4, 4),), references_first=True),
        "transposed": _transposed(edit),
        "references at t = 0": {**edit, "img_ids": torch.cat([edit["img_ids"][:, :32], edit["img_ids"][:, 32:] % 10], 1)},
    }
    for inputs in others.values():
        with pytest.raises(RuntimeError, match="img_ids are not the 8 x 4 token grid"):
            _sample(compiled, kwargs=inputs)
    # eager reads the values (a host sync): the grid after the references merges
    assert torch.equal(_sample(model, kwargs=others["references first"]),
                       _sample(compiled, kwargs=others["references first"]))


def test_a_traced_flux2_call_without_a_known_grid_is_refused():
    model = tome.patch.diffusers(make_flux2(), ratio=0.5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"tome.patch.set_token_grid\(model, height, width\)"):
        _sample(compiled, kwargs=flux2_inputs(8, 4))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_flux2_exports_with_a_declared_grid(strict):
    model = make_flux2()
    inputs = flux2_inputs(8, 4)
    unpatched = _sample(model, kwargs=inputs)
    tome.patch.diffusers(model, ratio=0.5)
    tome.patch.set_token_grid(model, 8, 4)
    with torch.no_grad():
        program = torch.export.export(model, (), inputs, strict=strict)
        got = program.module()(**inputs).sample
    assert torch.equal(got, _sample(model, kwargs=inputs))
    assert (got - unpatched).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="img_ids are not the 8 x 4 token grid"):
        program.module()(**_transposed(inputs))


def test_flux_compiled_without_fullgraph_reads_the_grid_in_an_eager_frame():
    model = tome.patch.diffusers(make_flux(), ratio=0.5)
    args, kwargs = flux_inputs()
    got = _sample(torch.compile(model, backend="eager"), args, kwargs)  # first call: no grid known yet
    assert model._tome_packed_grids == {24: (1, 6, 4)}
    assert torch.equal(got, _sample(model, args, kwargs))


def test_wan_compiles_fullgraph_and_equals_eager():
    # Wan's blocks take no attention kwargs: the state travels in a context variable, which
    # dynamo cannot set; while traced it rides on the denoiser's owner object instead.
    model = make_wan()
    inputs = wan_inputs()
    unpatched = _sample(model, kwargs=inputs)
    tome.patch.diffusers(model, ratio=0.5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _sample(compiled, kwargs=inputs)
        _sample(compiled, kwargs={**inputs, "timestep": torch.tensor([300, 300])})
    assert torch.equal(got, _sample(model, kwargs=inputs))
    assert (got - unpatched).abs().max() > 1e-2
    assert model._tome_owner.traced_step is None  # nothing left behind


def test_unet_compiles_fullgraph_and_equals_eager():
    model = make_unet()
    inputs = unet_inputs()
    unpatched = _sample(model, inputs)
    tome.patch.diffusers(model, ratio=0.5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    got = _sample(compiled, inputs)
    assert torch.equal(got, _sample(model, inputs))
    assert (got - unpatched).abs().max() > 1e-2


# --- regional compilation -----------------------------------------------------------------------


def test_regional_compilation_of_a_unet_shares_one_graph_per_level():
    # Each block's key used to reach the merge as a Python int, which dynamo specialises on:
    # one graph per block, past the recompile limit on SD-sized UNets. As a tensor, all blocks
    # of a level share one graph; levels differ in shape (16x16, 8x8, 4x4 tokens here).
    model = make_unet(levels=("CrossAttnDownBlock2D",) * 3)
    inputs = unet_inputs()
    unpatched = _sample(model, inputs)
    tome.patch.diffusers(model, ratio=0.5, max_downsample=2)  # two merging levels
    eager = _sample(model, inputs)
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True), _no_warnings():
        got = _sample(model, inputs)
        again = _sample(model, (inputs[0] + 1, torch.tensor(300), inputs[2]))
    assert counters["stats"]["unique_graphs"] == 3
    assert torch.equal(got, eager)
    assert (got - unpatched).abs().max() > 1e-2
    assert not torch.equal(again, got)


@pytest.mark.parametrize("make, inputs", [(make_wan, lambda: ((), wan_inputs())), (make_flux, flux_inputs),
                                          (make_flux2, lambda: ((), flux2_inputs(8, 4, references=((4, 4),))))],
                         ids=["wan", "flux", "flux2"])
def test_regional_compilation_of_dits_merges_as_eager(make, inputs):
    model = make()
    args, kwargs = inputs()
    unpatched = _sample(model, args, kwargs)
    tome.patch.diffusers(model, ratio=0.5)
    eager = _sample(model, args, kwargs)
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True), _no_warnings():
        got = _sample(model, args, kwargs)
        _sample(model, args, kwargs)
    assert torch.equal(got, eager)
    assert (got - unpatched).abs().max() > (1e-3 if make is make_flux2 else 1e-2)  # the tiny Flux.2 moves ~0.009


# --- the newer rows ------------------------------------------------------------------------------
# What diffusers itself cannot capture, unpatched, at these versions: HunyuanVideo 1.5 branches on
# the value of its image embeddings (`if torch.all(image_embeds == 0)`, a graph break, and a
# data-dependent guard that torch.export refuses); CogVideoX with its sin-cos position table
# recomputes the table for a frame count other than its config's, which torch.export refuses
# ("We found a fake tensor in the exported program constant's list"): its row here runs at the
# config's frame count, and the limit is checked at another.
NO_FULLGRAPH = {"hunyuan-video-1.5"}
NO_EXPORT = {"hunyuan-video-1.5"}


def _merged_differs(got, unpatched):
    assert ((got - unpatched).norm() / unpatched.norm()).item() > 1e-3  # it merged


@pytest.mark.parametrize("row", list(NEWER_ROWS))
def test_newer_rows_compile_fullgraph_without_recompiling_and_equal_eager(row):
    model, inputs = newer_row(row)
    unpatched = sample(model(**inputs))
    tome.patch.diffusers(model, ratio=0.5)
    compiled = torch.compile(model, backend="eager", fullgraph=row not in NO_FULLGRAPH)
    with torch.no_grad(), _no_warnings(), torch._dynamo.config.patch(error_on_recompile=True):
        got = sample(compiled(**inputs))
        step = sample(compiled(**later(inputs)))  # new latents and timestep: the same graph
        assert torch.equal(got, sample(model(**inputs)))
        assert torch.equal(step, sample(model(**later(inputs))))
    _merged_differs(got, unpatched)


@pytest.mark.parametrize("row", [row for row in NEWER_ROWS if row not in NO_EXPORT])
def test_newer_rows_export_and_equal_eager(row):
    model, inputs = newer_row(row)
    unpatched = sample(model(**inputs))
    tome.patch.diffusers(model, ratio=0.5)
    with torch.no_grad():
        program = torch.export.export(model, (), inputs)
        got = sample(program.module()(**inputs))
        assert torch.equal(got, sample(model(**inputs)))
        assert torch.equal(sample(program.module()(**later(inputs))), sample(model(**later(inputs))))
    _merged_differs(got, unpatched)


@pytest.mark.parametrize("row", sorted(NO_FULLGRAPH | NO_EXPORT | {"cogvideox"}))
def test_what_the_newer_rows_cannot_capture_fails_unpatched_too(row):
    """The limits above are diffusers' own: the unpatched model fails the same way (when a
    diffusers release lifts one, this fails, and the row joins the tests above)."""
    model, inputs = newer_row(row)
    if row == "cogvideox":
        inputs = cogvideox_inputs(frames=4)
    with torch.no_grad():
        if row in NO_FULLGRAPH:
            with pytest.raises(torch._dynamo.exc.Unsupported, match="Data-dependent branching"):
                torch.compile(model, backend="eager", fullgraph=True)(**inputs)
        with pytest.raises(Exception, match="fake tensor in the exported program|data-dependent"):
            torch.export.export(model, (), inputs)


@pytest.mark.parametrize("row", list(NEWER_ROWS))
def test_regional_compilation_of_the_newer_rows_makes_the_unpatched_graphs(row):
    """diffusers' compile_repeated_blocks, where the model lists repeated blocks: as many graphs
    as the unpatched model (one per block class and sequence shape, not one per block), no
    recompile on the next step, equal to eager; where it lists none, diffusers refuses it."""
    graphs = []
    for ratio in (None, 0.5):
        torch._dynamo.reset()
        counters.clear()
        model, inputs = newer_row(row)
        if not model._repeated_blocks:  # "not offered" in the docs: diffusers refuses, patched or not
            tome.patch.diffusers(model, ratio=0.5)
            with pytest.raises(ValueError, match="_repeated_blocks"):
                model.compile_repeated_blocks(backend="eager", fullgraph=True)
            return
        if ratio is not None:
            unpatched = sample(model(**inputs))
            tome.patch.diffusers(model, ratio=ratio)
            eager = sample(model(**inputs))
        model.compile_repeated_blocks(backend="eager", fullgraph=True)
        with torch.no_grad(), _no_warnings():
            got = sample(model(**inputs))
            graphs.append(counters["stats"]["unique_graphs"])
            with torch._dynamo.config.patch(error_on_recompile=True):
                sample(model(**later(inputs)))
    assert graphs[1] == graphs[0], graphs
    assert torch.equal(got, eager)
    _merged_differs(got, unpatched)
