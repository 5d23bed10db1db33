"""Visual-token reduction in VLMs (tome.patch._vlm): Qwen2.5-VL, Qwen3-VL and LLaVA-1.5.

The key check per family: a plain reference written from the model's own modules (image
features -> the Reduction the method returns -> the language model on the shorter
inputs_embeds at the kept positions) equals the patched model, for logits and for greedy
decoding; nothing reduced is the unpatched model bit for bit; batched generation with left
padding equals each sample alone.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

pytest.importorskip("transformers")

import vlm_cases as cases  # noqa: E402
from vlm_cases import IMAGE, VIDEO  # noqa: E402

import tome  # noqa: E402
from tome import visual_tokens as vt  # noqa: E402


@functools.lru_cache(maxsize=None)
def _built(family: str) -> torch.nn.Module:
    return cases.BUILDERS[family]()


def model_of(family: str) -> torch.nn.Module:
    return copy.deepcopy(_built(family))


def inputs_of(family: str, model: torch.nn.Module, video: bool = False, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Two samples, images of different sizes and counts (and a video in the second, if asked)."""
    if family == "llava":
        return cases.llava_inputs(model, [2, 1], seed=seed)
    videos = [[], [(2, 4, 6)]] if video else None
    return cases.qwen_inputs(model, [[(8, 8), (6, 8)], [(8, 6)]], seed=seed, videos=videos,
                             frames_apart=family.startswith("qwen3_vl"))


# ----------------------------------------------------------------------------- the plain reference


def _reduce_like(reduction: vt.Reduction, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (one per original token) for the passed-on tokens: the members' mean."""
    weights = reduction.source.to(x.dtype)
    return weights @ x / weights.sum(-1, keepdim=True)


@torch.no_grad()
def reference(model: torch.nn.Module, family: str, inputs: Dict[str, torch.Tensor], method: str,
              visual_tokens: Any, seed: Optional[int] = None, positions_mode: str = "keep",
              contexts: Optional[Dict[int, List[Dict[str, Any]]]] = None,
              prop_attn: bool = False) -> List[Dict[str, Any]]:
    """Per sample: the language model's ``logits`` (L', V) on the short sequence, its KV
    ``cache`` and the ``next`` position to decode at, built from the model's own modules
    without the patch (``contexts``: per placeholder token id, per item, more
    ``VisualContext`` fields, e.g. an eager reference's attention; ``prop_attn``: the language
    model gets a custom 4-D mask, causal plus ``log(size)`` of every key, and the sample keeps
    that ``key_bias`` for decoding)."""
    inner = model.model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    kinds: Dict[int, Tuple[list, list, Optional[list]]] = {}
    if family == "llava":
        out = inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        kinds[IMAGE] = (list(out.pooler_output), [(1, cases.LLAVA_SIDE, cases.LLAVA_SIDE)] * len(out.pooler_output), None)
        full = inputs.get("position_ids", torch.arange(ids.shape[1]).expand_as(ids))[None]
    else:
        for token, pixels, key, encode in ((IMAGE, "pixel_values", "image_grid_thw", inner.get_image_features),
                                           (VIDEO, "pixel_values_videos", "video_grid_thw", inner.get_video_features)):
            if pixels in inputs:
                out = encode(inputs[pixels], inputs[key], return_dict=True)
                grids = [(t, h // 2, w // 2) for t, h, w in inputs[key].tolist()]
                deep = getattr(out, "deepstack_features", None)
                per_item = [[layer[i] for layer in deep] for i in range(len(grids))] if deep is not None else None
                kinds[token] = (list(out.pooler_output), grids, per_item)
        full = inner.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                                    video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask)[0]
    # Every image (then every video) in batch order, as the model meets them.
    slot: Dict[Tuple[int, int], Tuple[int, int, int]] = {}  # (sample, column) -> (kind, item, slot in item)
    reductions: Dict[int, List[Tuple[vt.Reduction, torch.Tensor]]] = {}
    for token, (features, grids, _) in kinds.items():
        where = (ids == token).nonzero().tolist()
        start = 0
        reductions[token] = []
        for item, (feats, grid) in enumerate(zip(features, grids)):
            columns = where[start: start + feats.shape[0]]
            start += feats.shape[0]
            for s, (b, j) in enumerate(columns):
                slot[(b, j)] = (token, item, s)
            budget = vt.resolve_budget(visual_tokens, feats.shape[0])
            extra = (contexts or {}).get(token, [{}] * (item + 1))[item]
            reduction = vt.reduce_tokens(method, feats, budget, vt.VisualContext(grid=grid, generator=generator,
                                                                                 **extra))
            cols = torch.tensor([j for _, j in columns])
            reductions[token].append((reduction, full[:, columns[0][0], cols].t().float()))
    samples = []
    embed = inner.get_input_embeddings()
    for b in range(ids.shape[0]):
        rows, where, deep_rows, visual, sizes = [], [], [], [], []
        for j in range(ids.shape[1]):
            if not mask[b, j]:
                continue
            if (b, j) not in slot:
                rows.append(embed(ids[b, j]))
                where.append(full[:, b, j].float())
                visual.append(False)
                sizes.append(1.0)
                continue
            token, item, s = slot[(b, j)]
            reduction, item_positions = reductions[token][item]
            for r in (reduction.source.argmax(-1) == s).nonzero()[:, 0].tolist():
                rows.append(reduction.features[r])
                where.append(_reduce_like(reduction, item_positions)[r])
                visual.append(True)
                sizes.append(float(reduction.source[r].sum()))
                per_item = kinds[token][2]
                if per_item is not None:
                    deep_rows.append([_reduce_like(reduction, layer)[r] for layer in per_item[item]])
        # Float positions: the rotary embeddings of these models compute in float32 from them either way.
        embeds, positions = torch.stack(rows), torch.stack(where, dim=1)
        following = full[:, b][:, mask[b].bool()].max() + 1  # the unreduced model's first decoding position
        if positions_mode == "renumber":
            positions, following = torch.arange(embeds.shape[0])[None], embeds.shape[0]
        extra = {}
        if deep_rows:
            extra = {"visual_pos_masks": torch.tensor(visual)[None],
                     "deepstack_visual_embeds": [torch.stack(layer) for layer in zip(*deep_rows)]}
        position_ids = positions[:, None, :] if family != "llava" else positions
        key_bias = torch.tensor(sizes).log() if prop_attn else None
        if prop_attn:  # transformers takes a prepared 4-D float mask as it is
            n = embeds.shape[0]
            causal = torch.full((n, n), torch.finfo(embeds.dtype).min).triu(1)
            extra["attention_mask"] = (causal + key_bias)[None, None]
        hidden = inner.language_model(inputs_embeds=embeds[None], position_ids=position_ids, use_cache=True, **extra)
        samples.append({"logits": model.lm_head(hidden.last_hidden_state)[0], "cache": hidden.past_key_values,
                        "next": int(following), "visual": visual, "key_bias": key_bias})
    return samples


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, family: str, sample: Dict[str, Any], steps: int) -> List[int]:
    """Greedy continuation of one reference sample: each new token at the next position."""
    inner, cache = model.model, sample["cache"]
    token = int(sample["logits"][-1].argmax())
    tokens = [token]
    for step in range(1, steps):
        position = torch.tensor([[sample["next"] + step - 1]])
        position_ids = position.expand(3, 1, 1) if family != "llava" else position
        embeds = inner.get_input_embeddings()(torch.tensor([[token]]))
        extra = {}
        if sample.get("key_bias") is not None:  # the new tokens have size 1
            extra["attention_mask"] = torch.cat([sample["key_bias"], torch.zeros(step)])[None, None, None]
        hidden = inner.language_model(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache,
                                      use_cache=True, **extra)
        token = int(model.lm_head(hidden.last_hidden_state)[0, -1].argmax())
        tokens.append(token)
    return tokens


GENERATE = {"max_new_tokens": 4, "do_sample": False, "eos_token_id": None, "pad_token_id": cases.PAD}


def _rows(logits: torch.Tensor, lengths: List[int]) -> List[torch.Tensor]:
    """Each sample's logits without the left padding."""
    return [logits[b, logits.shape[1] - n:] for b, n in enumerate(lengths)]


CASES = [
    pytest.param("qwen2_5_vl", "pool", None, "keep", True, id="qwen2_5_vl-pool-video"),
    pytest.param("qwen2_5_vl", "random", 3, "keep", False, id="qwen2_5_vl-random"),
    pytest.param("qwen3_vl", "pool", None, "keep", True, id="qwen3_vl-pool-video"),
    pytest.param("qwen3_vl", "random", 3, "keep", False, id="qwen3_vl-random"),
    pytest.param("qwen3_vl_moe", "pool", None, "keep", True, id="qwen3_vl_moe-pool-video"),
    pytest.param("llava", "pool", None, "keep", False, id="llava-pool-keep"),
    pytest.param("llava", "random", 3, "renumber", False, id="llava-random-renumber"),
]


@pytest.mark.parametrize("family, method, seed, positions, video", CASES)
def test_patched_model_equals_the_plain_reference(family, method, seed, positions, video):
    model = model_of(family)
    inputs = inputs_of(family, model, video=video)
    if family == "llava":  # as generate passes them: the left padding does not move the positions
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        unreduced = model(**inputs).logits
    expected = reference(model, family, inputs, method, 5, seed=seed, positions_mode=positions)
    tome.apply_patch(model, visual_tokens=5, method=method, seed=seed, positions=positions)
    with torch.no_grad():
        logits = model(**inputs).logits
    lengths = [e["logits"].shape[0] for e in expected]
    assert logits.shape[1] == max(lengths) < unreduced.shape[1]
    for got, want in zip(_rows(logits, lengths), expected):
        torch.testing.assert_close(got, want["logits"], atol=2e-5, rtol=1e-5)
    assert (logits[:, -1] - unreduced[:, -1]).abs().max() > 1e-2  # the reduction is visible
    if video:
        assert [item["modality"] for item in model._tome_info["items"]] == ["image"] * 3 + ["video"]


@pytest.mark.parametrize("family, positions", [("qwen2_5_vl", "keep"), ("qwen3_vl", "keep"), ("llava", "keep"),
                                               ("llava", "renumber")])
def test_greedy_generate_continues_at_the_reference_positions(family, positions):
    model = model_of(family)
    inputs = cases.sample(inputs_of(family, model), 0, images=[0, 1])
    expected = reference(model, family, inputs if family != "llava" else dict(
        inputs, position_ids=torch.arange(inputs["input_ids"].shape[1])[None]), "pool", 5, positions_mode=positions)
    tome.apply_patch(model, visual_tokens=5, method="pool", positions=positions)
    with torch.no_grad():
        generated = model.generate(**inputs, **GENERATE)[0, inputs["input_ids"].shape[1]:].tolist()
    assert generated == reference_greedy(model, family, expected[0], GENERATE["max_new_tokens"])


def test_a_decoding_step_without_positions_uses_the_recomputed_rope_deltas():
    model = model_of("qwen2_5_vl")
    inputs = cases.sample(inputs_of("qwen2_5_vl", model), 0, images=[0, 1])
    expected = reference(model, "qwen2_5_vl", inputs, "pool", 5)[0]
    tome.apply_patch(model, visual_tokens=5, method="pool")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        short = out.logits.shape[1]
        assert model.model.rope_deltas.item() == expected["next"] - short
        token = out.logits[:, -1:].argmax(-1)
        # No attention mask: with one, transformers 5.23's Qwen computes positions for the whole mask
        # (not the new token) in this path, patched or not.
        step = model(input_ids=token, past_key_values=out.past_key_values)
    position = torch.tensor([[[expected["next"]]]]).expand(3, 1, 1)
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=model.model.get_input_embeddings()(token),
                                            position_ids=position, past_key_values=expected["cache"], use_cache=True)
    torch.testing.assert_close(step.logits[0, -1], model.lm_head(hidden.last_hidden_state)[0, -1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_batched_left_padded_generate_equals_each_sample_alone(family):
    model = tome.apply_patch(model_of(family), visual_tokens=5)
    inputs = inputs_of(family, model, video=family != "llava")
    scored = dict(GENERATE, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = model.generate(**inputs, **scored)
        for index, (images, videos) in enumerate((([0, 1], []), ([2], [0] if family != "llava" else []))):
            alone = cases.sample(inputs, index, images=images, videos=videos)
            single = model.generate(**alone, **scored)
            assert (batched.sequences[index, inputs["input_ids"].shape[1]:].tolist()
                    == single.sequences[0, alone["input_ids"].shape[1]:].tolist()), index
            for step_batched, step_single in zip(batched.scores, single.scores):
                torch.testing.assert_close(step_batched[index], step_single[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_nothing_reduced_is_the_unpatched_model_bit_for_bit(family):
    model = model_of(family)
    inputs = inputs_of(family, model, video=family != "llava")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, **GENERATE)
    tome.apply_patch(model, visual_tokens=None, trace_source=True)
    for visual_tokens in (None, 1.0, 10_000):
        model.visual_tokens = visual_tokens
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, logits), visual_tokens
            assert torch.equal(model.generate(**inputs, **GENERATE), generated), visual_tokens
    items = model._tome_info["items"]
    assert items and not any(item["reduced"] for item in items)
    assert all(item["budget"] == item["tokens"] == item["passed"] for item in items)
    assert [tuple(s.shape) for s in model._tome_info["source"]] == [(i["tokens"],) * 2 for i in items]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl_moe", "llava"])
def test_remove_patch_restores_the_model_exactly(family):
    model = model_of(family)
    inputs = inputs_of(family, model)
    classes = {name: type(module) for name, module in model.named_modules()}
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(**inputs).logits
    tome.apply_patch(model, visual_tokens=4)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        model(**inputs)
    tome.remove_patch(model)
    assert {name: type(module) for name, module in model.named_modules()} == classes
    assert not [(n, k) for n, m in model.named_modules() for k in vars(m) if k.startswith("_tome")]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_trace_source_lists_each_image_and_video_in_batch_order_and_says_what_was_not_reduced():
    model = tome.apply_patch(model_of("qwen2_5_vl"), visual_tokens=6, trace_source=True)
    inputs = inputs_of("qwen2_5_vl", model, video=True)
    with torch.no_grad():
        model(**inputs)
    items, sources = model._tome_info["items"], model._tome_info["source"]
    # images of 16, 12 and 12 tokens, then a 2-frame video of 12 tokens
    assert [(i["modality"], i["sample"], i["tokens"]) for i in items] == [
        ("image", 0, 16), ("image", 0, 12), ("image", 1, 12), ("video", 1, 12)]
    assert [tuple(s.shape) for s in sources] == [(i["passed"], i["tokens"]) for i in items]
    assert all(i["passed"] <= 6 and i["reduced"] for i in items)
    for source in sources:  # every original token in at most one passed-on token
        assert source.sum(0).max() <= 1 and (source.sum(1) >= 1).all()
    report = tome.last_forward(model)
    assert report.items == items and report.length[1] < report.length[0]
    model.visual_tokens = 12  # at least the 12-token images: those are passed on whole, and say so
    with torch.no_grad():
        model(**inputs)
    assert [i["reduced"] for i in model._tome_info["items"]] == [True, False, False, False]


def test_settings_are_properties_and_merging_restores_them():
    model = tome.apply_patch(model_of("llava"), visual_tokens=4)
    assert (model.visual_tokens, model.tome_method, model.positions) == (4, "tome", "keep")
    model.tome_method = "random"
    model.visual_tokens = 0.25
    assert (model.visual_tokens, model.tome_method) == (0.25, "random")
    with tome.merging(model, visual_tokens=2, positions="renumber"):
        assert (model.visual_tokens, model.positions) == (2, "renumber")
    assert (model.visual_tokens, model.positions) == (0.25, "keep")
    assert tome.patch.family_of(model) == "vlm"


@pytest.mark.parametrize("bad, match", [
    ({"visual_tokens": 0}, "visual_tokens=0"), ({"visual_tokens": -3}, "visual_tokens=-3"),
    ({"visual_tokens": 1.5}, "visual_tokens=1.5"), ({"visual_tokens": "all"}, "visual_tokens='all'"),
    ({"method": "nope"}, r"method='nope'.*'pool'.*'random'"), ({"positions": "middle"}, "positions='middle'"),
    ({"fastv_layer": -1}, "fastv_layer=-1"), ({"prop_attn": "yes"}, "prop_attn='yes'"),
])
def test_bad_settings_are_refused_by_name(bad, match):
    model = model_of("llava")
    with pytest.raises(ValueError, match=match):
        tome.apply_patch(model, **bad)
    assert not any(tome.patch.is_patched(m) for m in model.modules())


@pytest.mark.parametrize("family, method", [("llava", "tome"), ("qwen2_5_vl", "pool")])
def test_prop_attn_equals_the_reference_with_log_size_on_every_key(family, method):
    """``prop_attn=True``: logits of a batched, left-padded prefill equal each sample's language
    model run with a hand-made mask (causal + log(size) of every key), and greedy decoding
    continues with that bias on the cached keys."""
    model = model_of(family)
    inputs = inputs_of(family, model)
    if family == "llava":
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    expected = reference(model, family, inputs, method, 5, prop_attn=True)
    plain = reference(model, family, inputs, method, 5)
    assert all(bool((e["key_bias"] > 0).any()) for e in expected)  # tokens of several members are passed on
    tome.apply_patch(model, visual_tokens=5, method=method, prop_attn=True)
    assert model.prop_attn is True
    with torch.no_grad():
        logits = model(**inputs).logits
    lengths = [e["logits"].shape[0] for e in expected]
    for got, want, other in zip(_rows(logits, lengths), expected, plain):
        torch.testing.assert_close(got, want["logits"], atol=2e-5, rtol=1e-5)
        assert (got[-1] - other["logits"][-1]).abs().max() > 1e-3  # the bias is visible
    one = cases.sample(inputs_of(family, model), 0, images=[0, 1])
    first = reference(model, family, one if family != "llava" else dict(
        one, position_ids=torch.arange(one["input_ids"].shape[1])[None]), method, 5, prop_attn=True)[0]
    with torch.no_grad():
        generated = model.generate(**one, **GENERATE)[0, one["input_ids"].shape[1]:].tolist()
    assert generated == reference_greedy(model, family, first, GENERATE["max_new_tokens"])


def test_prop_attn_leaves_a_selection_bit_for_bit_and_batches_like_single_samples():
    model = model_of("llava")
    inputs = inputs_of("llava", model)
    with torch.no_grad():
        tome.apply_patch(model, visual_tokens=5, method="random", seed=3)
        selected = model(**inputs).logits
        model.prop_attn = True  # every passed-on token has size 1: no bias, no hooks
        assert torch.equal(model(**inputs).logits, selected)
        model.tome_method = "tome"
        scored = dict(GENERATE, output_scores=True, return_dict_in_generate=True)
        batched = model.generate(**inputs, **scored)
        for index, images in enumerate(([0, 1], [2])):
            alone = model.generate(**cases.sample(inputs, index, images=images), **scored)
            for step_batched, step_single in zip(batched.scores, alone.scores):
                torch.testing.assert_close(step_batched[index], step_single[0], atol=1e-4, rtol=1e-4)


def test_prop_attn_refuses_an_attention_that_takes_no_mask():
    model = model_of("llava")
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="prop_attn=True.*'flash_attention_2'.*'sdpa' or 'eager'"):
        tome.apply_patch(model, visual_tokens=4, prop_attn=True)


def test_renumbering_3d_positions_is_refused():  # unwired methods: test_vlm_methods_wiring.py
    model = model_of("qwen2_5_vl")
    with pytest.raises(ValueError, match="positions='renumber'.*M-RoPE"):
        tome.apply_patch(model, visual_tokens=4, positions="renumber")
    assert not any(tome.patch.is_patched(m) for m in model.modules())


def reference_loss(expected: List[Dict[str, Any]], inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of the plain reference's logits on the short sequences: each text token
    labelled with itself, each passed-on visual token -100; the mean over the batch's labels."""
    labels, ids = cases.text_labels(inputs), inputs["input_ids"]
    text_tokens = (inputs["attention_mask"] == 1) & (ids != IMAGE) & (ids != VIDEO)
    total, count = torch.zeros(()), 0
    for b, sample in enumerate(expected):
        text = iter(labels[b][text_tokens[b]].tolist())
        short = torch.tensor([-100 if visual else next(text) for visual in sample["visual"]])
        total = total + torch.nn.functional.cross_entropy(sample["logits"][:-1].float(), short[1:],
                                                          ignore_index=-100, reduction="sum")
        count += int((short[1:] != -100).sum())
    return total / count


LABEL_CASES = [
    pytest.param("qwen2_5_vl", "pool", True, id="qwen2_5_vl-pool-video"),
    pytest.param("qwen3_vl", "random", False, id="qwen3_vl-random"),
    pytest.param("llava", "pool", False, id="llava-pool"),
    pytest.param("llava", "tome", False, id="llava-tome"),
]  # FastV (select and drop) with labels: test_vlm_fastv_drop.py


@pytest.mark.parametrize("family, method, video", LABEL_CASES)
def test_labels_shrink_with_the_sequence_and_the_loss_is_the_references(family, method, video):
    model = model_of(family)
    inputs = inputs_of(family, model, video=video)
    if family == "llava":
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    expected = reference(model, family, inputs, method, 5, seed=3)
    tome.apply_patch(model, visual_tokens=5, method=method, seed=3)
    out = model(**inputs, labels=cases.text_labels(inputs))
    torch.testing.assert_close(out.loss, reference_loss(expected, inputs), atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] < inputs["input_ids"].shape[1] and list(out.keys())[0] == "loss"
    out.loss.backward()  # gradients reach the language model, the projector and the vision tower
    tower = model.model.visual if family != "llava" else model.model.vision_tower
    for part in (model.lm_head, model.model.language_model.layers[0], tower):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_labels_keep_the_signature_the_tuple_output_and_refuse_labels_on_removed_tokens():
    import inspect

    model = model_of("llava")
    signature = inspect.signature(model.forward)
    inputs = inputs_of("llava", model)
    with torch.no_grad():
        unpatched = model(**inputs, labels=inputs["input_ids"]).loss
    tome.apply_patch(model, visual_tokens=4)
    assert inspect.signature(model.forward) == signature
    with torch.no_grad():
        out = model(**inputs, labels=cases.text_labels(inputs))
        as_tuple = model(**inputs, labels=cases.text_labels(inputs), return_dict=False)
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    with pytest.raises(ValueError, match=r"carry labels other than -100: set the labels of image and video "
                                         r"placeholder tokens"):
        model(**inputs, labels=inputs["input_ids"])
    model.visual_tokens = None  # nothing reduced: the model's own loss, bit for bit
    with torch.no_grad():
        assert torch.equal(model(**inputs, labels=inputs["input_ids"]).loss, unpatched)


def test_a_text_only_model_is_refused_naming_its_class_and_the_families():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**cases._text()))
    with pytest.raises(TypeError, match=r"Qwen2ForCausalLM.*Supported families:.*vlm"):
        tome.apply_patch(model, visual_tokens=4)
    with pytest.raises(TypeError, match=r"Qwen2ForCausalLM.*Qwen2_5_VLForConditionalGeneration") as error:
        tome.apply_patch(model, family="vlm", visual_tokens=4)
    assert "Qwen3VLMoeForConditionalGeneration" in str(error.value)


def test_the_inner_model_patches_alone_and_a_compiled_language_model_runs_inside():
    model = model_of("qwen2_5_vl")
    inputs = inputs_of("qwen2_5_vl", model)
    with torch.no_grad():
        expected = tome.apply_patch(copy.deepcopy(model), visual_tokens=5).model(**inputs).last_hidden_state
    inner = tome.apply_patch(model.model, visual_tokens=5)  # Qwen2_5_VLModel: no generation head
    assert type(inner).__name__ == "Qwen2_5_VLModel" and inner.visual_tokens == 5
    torch._dynamo.reset()
    try:
        inner.language_model.compile(backend="eager")
        with torch.no_grad():
            torch.testing.assert_close(inner(**inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


def test_inputs_embeds_instead_of_input_ids_reduce_alike():
    model = tome.apply_patch(model_of("llava"), visual_tokens=5)
    inputs = inputs_of("llava", model)
    with torch.no_grad():
        expected = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        got = model(**{k: v for k, v in inputs.items() if k != "input_ids"}, inputs_embeds=embeds).logits
    assert got.shape == expected.shape
    # the new left padding differs (zeros, not the pad token's embedding) and is masked: the last
    # tokens, which both samples have, agree
    torch.testing.assert_close(got[:, -10:], expected[:, -10:], atol=1e-5, rtol=1e-5)


def test_tome_patch_vlm_is_the_family_function():
    model = tome.patch.vlm(model_of("llava"), visual_tokens=3, positions="renumber")
    assert (model.visual_tokens, model.positions, model.tome_method) == (3, "renumber", "tome")
    tome.patch.vlm(model, method="random")  # only what is given changes
    assert (model.visual_tokens, model.positions, model.tome_method) == (3, "renumber", "random")
