"""The 2-D stride matching of ToMe for SD (tome.merge.match_stride_2d) against
tomesd 0.1.3's function, with fixed and drawn destinations, and the hashed draw."""

from __future__ import annotations

import pytest
import torch

from tome.merge import hashed_stride_choice, match_stride_2d, stride_destinations

tomesd_merge = pytest.importorskip("tomesd.merge")


@pytest.mark.parametrize("height,width,sx,sy,r,batch", [
    (8, 8, 2, 2, 20, 2), (7, 9, 2, 2, 30, 3), (5, 6, 3, 2, 10, 1), (8, 8, 2, 2, 1000, 2), (4, 10, 1, 2, 7, 2),
])
@pytest.mark.parametrize("random", [False, True])
def test_merge_and_unmerge_equal_tomesd(height, width, sx, sy, r, batch, random):
    gen = torch.Generator().manual_seed(height * width + r)
    x = torch.randn(batch, height * width, 16, generator=gen)
    draw = torch.Generator().manual_seed(7)
    merge, unmerge = tomesd_merge.bipartite_soft_matching_random2d(
        x, width, height, sx, sy, r, no_rand=not random, generator=draw)
    choice = torch.randint(sy * sx, (height // sy, width // sx, 1), generator=torch.Generator().manual_seed(7))[..., 0]
    ours = match_stride_2d(x, height, width, sx, sy, r, choice if random else None)
    assert ours.num_out == merge(x).shape[1]
    # Same groups and values; only the order of the merged sequence may differ.
    torch.testing.assert_close(ours.unmerge(ours.merge(x)), unmerge(merge(x)), atol=1e-6, rtol=0)
    assert not torch.equal(ours.unmerge(ours.merge(x)), x)


def test_destinations_are_one_per_full_cell():
    dst = stride_destinations(5, 7, 2, 2)  # 2x3 full cells, the last row and column are cut off
    assert dst.tolist() == [0, 2, 4, 14, 16, 18]
    choice = torch.tensor([[3, 0, 1], [2, 3, 0]])
    assert stride_destinations(5, 7, 2, 2, choice).tolist() == [8, 2, 5, 21, 24, 18]


def test_hashed_choice_is_deterministic_uniform_and_keyed():
    a = hashed_stride_choice(64, 64, 4, torch.tensor([5]))
    assert torch.equal(a, hashed_stride_choice(64, 64, 4, torch.tensor([5])))
    assert (a != hashed_stride_choice(64, 64, 4, torch.tensor([6]))).float().mean() > 0.6
    counts = torch.bincount(a.reshape(-1), minlength=4).float() / a.numel()
    assert (counts - 0.25).abs().max() < 0.02
    assert a.min() >= 0 and a.max() < 4


def test_bad_grids_are_refused():
    x = torch.randn(1, 12, 4)
    with pytest.raises(ValueError, match="3x5 token grid has 15 tokens"):
        match_stride_2d(x, 3, 5, 2, 2, 3)
    with pytest.raises(ValueError, match="sx must be a positive int"):
        match_stride_2d(x, 3, 4, 0, 2, 3)
    assert match_stride_2d(x, 3, 4, 2, 2, 0) is None
