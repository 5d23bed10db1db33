"""Wan's keys: merge before or after the 3-D rotary embedding? The measurement behind its row.

    uv run python benchmarks/diffusion_rotary.py

A tiny ``WanTransformer3DModel`` built from its config (2 blocks, 2 heads, random
weights re-drawn at a trained-like scale: matrices ~ N(0, 1/fan_in), norms ~ 1),
on latents smooth in time and space (a coarse random field upsampled, plus noise,
as video latents are) and on white noise. For each ``mode="kv"`` variant and
ratio it prints the relative error ``|out - out_unmerged| / |out_unmerged|`` of
one denoiser call, averaged over 3 seeds, as a Markdown table:

- after: keys are matched and averaged as the processor rotated them (shipped);
- before: keys are rotated back, matched and averaged, and rotated again at their
  group's mean grid position (RoPE is linear in the position).

No image quality: random weights say how far merging moves the output, not how
good a generation stays.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import tome
from tome.patch import _diffusion_blocks as rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import trained_like_  # noqa: E402


def make_wan(head_dim: int) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return trained_like_(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )).eval()


def inputs(seed: int, smooth: bool, frames: int = 4, size: int = 32) -> dict:
    gen = torch.Generator().manual_seed(seed)
    if smooth:
        coarse = torch.randn(2, 4, frames // 2, size // 4, size // 4, generator=gen)
        latent = F.interpolate(coarse, size=(frames, size, size), mode="trilinear", align_corners=False)
        latent = latent + 0.1 * torch.randn(latent.shape, generator=gen)
    else:
        latent = torch.randn(2, 4, frames, size, size, generator=gen)
    return dict(hidden_states=latent, timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=gen))


def error(model: torch.nn.Module, smooth: bool, **options) -> float:
    total = 0.0
    for seed in range(3):
        kwargs = inputs(seed, smooth)
        tome.remove_patch(model)
        with torch.no_grad():
            want = model(**kwargs).sample
            tome.patch.diffusers(model, **options)
            got = model(**kwargs).sample
        total += ((got - want).norm() / want.norm()).item() / 3
    tome.remove_patch(model)
    return total


def main() -> None:
    warnings.simplefilter("ignore")
    base = rows._BLOCKS["WanTransformerBlock"]
    print("| head_dim | latents | ratio | st | after (shipped) | before |")
    print("|---|---|---|---|---|---|")
    for head_dim in (12, 48):
        model = make_wan(head_dim)
        for smooth in (True, False):
            for ratio, st in ((0.5, 1), (0.5, 2), (0.7, 1)):
                found = []
                for before in (False, True):
                    rotary = dataclasses.replace(base.rotary, merge_before=before)
                    rows.register_block(dataclasses.replace(base, rotary=rotary))
                    try:
                        found.append(error(model, smooth, ratio=ratio, st=st))
                    finally:
                        rows.register_block(base)
                kind = "smooth" if smooth else "noise"
                print(f"| {head_dim} | {kind} | {ratio} | {st} | {found[0]:.4f} | {found[1]:.4f} |")


if __name__ == "__main__":
    main()
