"""Token merging in Wan's video transformer (``WanTransformer3DModel``, Wan 2.1/2.2, and VACE):
keys and values merged over a 3-D stride partition, after Wan's 3-D rotary embedding (the
choice measured here), or tokens merged in self-attention at their mean positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import tome
from tome.merge import match_stride_2d, match_stride_3d, stride_destinations_3d

diffusers = pytest.importorskip("diffusers")

from tome.patch import _diffusion_blocks as rows  # noqa: E402

from conftest import KeyLengths, trained_like_  # noqa: E402


def make_wan(head_dim: int = 24, layers: int = 2, **overrides) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=64, num_layers=layers, rope_max_seq_len=64)
    return trained_like_(WanTransformer3DModel(**{**config, **overrides})).eval()


def wan_inputs(batch: int = 2, frames: int = 4, height: int = 16, width: int = 16, seed: int = 0, smooth: bool = True):
    """Latents smooth in time and space (as video latents are), plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    if smooth:
        coarse = torch.randn(batch, 4, max(frames // 2, 1), height // 4, width // 4, generator=gen)
        latent = F.interpolate(coarse, size=(frames, height, width), mode="trilinear", align_corners=False)
        latent = latent + 0.1 * torch.randn(latent.shape, generator=gen)
    else:
        latent = torch.randn(batch, 4, frames, height, width, generator=gen)
    return dict(hidden_states=latent, timestep=torch.tensor([500] * batch),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=gen))


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _relative_error(model, inputs, **options) -> float:
    tome.remove_patch(model)
    want = _run(model, inputs)
    tome.patch.diffusers(model, **options)
    got = _run(model, inputs)
    tome.remove_patch(model)
    return ((got - want).norm() / want.norm()).item()



# --- the 3-D stride partition ---------------------------------------------------------------


def test_3d_destinations_are_one_per_full_cell():
    dst = stride_destinations_3d(5, 4, 6, 2, 2, 3)  # the fifth frame is cut off
    assert dst.tolist() == [0, 3, 12, 15, 48, 51, 60, 63]
    choice = torch.arange(8).view(2, 2, 2) % 12  # offsets (dt * sy + dy) * sx + dx
    cells = torch.tensor([(f, y, x) for f in range(5) for y in range(4) for x in range(6)])
    picked = cells[stride_destinations_3d(5, 4, 6, 2, 2, 3, choice)]
    corner = torch.tensor([(0, 0, 0), (0, 0, 3), (0, 2, 0), (0, 2, 3), (2, 0, 0), (2, 0, 3), (2, 2, 0), (2, 2, 3)])
    offsets = torch.stack([choice.flatten() // 6, choice.flatten() % 6 // 3, choice.flatten() % 3], dim=1)
    assert torch.equal(picked, corner + offsets)


def test_3d_matching_with_one_frame_is_the_2d_matching():
    metric = torch.randn(2, 48, 8, generator=torch.Generator().manual_seed(1))
    choice = torch.randint(0, 4, (3, 4), generator=torch.Generator().manual_seed(2))
    want = match_stride_2d(metric, 6, 8, 2, 2, 20, choice)
    got = match_stride_3d(metric, (1, 6, 8), (1, 2, 2), 20, choice.view(1, 3, 4))
    assert torch.equal(got.dest, want.dest) and got.num_out == want.num_out


def test_3d_matching_merges_duplicates_within_their_cell_across_frames():
    """Tokens repeated over 2 x 2 x 2 cells: at the largest r every source joins its own cell."""
    cells = torch.randn(1, 2, 3, 2, 8, generator=torch.Generator().manual_seed(3))  # (batch, ct, cy, cx, channels)
    tokens = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3).reshape(1, 96, 8)
    assignment = match_stride_3d(tokens, (4, 6, 4), (2, 2, 2), 96, None)
    assert assignment.num_out == 12
    torch.testing.assert_close(assignment.merge(tokens), cells.reshape(1, 12, 8))
    with pytest.raises(ValueError, match="frames must be a positive int"):
        match_stride_3d(tokens, (0, 6, 4), (2, 2, 2), 4)


# --- Wan ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["kv", "tokens"])
def test_ratio_zero_is_bit_identical(mode):
    model, inputs = make_wan(), wan_inputs()
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.0, mode=mode)
    assert torch.equal(_run(model, inputs), want)
    model.ratio = 0.5
    assert not torch.equal(_run(model, inputs), want)
    tome.remove_patch(model)
    assert torch.equal(_run(model, inputs), want)


def test_kv_is_the_default_and_merges_keys_over_frames():
    model, inputs = make_wan(), wan_inputs(frames=4)
    tome.patch.diffusers(model, ratio=0.5, st=2)
    assert model.mode == "kv" and model._tome_info["merging_blocks"] == 2
    spy = KeyLengths()
    with spy, torch.no_grad():
        model(**inputs)
    tokens = 4 * 8 * 8
    # per block: self-attention over half the video tokens, cross-attention over the 5 text tokens
    assert spy.lengths == [tokens // 2, 5] * 2
    assert _relative_error(model, inputs, ratio=0.5, st=2) < 0.05


def test_tokens_mode_runs_self_attention_on_merged_tokens():
    model, inputs = make_wan(), wan_inputs()
    tome.patch.diffusers(model, ratio=0.5, mode="tokens")
    spy = KeyLengths()
    with spy, torch.no_grad():
        model(**inputs)
    assert spy.lengths == [4 * 8 * 8 // 2, 5] * 2
    assert _relative_error(model, inputs, ratio=0.5, mode="tokens") < 0.2
    with pytest.raises(ValueError, match="merge in self-attention only"):
        tome.patch.diffusers(make_wan(), ratio=0.5, mode="tokens", merge_mlp=True)


def test_keys_merge_after_the_rotation_because_it_moves_the_output_less():
    """The measurement behind Wan's row (docs/diffusion.md): at ratio 0.5, merging keys as
    rotated moves the output less than rotating them back, merging, and rotating at the
    mean position."""
    model = make_wan(head_dim=48)
    base = rows._BLOCKS["WanTransformerBlock"]
    assert base.rotary is not None and not base.rotary.merge_before
    errors = {}
    try:
        for before in (False, True):
            rows.register_block(dataclasses.replace(base, rotary=dataclasses.replace(base.rotary, merge_before=before)))
            errors[before] = sum(_relative_error(model, wan_inputs(seed=seed), ratio=0.5) for seed in range(2))
    finally:
        rows.register_block(base)
    assert errors[False] < 0.7 * errors[True], errors


def test_keys_merged_before_the_rotation_are_rotated_at_their_mean_position():
    """With every key of a 2 x 2 cell equal before rotation, merging before the rotation
    and rotating at the cell's mean position is what the unmerged attention would see
    for a key at that position: the per-cell check of the rotation code."""
    from tome.patch._diffusers import _merged_angles, _RotaryCall

    model = make_wan()
    axis, step = rows.wan_frequencies(model)
    cos, sin = model.rope(torch.zeros(1, 4, 1, 4, 4))
    assignment = match_stride_3d(torch.ones(1, 4, 3), (1, 2, 2), (1, 2, 2), 3)
    angles = _merged_angles(_RotaryCall(cos, sin, axis, step), (1, 2, 2), assignment, 1, torch.device("cpu"))
    # mean position (0, 0.5, 0.5): half the angle step on the height and width pairs, 0 on time
    want = torch.where(axis == 0, torch.zeros_like(step), 0.5 * step)
    torch.testing.assert_close(angles[0, 0], want)


def test_wan_vace_merges_in_its_main_and_control_blocks():
    from diffusers import WanVACETransformer3DModel

    model = trained_like_(WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64, vace_layers=[0],
        vace_in_channels=4,
    )).eval()
    inputs = wan_inputs()
    inputs["control_hidden_states"] = wan_inputs(seed=1)["hidden_states"]
    inputs["control_hidden_states_scale"] = torch.ones(1)
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.5)
    assert model._tome_info["merging_blocks"] == 3
    got = _run(model, inputs)
    assert not torch.equal(got, want) and ((got - want).norm() / want.norm()) < 0.05
    model.ratio = 0.0
    assert torch.equal(_run(model, inputs), want)


# --- other video transformers: CogVideoX ----------------------------------------------------


def make_cogvideox(patch_size_t=None):
    from diffusers import CogVideoXTransformer3DModel

    return trained_like_(CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=17, patch_size=2,
        patch_size_t=patch_size_t, max_text_seq_length=5,
        use_rotary_positional_embeddings=patch_size_t is not None,  # 1.5: no sin-cos table (its pipeline passes RoPE)
    )).eval()


def cogvideox_inputs(seed=0, frames=4):
    """Latents (batch, frames, channels, height, width) as CogVideoX takes them (its config's
    sample_frames=17 are 5 latent frames: 4 make it recompute its sin-cos position table)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, frames, 4, 16, 16, generator=gen),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=gen), timestep=torch.tensor([500, 500]))


@pytest.mark.parametrize("patch_size_t", [None, 2], ids=["cogvideox", "cogvideox1.5"])
def test_cogvideox_merges_the_video_keys_of_its_joint_attention(patch_size_t):
    """CogVideoX attends over [text, video]: only the video keys merge, over 3-D cells
    (CogVideoX 1.5 patchifies 2 latent frames into a token)."""
    model, inputs = make_cogvideox(patch_size_t), cogvideox_inputs()
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.0)
    assert torch.equal(_run(model, inputs), want)
    model.ratio, model.st = 0.5, 2
    spy = KeyLengths()
    with spy, torch.no_grad():
        got = model(**inputs).sample
    video = (4 // (patch_size_t or 1)) * 8 * 8
    assert spy.lengths == [5 + video - video // 2] * 2
    assert not torch.equal(got, want) and ((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize("how", ["in_place", "wrapped"])
def test_blocks_compiled_on_their_own_merge_without_a_false_nothing_merged_warning(how):
    # diffusers' compile_repeated_blocks compiles each block in place: the compiled blocks merge,
    # but their traced code does not record receiving the state, and the denoiser used to warn
    # "none of its patched transformer blocks received the merge state ... nothing merged".
    import warnings

    model = make_wan().eval()
    inputs = wan_inputs()
    with torch.no_grad():
        unmerged = model(**inputs).sample
        tome.apply_patch(model, ratio=0.5)
        merged = model(**inputs).sample
        for i, block in enumerate(model.blocks):
            if how == "in_place":
                block.compile(backend="eager", fullgraph=True)
            else:
                model.blocks[i] = torch.compile(block, backend="eager", fullgraph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            compiled = model(**inputs).sample
    assert torch.equal(compiled, merged) and not torch.equal(compiled, unmerged)
