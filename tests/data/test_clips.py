"""The generated clips: deterministic, balanced, a shape that really moves over a still background."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tome.data import synthetic
from tome.data.clips import MIN_TRAVEL, clip_batch, render_clip


def test_a_clip_is_a_pure_function_of_seed_split_and_index():
    clip, label = render_clip(7, "train", seed=3, frames=6, size=24)
    again, label_again = render_clip(7, "train", seed=3, frames=6, size=24)
    assert clip.dtype == np.uint8 and clip.shape == (6, 24, 24, 3)
    np.testing.assert_array_equal(clip, again)
    assert label == label_again == 7
    for other in (render_clip(7, "train", seed=4, frames=6, size=24), render_clip(7, "val", seed=3, frames=6, size=24),
                  render_clip(17, "train", seed=3, frames=6, size=24)):
        assert not np.array_equal(clip, other[0])
    # Clips have their own random stream: clip i is not still image i repeated.
    assert not np.array_equal(clip[0], synthetic.render(7, "train", seed=3, image_size=24)[0])


def test_labels_are_balanced_over_consecutive_indices():
    videos, labels = clip_batch(range(20), "val", frames=2, size=16)
    assert videos.shape == (20, 3, 2, 16, 16) and videos.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert set(Counter(labels.tolist()).values()) == {2}
    assert -1.0 <= videos.min() and videos.max() <= 1.0 and videos.std() > 0.1


def _changed_centre(frames: np.ndarray, a: int, b: int) -> np.ndarray:
    """Centre (x, y) of the pixels that differ between frames a and b by far more than the noise."""
    ys, xs = np.nonzero(np.abs(frames[a] - frames[b]).max(-1) > 60)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("index", range(10))
def test_the_shape_moves_in_a_straight_line_over_a_still_background(index):
    clip, _ = render_clip(index, "train", frames=8, size=48)
    frames = clip.astype(np.int16)
    # The background does not move: most pixels stay within the sensor noise (sigma 0.02 = 5 levels).
    still = (np.abs(frames[0] - frames[-1]).max(-1) < 25).mean()
    assert still > 0.5
    # The object does: the first and last frames differ over a sizeable area. What changed
    # between frames 0 and t is centred near the midpoint of the object's two positions, so
    # that centre travels half the object's way: from frame 1 to frame 7, 3/7 of at least
    # MIN_TRAVEL of the frame (a turning object that stays put keeps it in place).
    assert (np.abs(frames[0] - frames[-1]).max(-1) > 60).mean() > 0.02
    centres = np.stack([_changed_centre(frames, 0, t) for t in range(1, 8)])
    assert np.linalg.norm(centres[-1] - centres[0]) > 0.3 * MIN_TRAVEL * 48
    # ... along a straight line: every centre lies near the line through the first and last.
    direction = (centres[-1] - centres[0]) / np.linalg.norm(centres[-1] - centres[0])
    offsets = centres - centres[0]
    assert np.abs(offsets[:, 0] * direction[1] - offsets[:, 1] * direction[0]).max() < 2.5


def test_consecutive_frames_change_little_but_steadily():
    clip, _ = render_clip(3, "train", frames=8, size=48)
    frames = clip.astype(np.int16)
    steps = [(np.abs(frames[t + 1] - frames[t]).max(-1) > 60).mean() for t in range(7)]
    assert all(0 < step < 0.2 for step in steps)


@pytest.mark.parametrize("kwargs, message", [
    ({"index": -1}, "index must be a non-negative int, got -1"),
    ({"index": 1.5}, "index"),
    ({"index": 0, "split": "test"}, "split must be one of"),
    ({"index": 0, "frames": 1}, "frames must be an int >= 2, got 1"),
    ({"index": 0, "size": 8}, "size must be an int >= 16, got 8"),
    ({"index": 0, "size": True}, "size must be"),
    ({"index": 0, "background": "noise"}, "background must be one of \\('cluttered', 'plain'\\), got 'noise'"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        render_clip(**kwargs)


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="at least one clip"):
        clip_batch([])


def test_a_plain_clip_is_the_cluttered_one_over_its_base_colour():
    cluttered, label = render_clip(4, "val", frames=4, size=48)
    plain, plain_label = render_clip(4, "val", frames=4, size=48, background="plain")
    assert label == plain_label
    np.testing.assert_array_equal(plain, render_clip(4, "val", frames=4, size=48, background="plain")[0])
    # The same object on the same path: where the cluttered clip's frames differ (the object
    # moving), the plain clip's do too.
    moved = np.abs(cluttered[0].astype(np.int16) - cluttered[-1]).max(-1) > 60
    moved_plain = np.abs(plain[0].astype(np.int16) - plain[-1]).max(-1) > 60
    assert (moved == moved_plain).mean() > 0.97
    # Away from the object the plain background is one colour plus sensor noise (sigma 5 levels),
    # where the cluttered one is textured: the share of pixels near the frame's median colour.
    def flat(frame):
        return (np.abs(frame.astype(np.int16) - np.median(frame.reshape(-1, 3), 0)).max(-1) < 15).mean()

    shares = np.array([[flat(render_clip(i, "val", frames=2, size=48, background=b)[0][0]) for b in ("plain", "cluttered")]
                       for i in range(6)])
    assert (shares[:, 0] > shares[:, 1]).all() and shares[:, 0].mean() > 0.8 > 0.65 > shares[:, 1].mean()
    videos, _ = clip_batch([4], "val", frames=4, size=48, background="plain")
    expected = (torch.from_numpy(plain).permute(3, 0, 1, 2).float() / 255 - torch.tensor(synthetic.MEAN).view(3, 1, 1, 1))
    torch.testing.assert_close(videos[0], expected / torch.tensor(synthetic.STD).view(3, 1, 1, 1))
