"""VisionZip and FastV wired into the VLM families: the attention they rank by is computed from
queries and keys while the model keeps its sdpa attention. The references here run the same
layers in eager attention and read the weights the eager kernel returns (in the tests only)."""

from __future__ import annotations

import copy
import dataclasses
import sys
from typing import Any, Dict, List, Tuple

import pytest
import torch
import vlm_cases
import vlm_family_cases
from test_vlm import GENERATE, inputs_of, model_of, reference
from vlm_cases import IMAGE, VIDEO
from vlm_eager import assert_scores_close, eager_calls, forbid_eager, last_token_row

import tome

pytest.importorskip("transformers")

VISIONZIP_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")


def _target(model: torch.nn.Module, family: str) -> torch.nn.Module:
    """The attention module VisionZip reads: the Qwen tower's last block, LLaVA's feature layer."""
    if family == "llava":
        return model.model.vision_tower.encoder.layers[model.config.vision_feature_layer].self_attn
    return model.model.visual.blocks[-1].attn


def _tower(model: torch.nn.Module, family: str) -> torch.nn.Module:
    return model.model.vision_tower if family == "llava" else model.model.visual


def _case(family: str, video: bool = False) -> Tuple[torch.nn.Module, Dict[str, torch.Tensor]]:
    """A fresh tiny model of ``family`` and its two-sample inputs."""
    model = model_of(family)
    return model, inputs_of(family, model, video=video)


def _eager_contexts(model: torch.nn.Module, family: str, inputs: Dict[str, torch.Tensor],
                    monkeypatch) -> Dict[int, List[Dict[str, Any]]]:
    """Per placeholder id, per item: the eager reference's ``attention`` (N,) and ``metric`` keys."""
    if family == "llava":
        out, seen = eager_calls(monkeypatch, _target(model, family), _tower(model, family).config,
                                lambda: model.model.vision_tower(inputs["pixel_values"], output_attentions=True))
        (_, keys), = seen
        weights = out.attentions[model.config.vision_feature_layer]  # (images, heads, 1 + P, 1 + P), (images, heads, 1 + P, d)
        received, metric = weights[:, :, 0, 1:].mean(1), keys.mean(1)[:, 1:]
        return {IMAGE: [{"attention": received[i], "metric": metric[i]} for i in range(received.shape[0])]}
    visual = model.model.visual
    contexts = {}
    for token, pixels, key in ((IMAGE, "pixel_values", "image_grid_thw"), (VIDEO, "pixel_values_videos", "video_grid_thw")):
        if pixels not in inputs:
            continue
        _, seen = eager_calls(monkeypatch, _target(model, family), visual.config,
                              lambda: visual(inputs[pixels], grid_thw=inputs[key]))
        # one (1, heads, n, n) weight matrix per span the block attends over: column means over queries and heads
        received = torch.cat([w[0].float().mean(dim=(0, 1)) for w, _ in seen])
        keys = torch.cat([k[0].float().mean(0) for _, k in seen])
        received, keys = received.reshape(-1, 4).sum(1), keys.reshape(-1, 4, keys.shape[-1]).mean(1)
        if hasattr(visual, "window_size"):
            window = sys.modules[type(visual).__module__].get_vision_window_index(
                inputs[key], spatial_merge_size=2, window_size=visual.window_size, patch_size=visual.patch_size)[0]
            order = torch.argsort(window)
            received, keys = received[order], keys[order]
        counts = (inputs[key].prod(-1) // 4).tolist()
        contexts[token] = [{"attention": a, "metric": m} for a, m in zip(received.split(counts), keys.split(counts))]
    return contexts


def _pairs(contexts: List[Dict[str, Any]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(c["attention"], c["metric"]) for c in contexts]


def _patched_scores(model: torch.nn.Module, family: str, inputs: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """The ``(attention, keys)`` per item the patched model's tower function computes."""
    from tome.patch._vlm import _ADAPTERS

    adapter = _ADAPTERS[family]
    call = dict(inputs, vision_feature_layer=None, vision_feature_select_strategy=None)
    with torch.no_grad():
        return {m.name: m.tower(model.model, call)[1] for m in adapter.modalities if call.get(m.pixels) is not None}


@pytest.mark.parametrize("family,video", [("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", True),
                                          ("llava", False)])
def test_tower_attention_from_queries_and_keys_equals_the_eager_weights(family, video, monkeypatch):
    model, inputs = _case(family, video)
    expected = _eager_contexts(model, family, inputs, monkeypatch)
    got = _patched_scores(model, family, inputs)
    assert set(got) == {"image", "video"} if video else {"image"}
    for token, name in ((IMAGE, "image"), (VIDEO, "video")):
        if token in expected:
            assert_scores_close(got[name], _pairs(expected[token]))


def test_llava_visionzip_reads_the_feature_layer_the_penultimate_as_llava_1_5(monkeypatch):
    model, inputs = _case("llava")
    model.config.vision_feature_layer = -2  # LLaVA-1.5's: the features come from the first of the two layers
    expected = _eager_contexts(model, "llava", inputs, monkeypatch)[IMAGE]
    assert_scores_close(_patched_scores(model, "llava", inputs)["image"], _pairs(expected))
    model.config.vision_feature_layer = 0  # the embeddings: no attention layer to read
    with pytest.raises(ValueError, match="vision_feature_layer=0"):
        _patched_scores(model, "llava", inputs)


def _run_without_eager(patched: torch.nn.Module, family: str, inputs: Dict[str, torch.Tensor], monkeypatch,
                       expected: List[Dict[str, Any]]) -> None:
    """The patched model, its eager kernels made to fail, equals each sample of the reference;
    its attention stays sdpa."""
    forbid_eager(monkeypatch, [type(_target(patched, family)).__module__,
                               type(patched.model.language_model).__module__])
    with torch.no_grad():
        logits = patched(**inputs).logits
    for row, sample in enumerate(expected):
        length = sample["logits"].shape[0]
        torch.testing.assert_close(logits[row, -length:], sample["logits"], rtol=1e-4, atol=1e-4)
    for config in (patched.config, patched.config.text_config, patched.config.vision_config):
        assert config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family,video", [("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", False),
                                          ("qwen3_vl_moe", True), ("llava", False)])
def test_visionzip_logits_equal_the_plain_reference_on_the_eager_attention(family, video, monkeypatch):
    model, inputs = _case(family, video)
    contexts = _eager_contexts(model, family, inputs, monkeypatch)
    expected = reference(model, family, inputs, "visionzip", 8, contexts=contexts)
    patched = tome.apply_patch(copy.deepcopy(model), visual_tokens=8, method="visionzip")
    _run_without_eager(patched, family, inputs, monkeypatch, expected)


@pytest.mark.parametrize("family", VISIONZIP_FAMILIES)
def test_visionzip_reducing_nothing_is_the_unpatched_model(family):
    model, inputs = _case(family)
    with torch.no_grad():
        plain = model(**inputs).logits
        patched = tome.apply_patch(copy.deepcopy(model), visual_tokens=None, method="visionzip")
        assert torch.equal(patched(**inputs).logits, plain)
        patched.visual_tokens = 1.0
        assert torch.equal(patched(**inputs).logits, plain)
        assert not any(item["reduced"] for item in patched._tome_info["items"])


def test_visionzip_refuses_precomputed_encoder_outputs_and_unwired_families_refuse_both(monkeypatch):
    model = tome.apply_patch(model_of("llava"), visual_tokens=8, method="visionzip")
    inputs = inputs_of("llava", model)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs.pop("pixel_values"), return_dict=True)
    with pytest.raises(ValueError, match="'visionzip' needs the vision tower's attention.*pass the pixels"):
        model(**inputs, mm_encoder_outputs={"image": features})
    # every family has both wired now; a family without them (an adapter with neither) refuses both
    from tome.patch import _vlm

    bare = _vlm._ADAPTERS["gemma3"]
    bare = dataclasses.replace(bare, fastv=False, modalities=tuple(dataclasses.replace(m, tower=None)
                                                                   for m in bare.modalities))
    monkeypatch.setitem(_vlm._ADAPTERS, "gemma3", bare)
    gemma = vlm_family_cases.gemma3().model
    for method in ("visionzip", "fastv"):
        with pytest.raises(ValueError, match=f"'{method}'.*not wired for the gemma3 family.*'pool'"):
            tome.apply_patch(gemma, visual_tokens=8, method=method)
    assert not any(tome.patch.is_patched(m) for m in gemma.modules())


# ----------------------------------------------------------------------------- FastV


def _row_contexts(model: torch.nn.Module, family: str, inputs: Dict[str, torch.Tensor],
                  row: torch.Tensor) -> Dict[int, List[Dict[str, Any]]]:
    """Per placeholder id, per item (in batch order): the row's entries at that item's tokens."""
    ids = inputs["input_ids"]
    contexts = {}
    for token, key in ((IMAGE, "image_grid_thw"), (VIDEO, "video_grid_thw")):
        where = (ids == token).nonzero()
        if where.numel() == 0:
            continue
        counts = [64] * (where.shape[0] // 64) if family == "llava" else (inputs[key].prod(-1) // 4).tolist()
        contexts[token] = [{"attention": row[cols[0, 0], cols[:, 1]]} for cols in where.split(counts)]
    return contexts


def _patched_row(model: torch.nn.Module, family: str, inputs: Dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    from tome.patch._vlm import _ADAPTERS, VisualTokenSettings, _fastv_row

    inner, adapter = model.model, _ADAPTERS[family]
    visual = [m for m in adapter.modalities if inputs.get(m.pixels) is not None]
    with torch.no_grad():
        outputs = {m.name: m.encode(inner, inputs) for m in visual}
        settings = VisualTokenSettings(method="fastv", fastv_layer=layer)
        return _fastv_row(inner, settings, dict(inputs), outputs, visual, inner.forward)


@pytest.mark.parametrize("family,layer", [("qwen2_5_vl", 1), ("qwen2_5_vl", 0), ("qwen3_vl", 1), ("qwen3_vl_moe", 1),
                                         ("llava", 1)])
def test_last_token_attention_from_queries_and_keys_equals_the_eager_weights(family, layer):
    model, inputs = _case(family)
    expected = last_token_row(model, inputs, layer)
    got = _patched_row(model, family, inputs, layer)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-6)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))


@pytest.mark.parametrize("family,video", [("qwen2_5_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", False),
                                          ("llava", False)])
def test_fastv_logits_equal_the_plain_reference_on_the_eager_attention(family, video, monkeypatch):
    model, inputs = _case(family, video)
    contexts = _row_contexts(model, family, inputs, last_token_row(model, inputs, 1))
    expected = reference(model, family, inputs, "fastv", 5, contexts=contexts)
    patched = tome.apply_patch(copy.deepcopy(model), visual_tokens=5, method="fastv", fastv_layer=1)
    _run_without_eager(patched, family, inputs, monkeypatch, expected)


@pytest.mark.parametrize("family", VISIONZIP_FAMILIES)
def test_fastv_layer_beyond_the_depth_is_refused_naming_the_range(family):
    model = model_of(family)
    with pytest.raises(ValueError, match=r"fastv_layer=2 is beyond .* 2 layers; expected 0 <= fastv_layer <= 1"):
        tome.apply_patch(model, visual_tokens=4, method="fastv")  # the default layer, 2
    tome.apply_patch(model, visual_tokens=4, method="fastv", fastv_layer=1)
    with pytest.raises(ValueError, match="fastv_layer=5"):
        model.fastv_layer = 5
    assert model.fastv_layer == 1


@pytest.mark.parametrize("family", VISIONZIP_FAMILIES)
def test_fastv_reducing_nothing_is_the_unpatched_model_and_generate_runs(family):
    model, inputs = _case(family)
    with torch.no_grad():
        plain = model(**inputs).logits
        patched = tome.apply_patch(copy.deepcopy(model), visual_tokens=None, method="fastv", fastv_layer=1)
        assert torch.equal(patched(**inputs).logits, plain)
        patched.visual_tokens = 4
        first = patched(**inputs).logits[:, -1].argmax(-1)
        generated = patched.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[:, inputs["input_ids"].shape[1]], first)


@pytest.mark.parametrize("family,method", [("qwen2_5_vl", "visionzip"), ("qwen2_5_vl", "fastv"),
                                           ("llava", "visionzip"), ("llava", "fastv")])
def test_batched_left_padded_generate_equals_each_sample_alone(family, method):
    """Each sample's attention (tower or last-token) and so its selection do not depend on the batch."""
    model = tome.apply_patch(model_of(family), visual_tokens=5, method=method, fastv_layer=1)
    inputs = inputs_of(family, model, video=family != "llava")
    scored = dict(GENERATE, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = model.generate(**inputs, **scored)
        for index, (images, videos) in enumerate((([0, 1], []), ([2], [0] if family != "llava" else []))):
            alone = vlm_cases.sample(inputs, index, images=images, videos=videos)
            single = model.generate(**alone, **scored)
            assert (batched.sequences[index, inputs["input_ids"].shape[1]:].tolist()
                    == single.sequences[0, alone["input_ids"].shape[1]:].tolist()), index
            for step_batched, step_single in zip(batched.scores, single.scores):
                torch.testing.assert_close(step_batched[index], step_single[0], atol=1e-4, rtol=1e-4)
