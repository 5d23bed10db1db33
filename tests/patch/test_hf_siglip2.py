"""Hugging Face SigLIP 2 (NaFlex inputs: patchified ``pixel_values``, ``pixel_attention_mask``,
``spatial_shapes``): exactness at r=0, padded batches that merge per sample (each sample
as if run alone), the dual-tower model, lifecycle and citizenship."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from transformers import Siglip2Config, Siglip2Model, Siglip2TextConfig, Siglip2VisionConfig, Siglip2VisionModel

import tome

from conftest import trained_like_

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=4,
              num_patches=16, num_channels=3)
PATCH_FEATURES = 4 * 4 * 3
GRIDS = [(4, 4), (3, 3), (2, 5)]  # 16, 9 and 10 real patches, padded to 16


def make_vision(seed: int = 0, impl: str = "sdpa") -> Siglip2VisionModel:
    return trained_like_(Siglip2VisionModel(Siglip2VisionConfig(**VISION, attn_implementation=impl)), seed).eval()


def make_dual(seed: int = 0) -> Siglip2Model:
    text = Siglip2TextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=16)
    config = Siglip2Config(text_config=text.to_dict(), vision_config=Siglip2VisionConfig(**VISION).to_dict())
    return trained_like_(Siglip2Model(config), seed).eval()


def sample(height: int, width: int, seed: int):
    patches = torch.randn(height * width, PATCH_FEATURES, generator=torch.Generator().manual_seed(seed))
    return patches, (height, width)


def naflex(samples, length=None):
    """A padded batch as the SigLIP 2 processor lays it out: real patches first, then padding."""
    length = length or max(p.shape[0] for p, _ in samples)
    pixel_values = torch.zeros(len(samples), length, PATCH_FEATURES)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for index, (patches, _) in enumerate(samples):
        pixel_values[index, : patches.shape[0]] = patches
        mask[index, : patches.shape[0]] = 1
    shapes = torch.tensor([grid for _, grid in samples])
    return dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)


SAMPLES = [sample(h, w, i) for i, (h, w) in enumerate(GRIDS)]


@torch.no_grad()
def test_r0_equals_unpatched_bit_for_bit_and_remove_patch_restores():
    model = make_vision()
    inputs = naflex(SAMPLES)
    expected = model(**inputs)
    tome.apply_patch(model)
    assert tome.patch.family_of(model) == "hf" and type(model).__name__ == "Siglip2VisionModel"
    got = model(**inputs)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=0, atol=0)
    model.r = 2
    merged = model(**inputs).pooler_output
    assert (merged - expected.pooler_output).abs().max() > 1e-2
    tome.remove_patch(model)
    assert not any(tome.patch.is_patched(m) for m in model.modules())
    torch.testing.assert_close(model(**inputs).pooler_output, expected.pooler_output, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", [2, [3, 1, 2], (2, -1.0)])
@pytest.mark.parametrize("prop_attn", [True, False])
@torch.no_grad()
def test_each_sample_of_a_padded_batch_merges_as_if_alone(schedule, prop_attn):
    model = tome.patch.hf(make_vision(), prop_attn=prop_attn, trace_source=True)
    model.r = schedule
    out = model(**naflex(SAMPLES))
    size = model._tome_info["size"]
    # Sizes add up to each sample's real patches: padding never counts.
    torch.testing.assert_close(size.sum(dim=(1, 2)), torch.tensor([16.0, 9.0, 10.0]))
    for index, one in enumerate(SAMPLES):
        alone = model(**naflex([one]))
        torch.testing.assert_close(out.pooler_output[index], alone.pooler_output[0], rtol=0, atol=2e-5)
        # The real tokens come first, in the order they have alone.
        real = alone.last_hidden_state.shape[1]
        torch.testing.assert_close(out.last_hidden_state[index, :real], alone.last_hidden_state[0], rtol=0, atol=2e-5)
        assert torch.all(size[index, real:] == 0)


METHODS = {
    "tome": "tome",
    "pitome": "pitome",
    "tofu": tome.MergeMethod("tofu", prune_layers=2),  # pruning in layers 0-1, MLERP in layer 2
    "keep": tome.MergeMethod("ablation", combine="keep"),
    "greedy": tome.MergeMethod("ablation", match="greedy"),
    "metric_x": tome.MergeMethod("ablation", metric="x"),
}


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_every_method_merges_each_padded_sample_as_if_alone(method):
    # SigLIP 2 always takes a pixel_attention_mask, so every call runs the padded path; the
    # method must run there (not fall back to ToMe) and merge each image as it merges alone.
    model = tome.apply_patch(make_vision(), r=[3, 1, 2], method=METHODS[method])
    inputs = naflex(SAMPLES)
    out = model(**inputs)
    torch.testing.assert_close(model._tome_info["size"].sum(dim=(1, 2)), torch.tensor([16.0, 9.0, 10.0]))
    for index, one in enumerate(SAMPLES):
        alone = model(**naflex([one]))
        torch.testing.assert_close(out.pooler_output[index], alone.pooler_output[0], rtol=0, atol=2e-5)
        real = alone.last_hidden_state.shape[1]
        torch.testing.assert_close(out.last_hidden_state[index, :real], alone.last_hidden_state[0], rtol=0, atol=2e-5)
    model.r = 0
    unmerged = model(**inputs).pooler_output
    assert (out.pooler_output - unmerged).abs().amax(dim=1).min() > 1e-2  # every image merged
    if method != "tome":
        model.r, model.tome_method = [3, 1, 2], "tome"
        assert (out.pooler_output - model(**inputs).pooler_output).abs().max() > 1e-2  # not ToMe in disguise


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["tome", "pitome", "tofu"])
@torch.no_grad()
def test_an_image_of_padding_only_stays_finite(impl, method):
    model = tome.apply_patch(make_vision(impl=impl), r=[3, 1, 2], method=METHODS[method])
    inputs = naflex(SAMPLES)
    inputs["pixel_attention_mask"][1] = 0  # image 1: padding only, not one key to attend to
    out = model(**inputs)
    assert torch.isfinite(out.pooler_output).all() and torch.isfinite(out.last_hidden_state).all()
    assert torch.all(model._tome_info["size"][1] == 0)
    torch.testing.assert_close(out.pooler_output[0], model(**naflex(SAMPLES[:1])).pooler_output[0], rtol=0, atol=2e-5)


@torch.no_grad()
def test_positional_arguments_and_what_padding_holds():
    model = tome.apply_patch(make_vision(), r=3)
    inputs = naflex(SAMPLES)
    expected = model(**inputs).pooler_output
    positional = model(inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
    torch.testing.assert_close(positional.pooler_output, expected, rtol=0, atol=0)
    padding = inputs["pixel_attention_mask"][..., None] == 0
    scrambled = dict(inputs, pixel_values=torch.where(padding, 10 * torch.randn_like(inputs["pixel_values"]),
                                                      inputs["pixel_values"]))
    torch.testing.assert_close(model(**scrambled).pooler_output, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_dual_tower_model_merges_its_vision_tower_per_sample():
    model = make_dual()
    inputs = naflex(SAMPLES)
    text = dict(input_ids=torch.tensor([[5, 6, 7, 1], [8, 9, 1, 1], [4, 4, 4, 4]]),
                attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))
    expected = model(**inputs, **text)
    tome.apply_patch(model)
    torch.testing.assert_close(model(**inputs, **text).logits_per_image, expected.logits_per_image, rtol=0, atol=0)
    model.r = 2
    out = model(**inputs, **text)
    torch.testing.assert_close(out.text_embeds, expected.text_embeds, rtol=0, atol=1e-6)  # text untouched
    assert (out.image_embeds - expected.image_embeds).abs().max() > 1e-3
    for index, one in enumerate(SAMPLES):
        alone = model.get_image_features(**naflex([one])).pooler_output[0]
        torch.testing.assert_close(out.vision_model_output.pooler_output[index], alone, rtol=0, atol=2e-5)


@torch.no_grad()
def test_hooks_and_hidden_states():
    model = make_vision()
    counts = []
    for layer in model.encoder.layers:
        layer.register_forward_hook(lambda m, a, out: counts.append(out.shape[1]))
    tome.apply_patch(model, r=2)
    out = model(**naflex(SAMPLES), output_hidden_states=True)
    assert counts == [14, 12, 10]
    assert [h.shape[1] for h in out.hidden_states] == [16, 14, 12, 10]


@torch.no_grad()
def test_pickling_round_trips():
    model = tome.apply_patch(make_vision(), r=2)
    inputs = naflex(SAMPLES)
    expected = model(**inputs).pooler_output
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for restored in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert restored.r == 2
        torch.testing.assert_close(restored(**inputs).pooler_output, expected, rtol=0, atol=1e-6)


def test_padding_masks_of_other_shapes_are_refused():
    model = tome.apply_patch(make_vision(), r=2)
    inputs = naflex(SAMPLES)
    with pytest.raises(ValueError, match="attention_mask"):
        model(**dict(inputs, pixel_attention_mask=inputs["pixel_attention_mask"][:, None, :]))
