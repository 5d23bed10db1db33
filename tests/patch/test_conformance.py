"""The conformance suite: what every family must do, run on each tiny model every
registered family declares (``FamilySpec.examples``, see docs/families.md).

Nothing merged is the unpatched model bit for bit; merging changes the outputs;
hooks on every swapped module fire as unpatched; pickle, deepcopy and
``torch.save`` round trips; ``remove_patch`` is exact; ``state_dict`` keys are
unchanged; every setting can be read and set on the model, a re-patch changes
only what it is given, ``tome.merging`` restores it, a bad setting is refused by
name; ``torch.compile`` follows the merge. Export is in tests/test_export.py and
tracing in test_tracing.py, from the same registry. A family's own test file
holds only what is specific to it.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
from typing import Any, Dict, List

import pytest
import torch
from torch import nn

import tome
from tome.patch import FamilySpec, ToMeSettings

from registry_cases import build, call, cases, output, patch, run

CASES = cases()


def _property(name: str) -> str:
    """The model attribute of a setting (``method`` is ``model.tome_method``)."""
    return "tome_method" if name == "method" else name


def _other_value(option: dataclasses.Field, current: Any) -> Any:
    """A valid value of ``option`` other than ``current`` (None if the field declares none)."""
    if option.type in (bool, "bool", Any) or isinstance(current, bool):
        return not current
    if "choices" in option.metadata:
        return next(choice for choice in option.metadata["choices"] if choice != current)
    return option.metadata.get("example")


def _swapped(model: nn.Module) -> List[str]:
    return [name for name, module in model.named_modules() if name and tome.patch.is_patched(module)]


def _hook_counts(model: nn.Module, names: List[str], example, inputs: Any) -> Dict[str, int]:
    counts = {name: 0 for name in names}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def count(*_: Any, name: str = name) -> None:
            counts[name] += 1

        handles += [module.register_forward_hook(count), module.register_forward_pre_hook(count)]
    try:
        with torch.no_grad():
            call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize("spec, example", CASES)
def test_nothing_merged_is_the_unpatched_model(spec: FamilySpec, example):
    model = build(example)
    expected = run(example, model)
    patch(spec, example, model, merging=False)
    assert tome.patch.is_patched(model)
    torch.testing.assert_close(run(example, model), expected, atol=example.idle_atol, rtol=0)


@pytest.mark.parametrize("spec, example", CASES)
def test_merging_changes_the_outputs(spec: FamilySpec, example):
    model = build(example)
    unmerged = run(example, model)
    patch(spec, example, model)
    merged = run(example, model)
    assert merged.shape == unmerged.shape and torch.isfinite(merged).all()
    assert (merged - unmerged).abs().max() > 1e-3
    if issubclass(spec.settings, ToMeSettings):  # blocks that merge for good report what they did
        report = tome.last_forward(model)
        assert sum(report.r) > 0 and report.size.shape[1] == report.tokens


@pytest.mark.parametrize("spec, example", CASES)
def test_hooks_on_every_swapped_module_fire_as_unpatched(spec: FamilySpec, example):
    model = build(example)
    patched = patch(spec, example, copy.deepcopy(model))
    names = _swapped(patched)
    assert names, "a family swaps at least the blocks' classes"
    inputs = example.inputs(2, 1)
    expected = _hook_counts(model, names, example, inputs)
    assert all(count > 0 for count in expected.values()), expected
    assert _hook_counts(patched, names, example, inputs) == expected
    patch(spec, example, patched, merging=False)
    assert _hook_counts(patched, names, example, inputs) == expected


@pytest.mark.parametrize("spec, example", CASES)
def test_pickle_deepcopy_and_torch_save_round_trip(spec: FamilySpec, example):
    model = patch(spec, example, build(example))
    expected = run(example, model)
    settings = spec.current(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
              torch.load(buffer, weights_only=False)]  # whole-model pickles are for trusted files only
    for restored in copies:
        assert type(restored).__name__ == type(model).__name__ and spec.current(restored) == settings
        torch.testing.assert_close(run(example, restored), expected, atol=1e-6, rtol=0)
        tome.remove_patch(restored)
        assert not any(tome.patch.is_patched(m) for m in restored.modules())


@pytest.mark.parametrize("spec, example", CASES)
def test_remove_patch_restores_the_model_exactly(spec: FamilySpec, example):
    model = build(example)
    reference = copy.deepcopy(model)
    classes = {name: type(module) for name, module in model.named_modules()}
    patch(spec, example, model)
    run(example, model)
    tome.remove_patch(model)
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert not [(n, k) for n, m in model.named_modules() for k in vars(m) if k.startswith("_tome")]
    torch.testing.assert_close(run(example, model), run(example, reference), atol=0, rtol=0)


@pytest.mark.parametrize("spec, example", CASES)
def test_state_dict_is_unchanged(spec: FamilySpec, example):
    model = build(example)
    before = model.state_dict()
    after = patch(spec, example, model).state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    build(example, seed=1).load_state_dict(after)  # loads into an unpatched model


@pytest.mark.parametrize("spec, example", CASES)
def test_every_setting_is_a_property_and_a_repatch_changes_only_what_it_is_given(spec: FamilySpec, example):
    model = patch(spec, example, build(example))
    for option in dataclasses.fields(spec.settings):
        before = spec.current(model)
        old = getattr(before, option.name)
        assert getattr(model, _property(option.name)) == old
        new = _other_value(option, old)
        assert new is not None, f"{spec.settings.__name__}.{option.name}: declare metadata 'example' or 'choices'"
        for how in ("apply_patch", "property"):
            try:
                if how == "apply_patch":
                    tome.apply_patch(model, **{option.name: new})
                else:
                    setattr(model, _property(option.name), new)
            except ValueError:  # a value this model refuses (e.g. mode="tokens" on joint attention)
                assert spec.current(model) == before, "a refused setting changed the model"
                continue
            after = spec.current(model)
            assert getattr(after, option.name) != old, (how, option.name)
            assert dataclasses.replace(after, **{option.name: old}) == before, (how, option.name)
            tome.apply_patch(model)  # nothing given: nothing changes
            assert spec.current(model) == after
            tome.apply_patch(model, **{option.name: old})
            assert spec.current(model) == before


@pytest.mark.parametrize("spec, example", CASES)
def test_merging_context_sets_and_restores_every_setting(spec: FamilySpec, example):
    model = patch(spec, example, build(example))
    before = spec.current(model)
    for option in dataclasses.fields(spec.settings):
        new = _other_value(option, getattr(before, option.name))
        try:
            with tome.merging(model, **{option.name: new}):
                assert getattr(spec.current(model), option.name) != getattr(before, option.name)
                raise KeyError("the block raised")
        except ValueError:
            pass  # refused: nothing changed (checked below)
        except KeyError:
            pass
        assert spec.current(model) == before, option.name


@pytest.mark.parametrize("spec, example", CASES)
def test_bad_settings_are_refused_by_name_and_change_nothing(spec: FamilySpec, example):
    model = build(example)
    names = [option.name for option in dataclasses.fields(spec.settings)]
    with pytest.raises(ValueError, match=r"bogus.*" + r".*".join(names)):
        tome.apply_patch(model, bogus=1)
    for name in names:
        with pytest.raises(ValueError, match=name):
            tome.apply_patch(model, **{name: object()})
    assert not any(tome.patch.is_patched(m) for m in model.modules())
    patch(spec, example, model)
    before = spec.current(model)
    with pytest.raises(ValueError, match="bogus"):
        with tome.merging(model, bogus=1):
            pass
    assert spec.current(model) == before


@pytest.mark.parametrize("spec, example", cases(first_only=True))
def test_torch_compile_follows_the_merge(spec: FamilySpec, example):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available")
    model = patch(spec, example, build(example))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=example.fullgraph)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            for seed in (1, 2):  # new values, same shapes: one graph
                inputs = example.inputs(2, seed)
                torch.testing.assert_close(output(example, call(compiled, inputs)),
                                           output(example, call(model, inputs)), atol=1e-5, rtol=0)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("spec, example", CASES)
def test_accelerate_cpu_offload_runs_a_patched_model(spec: FamilySpec, example):
    # accelerate moves each module's weights in and out with hooks around its forward.
    accelerate = pytest.importorskip("accelerate")
    unpatched = build(example)
    try:
        offloaded = run(example, accelerate.cpu_offload(copy.deepcopy(unpatched), execution_device="cpu"))
    except RuntimeError as error:  # e.g. nn.MultiheadAttention uses out_proj's weight without calling it
        pytest.xfail(f"the unpatched model does not run under cpu_offload either: {error}")
    if not torch.allclose(offloaded, run(example, unpatched), atol=1e-6, rtol=0):  # e.g. NaN from a buffer it moved
        pytest.xfail("the unpatched model computes something else under cpu_offload too")
    model = patch(spec, example, unpatched)
    expected = run(example, model)
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert next(offloaded.parameters()).device.type == "meta"
    torch.testing.assert_close(run(example, offloaded), expected, atol=1e-6, rtol=0)
