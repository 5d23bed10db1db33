"""Visual-token reduction on Gemma 3, SmolVLM, Idefics3, InternVL and LLaVA-OneVision.

First the plain references of ``vlm_family_cases`` are checked against the unpatched models
themselves; the patched models are then checked against those references.
"""

from __future__ import annotations

import pytest
import torch
import vlm_family_cases as cases

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
        logits, real = cases.reference_logits(case)
    assert real.all()
    assert torch.equal(logits, expected)


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
