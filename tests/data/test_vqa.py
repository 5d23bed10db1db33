"""The generated question task, its tokenizer and its processors (tome.data.vqa)."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from tome.data import vqa

pytest.importorskip("transformers")


def _digest(sample: vqa.VQASample) -> str:
    return hashlib.md5(sample.image.tobytes() + f"{sample.question}|{sample.answer}".encode()).hexdigest()


def test_a_sample_is_a_pure_function_of_seed_split_and_index():
    first = vqa.make_sample(7, "train", seed=3, image_size=112)
    again = vqa.make_sample(7, "train", seed=3, image_size=112)
    assert _digest(first) == _digest(again) and first.objects == again.objects
    assert first.image.shape == (112, 112, 3) and first.image.dtype == np.uint8
    assert _digest(vqa.make_sample(7, "train", seed=4, image_size=112)) != _digest(first)
    assert _digest(vqa.make_sample(12, "train", seed=3, image_size=112)) != _digest(first)


def test_samples_are_the_ones_the_shipped_models_were_validated_on():
    # Digests of the generator as the shipped VLMs were trained and validated (before clips).
    assert _digest(vqa.make_sample(7, "train", seed=3, image_size=112)) == "c3e80c914dc8000d5ed897dbb6da3948"
    assert _digest(vqa.make_sample(3, "val", seed=0, image_size=224)) == "266138d336d1d10b5f88db3acbc37895"


def test_a_clip_is_the_sample_with_its_objects_moving_together():
    for i in range(15):
        sample, clip = vqa.make_sample(i, "val", image_size=112), vqa.make_clip(i, "val", frames=5, image_size=112,
                                                                                   speed=3.0)
        assert clip.frames.shape == (5, 112, 112, 3) and clip.frames.dtype == np.uint8
        assert np.array_equal(clip.frames[0], sample.image)
        assert (clip.question, clip.answer, clip.slice, clip.objects, clip.number, clip.plate) == (
            sample.question, sample.answer, sample.slice, sample.objects, sample.number, sample.plate)
        velocity = np.array(clip.velocity)
        assert np.linalg.norm(velocity) <= 3.0 + 1e-9
        # Far from every object's path, every frame is the first (same background, plate, noise).
        ys, xs = np.mgrid[0:112, 0:112]
        near = np.zeros((112, 112), dtype=bool)
        for _, _, x, y, r in clip.objects:
            for t in range(5):
                cx, cy = np.array([x, y]) + t * velocity
                near |= np.hypot(xs - cx, ys - cy) <= r * 1.6 + 2
        for t in range(1, 5):
            assert np.array_equal(clip.frames[t][~near], clip.frames[0][~near])
            assert (np.linalg.norm(velocity) > 0) == (not np.array_equal(clip.frames[t], clip.frames[0]))
            for _, _, x, y, r in clip.objects:  # every object stays inside the frame
                cx, cy = np.array([x, y]) + t * velocity
                assert r <= cx <= 112 - r and r <= cy <= 112 - r
    assert sum(np.linalg.norm(vqa.make_clip(i, "val", frames=5, image_size=112, speed=3.0).velocity) > 0
               for i in range(15)) >= 10  # most clips move
    still = vqa.make_clip(2, "val", frames=3, image_size=64, speed=0)
    assert still.velocity == (0.0, 0.0) and all(np.array_equal(f, still.frames[0]) for f in still.frames)
    for bad in ({"frames": 0}, {"frames": 2.5}, {"speed": -1.0}, {"speed": float("nan")}, {"image_size": 32}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vqa.make_clip(0, **bad)


def test_splits_never_share_a_sample():
    train = {_digest(vqa.make_sample(i, "train", image_size=64)) for i in range(15)}
    val = {_digest(vqa.make_sample(i, "val", image_size=64)) for i in range(15)}
    assert len(train) == len(val) == 15 and not train & val


def test_slices_rotate_and_answers_are_balanced():
    drawn = [vqa.answer_of(i, "val") for i in range(5000)]
    assert [s for s, _ in drawn[:10]] == list(vqa.SLICES) * 2
    for name in vqa.SLICES:
        counts = Counter(answer for s, answer in drawn if s == name)
        assert set(counts) == set(vqa.ANSWERS[name]), name
        expected = 1000 / len(vqa.ANSWERS[name])
        # Binomial spread: within 4 standard deviations of a uniform draw.
        assert all(abs(c - expected) < 4 * np.sqrt(expected) for c in counts.values()), (name, counts)
    # answer_of is what make_sample answers, without drawing the image.
    for i in (0, 1, 2, 3, 4, 123):
        sample = vqa.make_sample(i, "val", image_size=64)
        assert (sample.slice, sample.answer) == vqa.answer_of(i, "val")


def _assert_true_of_scene(s: vqa.VQASample, slice_name: str, question: str, answer: str) -> None:
    by_shape = {shape: (colour, x, y) for shape, colour, x, y, _ in s.objects}
    assert len(by_shape) == len(s.objects)  # shapes are distinct, "the circle" is unique
    assert 1 <= len(s.objects) <= 4 and set(question.split()) <= set(vqa.VOCAB)
    assert answer in vqa.ANSWERS[slice_name]
    words = question.split()
    if slice_name == "count":
        assert answer == str(len(s.objects))
    elif slice_name == "exist":
        colour, shape = words[3], words[4]
        present = by_shape.get(shape, (None,))[0] == colour
        assert answer == ("yes" if present else "no")
        if not present:  # adversarial: the shape or the colour is in the scene
            assert shape in by_shape or colour in {c for c, _, _ in by_shape.values()}
    elif slice_name == "colour":
        assert by_shape[words[4]][0] == answer
    elif slice_name == "spatial":
        (_, x0, y0), (_, x1, y1) = by_shape[words[3]], by_shape[words[7]]
        dx, dy = x0 - x1, y0 - y1
        along = {"left": -dx, "right": dx, "above": -dy, "below": dy}[answer]
        across = abs(dy) if answer in ("left", "right") else abs(dx)
        assert along > 0 and 2 * across <= along
    else:
        assert slice_name == "read" and answer == s.number and answer in vqa.ANSWERS["read"]


def test_every_answer_is_true_of_its_scene():
    for i in range(40):
        s = vqa.make_sample(i, "train", seed=1, image_size=112)
        _assert_true_of_scene(s, s.slice, s.question, s.answer)


def test_scene_questions_are_all_true_and_cover_every_slice():
    seen = set()
    for i in range(40):
        s = vqa.make_sample(i, "train", seed=1, image_size=112)
        questions = vqa.scene_questions(s, seed=i)
        assert questions[0] == (s.slice, s.question, s.answer)
        assert len({q for _, q, _ in questions}) == len(questions)  # no question twice
        assert questions == vqa.scene_questions(s, seed=i)  # a pure function of sample and seed
        for slice_name, question, answer in questions:
            _assert_true_of_scene(s, slice_name, question, answer)
        kinds = [(name, answer) for name, _, answer in questions]
        assert {"count", "read", "colour"} <= {name for name, _ in kinds}
        assert ("exist", "yes") in kinds and ("exist", "no") in kinds
        assert sum(name == "colour" for name, _ in kinds) == len(s.objects)
        assert sum(name == "spatial" for name, _ in kinds) <= 2
        seen.update(name for name, _ in kinds)
    assert seen == set(vqa.SLICES)


def test_locate_questions_name_each_objects_side_of_the_centre():
    located = Counter()
    for i in range(40):
        s = vqa.make_sample(i, "train", seed=1, image_size=112)
        plain = vqa.scene_questions(s, seed=i)
        assert vqa.scene_questions(s, seed=i, max_spatial=2, locate=False) == plain  # the default is unchanged
        questions = vqa.scene_questions(s, seed=i, max_spatial=4, locate=True)
        assert questions[0] == plain[0] and sum(name == "spatial" for name, _, _ in questions) <= 4
        by_shape = {shape: (x, y) for shape, _, x, y, _ in s.objects}
        for name, question, answer in questions:
            if name != "locate":
                _assert_true_of_scene(s, name, question, answer)
                continue
            words = question.split()
            assert words[:3] == ["where", "is", "the"] and words[4] == "?" and set(words) <= set(vqa.VOCAB)
            dx, dy = by_shape[words[3]][0] - 56, by_shape[words[3]][1] - 56
            along = {"left": -dx, "right": dx, "above": -dy, "below": dy}[answer]
            assert along > 0 and 2 * (abs(dy) if answer in ("left", "right") else abs(dx)) <= along
            located[answer] += 1
        assert not any(name == "spatial" for name, _, _ in vqa.scene_questions(s, seed=i, max_spatial=0)[1:])
    assert set(located) == {"left", "right", "above", "below"}
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_spatial"):
            vqa.scene_questions(vqa.make_sample(0, image_size=64), max_spatial=bad)


def test_the_number_plate_is_drawn_with_the_bitmap_font():
    # The same scene with another digit differs only inside the small plate.
    sample = vqa.make_sample(4, "val", image_size=224)  # a read question
    assert sample.slice == "read"
    image = sample.image.astype(np.float32) / 255
    bright = (image.min(axis=2) > 0.85)
    ys, xs = np.nonzero(bright)
    # The ink is a 3x5 glyph at 3 px per font pixel: at most 9 x 15 px of near-white pixels.
    assert len(ys) > 0 and ys.max() - ys.min() < 15 + 1 and xs.max() - xs.min() < 9 + 1
    # The record's plate box holds the glyph, inside a 3 px margin of plate colour.
    x, y, w, h = sample.plate
    assert (w, h) == (15, 21)
    assert x + 3 <= xs.min() and xs.max() < x + w - 3 and y + 3 <= ys.min() and ys.max() < y + h - 3


def test_scene_labels_mark_the_objects_and_the_plate_in_row_major_cells():
    for i in range(10):
        sample = vqa.make_sample(i, "val", image_size=224)
        labels = vqa.scene_labels(sample, 16)
        assert {k: v.shape for k, v in labels.items()} == {k: (256,) for k in ("shape", "colour", "digit", "row", "col")}
        for shape, colour, x, y, _ in sample.objects:  # the cell under each centre (row y // 14, column x // 14)
            cell = int(y // 14) * 16 + int(x // 14)
            assert labels["shape"][cell] == vqa.SHAPES.index(shape) + 1
            assert labels["colour"][cell] == vqa.COLOURS.index(colour) + 1
        assert ((labels["shape"] > 0) == (labels["colour"] > 0)).all()
        on_plate = np.flatnonzero(labels["digit"] >= 0)
        assert 1 <= len(on_plate) <= 4 and (labels["digit"][on_plate] == int(sample.number)).all()
        assert set(labels["digit"][labels["digit"] < 0]) <= {-100}
        x, y, w, h = sample.plate  # the plate's centre cell is a plate cell
        assert int((y + h / 2) // 14) * 16 + int((x + w / 2) // 14) in on_plate
        # Each 14 px cell's row and column, in 8 bins of 28 px: cells 2k and 2k + 1 share bin k.
        cells = np.arange(256)
        assert (labels["row"] == cells // 16 // 2).all() and (labels["col"] == cells % 16 // 2).all()
        assert vqa.scene_labels(sample, 1)["shape"].shape == (1,)
    # A grid that does not divide the side: bins of the cells' centres, all of 0..7 used, ordered.
    odd = vqa.scene_labels(vqa.make_sample(0, "val", image_size=224), 11)["col"].reshape(11, 11)
    assert (odd == odd[0]).all() and set(odd[0]) == set(range(vqa.POSITION_BINS)) and (np.diff(odd[0]) >= 0).all()
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="grid"):
            vqa.scene_labels(sample, bad)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="index"):
        vqa.make_sample(-1)
    with pytest.raises(ValueError, match="split"):
        vqa.make_sample(0, "test")
    with pytest.raises(ValueError, match="image_size"):
        vqa.make_sample(0, image_size=32)
    with pytest.raises(ValueError, match="arch"):
        vqa.prompt_text("how many shapes are there ?", "blip")
    with pytest.raises(ValueError, match="multiple of 28"):
        vqa.build_qwen2_5_vl_processor(100)
    with pytest.raises(ValueError, match="image_token"):
        vqa.build_tokenizer("<img>")


def test_the_tokenizer_is_word_level_with_special_tokens():
    tokenizer = vqa.build_tokenizer()
    assert len(tokenizer) == len(vqa.VOCAB) and tokenizer.pad_token_id == 0
    ids = tokenizer(vqa.prompt_text("what colour is the star ?", "qwen2_5_vl", "red")).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [vqa.VISION_START, vqa.IMAGE_TOKEN, vqa.VISION_END, "what",
                                                    "colour", "is", "the", "star", "?", "red", vqa.EOS]
    assert tokenizer.decode(ids[3:9]) == "what colour is the star ?"
    assert tokenizer.convert_ids_to_tokens(tokenizer("a zebra").input_ids) == ["a", vqa.UNK]
    assert tokenizer.image_token == vqa.IMAGE_TOKEN
    assert vqa.build_tokenizer(vqa.LLAVA_IMAGE_TOKEN).image_token == vqa.LLAVA_IMAGE_TOKEN


@pytest.mark.parametrize("image_size, tokens", [(224, 64), (448, 256)])
def test_qwen_processor_expands_the_placeholder_to_the_merged_grid(image_size, tokens):
    processor = vqa.build_qwen2_5_vl_processor(image_size)
    samples = [vqa.make_sample(i, "val", image_size=image_size) for i in range(2)]
    inputs = processor(text=[vqa.prompt_text(s.question, "qwen2_5_vl") for s in samples],
                       images=[vqa.to_pil(s) for s in samples], return_tensors="pt", padding=True)
    side = image_size // 14
    assert inputs["image_grid_thw"].tolist() == [[1, side, side]] * 2
    assert tuple(inputs["pixel_values"].shape) == (2 * side * side, 3 * 2 * 14 * 14)
    image_id = processor.tokenizer.convert_tokens_to_ids(vqa.IMAGE_TOKEN)
    is_image = inputs["input_ids"] == image_id
    assert is_image.sum(dim=1).tolist() == [tokens, tokens]
    # mm_token_type_ids marks exactly the placeholders (1 = image); Qwen's 3-D positions come from it.
    assert inputs["mm_token_type_ids"].tolist() == is_image.long().tolist()
    # Left padding: the prompts end together.
    assert (inputs["input_ids"][:, -1] == processor.tokenizer.convert_tokens_to_ids("?")).all()


def test_llava_processor_expands_the_placeholder_to_the_patch_grid():
    processor = vqa.build_llava_processor(224, patch_size=28)
    sample = vqa.make_sample(0, "val", image_size=224)
    inputs = processor(text=vqa.prompt_text(sample.question, "llava"), images=vqa.to_pil(sample), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 224, 224)
    image_id = processor.tokenizer.convert_tokens_to_ids(vqa.LLAVA_IMAGE_TOKEN)
    assert int((inputs["input_ids"] == image_id).sum()) == 64


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_processor_round_trips_through_a_folder(tmp_path, arch):
    from transformers import AutoProcessor

    processor = vqa.build_qwen2_5_vl_processor(224) if arch == "qwen2_5_vl" else vqa.build_llava_processor(224)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is type(processor)
    sample = vqa.make_sample(3, "val", image_size=224)
    text = vqa.prompt_text(sample.question, arch, sample.answer)
    before = processor(text=text, images=vqa.to_pil(sample), return_tensors="pt")
    after = loaded(text=text, images=vqa.to_pil(sample), return_tensors="pt")
    assert set(before) == set(after)
    for key in before:
        assert before[key].equal(after[key]), key
    assert loaded.tokenizer.padding_side == "left" and len(loaded.tokenizer) == len(vqa.VOCAB)
