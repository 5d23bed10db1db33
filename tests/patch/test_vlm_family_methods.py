"""VisionZip and FastV on Gemma 3, SmolVLM / Idefics3, InternVL and LLaVA-OneVision.

The references read the weights transformers' eager kernels return (``output_attentions``)
and map them onto the tokens the language model reads with the model's own modules: Gemma 3's
average pool, the pixel shuffle of Idefics3 and InternVL, LLaVA-OneVision's
``get_image_features`` / ``get_video_features`` (whose projector is made to hand the scores on
as features). The patched models compute the same from captured queries and keys, with their
eager kernels made to fail, and equal the plain reference on the kept rows.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import pytest
import torch
import vlm_family_cases as cases
from vlm_eager import assert_scores_close, eager_calls, forbid_eager, last_token_row

import tome
from tome import visual_tokens as vt

pytest.importorskip("transformers")

Pairs = List[Tuple[torch.Tensor, torch.Tensor]]
FAMILIES = ("gemma3", "smolvlm", "idefics3", "internvl", "llava_onevision")


def _build(name: str, **kwargs) -> cases.FamilyCase:
    if name == "llava_onevision":
        kwargs.setdefault("video_frames", 2)
    return cases.FAMILIES[name](**kwargs)


TOWER_LAYER = {  # the attention module VisionZip reads: the layer whose output is the feature
    "gemma3": lambda inner: inner.vision_tower.encoder.layers[-1].self_attn,
    "smolvlm": lambda inner: inner.vision_model.encoder.layers[-1].self_attn,
    "idefics3": lambda inner: inner.vision_model.encoder.layers[-1].self_attn,
    "internvl": lambda inner: inner.vision_tower.encoder.layer[-1].attention,  # vision_feature_layer=-1
    "llava_onevision": lambda inner: inner.vision_tower.encoder.layers[-1].self_attn,  # -1, strategy "full"
}


def _mean_received(weights: torch.Tensor) -> torch.Tensor:
    """``(B, N)``: the attention each token receives, mean over queries and heads."""
    return weights.float().mean(dim=(1, 2))


# ----------------------------------------------------------------------------- eager references


def _gemma3(case: cases.FamilyCase, monkeypatch) -> Pairs:
    inner = case.model.model
    out, ((_, key),) = eager_calls(monkeypatch, TOWER_LAYER["gemma3"](inner), inner.vision_tower.config,
                                   lambda: inner.get_image_features(case.inputs["pixel_values"], output_attentions=True))
    received, keys = _mean_received(out.attentions[-1]), key.float().mean(1)
    projector = inner.multi_modal_projector
    side, kernel = projector.patches_per_image, projector.kernel_size
    received = projector.avg_pool(received.view(-1, 1, side, side)).flatten(1) * kernel ** 2  # the pooled cell's sum
    keys = projector.avg_pool(keys.transpose(1, 2).reshape(keys.shape[0], -1, side, side)).flatten(2).transpose(1, 2)
    return list(zip(received, keys))


def _idefics3(case: cases.FamilyCase, monkeypatch) -> Pairs:
    inner = case.model.model
    out, ((_, key),) = eager_calls(monkeypatch, TOWER_LAYER[case.name](inner), inner.vision_model.config, lambda: inner.get_image_features(
        case.inputs["pixel_values"], case.inputs["pixel_attention_mask"], output_attentions=True))
    received, keys = _mean_received(out.attentions[-1]), key.float().mean(1)
    connector = inner.connector
    scale = connector.scale_factor
    received = connector.pixel_shuffle(received[..., None], scale).sum(-1)
    keys = connector.pixel_shuffle(keys, scale)
    keys = keys.reshape(keys.shape[0], keys.shape[1], scale ** 2, -1).mean(2)
    return list(zip(received, keys))


def _internvl(case: cases.FamilyCase, monkeypatch) -> Pairs:
    inner = case.model.model
    out, ((_, key),) = eager_calls(monkeypatch, TOWER_LAYER["internvl"](inner), inner.vision_tower.config, lambda: inner.get_image_features(
        pixel_values=case.inputs["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default",
        output_attentions=True))
    received = out.attentions[-1][:, :, 0, 1:].float().mean(1)  # the class token's row, the class token dropped
    keys = key.float().mean(1)[:, 1:]
    tiles, side = received.shape[0], math.isqrt(received.shape[1])
    received = inner.pixel_shuffle(received.view(tiles, side, side, 1), scale_factor=0.5).reshape(tiles, -1, 4).sum(-1)
    keys = inner.pixel_shuffle(keys.reshape(tiles, side, side, -1), scale_factor=0.5).reshape(tiles, -1, 4,
                                                                                                keys.shape[-1])
    return list(zip(received, keys.mean(2)))


def _onevision(case: cases.FamilyCase, monkeypatch) -> Pairs:
    """The eager scores as extra feature channels through the model's own image and video paths
    (projector replaced by them, newline zero): the layout the model gives its features."""
    inner = case.model.model
    target = TOWER_LAYER["llava_onevision"](inner)
    hidden = inner.config.text_config.hidden_size
    inputs = case.inputs
    encoders = [lambda **kw: inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **kw),
                lambda **kw: inner.get_video_features(inputs["pixel_values_videos"], **kw)]
    items: Pairs = []
    for index, encode in enumerate(encoders):
        out, ((_, key),) = eager_calls(monkeypatch, target, inner.vision_tower.config,
                                       lambda: encode(output_attentions=True))
        channels = torch.cat([_mean_received(out.attentions[-1])[..., None], key.float().mean(1)], dim=-1)
        width = channels.shape[-1]
        newline = inner.image_newline.detach().clone()
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setattr(inner.multi_modal_projector, "forward",
                          lambda x: torch.nn.functional.pad(channels, (0, hidden - width)))
            inner.image_newline.zero_()
            try:
                laid_out = list(encode().pooler_output)
            finally:
                inner.image_newline.copy_(newline)
        for unit in laid_out:
            views = [unit] if index == 1 or unit.shape[0] == 65 else [unit[:64], unit[64:]]
            items += [(view[:, 0], view[:, 1:width]) for view in views]
    return items


REFERENCES = {"gemma3": _gemma3, "smolvlm": _idefics3, "idefics3": _idefics3, "internvl": _internvl,
              "llava_onevision": _onevision}


def _patched_scores(case: cases.FamilyCase) -> Pairs:
    """The ``(attention, keys)`` per item the patched family's tower functions compute."""
    from tome.patch._vlm import find_adapter

    adapter, inner = find_adapter(case.model)
    call = dict(case.inputs, vision_feature_layer=None, vision_feature_select_strategy=None)
    with torch.no_grad():
        return [pair for m in adapter.modalities if call.get(m.pixels) is not None for pair in m.tower(inner, call)[1]]


def _masked_idefics3() -> cases.FamilyCase:
    """SmolVLM with the right half of its first crop padding (``pixel_attention_mask`` 0 there):
    the tower masks those patches as keys."""
    case = _build("smolvlm")
    case.inputs["pixel_attention_mask"][0, 0, :, 16:] = False
    return case


@pytest.mark.parametrize("name", FAMILIES + ("smolvlm-masked",))
def test_tower_attention_from_queries_and_keys_equals_the_eager_weights(name, monkeypatch):
    case = _masked_idefics3() if name == "smolvlm-masked" else _build(name)
    expected = REFERENCES[case.name](case, monkeypatch)
    assert len(expected) == len(list(cases.core_items(case)))
    assert_scores_close(_patched_scores(case), expected)
    if name == "smolvlm-masked":  # the padded half receives no attention: its 8 shuffled tokens score 0
        assert torch.equal(expected[0][0].view(4, 4)[:, 2:], torch.zeros(4, 2))


# ----------------------------------------------------------------------------- the plain reference


def _reference_sources(case: cases.FamilyCase, method: str, budget: int, contexts: List[Dict[str, torch.Tensor]]
                       ) -> List[torch.Tensor]:
    """Per core item, the ``(passed, tokens)`` source of ``method`` on its content tokens, ranked
    by the given ``contexts`` (its separators passed on as they are)."""
    embeds = cases.full_embeds(case)
    sources = []
    for (sample, positions, grid, separators), context in zip(cases.core_items(case), contexts):
        count = positions.shape[0]
        free = torch.tensor([i for i in range(count) if i not in separators])
        reduction = vt.reduce_tokens(method, embeds[sample, positions][free], budget,
                                     vt.VisualContext(grid=grid, **{k: v[free] for k, v in context.items()}))
        source = torch.zeros(reduction.source.shape[0] + len(separators), count, dtype=reduction.source.dtype)
        source[: reduction.source.shape[0], free] = reduction.source
        source[torch.arange(len(separators)) + reduction.source.shape[0], separators] = 1
        sources.append(source)
    return sources


def _row_contexts(case: cases.FamilyCase, row: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    return [{"attention": row[sample, positions]} for sample, positions, _, _ in cases.core_items(case)]


def _language_module(case: cases.FamilyCase) -> str:
    from tome.patch._vlm_fastv import language_layers

    return type(language_layers(case.model.model)[0].self_attn).__module__


def _assert_patched_equals(case: cases.FamilyCase, sources: List[torch.Tensor], monkeypatch, **settings) -> None:
    """The patched model (eager kernels made to fail) equals the plain reference of ``sources``,
    and keeping everything is the unpatched model bit for bit."""
    with torch.no_grad():
        full = case.model(**case.inputs).logits
        expected, real = cases.reference_for_sources(case, sources)
    forbid_eager(monkeypatch, [type(TOWER_LAYER[case.name](case.model.model)).__module__, _language_module(case)])
    tome.apply_patch(case.model, visual_tokens=10 ** 6, **settings)
    with torch.no_grad():
        assert torch.equal(case.model(**case.inputs).logits, full)  # nothing to reduce: the model itself
        case.model.visual_tokens = 5
        logits = case.model(**case.inputs).logits
    assert logits.shape == expected.shape and logits.shape[1] < full.shape[1]
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    assert (logits[:, -1] - full[:, -1]).abs().max() > 1e-2  # the reduction is visible
    for config in (case.model.config.get_text_config(), case.model.config.vision_config):
        assert config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", FAMILIES)
def test_visionzip_equals_the_plain_reference_on_the_eager_attention(name, monkeypatch):
    case = _build(name)
    contexts = [{"attention": a, "metric": k} for a, k in REFERENCES[case.name](case, monkeypatch)]
    sources = _reference_sources(case, "visionzip", 5, contexts)
    assert any(bool((s.sum(-1) > 1).any()) for s in sources)  # contextual tokens merged, not only selected
    _assert_patched_equals(case, sources, monkeypatch, method="visionzip")


# ----------------------------------------------------------------------------- FastV


def _patched_row(case: cases.FamilyCase, layer: int) -> torch.Tensor:
    from tome.patch._vlm import VisualTokenSettings, _fastv_row, find_adapter

    adapter, inner = find_adapter(case.model)
    visual = [m for m in adapter.modalities if case.inputs.get(m.pixels) is not None]
    with torch.no_grad():
        outputs = {m.name: m.encode(inner, case.inputs) for m in visual}
        settings = VisualTokenSettings(method="fastv", fastv_layer=layer)
        return _fastv_row(inner, settings, dict(case.inputs), outputs, visual, inner.forward)


@pytest.mark.parametrize("name,layer", [("gemma3", 0), ("gemma3", 1), ("smolvlm", 1), ("internvl", 0),
                                        ("llava_onevision", 1)])
def test_last_token_attention_from_queries_and_keys_equals_the_eager_weights(name, layer):
    case = _build(name)
    expected = last_token_row(case.model, case.inputs, layer)
    got = _patched_row(case, layer)
    real = case.inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-6)
    assert torch.equal(got[~real], torch.zeros_like(got[~real]))
    if (name, layer) == ("gemma3", 0):  # a sliding-window layer: the last token sees its last 8 tokens only
        window = case.model.config.text_config.sliding_window
        assert torch.equal(got[:, :-window], torch.zeros_like(got[:, :-window]))
        assert bool((got[:, -window:] > 0).all())


@pytest.mark.parametrize("name", FAMILIES)
def test_fastv_equals_the_plain_reference_on_the_eager_attention(name, monkeypatch):
    case = _build(name)
    contexts = _row_contexts(case, last_token_row(case.model, case.inputs, 1))
    sources = _reference_sources(case, "fastv", 5, contexts)
    _assert_patched_equals(case, sources, monkeypatch, method="fastv", fastv_layer=1)


@pytest.mark.parametrize("name,method", [("gemma3", "visionzip"), ("smolvlm", "fastv"), ("internvl", "visionzip"),
                                         ("llava_onevision", "fastv")])
def test_batched_left_padded_generate_equals_each_sample_alone(name, method):
    """Each sample's attention (tower or last-token) and so its selection do not depend on the batch."""
    case = _build(name)
    tome.apply_patch(case.model, visual_tokens=5, method=method, fastv_layer=1)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=cases.PAD)
    with torch.no_grad():
        batched = case.model.generate(**case.inputs, **kwargs)[:, -3:]
        for sample in range(batched.shape[0]):
            alone = case.model.generate(**cases.sample_inputs(case, sample), **kwargs)[:, -3:]
            assert torch.equal(alone[0], batched[sample]), (sample, alone, batched)
