"""Token merging in today's image and video diffusion transformers beyond Flux and Wan:
Qwen-Image, HunyuanVideo, LTX-Video, Sana and Mochi. Each: ratio 0 bit-identical, ``kv`` by
default with self-attention really seeing fewer image keys at ratio 0.5 (text keys kept;
Sana: its linear attention on fewer tokens), a small output change at a trained-like
weight scale, and pipelines that append reference or condition tokens refused."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import tome

diffusers = pytest.importorskip("diffusers")

from conftest import KeyLengths, trained_like_  # noqa: E402


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _smooth(batch, channels, height, width, gen):
    coarse = torch.randn(batch, channels, height // 4, width // 4, generator=gen)
    latent = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return latent + 0.1 * torch.randn(latent.shape, generator=gen)


def _check(model, inputs, video_keys, text_keys, blocks, before=(), tolerance=0.05, **options):
    """Ratio 0 bit-identical; ratio 0.5 in kv mode: every merging attention over
    ``text_keys + video_keys // 2`` keys (after the unmerged calls ``before``), output moved
    by a little; removed: identical again."""
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.0, **options)
    assert model.mode == "kv"
    assert torch.equal(_run(model, inputs), want)
    model.ratio = 0.5
    assert model._tome_info["merging_blocks"] == blocks
    spy = KeyLengths()
    with spy, torch.no_grad():
        got = model(**inputs).sample
    assert spy.lengths == list(before) + [text_keys + video_keys - video_keys // 2] * blocks, spy.lengths
    error = ((got - want).norm() / want.norm()).item()
    assert not torch.equal(got, want) and error < tolerance, error
    tome.remove_patch(model)
    assert torch.equal(_run(model, inputs), want)


# --- Qwen-Image -----------------------------------------------------------------------------


def make_qwen(layers=2):
    from diffusers import QwenImageTransformer2DModel

    return trained_like_(QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(4, 6, 6),
    )).eval()


def qwen_inputs(batch=2, height=16, width=16, seed=0, mask=None, shapes=None):
    """Latents (batch, 4, h, w) packed 2 x 2 as the pipeline does: (batch, h/2 * w/2, 16)."""
    gen = torch.Generator().manual_seed(seed)
    latent = _smooth(batch, 4, height, width, gen)
    packed = latent.view(batch, 4, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(batch, (height // 2) * (width // 2), 16)
    return dict(hidden_states=packed, encoder_hidden_states=torch.randn(batch, 5, 12, generator=gen),
                encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5] * batch),
                img_shapes=shapes or [[(1, height // 2, width // 2)]] * batch)


def test_qwen_image_merges_the_image_keys_of_its_joint_attention():
    _check(make_qwen(), qwen_inputs(), video_keys=64, text_keys=5, blocks=2)


def test_qwen_image_with_padded_text_keeps_the_text_mask():
    """The pipeline passes a text mask when prompts differ in length: the merged keys keep
    it, so padding text keys stay unseen (a padded key changed would change the output)."""
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    model = make_qwen()
    inputs = qwen_inputs(mask=mask)
    _check(model, inputs, video_keys=64, text_keys=5, blocks=2)
    tome.patch.diffusers(model, ratio=0.5)
    want = _run(model, inputs)
    inputs["encoder_hidden_states"][1, 3:] = 100.0  # the padding: masked, so it changes nothing of sample 1
    torch.testing.assert_close(_run(model, inputs)[1], want[1])


def test_qwen_image_edit_reference_tokens_are_refused():
    """Qwen-Image-Edit appends the reference image's tokens to the latent sequence
    (two grids per sample in img_shapes): refused with a ValueError naming the shapes."""
    model = make_qwen()
    inputs = qwen_inputs()
    shapes = [[(1, 8, 8), (1, 4, 4)]] * 2
    gen = torch.Generator().manual_seed(1)
    inputs.update(hidden_states=torch.cat([inputs["hidden_states"], torch.randn(2, 16, 16, generator=gen)], 1),
                  img_shapes=shapes)
    tome.patch.diffusers(model, ratio=0.0)
    _run(model, inputs)  # ratio 0: the model as it was
    model.ratio = 0.5
    with pytest.raises(ValueError, match=r"2 image grids per sample .*Qwen-Image-Edit"):
        _run(model, inputs)


# --- HunyuanVideo ---------------------------------------------------------------------------


def _smooth_video(batch, channels, frames, height, width, gen):
    coarse = torch.randn(batch, channels, max(frames // 2, 1), height // 4, width // 4, generator=gen)
    latent = F.interpolate(coarse, size=(frames, height, width), mode="trilinear", align_corners=False)
    return latent + 0.1 * torch.randn(latent.shape, generator=gen)


def make_hunyuan(image_condition_type=None):
    from diffusers import HunyuanVideoTransformer3DModel

    return trained_like_(HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=False,
        image_condition_type=image_condition_type,
    )).eval()


def hunyuan_inputs(seed=0):
    """4 frames of 16 x 16 latents (4 x 8 x 8 tokens), two prompts, the second padded."""
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_smooth_video(2, 4, 4, 16, 16, gen), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 5, 12, generator=gen),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
                pooled_projections=torch.randn(2, 8, generator=gen))


@pytest.mark.parametrize("image_condition_type", [None, "token_replace"], ids=["t2v", "i2v_token_replace"])
def test_hunyuan_video_merges_the_video_keys_of_its_dual_and_single_blocks(image_condition_type):
    """[video, text] in every block, text padded by a key mask (the second prompt is shorter)."""
    # first the text refiner's self-attention over the 5 text tokens, left alone
    _check(make_hunyuan(image_condition_type), hunyuan_inputs(), video_keys=4 * 8 * 8, text_keys=5, blocks=2,
           before=[5], st=2)


# --- LTX-Video ------------------------------------------------------------------------------


def make_ltx():
    from diffusers import LTXVideoTransformer3DModel

    return trained_like_(LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=24, cross_attention_dim=48,
        num_layers=2, caption_channels=12,
    )).eval()


def ltx_inputs(frames=4, height=8, width=8, seed=0):
    """Latents packed as the pipeline does (patch size 1): (batch, frames * height * width, channels)."""
    gen = torch.Generator().manual_seed(seed)
    latent = _smooth_video(2, 4, frames, height * 2, width * 2, gen)[..., ::2, ::2]
    return dict(hidden_states=latent.flatten(2).transpose(1, 2), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 5, 12, generator=gen),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
                num_frames=frames, height=height, width=width)


def test_ltx_video_merges_the_keys_of_its_video_self_attention():
    # per block: self-attention merged, then cross-attention over the 5 text tokens (left alone)
    model, inputs = make_ltx(), ltx_inputs()
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.5, st=2)
    spy = KeyLengths()
    with spy, torch.no_grad():
        got = model(**inputs).sample
    assert spy.lengths == [4 * 8 * 8 // 2, 5] * 2
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.05, error
    model.ratio = 0.0
    assert torch.equal(_run(model, inputs), want)


def test_ltx_video_condition_tokens_are_refused():
    model, inputs = make_ltx(), ltx_inputs()
    gen = torch.Generator().manual_seed(1)
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], torch.randn(2, 16, 4, generator=gen)], 1)
    tome.patch.diffusers(model, ratio=0.5)
    with pytest.raises(ValueError, match=r"272 tokens for a 4 x 8 x 8 grid.*LTXConditionPipeline"):
        _run(model, inputs)


# --- Sana -----------------------------------------------------------------------------------


def make_sana():
    from diffusers import SanaTransformer2DModel

    return trained_like_(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=12,
        sample_size=16, patch_size=2,
    )).eval()


def sana_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_smooth(2, 4, 16, 16, gen), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 5, 12, generator=gen))


def test_sana_linear_attention_runs_on_merged_tokens():
    """Sana's self-attention is linear (no softmax to merge keys in): mode tokens is its
    default, and the attention's projections see half the image tokens."""
    model, inputs = make_sana(), sana_inputs()
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.0)
    assert model.mode == "tokens" and torch.equal(_run(model, inputs), want)
    seen = []
    hooks = [block.attn1.to_q.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
             for block in model.transformer_blocks]
    model.ratio = 0.5
    got = _run(model, inputs)
    for hook in hooks:
        hook.remove()
    assert seen == [8 * 8 // 2] * 2
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.2, error
    with pytest.raises(ValueError, match="mode='kv'") as refused:
        tome.patch.diffusers(model, ratio=0.5, mode="kv")
    # the reason is Sana's own (linear attention), not another model's
    message = str(refused.value)
    assert "SanaTransformerBlock: its self-attention is ReLU linear attention" in message, message
    assert "use mode='tokens'" in message and "Wan" not in message and "BasicTransformerBlocks" not in message
    tome.remove_patch(model)
    assert torch.equal(_run(model, inputs), want)


# --- Mochi ----------------------------------------------------------------------------------


def make_mochi():
    from diffusers import MochiTransformer3DModel

    return trained_like_(MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=24, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=4, text_embed_dim=16, time_embed_dim=8,
    )).eval()


def mochi_inputs(seed=0):
    """4 frames of 16 x 16 latents (4 x 8 x 8 tokens), two prompts, the second padded."""
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_smooth_video(2, 4, 4, 16, 16, gen), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))


@pytest.mark.parametrize("use_rand", [False, True])
def test_mochi_merges_the_video_keys_of_its_per_sample_joint_attention(use_rand):
    """Mochi attends over [video, valid text] one sample at a time: the second prompt has 3
    valid tokens of 5, so its calls see 3 text keys."""
    model, inputs = make_mochi(), mochi_inputs()
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.0, use_rand=use_rand, st=2)
    assert model.mode == "kv" and torch.equal(_run(model, inputs), want)
    model.ratio = 0.5
    spy = KeyLengths()
    with spy, torch.no_grad():
        got = model(**inputs).sample
    video = 4 * 8 * 8
    assert spy.lengths == [6] + [video // 2 + 5, video // 2 + 3] * 2  # first: the caption's attention pooling
    error = ((got - want).norm() / want.norm()).item()
    # ~0.09 here (0.01-0.05 for Wan, LTX, HunyuanVideo at this size): the rotary spread of a tiny
    # grid, see test_mochi_moves_more_only_through_its_rotary_spread_on_a_tiny_grid
    assert 0 < error < 0.15, error
    tome.remove_patch(model)
    assert torch.equal(_run(model, inputs), want)


def test_mochi_moves_more_only_through_its_rotary_spread_on_a_tiny_grid():
    """Why Mochi moves more than the other rows at this size: MochiRoPE spreads any token grid
    over a 192 x 192 position area, so neighbours of this 8 x 8 grid lie 24 position units apart
    (4.8 on 480p's 30 x 53 grid), and with learned frequencies of std 0.2 (trained-like redraw)
    the keys a cell averages after the rotation are turned by ~5 rad against each other. With
    the frequencies at zero (no rotation, all else unchanged) merging moves the output as little
    as it moves the other rows'. (The token layout, frame-major rows of patches, is the one
    Mochi's patch embedding and its RoPE positions use; this test does not tell layouts apart.)"""
    errors = []
    for frequency_scale in (1.0, 0.0):
        model, inputs = make_mochi(), mochi_inputs()
        with torch.no_grad():
            model.pos_frequencies.mul_(frequency_scale)
        want = _run(model, inputs)
        tome.patch.diffusers(model, ratio=0.5, st=2)
        errors.append(((_run(model, inputs) - want).norm() / want.norm()).item())
    spread, still = errors
    assert 0 < still < 0.04 and spread > 3 * still, errors  # measured: 0.094 and 0.023


# --- Flux.2 ---------------------------------------------------------------------------------


def make_flux2():
    from diffusers import Flux2Transformer2DModel

    return trained_like_(Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )).eval()


def _flux2_ids(t, height, width):
    """(height * width, 4) ids (t, h, w, l) as Flux.2's pipelines build them: t = 0 for the
    target latents, 10, 20, ... for reference images."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width), torch.arange(1))


def flux2_inputs(height=8, width=8, references=(), seed=0, references_first=False):
    """Packed latents (batch, height * width, 8); ``references``: (height, width) of reference
    images appended after the target (Flux.2 editing) or put before it (``references_first``)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [_smooth(2, 8, height, width, gen).flatten(2).transpose(1, 2)]
    ids = [_flux2_ids(0, height, width)]
    for i, (h, w) in enumerate(references):
        parts.append(_smooth(2, 8, h, w, gen).flatten(2).transpose(1, 2))
        ids.append(_flux2_ids(10 + 10 * i, h, w))
    if references_first:
        parts, ids = parts[1:] + parts[:1], ids[1:] + ids[:1]
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(5))
    return dict(hidden_states=torch.cat(parts, 1), encoder_hidden_states=torch.randn(2, 5, 12, generator=gen),
                timestep=torch.tensor([0.5, 0.5]), img_ids=torch.cat(ids)[None].expand(2, -1, -1),
                txt_ids=text_ids[None].expand(2, -1, -1))


def test_flux2_merges_the_image_keys_of_its_joint_attention():
    """Text to image: [text, image] in the double- and single-stream blocks; the grid is read
    from the values of img_ids."""
    _check(make_flux2(), flux2_inputs(), video_keys=64, text_keys=5, blocks=2)


@pytest.mark.parametrize("references_first", [False, True], ids=["edit", "references_first"])
def test_flux2_reference_tokens_stay_unmerged(references_first):
    """Flux.2 editing appends the reference images' tokens to the latent sequence (ids t = 10,
    20): only the target grid's keys merge, the 16 + 36 reference keys are all kept."""
    inputs = flux2_inputs(references=((4, 4), (6, 6)), references_first=references_first)
    _check(make_flux2(), inputs, video_keys=64, text_keys=5 + 16 + 36, blocks=2)


def test_flux2_merges_the_target_slice_only():
    """One joint attention, target tokens repeated over 2 x 2 cells, random reference tokens
    after them: merging the duplicates is lossless, for the target, reference and text outputs
    alike (merging any other slice of the keys would not be)."""
    from tome.patch._diffusers import _Step

    model = make_flux2()
    attn = model.transformer_blocks[0].attn
    cells = torch.randn(2, 3, 2, 32)
    image = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 24, 32)  # 6 x 4 grid
    references, text = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    hidden = torch.cat([image, references], 1)
    with torch.no_grad():
        before = attn(hidden_states=hidden, encoder_hidden_states=text)
        tome.patch.diffusers(model, ratio=0.75, use_rand=False)  # every cell's 3 sources merge
        spy = KeyLengths()
        with spy:
            after = attn(hidden_states=hidden, encoder_hidden_states=text,
                         tome=_Step(model._tome_settings, 1, 6, 4, None, after=7))
    assert spy.lengths == [5 + 6 + 7]
    for want, got in zip(before, after):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_flux2_klein_kv_cache_steps():
    """Flux.2 Klein's KV-cache pipeline: the first step puts the reference tokens first and
    lets them attend to themselves only (that call is left alone); later steps inject the cached
    reference keys between text and image. Both merge the target's keys only."""
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    model = make_flux2()
    model.transformer_blocks[0].attn.set_processor(Flux2KVAttnProcessor())
    model.single_transformer_blocks[0].attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    first = flux2_inputs(references=((4, 4),), references_first=True)
    later = flux2_inputs()

    def steps():
        with torch.no_grad():
            sample, cache = model(**first, kv_cache_mode="extract", num_ref_tokens=16, return_dict=False)
            return sample, model(**later, kv_cache=cache, kv_cache_mode="cached").sample

    want = steps()
    tome.patch.diffusers(model, ratio=0.0)
    assert all(torch.equal(a, b) for a, b in zip(steps(), want))
    model.ratio = 0.5
    spy = KeyLengths()
    with spy:
        got = steps()
    # per block: [text, references, merged image] then the references alone; then cached
    assert spy.lengths == [5 + 16 + 32, 16] * 2 + [5 + 16 + 32] * 2, spy.lengths
    for a, b in zip(got, want):
        error = ((a - b).norm() / b.norm()).item()
        assert 0 < error < 0.05, error


def test_flux2_ids_without_a_target_grid_merge_nothing_and_warn():
    model = make_flux2()
    inputs = flux2_inputs()
    want = _run(model, inputs)
    inputs["img_ids"] = inputs["img_ids"].flip(1)  # the target's ids not row-major
    unordered = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.5)
    with pytest.warns(RuntimeWarning, match="could not read the token grid"):
        assert torch.equal(_run(model, inputs), unordered)
    assert not torch.equal(unordered, want)


# --- SD 3.5 (MMDiT-X) -----------------------------------------------------------------------


def make_sd35():
    from diffusers import SD3Transformer2DModel

    return trained_like_(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )).eval()


def sd35_inputs(seed=3):
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_smooth(2, 4, 16, 16, gen), encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
                pooled_projections=torch.randn(2, 16, generator=gen), timestep=torch.tensor([10, 10]))


def test_sd35_merges_the_keys_of_its_joint_and_its_image_only_attention():
    """SD 3.5: RMS qk-norm, and in the ``dual_attention_layers`` a second self-attention
    (``attn2``) over the image tokens alone. Block 0 (dual): joint attention over 5 text and
    64 image keys, then attn2 over the 64 image keys, both with half the image keys; block 1
    (the last, context-pre-only): joint attention."""
    model, inputs = make_sd35(), sd35_inputs()
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.0)
    assert torch.equal(_run(model, inputs), want)
    model.ratio = 0.5
    spy = KeyLengths()
    with spy, torch.no_grad():
        got = model(**inputs).sample
    assert spy.lengths == [5 + 32, 32, 5 + 32]
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.05, error


# --- Z-Image --------------------------------------------------------------------------------


def make_zimage():
    from diffusers import ZImageTransformer2DModel

    return trained_like_(ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=12,
        axes_dims=[4, 6, 6], axes_lens=[128, 32, 32],
    )).eval()


def zimage_inputs(size=16, captions=(5, 5), seed=0):
    """Latents as a list of (4, 1, size, size), one per sample, and captions of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    latent = _smooth_video(2, 4, 1, size, size, gen)
    return dict(x=list(latent.unbind(0)), t=torch.tensor([0.5, 0.5]),
                cap_feats=[torch.randn(n, 12, generator=gen) for n in captions])


def _zimage_run(model, inputs):
    with torch.no_grad():
        return torch.stack(model(**inputs).sample)


def test_zimage_merges_the_image_keys_of_its_noise_refiner_and_main_layers():
    """Per call: the noise refiner over the 64 image tokens, the caption refiner over the caption
    (5 tokens padded to 32, left alone), then the main layers over [image, caption]."""
    model, inputs = make_zimage(), zimage_inputs()
    want = _zimage_run(model, inputs)
    tome.patch.diffusers(model, ratio=0.0)
    assert model.mode == "kv" and torch.equal(_zimage_run(model, inputs), want)
    model.ratio = 0.5
    assert model._tome_info["merging_blocks"] == 3 and model._tome_info["skipped_blocks"] == ["context_refiner.0"]
    spy = KeyLengths()
    with spy:
        got = _zimage_run(model, inputs)
    assert spy.lengths == [32, 32, 32 + 32, 32 + 32], spy.lengths
    error = ((got - want).norm() / want.norm()).item()
    # ~0.07: a third of the tiny rotary's channel pairs turn by 1 rad per token (a twelfth in
    # Z-Image's 128-channel heads), so the keys averaged after the rotation differ more (see Mochi)
    assert 0 < error < 0.1, error
    tome.remove_patch(model)
    assert torch.equal(_zimage_run(model, inputs), want)


def test_zimage_padding_and_caption_mask_stay_unmerged():
    """36 image tokens padded to 64 (the 28 padding tokens kept), captions of 5 and 40 tokens
    (padded to 32 and 64, so the second sample's sequence is longer and a key mask hides the
    first's batch padding): the first sample's merged output is the one it gets alone."""
    model, inputs = make_zimage(), zimage_inputs(size=12, captions=(5, 40))
    tome.patch.diffusers(model, ratio=0.5, use_rand=False)  # a batch of one has no random partition
    spy = KeyLengths()
    with spy:
        batched = _zimage_run(model, inputs)
    assert spy.lengths == [18 + 28, 64, 18 + 28 + 64, 18 + 28 + 64], spy.lengths
    alone = _zimage_run(model, dict(x=inputs["x"][:1], t=inputs["t"][:1], cap_feats=inputs["cap_feats"][:1]))
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-4)


def test_zimage_omni_and_mixed_sizes_are_refused():
    model = make_zimage()
    tome.patch.diffusers(model, ratio=0.5)
    inputs = zimage_inputs()
    omni = dict(inputs, x=[[x] for x in inputs["x"]], cap_feats=[[c] for c in inputs["cap_feats"]])
    with pytest.raises(ValueError, match="omni mode"):
        model(**omni)
    mixed = dict(inputs, x=[inputs["x"][0], inputs["x"][1][..., :8, :8]])
    with pytest.raises(ValueError, match=r"shapes \[\(4, 1, 8, 8\), \(4, 1, 16, 16\)\]"):
        model(**mixed)


# --- HunyuanVideo 1.5 -----------------------------------------------------------------------


def make_hunyuan15():
    from diffusers import HunyuanVideo15Transformer3DModel

    return trained_like_(HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6),
    )).eval()


def hunyuan15_inputs(batch=2, text=(5, 3), glyphs=(3, 2), seed=0):
    """Text to video (image embeddings all zero): two prompts, each padded to the longest, and
    two ByT5 glyph prompts likewise."""
    gen = torch.Generator().manual_seed(seed)

    def padded(lengths, channels):
        mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
        return torch.randn(len(lengths), max(lengths), channels, generator=gen), mask

    states, mask = padded(text[:batch], 12)
    states_2, mask_2 = padded(glyphs[:batch], 8)
    return dict(hidden_states=_smooth_video(batch, 4, 4, 16, 16, gen), timestep=torch.tensor([500.0] * batch),
                encoder_hidden_states=states, encoder_attention_mask=mask, encoder_hidden_states_2=states_2,
                encoder_attention_mask_2=mask_2, image_embeds=torch.zeros(batch, 2, 8))


def test_hunyuan_video_15_merges_keys_under_its_query_by_key_mask():
    """Its processor masks padding queries and keys with a (batch, 1, tokens, tokens) mask: the
    mask's key axis shrinks with the merged video keys. Per block: 256 video keys (half kept)
    and 10 text-side keys (2 image, 3 glyph, 5 text; the text refiner's 5 first)."""
    _check(make_hunyuan15(), hunyuan15_inputs(), video_keys=4 * 8 * 8, text_keys=10, blocks=2, before=[5], st=2)


def test_hunyuan_video_15_padding_stays_masked_when_merged():
    """The second prompt (3 text and 2 glyph tokens of 5 and 3) gives the merged output it gets
    alone without padding: the padding keys stay masked after the mask is merged."""
    model = make_hunyuan15()
    tome.patch.diffusers(model, ratio=0.5, st=2, use_rand=False)  # a batch of one has no random partition
    batched = _run(model, hunyuan15_inputs())
    inputs = hunyuan15_inputs()
    alone = {name: value[1:] for name, value in inputs.items()}
    alone.update(encoder_hidden_states=alone["encoder_hidden_states"][:, :3],
                 encoder_attention_mask=alone["encoder_attention_mask"][:, :3],
                 encoder_hidden_states_2=alone["encoder_hidden_states_2"][:, :2],
                 encoder_attention_mask_2=alone["encoder_attention_mask_2"][:, :2])
    torch.testing.assert_close(batched[1:], _run(model, alone), atol=1e-4, rtol=1e-4)


# --- Stable Video Diffusion in kv mode --------------------------------------------------------


def test_stable_video_diffusion_merges_per_frame_keys_in_kv_mode():
    """The spatio-temporal UNet's spatial blocks see each frame as a batch entry: in kv mode
    each frame's 16 x 16 grid keeps 128 keys at the highest level (64 at x2, not merged);
    cross-attention (1 image token) and the temporal blocks (3 frames) are untouched."""
    from test_diffusers import make_svd_unet, svd_inputs

    unet, inputs = make_svd_unet(), svd_inputs()
    with torch.no_grad():
        want = unet(*inputs).sample
    tome.patch.diffusers(unet, ratio=0.0, mode="kv")
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, want)
    unet.ratio = 0.5
    spy = KeyLengths()
    with spy, torch.no_grad():
        got = unet(*inputs).sample
    # per spatio-temporal transformer: spatial self-attention, cross-attention, temporal self-, cross-attention
    assert spy.lengths == [128, 1, 3, 1] + [64, 1, 3, 1] + [128, 1, 3, 1] * 2, spy.lengths
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.1, error  # 0.067 (mode tokens: 0.16)


# --- Wan Animate ----------------------------------------------------------------------------


def make_wan_animate():
    from diffusers import WanAnimateTransformer3DModel

    return trained_like_(WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, image_dim=16, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )).eval()


def wan_animate_inputs(frames=4, seed=0):
    """The reference frame and 4 frames of 16 x 16 latents (8 x 8 tokens each), their pose
    latents, and 13 face frames (4 motion frames after the face encoder, 5 with its padding)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_smooth_video(2, 12, frames + 1, 16, 16, gen), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
                encoder_hidden_states_image=torch.randn(2, 3, 16, generator=gen),
                pose_hidden_states=_smooth_video(2, 4, frames, 16, 16, gen),
                face_pixel_values=torch.randn(2, 3, 13, 16, 16, generator=gen))


def test_wan_animate_merges_the_video_frames_but_not_the_reference_frame():
    """Self-attention sees the 64 reference-frame keys and half of the 4 x 64 video keys;
    cross-attention (3 image + 5 text keys) and block 0's face adapter (3 keys) are untouched."""
    model, inputs = make_wan_animate(), wan_animate_inputs()
    want = _run(model, inputs)
    tome.patch.diffusers(model, ratio=0.0)
    assert model.mode == "kv" and torch.equal(_run(model, inputs), want)
    model.ratio = 0.5
    spy = KeyLengths()
    with spy, torch.no_grad():
        got = model(**inputs).sample
    assert spy.lengths == [64 + 128, 8, 3, 64 + 128, 8], spy.lengths
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.05, error
    model.mode = "tokens"
    with pytest.raises(ValueError, match="64 reference tokens .*use mode='kv'"):
        _run(model, inputs)
    tome.remove_patch(model)
    assert torch.equal(_run(model, inputs), want)


def test_wan_animate_merges_the_slice_after_the_reference_frame():
    """One self-attention: 16 random reference tokens, then 2 frames of a 4 x 4 grid repeated
    over 2 x 2 cells: merging the duplicates is lossless (merging the reference would not be)."""
    from tome.patch._diffusers import _Step

    model = make_wan_animate()
    attn = model.blocks[0].attn1
    cells = torch.randn(2, 2, 2, 2, 24)
    video = cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3).reshape(2, 32, 24)
    hidden = torch.cat([torch.randn(2, 16, 24), video], 1)
    with torch.no_grad():
        before = attn(hidden)
        tome.patch.diffusers(model, ratio=0.75, use_rand=False)
        spy = KeyLengths()
        with spy:
            after = attn(hidden, tome=_Step(model._tome_settings, 1, 4, 4, None, frames=2, before=16))
    assert spy.lengths == [16 + 8]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


# --- the rows above, for the compile, export and offloading tests --------------------------------


def sample(out):
    """The denoiser output as one tensor (Z-Image returns a list, one per sample)."""
    sample = out.sample if hasattr(out, "sample") else out[0]
    return torch.stack(sample) if isinstance(sample, (list, tuple)) else sample


def later(inputs):
    """Another step's inputs: the same shapes, new latents and a new timestep."""
    def moved(value):
        return [moved(v) for v in value] if isinstance(value, list) else (value * 0.6 + 0.1).to(value.dtype)
    return {name: moved(value) if name in ("hidden_states", "x", "timestep", "t") else value
            for name, value in inputs.items()}


def _cogvideox_inputs():
    from test_wan import cogvideox_inputs

    return cogvideox_inputs(frames=5)  # its config's frame count (see NO_EXPORT in the compile tests)


def _make_cogvideox():
    from test_wan import make_cogvideox

    return make_cogvideox()


# name: (tiny model, its inputs); Flux.2 is left out (its grid is read with a host sync per call)
NEWER_ROWS = {
    "qwen-image": (make_qwen, qwen_inputs),
    "hunyuan-video": (make_hunyuan, hunyuan_inputs),
    "hunyuan-video-1.5": (make_hunyuan15, hunyuan15_inputs),
    "ltx-video": (make_ltx, ltx_inputs),
    "cogvideox": (_make_cogvideox, _cogvideox_inputs),
    "mochi": (make_mochi, mochi_inputs),
    "z-image": (make_zimage, zimage_inputs),
    "sana": (make_sana, sana_inputs),
    "sd3.5": (make_sd35, sd35_inputs),
}


def newer_row(name):
    """The row's tiny model and its inputs."""
    make, inputs = NEWER_ROWS[name]
    return make(), inputs()


def _pipeline(name, transformer, **components):
    """A newer row's pipeline without VAE and text encoders (prompt embeddings are given, latents returned)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = components.pop("scheduler", None) or FlowMatchEulerDiscreteScheduler()
    parameters = inspect.signature(getattr(diffusers, name)).parameters
    encoders = {part: None for part in parameters if part.startswith(("text_encoder", "tokenizer", "vae"))}
    return getattr(diffusers, name)(transformer=transformer, scheduler=scheduler, **encoders, **components)


def _prompt(channels, mask=False, negative=True, **more):
    """Prompt embeddings (1, 5, channels), their mask and a zero negative prompt, as pipeline arguments."""
    embeds = torch.randn(1, 5, channels, generator=torch.Generator().manual_seed(0))
    out = {"prompt_embeds": embeds, **more}
    if negative:
        out["negative_prompt_embeds"] = torch.zeros_like(embeds)
    if mask:
        out["prompt_attention_mask"] = torch.ones(1, 5)
        if negative:
            out["negative_prompt_attention_mask"] = torch.ones(1, 5)
    return out


def _latents(pipe, **arguments):
    out = pipe(num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0), **arguments)
    return out.frames if hasattr(out, "frames") else out.images


def _cogvideox_pipeline():
    from diffusers import CogVideoXDDIMScheduler

    return _pipeline("CogVideoXPipeline", _make_cogvideox(), scheduler=CogVideoXDDIMScheduler())


# name: (a tiny pipeline of the row's model, its two steps to latents); every latent grid is 8 x 8
# tokens per frame. HunyuanVideo 1.5's pipeline reads its VAE's config when built: not here.
NEWER_PIPELINES = {
    "qwen-image": (lambda: _pipeline("QwenImagePipeline", make_qwen()), lambda pipe: _latents(
        pipe, prompt_embeds=torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(0)),
        prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long), height=128, width=128)),
    "hunyuan-video": (lambda: _pipeline("HunyuanVideoPipeline", make_hunyuan()), lambda pipe: _latents(
        pipe, **_prompt(12, mask=True, negative=False, pooled_prompt_embeds=torch.ones(1, 8)), height=128, width=128,
        num_frames=9)),
    "ltx-video": (lambda: _pipeline("LTXPipeline", make_ltx()), lambda pipe: _latents(
        pipe, **_prompt(12, mask=True), height=256, width=256, num_frames=9)),
    "cogvideox": (_cogvideox_pipeline, lambda pipe: _latents(pipe, **_prompt(16), height=128, width=128, num_frames=13)),
    "mochi": (lambda: _pipeline("MochiPipeline", make_mochi()), lambda pipe: _latents(
        pipe, **_prompt(16, mask=True), height=128, width=128, num_frames=7)),
    "z-image": (lambda: _pipeline("ZImagePipeline", make_zimage()), lambda pipe: _latents(
        pipe, prompt_embeds=[torch.randn(5, 12, generator=torch.Generator().manual_seed(0))],
        negative_prompt_embeds=[torch.zeros(5, 12)], height=128, width=128)),
    "sana": (lambda: _pipeline("SanaPipeline", make_sana()), lambda pipe: _latents(
        pipe, **_prompt(12, mask=True), negative_prompt=None, height=512, width=512, use_resolution_binning=False)),
    "sd3.5": (lambda: _pipeline("StableDiffusion3Pipeline", make_sd35()), lambda pipe: _latents(
        pipe, **_prompt(16, pooled_prompt_embeds=torch.ones(1, 16), negative_pooled_prompt_embeds=torch.zeros(1, 16)),
        height=128, width=128)),
}
