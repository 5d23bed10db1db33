"""FastV's in-layer drop (``method="fastv", fastv_mode="drop"``) in Qwen2.5-VL, Qwen3-VL and LLaVA.

The reference is written from the model's own modules, without the patch: the full sequence's
embeddings (the visual features scattered at their placeholders) run through the language
model's layers ``0 .. K-1``; the last token's attention at layer ``K-1`` (from an eager copy
asked for its weights) picks each image's kept tokens; their rows (and their rotary cos/sin)
are taken from the hidden states, and layers ``K ..`` run on the shorter sequence, every
layer filling one ``DynamicCache`` (full length below ``K``, short from ``K`` on). Greedy
decoding continues from that cache at the full sequence's next position. With labels, the loss
is the reference's on the kept tokens' labels (and FastV-select's on the tokens it reports kept).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Dict, List, Tuple

import pytest
import torch

pytest.importorskip("transformers")

import vlm_cases as cases  # noqa: E402
from vlm_cases import IMAGE, VIDEO  # noqa: E402

import tome  # noqa: E402

LAYER, BUDGET, STEPS = 1, 5, 4
GENERATE = {"max_new_tokens": STEPS, "do_sample": False, "eos_token_id": None, "pad_token_id": cases.PAD}


def qwen3_vl_deep() -> torch.nn.Module:
    """The tiny Qwen3-VL with deepstack features added after both language-model layers, so one
    of them lands after the drop at layer 1."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = cases._text(head_dim=cases.TEXT // cases.HEADS, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=cases.TEXT,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=cases.START, vision_end_token_id=cases.END,
                           tie_word_embeddings=False)
    return cases._ready(Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="sdpa"))


BUILDERS = {"qwen2_5_vl": cases.qwen2_5_vl, "qwen3_vl": qwen3_vl_deep, "llava": cases.llava}
_BUILT: Dict[str, torch.nn.Module] = {}


def model_of(family: str) -> torch.nn.Module:
    if family not in _BUILT:
        _BUILT[family] = BUILDERS[family]()
    return copy.deepcopy(_BUILT[family])


def inputs_of(family: str, model: torch.nn.Module, video: bool = False) -> Dict[str, torch.Tensor]:
    """Two left-padded samples: images of different sizes and counts (a video in the second)."""
    if family == "llava":
        return cases.llava_inputs(model, [2, 1])
    return cases.qwen_inputs(model, [[(8, 8), (6, 8)], [(8, 6)]], videos=[[], [(2, 4, 6)]] if video else None,
                             frames_apart=family == "qwen3_vl")


def alone(inputs: Dict[str, torch.Tensor], family: str, index: int) -> Dict[str, torch.Tensor]:
    images, videos = ([0, 1], []) if index == 0 else ([2], [0] if "pixel_values_videos" in inputs else [])
    return cases.sample(inputs, index, images=images, videos=videos)


# ----------------------------------------------------------------------------- the plain reference


def _eager_row(model: torch.nn.Module, inputs: Dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """``(L,)``: the last token's attention at ``layer``, mean over heads, from an eager copy."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    return out.attentions[layer][0, :, -1, :].float().mean(0)


def _visual(model: torch.nn.Module, family: str, inputs: Dict[str, torch.Tensor]
            ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """One sample's ``(features (V, C), deepstack rows per layer [(V, C)], item columns)`` in
    sequence order, from the model's own feature methods."""
    inner, ids = model.model, inputs["input_ids"][0]
    features = torch.zeros(ids.shape[0], cases.TEXT)
    deep: List[torch.Tensor] = []
    items: List[torch.Tensor] = []
    parts = [(IMAGE, "pixel_values", "image_grid_thw", "get_image_features"),
             (VIDEO, "pixel_values_videos", "video_grid_thw", "get_video_features")]
    for token, pixels, grid, method in parts:
        if pixels not in inputs:
            continue
        kwargs = {pixels: inputs[pixels], "return_dict": True}
        if family != "llava":
            kwargs[grid] = inputs[grid]
        out = getattr(inner, method)(**kwargs)
        columns = (ids == token).nonzero()[:, 0]
        rows = torch.cat(list(out.pooler_output))
        features[columns] = rows
        items += list(columns.split([f.shape[0] for f in out.pooler_output]))
        for n, layer in enumerate(getattr(out, "deepstack_features", None) or []):
            if len(deep) <= n:
                deep.append(torch.zeros(ids.shape[0], cases.TEXT))
            deep[n][columns] = torch.cat(list(layer))
    items.sort(key=lambda c: int(c[0]))
    return features, deep, items


@torch.no_grad()
def drop_reference(model: torch.nn.Module, family: str, inputs: Dict[str, torch.Tensor], layer: int,
                   budget: int, steps: int) -> Dict[str, Any]:
    """One sample (no padding): the prefill ``logits`` (L', V), the kept ``columns``, the
    ``cache`` and the greedy ``tokens`` of ``steps`` decoding steps, from the model's modules."""
    from transformers import DynamicCache

    inner = model.model
    lm = inner.language_model
    ids = inputs["input_ids"]
    length = ids.shape[1]
    features, deep, items = _visual(model, family, inputs)
    visual = (ids[0] == IMAGE) | (ids[0] == VIDEO)
    embeds = torch.where(visual[:, None], features, lm.embed_tokens(ids[0]))[None]
    if family == "llava":
        positions = torch.arange(length)[None]
    else:
        positions = inner.get_rope_index(ids, inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs.get("image_grid_thw"),
                                         video_grid_thw=inputs.get("video_grid_thw"),
                                         attention_mask=inputs["attention_mask"])[0]
    row = _eager_row(model, inputs, layer - 1)
    keep = ~visual.clone()
    for columns in items:
        keep[columns[row[columns].argsort(descending=True, stable=True)[:budget]]] = True
    kept = keep.nonzero()[:, 0]
    cos, sin = lm.rotary_emb(embeds, positions)
    cache = DynamicCache(config=lm.config)
    hidden, where = embeds, torch.arange(length)
    for n, block in enumerate(lm.layers):
        if n == layer:  # FastV: the rows of the kept tokens, at their positions in the full sequence
            hidden, cos, sin, where = hidden[:, kept], cos[:, kept], sin[:, kept], kept
        hidden = block(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=None,
                       past_key_values=cache, use_cache=True)
        if n < len(deep):  # Qwen3-VL's deepstack: visual features added after the first layers
            hidden = hidden.clone()
            hidden[0, visual[where]] += deep[n][where[visual[where]]]
    logits = model.lm_head(lm.norm(hidden))[0]
    following = int(positions.max()) + 1
    tokens = [int(logits[-1].argmax())]
    for step in range(1, steps):
        position = torch.tensor([[following + step - 1]])
        position = position[None].expand(3, 1, 1) if family != "llava" else position
        embed = lm.embed_tokens(torch.tensor([[tokens[-1]]]))
        cos, sin = lm.rotary_emb(embed, position)
        hidden = embed
        for block in lm.layers:
            hidden = block(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=None,
                           past_key_values=cache, use_cache=True)
        tokens.append(int(model.lm_head(lm.norm(hidden))[0, -1].argmax()))
    return {"logits": logits, "columns": kept, "cache": cache, "tokens": tokens}


def _refuse_eager(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the patched model ran eager attention")

    monkeypatch.setattr(sys.modules[type(model.model.language_model).__module__], "eager_attention_forward", refuse)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family,video", [("qwen2_5_vl", True), ("qwen3_vl", True), ("llava", False)])
def test_drop_equals_the_plain_reference_and_decodes_as_it(family, video, monkeypatch):
    model = model_of(family)
    inputs = inputs_of(family, model, video=video)
    samples = [alone(inputs, family, index) for index in range(2)]
    expected = [drop_reference(model, family, s, LAYER, BUDGET, STEPS) for s in samples]
    with torch.no_grad():
        unreduced = model(**inputs).logits
    patched = tome.apply_patch(model, visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER, fastv_mode="drop")
    _refuse_eager(monkeypatch, patched)
    with torch.no_grad():
        out = patched(**inputs, use_cache=True)
        for index, (sample, want) in enumerate(zip(samples, expected)):
            got = out.logits[index, -want["logits"].shape[0]:]
            torch.testing.assert_close(got, want["logits"], atol=1e-4, rtol=1e-4)
            generated = patched.generate(**sample, **GENERATE)[0, sample["input_ids"].shape[1]:].tolist()
            assert generated == want["tokens"], index
    assert out.logits.shape[1] == max(w["logits"].shape[0] for w in expected) < unreduced.shape[1]
    assert (out.logits[:, -1] - unreduced[:, -1]).abs().max() > 1e-2  # the drop is visible
    # The paper's KV cache: full length below the drop layer, short from it on.
    cache = out.past_key_values
    assert cache.layers[0].keys.shape[-2] == inputs["input_ids"].shape[1]
    assert cache.layers[LAYER].keys.shape[-2] == out.logits.shape[1]
    assert patched.config.text_config._attn_implementation == "sdpa"


def test_drop_differs_from_select_in_the_first_layers_only():
    """Select at layer K-1 and drop at layer K rank by the same attention (layer K-1's, on the
    same inputs): the same tokens are kept, but the drop's first layers see the full sequence."""
    model = model_of("qwen2_5_vl")
    inputs = inputs_of("qwen2_5_vl", model)
    tome.apply_patch(model, visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER - 1, trace_source=True)
    with torch.no_grad():
        select = model(**inputs).logits
    chosen = model._tome_info["source"]
    model.fastv_layer, model.fastv_mode = LAYER, "drop"
    with torch.no_grad():
        drop = model(**inputs).logits
    assert all(torch.equal(a, b) for a, b in zip(model._tome_info["source"], chosen))
    assert drop.shape == select.shape and (drop - select).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_drop_batched_left_padded_generate_equals_each_sample_alone(family):
    model = tome.apply_patch(model_of(family), visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER,
                             fastv_mode="drop")
    inputs = inputs_of(family, model, video=family != "llava")
    scored = dict(GENERATE, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = model.generate(**inputs, **scored)
        for index in range(2):
            sample = alone(inputs, family, index)
            single = model.generate(**sample, **scored)
            assert (batched.sequences[index, inputs["input_ids"].shape[1]:].tolist()
                    == single.sequences[0, sample["input_ids"].shape[1]:].tolist()), index
            for step_batched, step_single in zip(batched.scores, single.scores):
                torch.testing.assert_close(step_batched[index], step_single[0], atol=1e-4, rtol=1e-4)


def test_drop_reducing_nothing_is_the_unpatched_model_bit_for_bit():
    model = model_of("qwen2_5_vl")
    inputs = inputs_of("qwen2_5_vl", model, video=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, **GENERATE)
    tome.apply_patch(model, visual_tokens=10_000, method="fastv", fastv_layer=LAYER, fastv_mode="drop")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
        assert torch.equal(model.generate(**inputs, **GENERATE), generated)
    assert not any(item["reduced"] for item in model._tome_info["items"])


def test_the_default_fastv_mode_is_select():
    model = tome.apply_patch(model_of("llava"), visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER)
    assert model.fastv_mode == "select"


@pytest.mark.parametrize("bad, match", [
    ({"fastv_mode": "inplace"}, r"fastv_mode='inplace'.*'select'.*'drop'"),
    ({"fastv_mode": "drop", "fastv_layer": 0}, r"fastv_layer=0 with fastv_mode='drop'.*K >= 1"),
    ({"fastv_mode": "drop", "fastv_layer": LAYER, "positions": "renumber"}, r"positions='renumber' with fastv_mode='drop'"),
])
def test_bad_drop_settings_are_refused_by_name(bad, match):
    model = model_of("llava")
    with pytest.raises(ValueError, match=match):
        tome.apply_patch(model, visual_tokens=BUDGET, method="fastv", **bad)
    assert not any(tome.patch.is_patched(m) for m in model.modules())


@pytest.mark.parametrize("family", ["gemma3", "smolvlm", "internvl", "llava_onevision"])
def test_drop_on_a_family_it_is_not_built_for_is_refused_by_name(family):
    import vlm_family_cases

    model = getattr(vlm_family_cases, family)().model
    with pytest.raises(ValueError, match=r"fastv_mode='drop' is built and tested for qwen2_5_vl, qwen3_vl, llava"):
        tome.apply_patch(model, visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER, fastv_mode="drop")
    assert not any(tome.patch.is_patched(m) for m in model.modules())


def test_drop_refuses_right_padding_naming_the_fix():
    model = tome.apply_patch(model_of("qwen2_5_vl"), visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER,
                             fastv_mode="drop")
    inputs = cases.qwen_inputs(model, [[(8, 8)], [(6, 8)], [(4, 4)]], pad="right")
    with pytest.raises(ValueError, match="pad on the left"), torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
def test_drop_trains_with_labels_and_the_loss_is_the_references(family):
    """The labels shrink with the sequence after layer K (the logits are the short sequence's);
    the loss is the plain reference's, and gradients reach the vision tower."""
    model = model_of(family)
    inputs = inputs_of(family, model, video=family != "llava")
    labels = cases.text_labels(inputs)
    total, count = torch.zeros(()), 0
    for index in range(2):
        sample = alone(inputs, family, index)
        want = drop_reference(model, family, sample, LAYER, BUDGET, 1)
        short = cases.text_labels(sample)[0, want["columns"]]
        total = total + torch.nn.functional.cross_entropy(want["logits"][:-1], short[1:], reduction="sum")
        count += int((short[1:] != -100).sum())
    tome.apply_patch(model, visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER, fastv_mode="drop")
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    tower = model.model.visual if family != "llava" else model.model.vision_tower
    grads = [p.grad for p in tower.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_select_trains_with_labels_aligned_to_the_kept_tokens():
    """FastV-select with labels: the loss is the cross-entropy of the logits the model gives
    without labels against the labels of the tokens it reports kept (``trace_source``)."""
    model = tome.apply_patch(model_of("qwen2_5_vl"), visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER,
                             trace_source=True)
    inputs = inputs_of("qwen2_5_vl", model, video=True)
    labels = cases.text_labels(inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    keep = real & (ids != IMAGE) & (ids != VIDEO)
    sources = iter(model._tome_info["source"])
    for token in (IMAGE, VIDEO):  # items in batch order, images first, as the model meets them
        where = (ids == token).nonzero()
        sizes = [i["tokens"] for i in model._tome_info["items"] if i["modality"] == ("image" if token == IMAGE
                                                                                         else "video")]
        for columns in where.split(sizes):
            chosen = columns[next(sources).argmax(-1)]
            keep[chosen[:, 0], chosen[:, 1]] = True
    total, count = torch.zeros(()), 0
    for b in range(ids.shape[0]):
        short = labels[b][keep[b]]
        rows = logits[b, -short.shape[0]:]
        total = total + torch.nn.functional.cross_entropy(rows[:-1], short[1:], reduction="sum")
        count += int((short[1:] != -100).sum())
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.visual.parameters())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_drop_without_a_cache_ranks_every_step_anew(family):
    """``generate(use_cache=False)``: each step is a new prefill of the whole sequence, ranked by
    its own last token (the paper's code without a cache): the reference, step by step."""
    model = model_of(family)
    sample = alone(inputs_of(family, model), family, 0)
    expected, grown = [], dict(sample)
    for _ in range(3):
        token = drop_reference(model, family, grown, LAYER, BUDGET, 1)["tokens"][0]
        expected.append(token)
        for key, value in (("input_ids", token), ("attention_mask", 1), ("mm_token_type_ids", 0)):
            if key in grown:
                grown[key] = torch.cat([grown[key], torch.tensor([[value]])], dim=1)
    tome.apply_patch(model, visual_tokens=BUDGET, method="fastv", fastv_layer=LAYER, fastv_mode="drop")
    with torch.no_grad():
        generated = model.generate(**sample, **dict(GENERATE, max_new_tokens=3), use_cache=False)
    assert generated[0, sample["input_ids"].shape[1]:].tolist() == expected
