"""A generated visual-question task with one-word answers, and its offline tokenizer and processors.

Every sample is a scene of a few shapes (drawn by the renderer of :mod:`tome.data.synthetic`
over its cluttered, textured background) at different sizes, colours and places, plus a small
number plate (one digit in a tiny built-in bitmap font), and one templated question about it.
Questions come in five slices (:data:`SLICES`), in turn by index, so any run of consecutive
indices is balanced across slices; within a slice the answer is drawn first, uniformly over
:data:`ANSWERS` ``[slice]``, and the scene is built to make it true:

- ``count``: "how many shapes are there ?" -> ``1`` .. ``4``
- ``exist``: "is there a red star ?" -> ``yes`` / ``no`` (balanced; a "no" scene holds a
  distractor with the same shape or the same colour, as POPE's adversarial setting)
- ``colour``: "what colour is the circle ?" -> one of :data:`COLOURS`
- ``spatial``: "where is the star relative to the cross ?" -> ``left`` / ``right`` / ``above`` /
  ``below`` (the other axis's offset is at most half of the named one)
- ``read``: "what number is written ?" -> ``0`` .. ``9`` (a digit about 15 px tall at 224 px:
  the fine-detail, OCR-like slice that token reduction hurts first)

A sample is a pure function of ``(seed, split, index)`` like the shapes task; the splits draw
from independent streams. Shapes within one scene are distinct, so "the circle" is unique.

The text side is a word-level vocabulary (:data:`VOCAB`) built with the ``tokenizers``
library (:func:`build_tokenizer`), wrapped as a transformers ``PreTrainedTokenizerFast``; the
processors are transformers' own (:func:`build_qwen2_5_vl_processor`,
:func:`build_llava_processor`), built offline from that tokenizer, so ``processor(text=...,
images=...)`` and ``model.generate(**inputs)`` follow the real path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import synthetic as _shapes

__all__ = [
    "SLICES",
    "SHAPES",
    "POSITION_BINS",
    "COLOURS",
    "ANSWERS",
    "VOCAB",
    "SPECIAL_TOKENS",
    "VQASample",
    "make_sample",
    "VQAClip",
    "make_clip",
    "answer_of",
    "scene_questions",
    "prompt_text",
    "chat_template",
    "build_tokenizer",
    "build_qwen2_5_vl_processor",
    "build_llava_processor",
    "to_pil",
    "scene_labels",
]

POSITION_BINS = 8
"""Bins per image side of the ``row`` / ``col`` labels of :func:`scene_labels`."""

SLICES: Tuple[str, ...] = ("count", "exist", "colour", "spatial", "read")
"""Question slices; sample ``index`` belongs to ``SLICES[index % len(SLICES)]``."""

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
"""The shapes of :data:`tome.data.synthetic.CLASSES` used in scenes (the most distinct six)."""

# Hue (HSV, in turns) of each colour name; drawn with a little jitter, high saturation and value.
_HUES: Dict[str, float] = {"red": 0.0, "yellow": 0.15, "green": 0.33, "cyan": 0.5, "blue": 0.65, "purple": 0.8}
COLOURS: Tuple[str, ...] = tuple(_HUES)
"""Colour names an object can have."""

ANSWERS: Dict[str, Tuple[str, ...]] = {
    "count": ("1", "2", "3", "4"),
    "exist": ("yes", "no"),
    "colour": COLOURS,
    "spatial": ("left", "right", "above", "below"),
    "read": tuple(str(d) for d in range(10)),
}
"""The possible answers of each slice (each drawn uniformly)."""

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
LLAVA_IMAGE_TOKEN = "<image>"
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS: Tuple[str, ...] = (PAD, EOS, UNK, IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END,
                                   LLAVA_IMAGE_TOKEN)
"""Special tokens, first in the vocabulary (``<pad>`` is id 0)."""

_WORDS: Tuple[str, ...] = ("how", "many", "shapes", "are", "there", "is", "a", "what", "colour", "the",
                           "where", "relative", "to", "number", "written", "?")
VOCAB: Tuple[str, ...] = tuple(dict.fromkeys(
    SPECIAL_TOKENS + _WORDS + SHAPES + COLOURS + tuple(w for s in SLICES for w in ANSWERS[s])))
"""The whole vocabulary in id order (special tokens, question words, names, answers)."""

_RADIUS = (0.07, 0.13)  # object radius as a fraction of the image size
_SAT = (0.75, 1.0)  # HSV saturation of object colours
_VAL = (0.8, 1.0)  # HSV value of object colours: brighter than any background (value <= 0.5)

# A 3x5 bitmap font: each digit is five rows of three bits, most significant bit on the left.
_FONT: Dict[str, Tuple[int, ...]] = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 2, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
}


@dataclass(frozen=True)
class VQASample:
    """One question about one image.

    Attributes:
        image: uint8 array ``(image_size, image_size, 3)``.
        question: The question, words separated by single spaces (all in :data:`VOCAB`).
        answer: The one-word answer (in :data:`ANSWERS` ``[slice]``).
        slice: The question's slice (in :data:`SLICES`).
        objects: The scene: one ``(shape, colour, x, y, radius)`` per object, in pixels.
        number: The digit on the number plate.
        plate: The number plate's box ``(x, y, width, height)`` in pixels (the digit fills
            its middle three fifths across and five sevenths down).
    """

    image: np.ndarray
    question: str
    answer: str
    slice: str
    objects: Tuple[Tuple[str, str, float, float, float], ...]
    number: str
    plate: Tuple[int, int, int, int]


def _colour_rgb(rng: np.random.Generator, name: str) -> np.ndarray:
    import colorsys

    hue = (_HUES[name] + rng.uniform(-0.03, 0.03)) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*_SAT), rng.uniform(*_VAL)), dtype=np.float32)


def _place(rng: np.random.Generator, size: int, radii: Sequence[float], keep_out: Tuple[float, float, float, float],
           constraint: Optional[str] = None) -> Optional[np.ndarray]:
    """Centres (n, 2) for discs of the given radii that overlap neither each other nor ``keep_out``.

    ``constraint`` (``left`` / ``right`` / ``above`` / ``below``) makes disc 0 lie clearly on that
    side of disc 1: its offset along that axis at least twice the offset along the other.
    Returns ``None`` when no placement is found in a few hundred tries.
    """
    x0, y0, x1, y1 = keep_out
    for _ in range(400):
        centres = np.stack([rng.uniform(r + 1, size - r - 1, 2) for r in radii])
        if constraint is not None:
            dx, dy = centres[0] - centres[1]
            along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[constraint]
            if along <= 0 or abs(across) * 2 > along:
                continue
        ok = True
        for i, (c, r) in enumerate(zip(centres, radii)):
            # Keep a gap of a few pixels between objects, and clear of the number plate.
            nearest_x, nearest_y = np.clip(c[0], x0, x1), np.clip(c[1], y0, y1)
            if math.hypot(c[0] - nearest_x, c[1] - nearest_y) < r + 2:
                ok = False
                break
            for c2, r2 in zip(centres[:i], radii[:i]):
                if math.hypot(*(c - c2)) < r + r2 + 3:
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return centres
    return None


def _draw_number(image: np.ndarray, digit: str, x: int, y: int, scale: int, plate: np.ndarray,
                 ink: np.ndarray) -> None:
    """Paint a plate with one digit of :data:`_FONT` (each font pixel ``scale`` px) at ``(x, y)``, in place."""
    margin = scale
    h, w = 5 * scale + 2 * margin, 3 * scale + 2 * margin
    image[y:y + h, x:x + w] = plate
    for row, bits in enumerate(_FONT[digit]):
        for col in range(3):
            if bits >> (2 - col) & 1:
                top, left = y + margin + row * scale, x + margin + col * scale
                image[top:top + scale, left:left + scale] = ink


def _scene_spec(rng: np.random.Generator, slice_name: str, answer: str) -> Tuple[List[Tuple[str, str]], str, str]:
    """Objects ``[(shape, colour), ...]`` (object 0 and 1 are the ones asked about), the question, the constraint."""
    shapes = [str(s) for s in rng.permutation(SHAPES)]
    colours = [str(c) for c in rng.choice(COLOURS, size=len(SHAPES))]
    constraint = ""
    if slice_name == "count":
        n = int(answer)
        return list(zip(shapes[:n], colours[:n])), "how many shapes are there ?", constraint
    n = int(rng.integers(2, 5))
    objects = list(zip(shapes[:n], colours[:n]))
    if slice_name == "exist":
        shape, colour = objects[0]
        if answer == "no":
            # Adversarial "no": the asked pair is absent, but its shape or its colour is present.
            other = [c for c in COLOURS if c != colour]
            if rng.random() < 0.5:  # the shape is present (once, shapes are distinct) in another colour
                colour = str(rng.choice(other))
            else:  # same colour on another shape; the asked shape is absent
                shape = shapes[n]
        question = f"is there a {colour} {shape} ?"
        if answer == "no":
            assert (shape, colour) not in objects
        return objects, question, constraint
    if slice_name == "colour":
        objects[0] = (objects[0][0], answer)
        return objects, f"what colour is the {objects[0][0]} ?", constraint
    if slice_name == "spatial":
        return objects, f"where is the {objects[0][0]} relative to the {objects[1][0]} ?", answer
    if slice_name == "read":
        return objects, "what number is written ?", constraint
    raise AssertionError(slice_name)


def _draw_answer(index: int, split: str, seed: int) -> Tuple[str, str, np.random.Generator]:
    """The slice and answer of sample ``index`` (the first draw of its stream), and the stream."""
    slice_name = SLICES[index % len(SLICES)]
    # Stream 1000 + split keeps this task's randomness apart from the shapes task's.
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 1000 + _shapes.SPLITS[split], index])
    answers = ANSWERS[slice_name]
    return slice_name, answers[int(rng.integers(len(answers)))], rng


def answer_of(index: int, split: str = "train", seed: int = 0) -> Tuple[str, str]:
    """``(slice, answer)`` of sample ``index`` without drawing its image (as :func:`make_sample` gives them).

    Raises:
        ValueError: for a negative index or an unknown split.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if split not in _shapes.SPLITS:
        raise ValueError(f"split must be one of {list(_shapes.SPLITS)}, got {split!r}")
    slice_name, answer, _ = _draw_answer(int(index), split, seed)
    return slice_name, answer


def make_sample(index: int, split: str = "train", seed: int = 0, image_size: int = 224) -> VQASample:
    """Generate sample ``index`` of the task: an image, a question and its one-word answer.

    Args:
        index: Sample number within the split (non-negative int); its slice is
            ``SLICES[index % len(SLICES)]``.
        split: ``"train"`` or ``"val"`` (independent streams).
        seed: Seed of the whole task.
        image_size: Height and width in pixels (at least 64).

    Returns:
        A :class:`VQASample`.

    Raises:
        ValueError: for a negative index, an unknown split or an image smaller than 64 px.
    """
    _check(index, split, image_size)
    frames, record, _ = _render(int(index), split, seed, int(image_size), frames=1, speed=0.0)
    return VQASample(frames[0], *record)


def _check(index: int, split: str, image_size: int) -> None:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if split not in _shapes.SPLITS:
        raise ValueError(f"split must be one of {list(_shapes.SPLITS)}, got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 64:
        raise ValueError(f"image_size must be an int >= 64, got {image_size!r}")


@dataclass(frozen=True)
class VQAClip:
    """One question about a short clip: the scene of :func:`make_sample` with its objects moving.

    Attributes:
        frames: uint8 array ``(frames, image_size, image_size, 3)``; frame 0 is the sample's image.
        question, answer, slice, objects, number, plate: As :class:`VQASample` (objects at
            frame 0); every answer holds in every frame (the objects move together, so
            relations keep, and the plate stays).
        velocity: The objects' common motion ``(dx, dy)`` in pixels per frame.
    """

    frames: np.ndarray
    question: str
    answer: str
    slice: str
    objects: Tuple[Tuple[str, str, float, float, float], ...]
    number: str
    plate: Tuple[int, int, int, int]
    velocity: Tuple[float, float]


def make_clip(index: int, split: str = "train", seed: int = 0, frames: int = 4, image_size: int = 224,
              speed: float = 4.0) -> VQAClip:
    """Sample ``index`` of the task as a clip: the same scene over ``frames`` frames, objects moving.

    The background and number plate stay; every object moves by one common velocity (its
    direction drawn per index from a stream of its own, its length ``speed`` or, where that
    would take an object out of the image or over the plate, 3/4, 1/2, 1/4 of it or 0). So the
    question and answer of :func:`make_sample` hold in every frame, and the tokens at one place
    in consecutive frames are near-duplicates: the redundancy a temporal rule should merge first.

    Args:
        index: Sample number (non-negative int), as :func:`make_sample`.
        split: ``"train"`` or ``"val"``.
        seed: Seed of the whole task.
        frames: Frames in the clip (int >= 1).
        image_size: Frame side in pixels (at least 64).
        speed: Object motion in pixels per frame (>= 0).

    Returns:
        A :class:`VQAClip`; ``make_clip(i).frames[0]`` equals ``make_sample(i).image``.

    Raises:
        ValueError: for what :func:`make_sample` refuses, ``frames`` below 1 or a negative ``speed``.
    """
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed >= 0:
        raise ValueError(f"speed must be a number >= 0 (pixels per frame), got {speed!r}")
    _check(index, split, image_size)
    images, record, velocity = _render(int(index), split, seed, int(image_size), int(frames), float(speed))
    return VQAClip(np.stack(images), *record, velocity=(float(velocity[0]), float(velocity[1])))


def _render(index: int, split: str, seed: int, size: int, frames: int,
            speed: float) -> Tuple[List[np.ndarray], Tuple[Any, ...], np.ndarray]:
    """The scene of sample ``index`` drawn ``frames`` times, its objects moving together ``speed`` px a frame.

    Frame 0 is :func:`make_sample`'s image. Returns the frames, the sample's other fields
    (question, answer, slice, objects at frame 0, number, plate box) and the velocity (px per frame, ``(2,)``).
    """
    slice_name, answer, rng = _draw_answer(index, split, seed)
    number = str(int(rng.integers(10))) if slice_name != "read" else answer

    background, _, _ = _shapes._background(rng, size)
    # The number plate: dark, with a light digit, somewhere in the image.
    scale = max(1, round(size / 75))
    plate_w, plate_h = 5 * scale, 7 * scale
    px, py = int(rng.integers(0, size - plate_w)), int(rng.integers(0, size - plate_h))
    keep_out = (px - 1.0, py - 1.0, px + plate_w + 1.0, py + plate_h + 1.0)

    while True:
        objects, question, constraint = _scene_spec(rng, slice_name, answer)
        radii = [float(rng.uniform(*_RADIUS) * size) for _ in objects]
        centres = _place(rng, size, radii, keep_out, constraint or None)
        if centres is not None:
            break
    velocity = _velocity(index, split, seed, size, centres, radii, keep_out, frames, speed)
    labels = {name: _shapes.CLASSES.index(name) for name in SHAPES}
    state = rng.bit_generator.state
    images, drawn = [], []
    for t in range(frames):
        rng.bit_generator.state = state  # every frame draws the same objects, noise and plate
        image, drawn = background, []
        for (shape, colour), centre, radius in zip(objects, centres, radii):
            rgb = _colour_rgb(rng, colour)
            image = _shapes._paint_shape(image, labels[shape], centre + t * velocity, radius,
                                         rng.uniform(0, 2 * math.pi), rng.uniform(0.9, 1.1), rgb,
                                         rng.uniform(0, 2 * math.pi))
            drawn.append((shape, colour, float(centre[0]), float(centre[1]), radius))
        image = image.copy()
        plate = np.full(3, rng.uniform(0.0, 0.1), dtype=np.float32)
        ink = np.full(3, rng.uniform(0.9, 1.0), dtype=np.float32)
        _draw_number(image, number, px, py, scale, plate, ink)
        images.append(_shapes._finish(rng, image))
    # Shuffle the drawing order out of the record, so object 0 is not always the asked one.
    order = rng.permutation(len(drawn))
    record = (question, answer, slice_name, tuple(drawn[i] for i in order), number, (px, py, plate_w, plate_h))
    return images, record, velocity


def _velocity(index: int, split: str, seed: int, size: int, centres: np.ndarray, radii: Sequence[float],
              keep_out: Tuple[float, float, float, float], frames: int, speed: float) -> np.ndarray:
    """A common velocity (px per frame, ``(2,)``) that keeps every object inside the image and off the plate.

    The direction is drawn from its own stream (the scene's is untouched); the speed is the
    largest of ``speed``, 3/4, 1/2, 1/4 of it or 0 under which no object leaves the image or
    touches the number plate in any frame.
    """
    if frames <= 1 or speed == 0:
        return np.zeros(2)
    angle = np.random.default_rng([int(seed) & 0xFFFFFFFF, 2000 + _shapes.SPLITS[split], index]).uniform(0, 2 * math.pi)
    direction = np.array([math.cos(angle), math.sin(angle)])
    x0, y0, x1, y1 = keep_out
    for factor in (1.0, 0.75, 0.5, 0.25):
        velocity = factor * speed * direction
        ok = True
        for t in range(1, frames):
            for c, r in zip(centres + t * velocity, radii):
                inside = r + 1 <= c[0] <= size - r - 1 and r + 1 <= c[1] <= size - r - 1
                clear = math.hypot(c[0] - np.clip(c[0], x0, x1), c[1] - np.clip(c[1], y0, y1)) >= r + 2
                ok = ok and inside and clear
        if ok:
            return velocity
    return np.zeros(2)


def _relation(a: Tuple[str, str, float, float, float], b: Tuple[str, str, float, float, float]) -> Optional[str]:
    """Where object ``a`` is relative to ``b`` by the spatial slice's rule, or ``None`` if no word fits."""
    dx, dy = a[2] - b[2], a[3] - b[3]
    for word, along, across in (("left", -dx, dy), ("right", dx, dy), ("above", -dy, dx), ("below", dy, dx)):
        if along > 0 and 2 * abs(across) <= along:
            return word
    return None


def _spatial_questions(objects: Sequence[Tuple[str, str, float, float, float]], rng: np.random.Generator,
                       max_spatial: int) -> List[Tuple[str, str, str]]:
    """Up to ``max_spatial`` spatial questions about distinct pairs of ``objects`` that fit the rule."""
    pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects)) if i != j]
    spatial, questions = [], []
    for k in rng.permutation(len(pairs)) if pairs and max_spatial else []:
        i, j = pairs[int(k)]
        word = _relation(objects[i], objects[j])
        if word is not None and not any({i, j} == pair for pair in spatial):
            spatial.append({i, j})
            questions.append(("spatial", f"where is the {objects[i][0]} relative to the {objects[j][0]} ?", word))
        if len(spatial) >= max_spatial:
            break
    return questions


def scene_questions(sample: VQASample, seed: int = 0, max_spatial: int = 2,
                    locate: bool = False) -> List[Tuple[str, str, str]]:
    """Every templated question the scene of ``sample`` answers, as ``(slice, question, answer)``.

    Denser supervision for training: one image answers its own question (first in the list)
    and, in shuffled order, the count, the number, the colour of every shape, one true and one
    adversarial false existence question (as :func:`make_sample` builds them) and up to
    ``max_spatial`` spatial questions about pairs that satisfy the spatial slice's rule (the
    offset along the named axis at least twice the other). Each answer is read off
    ``sample.objects`` and ``sample.number``, so it is true of the image.

    With ``locate``, every object whose place fits the spatial rule against the image centre
    also gets "where is the star ?" -> ``left`` / ``right`` / ``above`` / ``below`` (slice name
    ``"locate"``, for training only: not one of :data:`SLICES`). It asks for one named object's
    place, half of what a spatial question asks, as a step towards it.

    Args:
        sample: A sample of :func:`make_sample`.
        seed: Seed of the choices and the order (a pure function of ``sample`` and ``seed``).
        max_spatial: At most this many spatial questions (a non-negative int).
        locate: Add the ``"locate"`` questions. Without it the list is what it was before the
            option existed (same questions, same order).

    Returns:
        A list of ``(slice, question, answer)``; ``[0]`` is the sample's own question.

    Raises:
        ValueError: for a ``max_spatial`` that is not a non-negative int.
    """
    if isinstance(max_spatial, bool) or not isinstance(max_spatial, (int, np.integer)) or max_spatial < 0:
        raise ValueError(f"max_spatial must be a non-negative int, got {max_spatial!r}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 2000])
    objects = sample.objects
    present = {shape for shape, *_ in objects}
    extra: List[Tuple[str, str, str]] = [("count", "how many shapes are there ?", str(len(objects))),
                                         ("read", "what number is written ?", sample.number)]
    extra += [("colour", f"what colour is the {shape} ?", colour) for shape, colour, *_ in objects]
    shape, colour = objects[int(rng.integers(len(objects)))][:2]
    extra.append(("exist", f"is there a {colour} {shape} ?", "yes"))
    shape, colour = objects[int(rng.integers(len(objects)))][:2]
    if rng.random() < 0.5:  # the shape is present in another colour
        colour = str(rng.choice([c for c in COLOURS if c != colour]))
    else:  # the colour is present on a shape that is absent
        shape = str(rng.choice([s for s in SHAPES if s not in present]))
    extra.append(("exist", f"is there a {colour} {shape} ?", "no"))
    extra += _spatial_questions(objects, rng, max_spatial)
    if locate:
        centre = ("", "", sample.image.shape[1] / 2, sample.image.shape[0] / 2, 0.0)
        extra += [("locate", f"where is the {obj[0]} ?", word) for obj in objects
                  if (word := _relation(obj, centre)) is not None]
    own = (sample.slice, sample.question, sample.answer)
    extra = [q for q in extra if q != own]
    return [own] + [extra[int(k)] for k in rng.permutation(len(extra))]


def prompt_text(question: str, arch: str, answer: Optional[str] = None) -> str:
    """The model's input text for ``question``: image placeholder, question, then ``answer <eos>`` if given.

    Args:
        question: A question of the task.
        arch: ``"qwen2_5_vl"`` (``<|vision_start|><|image_pad|><|vision_end|>``) or ``"llava"``
            (``<image>``); the processor expands the one placeholder to the image's tokens.
        answer: Appended with ``<eos>`` for teacher-forced training; ``None`` for generation.

    Raises:
        ValueError: for an unknown ``arch``.
    """
    if arch == "qwen2_5_vl":
        image = f"{VISION_START}{IMAGE_TOKEN}{VISION_END}"
    elif arch == "llava":
        image = LLAVA_IMAGE_TOKEN
    else:
        raise ValueError(f"arch must be 'qwen2_5_vl' or 'llava', got {arch!r}")
    text = f"{image} {question}"
    return text if answer is None else f"{text} {answer} {EOS}"


def chat_template(arch: str) -> str:
    """The processor's chat template: renders chat messages as :func:`prompt_text` writes the prompt.

    Harnesses that speak chat (lmms-eval's ``huggingface`` model calls
    ``processor.apply_chat_template(messages, add_generation_prompt=True)``) then give the
    models exactly the input they were trained on: each image or video item becomes the
    architecture's placeholder, text items their words, all joined by single spaces; roles
    add nothing (the task has no turns) and the generation prompt is empty (the answer word
    follows the question directly).

    Args:
        arch: ``"qwen2_5_vl"`` or ``"llava"``.

    Raises:
        ValueError: for an unknown ``arch``.
    """
    if arch == "qwen2_5_vl":
        image, video = f"{VISION_START}{IMAGE_TOKEN}{VISION_END}", f"{VISION_START}{VIDEO_TOKEN}{VISION_END}"
    elif arch == "llava":
        image, video = LLAVA_IMAGE_TOKEN, VIDEO_TOKEN
    else:
        raise ValueError(f"arch must be 'qwen2_5_vl' or 'llava', got {arch!r}")
    return (
        "{%- set ns = namespace(parts=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set ns.parts = ns.parts + [message['content']] -%}"
        "{%- else -%}{%- for item in message['content'] -%}"
        f"{{%- if item['type'] == 'image' -%}}{{%- set ns.parts = ns.parts + ['{image}'] -%}}"
        f"{{%- elif item['type'] == 'video' -%}}{{%- set ns.parts = ns.parts + ['{video}'] -%}}"
        "{%- elif item['type'] == 'text' -%}{%- set ns.parts = ns.parts + [item['text']] -%}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
        "{{- ns.parts | join(' ') -}}"
    )


def build_tokenizer(image_token: str = IMAGE_TOKEN) -> Any:
    """The task's word-level tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Words split on whitespace; special tokens (:data:`SPECIAL_TOKENS`) are matched anywhere,
    so ``<|vision_start|><|image_pad|>`` needs no spaces. Padding is on the left, as batched
    generation needs.

    Args:
        image_token: What ``tokenizer.image_token`` names (processors read it): ``<|image_pad|>``
            (Qwen2.5-VL) or ``<image>`` (LLaVA). Both are in the vocabulary either way.

    Raises:
        ValueError: if ``image_token`` is neither.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``len(tokenizer) == len(VOCAB)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if image_token not in (IMAGE_TOKEN, LLAVA_IMAGE_TOKEN):
        raise ValueError(f"image_token must be {IMAGE_TOKEN!r} or {LLAVA_IMAGE_TOKEN!r}, got {image_token!r}")
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder with an impossible prefix joins words with spaces.
    backend.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left",
        model_max_length=4096,
        extra_special_tokens={"image_token": image_token, "video_token": VIDEO_TOKEN,
                              "vision_start_token": VISION_START, "vision_end_token": VISION_END})
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[3:])})
    return tokenizer


def build_qwen2_5_vl_processor(image_size: int = 224, tokenizer: Any = None) -> Any:
    """A ``Qwen2_5_VLProcessor`` for the task, built offline.

    The image processor is ``Qwen2VLImageProcessor`` with patch 14, 2x2 merge and its pixel
    budget pinned to ``image_size**2``, so a square image of ``image_size`` px (a multiple of
    28) becomes ``(image_size / 28)**2`` visual tokens. ``processor(text=..., images=...)``
    gives ``input_ids`` (one ``<|image_pad|>`` per visual token), ``attention_mask``,
    ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids``.

    Args:
        image_size: Side in pixels of the (square) images; a multiple of 28.
        tokenizer: The tokenizer; :func:`build_tokenizer` when ``None``.

    Raises:
        ValueError: if ``image_size`` is not a positive multiple of 28.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 28 or image_size % 28:
        raise ValueError(f"image_size must be a positive multiple of 28 (patch 14 x merge 2), got {image_size!r}")
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, merge_size=2, temporal_patch_size=2,
        image_mean=list(_shapes.MEAN), image_std=list(_shapes.STD))
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels * 16}, patch_size=14, merge_size=2,
        temporal_patch_size=2, image_mean=list(_shapes.MEAN), image_std=list(_shapes.STD))
    return Qwen2_5_VLProcessor(image_processor=image_processor, video_processor=video_processor,
                               tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
                               chat_template=chat_template("qwen2_5_vl"))


def build_llava_processor(image_size: int = 224, patch_size: int = 28, tokenizer: Any = None) -> Any:
    """A ``LlavaProcessor`` (``CLIPImageProcessor`` + the task's tokenizer) for the task, built offline.

    Images are resized to ``image_size`` square (no crop); ``<image>`` expands to
    ``(image_size / patch_size)**2`` placeholders (the CLS token is dropped, as LLaVA-1.5's
    ``"default"`` feature strategy does).

    Args:
        image_size: Side in pixels of the images the CLIP tower takes.
        patch_size: The tower's patch size (must divide ``image_size``).
        tokenizer: The tokenizer; ``build_tokenizer("<image>")`` when ``None``.

    Raises:
        ValueError: if ``patch_size`` does not divide ``image_size``.
    """
    from transformers import CLIPImageProcessor, LlavaProcessor

    if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"patch_size must divide image_size, got patch_size={patch_size!r}, "
                         f"image_size={image_size!r}")
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size}, do_center_crop=False, do_convert_rgb=True,
        image_mean=list(_shapes.MEAN), image_std=list(_shapes.STD))
    tok = tokenizer if tokenizer is not None else build_tokenizer(LLAVA_IMAGE_TOKEN)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template("llava"))


def to_pil(sample: VQASample) -> Image.Image:
    """The sample's image as a PIL RGB image."""
    return Image.fromarray(sample.image)


def scene_labels(sample: VQASample, grid: int) -> Dict[str, np.ndarray]:
    """What lies under each cell of a ``grid x grid`` split of the sample's image, for dense supervision.

    Cells are in row-major order, as a ViT's patch tokens (or Qwen2.5-VL's merged tokens) of
    that grid are. An object covers a cell when the cell's centre is within 0.8 of its radius
    of the object's centre (inside the drawn shape for all six shapes at any rotation, or
    nearly); the plate covers a cell that holds at least 15 % of the plate's area. Every cell
    also gets its own place: the row and the column, in :data:`POSITION_BINS` equal bins of the
    image side, that its centre falls in (what a CLIP tower's absolute position embeddings keep
    in its patch tokens, and a tower with rotary positions only, as Qwen2.5-VL's, has no input
    for: the spatial slice needs it in the tokens the language model reads).

    Args:
        sample: A :class:`VQASample`.
        grid: Cells per side (a positive int; the image side need not be a multiple).

    Returns:
        int64 arrays of shape ``(grid * grid,)``: ``"shape"`` (1 + index in :data:`SHAPES`, 0 for
        no object), ``"colour"`` (1 + index in :data:`COLOURS`, 0 for none) and ``"digit"``
        (the plate's digit 0-9 on plate cells, -100 elsewhere: cross-entropy's ignore index),
        ``"row"`` and ``"col"`` (0 to ``POSITION_BINS - 1``, every cell).

    Raises:
        ValueError: for a ``grid`` that is not a positive int.
    """
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid <= 0:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    cell = sample.image.shape[0] / grid
    edges = np.arange(grid + 1) * cell
    centres = (edges[:-1] + edges[1:]) / 2
    cy, cx = (a.reshape(-1) for a in np.meshgrid(centres, centres, indexing="ij"))
    shape = np.zeros(grid * grid, dtype=np.int64)
    colour = np.zeros(grid * grid, dtype=np.int64)
    for name, colour_name, x, y, radius in sample.objects:
        inside = (cx - x) ** 2 + (cy - y) ** 2 < (0.8 * radius) ** 2
        shape[inside] = SHAPES.index(name) + 1
        colour[inside] = COLOURS.index(colour_name) + 1
    px, py, width, height = sample.plate
    overlap_x = np.clip(np.minimum(edges[1:], px + width) - np.maximum(edges[:-1], px), 0, None)
    overlap_y = np.clip(np.minimum(edges[1:], py + height) - np.maximum(edges[:-1], py), 0, None)
    on_plate = (overlap_y[:, None] * overlap_x[None, :]).reshape(-1) >= 0.15 * width * height
    digit = np.where(on_plate, int(sample.number), -100).astype(np.int64)
    bins = np.minimum((centres / sample.image.shape[0] * POSITION_BINS).astype(np.int64), POSITION_BINS - 1)
    row, col = (a.reshape(-1) for a in np.meshgrid(bins, bins, indexing="ij"))
    return {"shape": shape, "colour": colour, "digit": digit, "row": row, "col": col}
