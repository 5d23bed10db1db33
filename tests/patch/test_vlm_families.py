"""Visual-token reduction on Gemma 3, SmolVLM, Idefics3, InternVL and LLaVA-OneVision.

First the plain references of ``vlm_family_cases`` are checked against the unpatched models
themselves; the patched models are then checked against those references.
"""

from __future__ import annotations

import pytest
import torch
import vlm_family_cases as cases

import tome
from tome import visual_tokens as vt

FAMILY_NAMES = sorted(cases.FAMILIES)


def _build(name: str, **kwargs) -> cases.FamilyCase:
    if name == "llava_onevision":
        kwargs.setdefault("video_frames", 2)
    return cases.FAMILIES[name](**kwargs)


def _half(case: cases.FamilyCase, seed: int = 0):
    """A random half of every unit's tokens (ascending indices)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(u.length, generator=generator)[: u.length // 2].sort().values for u in case.units]


# --- the references ------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_reference_keeping_everything_is_the_model(name):
    case = _build(name)
    with torch.no_grad():
        expected = case.model(**case.inputs).logits
        logits, real = cases.reference_logits(case, drop_padding=False)
        unpadded, kept_rows = cases.reference_logits(case)
    assert real.all()
    assert torch.equal(logits, expected)
    # without the padding (as the patched model runs): the same text, to rounding
    for b in range(expected.shape[0]):
        rows = case.inputs["attention_mask"][b].bool()
        torch.testing.assert_close(unpadded[b][kept_rows[b]], expected[b][rows], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_reference_dropping_equals_the_model_with_dropped_tokens_masked_out(name):
    """With original positions, leaving tokens out of the sequence is what masking them out of
    the full sequence does (a second, independent construction). Gemma 3's sliding window
    counts sequence indices, so it is widened past the sequence here."""
    case = _build(name, sliding_window=512) if name == "gemma3" else _build(name)
    kept = _half(case)
    input_ids = case.inputs["input_ids"]
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for u, (sample, pos) in enumerate(cases.unit_positions(case)):
        keep[sample, pos] = False
        keep[sample, pos[kept[u]]] = True
    masked = dict(case.inputs, attention_mask=case.inputs["attention_mask"] * keep,
                  position_ids=torch.arange(input_ids.shape[1]).expand_as(input_ids))
    with torch.no_grad():
        full = case.model(**case.inputs).logits
        expected = case.model(**masked).logits
        logits, real = cases.reference_logits(case, kept)
    assert logits.shape[1] < input_ids.shape[1]
    for b in range(input_ids.shape[0]):
        rows = keep[b] & (case.inputs["attention_mask"][b] > 0)
        got = logits[b][real[b]][-int(rows.sum()):]
        torch.testing.assert_close(got, expected[b][rows], atol=2e-4, rtol=1e-4)
        # dropping visual tokens changes the text's logits (the check is not vacuous)
        assert (got[-1] - full[b, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_reference_positions_matter(name):
    case = _build(name)
    kept = _half(case)
    with torch.no_grad():
        original, real = cases.reference_logits(case, kept, positions="original")
        consecutive, _ = cases.reference_logits(case, kept, positions="consecutive")
    assert (original[real] - consecutive[real]).abs().max() > 1e-3


def test_onevision_units_mark_the_image_newlines():
    """The separators recorded for LLaVA-OneVision are exactly the rows equal to the model's
    ``image_newline`` parameter."""
    case = _build("llava_onevision")
    newline = case.model.model.image_newline
    embeds = cases.full_embeds(case)
    for unit, (sample, pos) in zip(case.units, cases.unit_positions(case)):
        is_newline = (embeds[sample, pos] == newline.to(embeds.dtype)).all(-1)
        assert is_newline.nonzero().squeeze(-1).tolist() == list(unit.separators)


# --- the patched models ----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["random", "pool"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_patched_equals_the_reference(name, method):
    case = _build(name)
    with torch.no_grad():
        full = case.model(**case.inputs).logits
        tome.apply_patch(case.model, visual_tokens=5, method=method, seed=0, trace_source=True)
        logits = case.model(**case.inputs).logits
        expected, real = cases.reference_for_sources(case, case.model._tome_info["source"])
    assert logits.shape == expected.shape and logits.shape[1] < full.shape[1]
    if method == "random":
        assert torch.equal(logits[real], expected[real])
    else:
        torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    assert (logits[:, -1] - full[:, -1]).abs().max() > 1e-2


def _expected_items(case: cases.FamilyCase):
    """Per item of the core: its features, the grid the builder knows it has, and its separators."""
    embeds = cases.full_embeds(case)
    for sample, positions, grid, separators in cases.core_items(case):
        yield embeds[sample, positions], grid, separators


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pool_sees_each_units_grid(name):
    """The grid each family hands to the method is the connector's output grid: the pooled
    cells are those of ``pool`` on that grid (a wrong grid pools other tokens together)."""
    case = _build(name)
    with torch.no_grad():
        tome.apply_patch(case.model, visual_tokens=5, method="pool", trace_source=True)
        case.model(**case.inputs)
        sources = case.model._tome_info["source"]
        expected = list(_expected_items(case))
    assert len(sources) == len(expected)
    for source, (features, grid, separators) in zip(sources, expected):
        free = [i for i in range(features.shape[0]) if i not in separators]
        cells = vt.reduce_tokens("pool", features[free], 5, vt.VisualContext(grid=grid)).source
        content = source[:, free]
        assert torch.equal(content[content.sum(-1) > 0], cells)
        assert source[:, separators].sum() == len(separators)  # each separator passed on


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_patched_renumbered_positions_equal_the_reference(name):
    case = _build(name)
    with torch.no_grad():
        tome.apply_patch(case.model, visual_tokens=5, method="random", seed=1, trace_source=True,
                         positions="renumber")
        logits = case.model(**case.inputs).logits
        expected, real = cases.reference_for_sources(case, case.model._tome_info["source"], positions="consecutive")
        kept, _ = cases.reference_for_sources(case, case.model._tome_info["source"], positions="original")
    assert torch.equal(logits[real], expected[real])
    assert (logits[real] - kept[real]).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_identity_and_exact_removal(name):
    case = _build(name)
    original = type(case.model)
    with torch.no_grad():
        expected = case.model(**case.inputs).logits
        tome.apply_patch(case.model, visual_tokens=None)
        assert torch.equal(case.model(**case.inputs).logits, expected)
        case.model.visual_tokens = 10 ** 6  # at least every unit's tokens: nothing to reduce
        assert torch.equal(case.model(**case.inputs).logits, expected)
        assert not any(item["reduced"] for item in case.model._tome_info["items"])
        case.model.visual_tokens = 3
        reduced = case.model(**case.inputs).logits
        assert reduced.shape[1] < expected.shape[1]
        tome.remove_patch(case.model)
        assert type(case.model) is original
        assert torch.equal(case.model(**case.inputs).logits, expected)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_greedy_generate_batched_equals_each_sample_alone(name):
    case = _build(name)
    tome.apply_patch(case.model, visual_tokens=5, method="pool")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=cases.PAD, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        out = case.model.generate(**case.inputs, **kwargs)
        batched = out.sequences[:, -4:]
        for sample in range(batched.shape[0]):
            alone = case.model.generate(**cases.sample_inputs(case, sample), **kwargs).sequences[:, -4:]
            assert torch.equal(alone[0], batched[sample]), (sample, alone, batched)
        tome.remove_patch(case.model)
        unpatched = case.model.generate(**case.inputs, **kwargs)
    # the reduction reaches every decoding step (the tokens may still agree)
    for step, (reduced, full) in enumerate(zip(out.logits, unpatched.logits)):
        assert (reduced - full).abs().max() > 1e-3, step


@pytest.mark.parametrize("method", ["random", "pool"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_decoding_continues_the_reference(name, method):
    """Every decoding step's logits are the reference's on the shortened prompt plus the tokens
    generated so far (positions continue where the unreduced prompt ends)."""
    case = _build(name)
    tome.apply_patch(case.model, visual_tokens=5, method=method, seed=0, trace_source=True)
    steps = 3
    with torch.no_grad():
        out = case.model.generate(**case.inputs, max_new_tokens=steps, do_sample=False, pad_token_id=cases.PAD,
                                  output_logits=True, return_dict_in_generate=True)
        sources = case.model._tome_info["source"]
        tome.remove_patch(case.model)
        generated = out.sequences[:, -steps:]
        expected, real = cases.reference_for_sources(cases.extended(case, generated[:, :-1]), sources)
    for step in range(steps):
        torch.testing.assert_close(out.logits[step], expected[:, step - steps], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, units", [("smolvlm", 9), ("idefics3", 9), ("internvl", 6)])
def test_budget_is_per_crop_or_tile(name, units):
    """SmolVLM / Idefics3 crops and InternVL tiles are the units: K tokens each, and "pool"
    never averages tokens of two tiles."""
    case = _build(name)
    tome.apply_patch(case.model, visual_tokens=5, method="pool", trace_source=True)
    with torch.no_grad():
        case.model(**case.inputs)
    items = case.model._tome_info["items"]
    assert len(items) == len(case.units) == units and all(item["passed"] <= 5 for item in items)
    assert all(source.shape[1] == 16 for source in case.model._tome_info["source"])


@pytest.mark.parametrize("method", ["random", "pool"])
def test_onevision_multi_image_prompt_equals_the_reference(method):
    """Images of a multi-image prompt have no any-res crops (a base view and one newline each);
    a sample's single image has them (the batch mixes both)."""
    case = cases.llava_onevision(image_sizes=((40, 60), (32, 32), (32, 32)), images_per_sample=(2, 1))
    assert [len(u.separators) for u in case.units] == [1, 1, 8]
    with torch.no_grad():
        expected_full = case.model(**case.inputs).logits
        tome.apply_patch(case.model, visual_tokens=0.25, method=method, seed=0, trace_source=True)
        logits = case.model(**case.inputs).logits
        expected, real = cases.reference_for_sources(case, case.model._tome_info["source"])
    # a quarter of 64 (+ the newline); the any-res image: its base view, its grid (+ 8 newlines)
    assert [item["passed"] for item in case.model._tome_info["items"]] == [17, 17, 16, 24]
    assert logits.shape[1] < expected_full.shape[1]
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)


def test_onevision_newlines_are_passed_on_unmerged():
    case = _build("llava_onevision")
    tome.apply_patch(case.model, visual_tokens=4, method="pool", trace_source=True)
    with torch.no_grad():
        case.model(**case.inputs)
    for unit, source in zip(case.units, cases.unit_sources(case, case.model._tome_info["source"])):
        rows = source[:, list(unit.separators)]
        assert (rows.sum(0) == 1).all()  # every newline passed on
        assert (source[rows.sum(-1) > 0].sum(-1) == 1).all()  # alone
        visual = source.shape[0] - len(unit.separators)
        assert 1 <= visual <= 4 * (2 if len(unit.separators) > 1 else 1)


def test_text_only_gemma3_is_refused_naming_the_supported_classes():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(TypeError, match="Gemma3ForCausalLM") as error:
        tome.patch.family_spec("vlm").patch(model, tome.patch.VisualTokenSettings(visual_tokens=4))
    for name in ("Gemma3ForConditionalGeneration", "SmolVLMForConditionalGeneration",
                 "Idefics3ForConditionalGeneration", "InternVLForConditionalGeneration",
                 "LlavaOnevisionForConditionalGeneration"):
        assert name in str(error.value)
