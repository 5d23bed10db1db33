"""Short generated video clips for the shapes task: one shape moving over a still background.

A clip shows one object of :data:`tome.data.synthetic.CLASSES` travelling in a straight line
at constant speed (and turning slowly) over the task's cluttered, textured background (or,
with ``background="plain"``, over that background's flat base colour), which stays still;
each frame gets its own sensor noise. Drawing reuses :mod:`tome.data.synthetic`,
so a frame looks like an image of the shapes task (the shipped shapes classifier reads frames
upsampled to its 64 px). The label is the class of the object.

A clip is a pure function of ``(seed, split, index)``, as :func:`tome.data.synthetic.render`'s
images are; the label of clip ``index`` is ``index % len(CLASSES)``, so a run of consecutive
indices is balanced. Clips draw from their own random stream: clip ``i`` is not image ``i``.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

from . import synthetic
from .synthetic import CLASSES, SPLITS

__all__ = ["render_clip", "clip_batch", "MIN_TRAVEL", "BACKGROUNDS"]

MIN_TRAVEL = 0.25
"""Least distance the object's centre travels over a clip, as a fraction of the frame size."""

BACKGROUNDS = ("cluttered", "plain")
"""What a clip's object moves over: the shapes task's textured, cluttered background, or its
base colour alone (an easier target for a small generator; the shipped shapes classifier finds
the class in 98.4 % of plain 48 px frames against 93.4 % of cluttered ones, 200 val clips)."""

_STREAM = 0x0C11  # tags the clip stream, so clips and the still images draw different numbers
_TURN = 0.12  # largest rotation per frame, radians


def _check(index: object, split: str, frames: object, size: object, background: object = "cluttered") -> None:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")


def render_clip(index: int, split: str = "train", seed: int = 0, frames: int = 8,
                size: int = 32, background: str = "cluttered") -> Tuple[np.ndarray, int]:
    """Draw one clip.

    The object's start and end points are drawn inside the frame (a margin of its radius plus
    one pixel), at least :data:`MIN_TRAVEL` of the frame apart; it moves between them at
    constant velocity and turns at a constant rate of at most 0.12 rad per frame.

    Args:
        index: Clip number within the split (any non-negative int).
        split: ``"train"`` or ``"val"``; each split is an independent stream.
        seed: Seed of the whole task.
        frames: Frames per clip (at least 2).
        size: Frame height and width in pixels (at least 16).
        background: One of :data:`BACKGROUNDS`. A plain clip is the cluttered clip of the same
            index with the background replaced by its base colour: the same object, colour,
            path and sensor noise.

    Returns:
        ``(clip, label)``: uint8 frames of shape ``(frames, size, size, 3)`` and
        ``index % len(CLASSES)``.

    Raises:
        ValueError: for a negative index, an unknown split, fewer than 2 frames, a
            frame smaller than 16 px or an unknown background.
    """
    _check(index, split, frames, size, background)
    index, frames, size = int(index), int(frames), int(size)
    label = index % len(CLASSES)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, SPLITS[split], index, _STREAM])
    background_image, base, second = synthetic._background(rng, size)
    if background == "plain":  # drawn all the same, so the rest of the clip takes the same numbers
        background_image = np.broadcast_to(base, background_image.shape).astype(np.float32)
    colour = synthetic._colour_far_from(rng, np.stack([base, second]), synthetic._STYLE["object_contrast"])
    radius = rng.uniform(*synthetic._STYLE["radius"]) * size
    margin = radius + 1.0
    start = rng.uniform(margin, size - margin, 2)
    end = start
    for _ in range(64):  # rejection: a far enough end point (found in a few tries for every radius)
        end = rng.uniform(margin, size - margin, 2)
        if np.linalg.norm(end - start) >= MIN_TRAVEL * size:
            break
    angle, turn = rng.uniform(0, 2 * math.pi), rng.uniform(-_TURN, _TURN)
    aspect, light = rng.uniform(0.88, 1.12), rng.uniform(0, 2 * math.pi)
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        center = start + (end - start) * t / (frames - 1)
        image = synthetic._paint_shape(background_image, label, center, radius, angle + turn * t, aspect, colour, light)
        clip[t] = synthetic._finish(rng, image)
    return clip, label


def clip_batch(indices: "range | list[int]", split: str = "train", seed: int = 0, frames: int = 8,
               size: int = 32, background: str = "cluttered") -> Tuple[torch.Tensor, torch.Tensor]:
    """Clips as a normalised float batch, the layout video diffusion transformers read.

    Args:
        indices: Clip numbers.
        split, seed, frames, size, background: As :func:`render_clip`.

    Returns:
        ``(videos, labels)``: float32 ``(batch, 3, frames, size, size)`` in ``[-1, 1]``
        (``(x - MEAN) / STD`` of :mod:`tome.data.synthetic`) and int64 ``(batch,)``.

    Raises:
        ValueError: as :func:`render_clip`, or for no indices.
    """
    indices = list(indices)
    if not indices:
        raise ValueError("indices must name at least one clip, got none")
    clips, labels = zip(*(render_clip(i, split, seed, frames, size, background) for i in indices))
    videos = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 255.0
    mean = torch.tensor(synthetic.MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(synthetic.STD).view(1, 3, 1, 1, 1)
    return (videos - mean) / std, torch.tensor(labels, dtype=torch.int64)
