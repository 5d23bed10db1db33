"""One settings API for every family: ``tome.apply_patch`` takes every option of the
detected family, every setting is a property of the patched model, a re-patch changes
only what it is given, ``tome.merging`` restores what it changed, ``tome.last_forward``
reports the last forward, and the registry (``tome.list_families``,
``tome.patch.FAMILIES``) is live. test_conformance.py runs the generic checks on every
family; these are the cases the old API got wrong."""

from __future__ import annotations

import pytest
import torch

import tome
from tome.patch import FamilySpec, ToMeSettings, default_prop_attn, register
from tome.patch._lifecycle import _INSTANCE_ATTRS, _REGISTRY

from registry_cases import build
from test_timm import images, make


def _example(family: str, name: str):
    return next(e for e in tome.patch.family_spec(family).examples() if e.name == name)


def _eva():
    return build(_example("eva", "dinov3"))


def _unet():
    return build(_example("diffusers", "unet"))


def test_apply_patch_takes_the_options_of_the_family():
    model = tome.apply_patch(_eva(), r=2, rope_position="destination", rope_metric="plain")
    assert (model.rope_position, model.rope_metric, model.r) == ("destination", "plain", 2)
    assert not type(model.blocks[0].attn)._tome_rotated_metric  # the plain-keys attention
    unet = tome.apply_patch(_unet(), ratio=0.3, mode="kv", max_downsample=2, seed=3, use_rand=False)
    assert (unet.ratio, unet.mode, unet.max_downsample, unet.seed, unet.use_rand) == (0.3, "kv", 2, 3, False)


def test_an_option_the_family_does_not_take_is_refused_naming_the_valid_ones():
    model = make("token")
    with pytest.raises(ValueError, match="rope_position; its options are r, method, trace_source, prop_attn"):
        tome.apply_patch(model, rope_position="mean")
    with pytest.raises(ValueError, match=r"trace_source=1 must be True or False"):
        tome.apply_patch(model, trace_source=1)
    with pytest.raises(ValueError, match=r"rope_metric='keys' is not one of \('rotated', 'plain'\)"):
        tome.apply_patch(_eva(), rope_metric="keys")
    with pytest.raises(ValueError, match="r; its options are ratio"):
        tome.apply_patch(_unet(), r=8)
    assert not tome.patch.is_patched(model)


def test_a_repatch_keeps_every_setting_it_is_not_given():
    model = tome.apply_patch(make("token"), r=4, method="pitome", prop_attn=False, trace_source=True)
    for repatch in (lambda: tome.apply_patch(model), lambda: tome.patch.timm(model),
                    lambda: tome.apply_patch(model, family="timm")):
        repatch()
        assert (model.r, model.tome_method.name, model.prop_attn, model.trace_source) == (4, "pitome", False, True)
    tome.apply_patch(model, trace_source=False)
    assert (model.r, model.tome_method.name, model.prop_attn, model.trace_source) == (4, "pitome", False, False)
    assert not model.blocks[0]._tome_prop_attn


@torch.no_grad()
def test_repatching_to_draw_a_picture_leaves_the_outputs_alone():
    model = tome.apply_patch(make("token"), r=3, prop_attn=False)
    x = images()
    before = model(x)
    tome.apply_patch(model, trace_source=True)  # what a visualisation does
    assert torch.equal(model(x), before)
    assert tome.last_forward(model).source.shape == (2, 17 - 9, 17)


def test_a_diffusion_repatch_keeps_the_options_it_is_not_given():
    unet = tome.patch.diffusers(_unet(), ratio=0.5, mode="kv", seed=3, use_rand=False, max_downsample=2)
    tome.patch.diffusers(unet, ratio=0.3)
    assert (unet.ratio, unet.mode, unet.seed, unet.use_rand, unet.max_downsample) == (0.3, "kv", 3, False, 2)
    tome.apply_patch(unet, ratio=0.4)
    assert (unet.ratio, unet.mode, unet.seed, unet.use_rand, unet.max_downsample) == (0.4, "kv", 3, False, 2)


@torch.no_grad()
def test_every_setting_is_a_property_of_the_model():
    model = tome.apply_patch(make("token"), r=3)
    x = images()
    with_prop_attn = model(x)
    model.prop_attn = False
    assert model._tome_info["prop_attn"] is False and not any(b._tome_prop_attn for b in model.blocks)
    assert not torch.allclose(model(x), with_prop_attn)
    model.prop_attn = None  # the default rule again
    assert model.prop_attn is True and torch.equal(model(x), with_prop_attn)
    model.trace_source = True
    model(x)
    assert tome.last_forward(model).source is not None and model.r == 3
    eva = tome.apply_patch(_eva(), r=2)
    eva.rope_metric = "plain"
    assert eva._tome_info["rope_metric"] == "plain" and not type(eva.blocks[0].attn)._tome_rotated_metric
    with pytest.raises(ValueError, match="rope_position='middle'"):
        eva.rope_position = "middle"
    assert eva.rope_position == "mean"


@torch.no_grad()
def test_merging_restores_every_setting_it_changed_also_on_error():
    model = tome.apply_patch(make("token"), r=2, method="tofu")
    x = images()
    expected = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with tome.merging(model, r=5, prop_attn=False, trace_source=True, method="pitome"):
            assert (model.r, model.prop_attn, model.trace_source, model.tome_method.name) == (5, False, True, "pitome")
            model(x)
            raise RuntimeError("boom")
    assert (model.r, model.prop_attn, model.trace_source, model.tome_method.name) == (2, True, False, "tofu")
    assert torch.equal(model(x), expected)
    with pytest.raises(ValueError, match="rope_position"):  # refused before anything changes
        with tome.merging(model, r=7, rope_position="mean"):
            pass
    assert model.r == 2


def test_merging_takes_a_diffusers_model():
    unet = tome.apply_patch(_unet(), ratio=0.5)
    with tome.merging(unet, ratio=0.2, use_rand=False) as same:
        assert same is unet and (unet.ratio, unet.use_rand) == (0.2, False)
    assert (unet.ratio, unet.use_rand) == (0.5, True)


@torch.no_grad()
def test_last_forward_reports_sizes_sources_and_the_schedule_as_it_ran():
    model = tome.apply_patch(make("token"), r=5, trace_source=True)
    assert tome.last_forward(model) is None
    model(images())
    report = tome.last_forward(model)
    assert report.r == model._tome_info["r"] == [5, 5, 3]  # the last layer caps r at 3
    assert report.tokens == 17 - 13 and torch.equal(report.size, model._tome_info["size"])
    assert torch.equal(report.source, model._tome_info["source"]) and report.size.sum() == 2 * 17
    with pytest.raises(TypeError, match="not patched"):
        tome.last_forward(make("token"))
    with pytest.raises(TypeError, match="unmerges inside its blocks"):
        tome.last_forward(tome.apply_patch(_unet()))


def test_the_family_list_is_live():
    assert tome.list_families() == list(tome.patch.FAMILIES) == [s.name for s in tome.patch.registered()]
    register(FamilySpec(name="toy", detector=lambda model: False, patch=lambda model, settings: model, priority=999))
    try:
        assert tome.list_families()[-1] == "toy" and "toy" in tome.patch.FAMILIES
        assert tome.patch.FAMILIES["toy"][0](None) is False
    finally:
        del _REGISTRY["toy"]
    assert "toy" not in tome.patch.FAMILIES


def test_proportional_attention_has_one_default_rule():
    # On, except for MAE weights: as patched by the mae family or only recognised by it.
    assert [spec.name for spec in tome.patch.registered() if not spec.prop_attn_default] == ["mae"]
    assert tome.apply_patch(make("token")).prop_attn is True
    mae_weights = build(_example("mae", "timm_avg"))
    assert default_prop_attn(mae_weights, "timm") == (False, "off by default for MAE weights")
    patched = tome.patch.timm(mae_weights)
    assert patched.prop_attn is False and "prop_attn=False (off by default for MAE weights)" in repr(patched)
    assert tome.patch.mae(make("token")).prop_attn is False
    assert tome.apply_patch(_eva()).prop_attn is True


@torch.no_grad()
def test_a_patch_function_registered_with_the_decorator_still_works():
    from tome.patch._lifecycle import original_class, patch_model
    from tome.patch._timm import _BLOCK_MIXINS, ToMeTimmAttention, ToMeTimmVisionTransformer

    @tome.patch.register_family("legacy", lambda model: False, priority=999)
    def legacy(model, trace_source=False, prop_attn=True):
        return patch_model(model, ToMeTimmVisionTransformer, list(model.blocks),
                           lambda block: _BLOCK_MIXINS[original_class(block).__name__],
                           attention=lambda block: (block.attn, ToMeTimmAttention), protected_tokens=1,
                           trace_source=trace_source, prop_attn=prop_attn, class_token=True)

    try:
        model = make("token")
        reference = tome.apply_patch(make("token"), r=3, prop_attn=False)
        tome.apply_patch(model, family="legacy", r=3, prop_attn=False)
        assert torch.equal(model(images()), reference(images()))
        tome.apply_patch(model, family="legacy", trace_source=True)
        assert (model.r, model.prop_attn, model.trace_source) == (3, False, True)
    finally:
        del _REGISTRY["legacy"]


def test_the_core_names_no_family():
    # Instance attributes of a family are declared by the family (FamilySpec.instance_attrs).
    family_attrs = {attr for spec in tome.patch.registered() for attr in spec.instance_attrs}
    assert family_attrs and not family_attrs & set(_INSTANCE_ATTRS)
    assert issubclass(tome.patch.family_spec("eva").settings, ToMeSettings)


def test_a_family_declaring_attention_features_is_named_when_a_method_needs_them():
    # The core names no family: the list in the error comes from the registered specs.
    from tome.patch import _lifecycle

    assert "newfamily" not in _lifecycle._families_with_features()
    spec = _lifecycle.FamilySpec(name="newfamily", detector=lambda model: False, patch=lambda model, settings: model,
                                 attention_features="its own attention")
    _lifecycle.register(spec)
    try:
        assert "newfamily (its own attention)" in _lifecycle._families_with_features()
    finally:
        del _lifecycle._REGISTRY["newfamily"]
    assert "newfamily" not in _lifecycle._families_with_features()
