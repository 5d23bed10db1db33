"""What matching on fewer channels (``match_channels``) costs in fidelity.

    uv run python benchmarks/diffusion_match_fidelity.py

On smooth image-like features (a low-frequency random field upsampled to a
64 x 64 grid of 320 channels plus noise: the shape of SD 1.5's highest level at
512 px), it compares the merge of ``mode="tokens"`` on all channels with the
merge on a random sign projection to ``k`` channels: the relative error
``|unmerge(merge(x)) - x| / |x|`` that each leaves. No model and no image
quality: a proxy, printed as a Markdown table.
"""

from __future__ import annotations

import torch

from tome.merge import match_stride_2d, sign_projection


def main() -> None:
    torch.manual_seed(0)
    low = torch.randn(2, 320, 8, 8)
    x = torch.nn.functional.interpolate(low, size=(64, 64), mode="bicubic", align_corners=False)
    x = (x + 0.3 * torch.randn_like(x)).flatten(2).transpose(1, 2)  # (2, 4096, 320)
    print("| ratio | all 320 channels | k=32 | k=64 | k=128 |")
    print("|---|---|---|---|---|")
    for ratio in (0.3, 0.5, 0.7):
        r = int(x.shape[1] * ratio)
        errors = []
        for k in (None, 32, 64, 128):
            metric = x if k is None else x @ sign_projection(x.shape[-1], k)
            assignment = match_stride_2d(metric, 64, 64, 2, 2, r)
            errors.append(((assignment.unmerge(assignment.merge(x)) - x).norm() / x.norm()).item())
        print(f"| {ratio} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
