"""tome.patch.diffusers: tomesd-exact token merging for UNets, kv merging, pipelines,
ControlNets, temporal blocks, settings, undo, hooks, compile. Tiny random models
built from configs; nothing is downloaded."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import tome

diffusers = pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    MotionAdapter,
    PixArtTransformer2DModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    Transformer2DModel,
    UNet2DConditionModel,
    UNetMotionModel,
)

from conftest import KeyLengths  # noqa: E402

CONTEXT = 32


def _trained_scale(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights at a trained-like scale, so that a wrong merge shows as a large difference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_unet(levels=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), seed=0):
    """SD 1.x layout (attention at every level but the last by default) or SDXL's (no attention at level 0)."""
    up = tuple(t.replace("Down", "Up") for t in reversed(levels))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32,) * len(levels), down_block_types=levels, up_block_types=up,
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=8,
    )
    return _trained_scale(unet, seed)


def make_sdxl_like():
    return make_unet(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))


def unet_inputs(batch=2, height=16, width=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, height, width, generator=gen), torch.tensor(500),
            torch.randn(batch, 7, CONTEXT, generator=gen))


def run(model, inputs, **kwargs):
    with torch.no_grad():
        return model(*inputs, **kwargs).sample


# --- equal to tomesd 0.1.3 ----------------------------------------------------------------

TOMESD_CASES = [
    # ratio, max_downsample, sx, sy, merge_crossattn, merge_mlp, (height, width), batch
    (0.5, 1, 2, 2, False, False, (16, 16), 2),
    (0.3, 2, 2, 2, False, False, (16, 16), 1),
    (0.6, 4, 2, 2, True, False, (15, 13), 2),
    (0.75, 8, 2, 2, False, True, (16, 16), 3),
    (0.5, 2, 3, 2, True, True, (11, 17), 2),
    (0.4, 1, 1, 2, False, False, (9, 20), 1),
]


@pytest.mark.parametrize("ratio,max_downsample,sx,sy,crossattn,mlp,size,batch", TOMESD_CASES)
def test_tokens_mode_equals_tomesd(ratio, max_downsample, sx, sy, crossattn, mlp, size, batch):
    unet = make_unet()
    reference = copy.deepcopy(unet)
    inputs = unet_inputs(batch, *size)
    unmerged = run(unet, inputs)
    options = dict(ratio=ratio, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=False,
                   merge_crossattn=crossattn, merge_mlp=mlp)
    tomesd.apply_patch(reference, **options)
    tome.patch.diffusers(unet, **options)
    want, got = run(reference, inputs), run(unet, inputs)
    assert (want - unmerged).abs().max() > 1e-2  # tomesd merged something
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_ratio_zero_is_the_unpatched_model():
    unet = make_unet()
    inputs = unet_inputs()
    before = run(unet, inputs)
    for mode in ("tokens", "kv"):
        tome.patch.diffusers(unet, ratio=0.0, mode=mode)
        assert torch.equal(run(unet, inputs), before)


def test_remove_patch_restores_the_model_bit_for_bit():
    unet = make_unet()
    inputs = unet_inputs()
    before = run(unet, inputs)
    classes = {name: type(m) for name, m in unet.named_modules()}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    tome.patch.diffusers(unet, ratio=0.5)
    assert type(unet).__name__ == "UNet2DConditionModel"  # diffusers still knows it by name
    assert not torch.equal(run(unet, inputs), before)
    tome.remove_patch(unet)
    assert {name: type(m) for name, m in unet.named_modules()} == classes
    assert not [k for m in unet.modules() for k in vars(m) if k.startswith("_tome")]
    assert all(torch.equal(state[k], v) for k, v in unet.state_dict().items())
    assert torch.equal(run(unet, inputs), before)


# --- random destinations ------------------------------------------------------------------


def test_random_destinations_repeat_for_a_seed_and_differ_between_seeds():
    unet = make_unet()
    inputs = unet_inputs()
    tome.patch.diffusers(unet, ratio=0.5, use_rand=True, seed=3)
    first, again = run(unet, inputs), run(unet, inputs)
    assert torch.equal(first, again)
    unet.seed = 4
    assert (run(unet, inputs) - first).abs().max() > 1e-3
    unet.use_rand = False
    assert (run(unet, inputs) - first).abs().max() > 1e-3


def test_random_destinations_are_shared_by_both_halves_of_a_guidance_batch():
    unet = make_unet()
    x, t, c = unet_inputs(batch=1)
    tome.patch.diffusers(unet, ratio=0.5, use_rand=True)
    out = run(unet, (torch.cat([x, x]), t, torch.cat([c, c])))
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)


def test_random_destinations_change_with_the_timestep():
    unet = make_unet()
    x, _, c = unet_inputs()
    tome.patch.diffusers(unet, ratio=0.5, use_rand=True)
    fixed = copy.deepcopy(unet)
    fixed.use_rand = False
    # Same timestep embedding for both runs would need equal t; compare each against fixed destinations.
    diffs = [(run(unet, (x, torch.tensor(t), c)) - run(fixed, (x, torch.tensor(t), c))).abs().max() for t in (10, 11)]
    assert min(diffs) > 1e-4


# --- structure: SDXL, temporal blocks, summary --------------------------------------------


def test_sdxl_merges_at_its_highest_attention_level_by_default():
    unet = make_sdxl_like()
    inputs = unet_inputs()
    before = run(unet, inputs)
    tome.patch.diffusers(unet)
    info = unet._tome_info
    assert info["max_downsample"] is None and info["max_downsample_resolved"] == 2 and info["merging_blocks"] == info["levels"][2]["blocks"] > 0
    assert "merging in" in repr(unet) and "x2:" in repr(unet)
    assert (run(unet, inputs) - before).abs().max() > 1e-3


def test_a_setting_where_no_block_merges_is_refused():
    unet = make_sdxl_like()
    with pytest.raises(ValueError, match=r"max_downsample=1.*\[2, 4\]"):
        tome.patch.diffusers(unet, max_downsample=1)
    assert not tome.patch.is_patched(unet)
    tome.patch.diffusers(unet)
    with pytest.raises(ValueError, match="max_downsample=1"):
        unet.max_downsample = 1
    assert unet.max_downsample is None  # the refused value was not kept


def test_explicit_max_downsample_keeps_tomesd_meaning():
    unet = make_unet()
    tome.patch.diffusers(unet, max_downsample=2)
    assert unet._tome_info["merging_blocks"] == sum(v["blocks"] for d, v in unet._tome_info["levels"].items() if d <= 2)
    unet.max_downsample = 8
    assert unet._tome_info["merging_blocks"] == unet._tome_info["blocks"]


def _motion_unet():
    unet = make_unet(("CrossAttnDownBlock2D", "DownBlock2D"))
    adapter = MotionAdapter(block_out_channels=(32, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _trained_scale(UNetMotionModel.from_unet2d(unet, adapter), seed=2)


def test_temporal_blocks_of_animatediff_are_left_alone():
    model = _motion_unet()
    spatial_calls, temporal_shapes = [], []
    for name, module in model.named_modules():
        # attn1's own hooks see its unmerged input and output (its interface is unchanged);
        # its query projection sees the tokens attention really runs on.
        if name.endswith("attn1.to_q") and "motion_modules" in name:
            module.register_forward_pre_hook(lambda m, a: temporal_shapes.append(a[0].shape[1]))
        elif name.endswith("attn1.to_q"):
            module.register_forward_pre_hook(lambda m, a: spatial_calls.append(a[0].shape[1]))
    frames = 3
    x = torch.randn(1, 4, frames, 16, 16)
    c = torch.randn(frames, 7, CONTEXT)
    tome.patch.diffusers(model, ratio=0.5)
    assert model._tome_info["skipped_blocks"] and all("motion_modules" in n for n in model._tome_info["skipped_blocks"])
    with torch.no_grad():
        model(x, torch.tensor(10), c)
    assert set(temporal_shapes) == {frames}  # frames are never merged
    assert 128 in spatial_calls  # 256 tokens merged to 128 at the top level


def test_pixart_and_transformer_2d():
    pixart = _trained_scale(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16,
    ))
    x = torch.randn(2, 4, 16, 16)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 5, 16), timestep=torch.tensor([10, 10]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        before = pixart(x, **kwargs).sample
        for mode in ("tokens", "kv"):
            tome.patch.diffusers(pixart, ratio=0.5, mode=mode)
            assert pixart._tome_info["merging_blocks"] == 2
            after = pixart(x, **kwargs).sample
            assert after.shape == before.shape and (after - before).abs().max() > 1e-3
        tome.remove_patch(pixart)
        assert torch.equal(pixart(x, **kwargs).sample, before)


def _duplicated_transformer():
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2,
                               norm_num_groups=8, use_linear_projection=True)
    return _trained_scale(model)


def test_kv_mode_is_lossless_on_exact_duplicates():
    """Every 2x2 cell holds one token four times: merging keys and values with
    proportional attention must give the unmerged output."""
    model = _duplicated_transformer()
    cells = torch.randn(2, 16, 4, 5)
    x = cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (2, 16, 8, 10)
    with torch.no_grad():
        before = model(x).sample
        tome.patch.diffusers(model, ratio=0.74, mode="kv", use_rand=False)
        after = model(x).sample
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
        noisy = x + 0.5 * torch.randn_like(x)
        model.ratio = 0.0
        unmerged = model(noisy).sample
        model.ratio = 0.74
        assert (model(noisy).sample - unmerged).abs().max() > 1e-3  # and it does merge


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "compiled"])
def test_kv_mode_refuses_a_self_attention_mask_that_differs_between_the_keys_of_a_query(traced):
    """A mask over queries and keys that differs between the image keys one query sees (here
    causal) cannot be kept by merged keys: refused. (One equal on every image key of a query,
    a padding mask, is kept: tests/patch/test_dit_rows.py, HunyuanVideo 1.5.) Compiled with
    fullgraph=True, the check runs inside the graph (no branch on a value to break it) and fails there."""
    model = _duplicated_transformer()
    tome.patch.diffusers(model, ratio=0.5, mode="kv")
    block = model.transformer_blocks[0]
    causal = torch.full((16, 16), -1e4).triu(1)[None]
    attn = torch.compile(block.attn1, backend="eager", fullgraph=True) if traced else block.attn1
    with pytest.raises(RuntimeError if traced else ValueError,
                       match="attention mask over queries and keys .*differs between the image keys"):
        attn(torch.randn(1, 16, 16), attention_mask=causal,
             tome=block._tome_plan(torch.randn(1, 16, 16), _step_for(model, 4, 4)))


def test_kv_mode_carries_a_key_mask_onto_the_merged_keys():
    """A mask over keys only (one row for every query) is merged with the keys: on tokens
    repeated over 2 x 2 cells, whose merge changes nothing, a masked-out cell stays out."""
    model = _duplicated_transformer()
    block = model.transformer_blocks[0]
    cells = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    x = cells.view(1, 2, 2, 16).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 16, 16)
    mask = torch.zeros(1, 1, 16)
    mask[..., x.new_tensor([0, 1, 4, 5]).long()] = -1e4  # the first 2 x 2 cell masked out
    with torch.no_grad():
        want = block.attn1(x, attention_mask=mask)
        tome.patch.diffusers(model, ratio=0.75, mode="kv", use_rand=False)
        with KeyLengths() as spy:
            got = block.attn1(x, attention_mask=mask, tome=block._tome_plan(x, _step_for(model, 4, 4)))
    assert spy.lengths == [4]  # one key per cell: it merged
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)



def _step_for(model, height, width):
    from tome.patch._diffusers import _Step

    return _Step(model._tome_settings, 1, height, width, None)


# --- pipelines, ControlNet, apply_patch -----------------------------------------------------


def _pipeline(controlnet=None):
    unet = make_unet(("CrossAttnDownBlock2D", "DownBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    parts = dict(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(clip_sample=False),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if controlnet is None:
            return StableDiffusionPipeline(**parts)
        return StableDiffusionControlNetPipeline(controlnet=controlnet(unet), **parts)


def _generate(pipe, **extra):
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 7, CONTEXT, generator=gen)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=2,
                output_type="latent", height=32, width=32, generator=gen, **extra).images


def test_pipeline_is_patched_and_restored():
    pipe = _pipeline()
    pipe.set_progress_bar_config(disable=True)
    before = _generate(pipe)
    assert tome.apply_patch(pipe, ratio=0.5) is pipe
    assert tome.patch.is_patched(pipe.unet)
    merged = _generate(pipe)
    assert (merged - before).abs().max() > 1e-4
    tome.remove_patch(pipe)
    assert not tome.patch.is_patched(pipe.unet)
    assert torch.equal(_generate(pipe), before)


def test_controlnet_blocks_are_patched_too():
    pipe = _pipeline(controlnet=lambda unet: _trained_scale(ControlNetModel.from_unet(unet, conditioning_channels=3, conditioning_embedding_out_channels=(16,))))
    pipe.set_progress_bar_config(disable=True)
    tome.patch.diffusers(pipe, ratio=0.5)
    assert tome.patch.is_patched(pipe.controlnet) and pipe.controlnet._tome_info["merging_blocks"] > 0
    calls = []
    pipe.controlnet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.register_forward_pre_hook(
        lambda m, a: calls.append(a[0].shape[1]))
    _generate(pipe, image=torch.rand(1, 3, 32, 32))
    assert calls and all(n == 512 for n in calls)  # 32x32 latent: 1024 tokens, half merged away


def test_apply_patch_routes_diffusers_options_and_refuses_r():
    unet = make_unet()
    with pytest.raises(ValueError, match="ratio"):
        tome.apply_patch(unet, r=8)
    tome.apply_patch(unet, ratio=0.25, mode="kv")
    assert unet.ratio == 0.25 and unet.mode == "kv"
    assert tome.patch.family_of(unet) == "diffusers"


def test_bad_options_name_the_value():
    unet = make_unet()
    for options, match in [({"ratio": 1.0}, "ratio=1.0"), ({"ratio": -0.1}, "ratio=-0.1"), ({"mode": "keys"}, "keys"),
                           ({"sx": 0}, "sx=0"), ({"max_downsample": 0}, "max_downsample=0"),
                           ({"mode": "kv", "merge_mlp": True}, "merge_mlp"),
                           ({"merge_attn": False}, "nothing would be merged")]:
        with pytest.raises(ValueError, match=match):
            tome.patch.diffusers(unet, **options)
    with pytest.raises(TypeError, match="not a diffusers"):
        tome.patch.diffusers(torch.nn.Linear(2, 2))


def test_changing_a_setting_equals_patching_with_it():
    unet = make_unet()
    other = copy.deepcopy(unet)
    inputs = unet_inputs()
    tome.patch.diffusers(unet, ratio=0.5, use_rand=False)
    unet.ratio = 0.3
    tome.patch.diffusers(other, ratio=0.3, use_rand=False)
    assert torch.equal(run(unet, inputs), run(other, inputs))
    tome.patch.diffusers(unet, ratio=0.6, use_rand=False)  # re-patching updates the options
    assert unet.ratio == 0.6


# --- the block's own features keep working -----------------------------------------------


def test_cross_attention_kwargs_and_processors_keep_working():
    unet = make_unet()
    inputs = unet_inputs()
    seen = []

    class Recording(diffusers.models.attention_processor.AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     marker=None, **kwargs):
            seen.append((marker, hidden_states.shape[1]))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    tome.patch.diffusers(unet, ratio=0.5, use_rand=False)
    unet.set_attn_processor(Recording())  # processors set after patching are used as they are
    run(unet, inputs, cross_attention_kwargs={"marker": "user"})
    assert seen and all(marker == "user" for marker, _ in seen)
    assert 128 in {n for _, n in seen}


def test_merge_mlp_refuses_feed_forward_chunking():
    unet = make_unet()
    tome.patch.diffusers(unet, ratio=0.5, merge_mlp=True)
    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            module.set_chunk_feed_forward(chunk_size=1, dim=1)
    with pytest.raises(ValueError, match="chunking"):
        run(unet, unet_inputs())


def test_gradient_checkpointing_gives_the_same_output():
    unet = make_unet()
    inputs = unet_inputs()
    tome.patch.diffusers(unet, ratio=0.5, use_rand=False)
    want = run(unet, inputs)
    unet.enable_gradient_checkpointing()
    unet.train()
    x, t, c = inputs
    got = unet(x.requires_grad_(), t, c).sample
    got.sum().backward()
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    assert x.grad is not None


# --- DiTs with joint attention: SD3 (image tokens first) and Flux (text first, rotary) ---------


def make_sd3():
    from diffusers import SD3Transformer2DModel

    return _trained_scale(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,),  # SD 3.5's extra image self-attention in block 0
    ))


def sd3_inputs(height=16, width=12):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, height, width, generator=gen),), dict(
        encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
        pooled_projections=torch.randn(2, 16, generator=gen), timestep=torch.tensor([10, 10]))


def make_flux():
    from diffusers import FluxTransformer2DModel

    return _trained_scale(FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ))


def flux_inputs(height=6, width=4):
    gen = torch.Generator().manual_seed(4)
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None]
    return (torch.randn(2, height * width, 8, generator=gen),), dict(
        encoder_hidden_states=torch.randn(2, 5, 16, generator=gen), pooled_projections=torch.randn(2, 16, generator=gen),
        timestep=torch.tensor([0.5, 0.5]), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3))


@pytest.mark.parametrize("make,inputs", [(make_sd3, sd3_inputs), (make_flux, flux_inputs)], ids=["sd3", "flux"])
def test_joint_attention_dits_merge_keys_and_values(make, inputs):
    model = make()
    args, kwargs = inputs()
    with torch.no_grad():
        before = model(*args, **kwargs).sample
        with pytest.raises(ValueError, match="mode='tokens' needs BasicTransformerBlocks"):
            tome.patch.diffusers(model, mode="tokens")
        tome.patch.diffusers(model, ratio=0.5)
        assert model.mode == "kv" and model._tome_info["merging_blocks"] == 2
        after = model(*args, **kwargs).sample
        assert after.shape == before.shape and (after - before).abs().max() > 1e-3
        model.ratio = 0.0
        assert torch.equal(model(*args, **kwargs).sample, before)
        tome.remove_patch(model)
        assert torch.equal(model(*args, **kwargs).sample, before)


@pytest.mark.parametrize("make,image_first", [(make_sd3, True), (make_flux, False)], ids=["sd3", "flux"])
def test_joint_attention_is_lossless_on_duplicated_image_tokens(make, image_first):
    """One joint attention module, image tokens repeated over 2x2 cells: merged keys
    with proportional attention give the unmerged outputs for image and text tokens."""
    from tome.patch._diffusers import _Step

    model = make()
    block = model.transformer_blocks[0]
    cells = torch.randn(2, 3, 2, 16)
    image = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 24, 16)  # 6x4 grid
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = block.attn(hidden_states=image, encoder_hidden_states=text)
        tome.patch.diffusers(model, ratio=0.74, use_rand=False)
        step = _Step(model._tome_settings, 1, 6, 4, None)
        after = block.attn(hidden_states=image, encoder_hidden_states=text, tome=step)
    assert block.attn._tome_image_at == ("start" if image_first else "end")
    for want, got in zip(before, after):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_kv_mode_needs_an_sdpa_processor():
    from diffusers.models.attention_processor import AttnProcessor

    model = _duplicated_transformer()
    tome.patch.diffusers(model, ratio=0.5, mode="kv")
    for block in model.transformer_blocks:
        block.attn1.set_processor(AttnProcessor())  # the classic processor computes softmax itself
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        model(torch.randn(1, 16, 4, 4))


def test_sd3_compiles_fullgraph_in_kv_mode():
    torch._dynamo.reset()
    model = make_sd3()
    tome.patch.diffusers(model, ratio=0.5)
    args, kwargs = sd3_inputs()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled(*args, **kwargs).sample
        compiled(args[0] + 1, **{**kwargs, "timestep": torch.tensor([20, 20])})
        torch.testing.assert_close(got, model(*args, **kwargs).sample, atol=1e-5, rtol=1e-5)


def test_cross_attention_masks_pass_through_in_tokens_mode():
    unet = make_unet()
    reference = copy.deepcopy(unet)
    x, t, c = unet_inputs()
    mask = torch.ones(2, 7)
    mask[:, 4:] = 0  # the last three text tokens are padding
    tomesd.apply_patch(reference, ratio=0.5, use_rand=False)
    tome.patch.diffusers(unet, ratio=0.5, use_rand=False)
    with torch.no_grad():
        want = reference(x, t, c, encoder_attention_mask=mask).sample
        got = unet(x, t, c, encoder_attention_mask=mask).sample
        unmasked = unet(x, t, c).sample
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - unmasked).abs().max() > 1e-3


def test_match_channels_projects_the_metric():
    unet = make_unet()
    inputs = unet_inputs()
    tome.patch.diffusers(unet, ratio=0.5, use_rand=False)
    full = run(unet, inputs)
    unet.match_channels = 8  # of 32 channels
    projected = run(unet, inputs)
    assert 0 < (projected - full).abs().max()  # other merges ...
    unet.match_channels = 64  # more than the model has: every channel, as before
    assert torch.equal(run(unet, inputs), full)
    with pytest.raises(ValueError, match="match_channels=0"):
        unet.match_channels = 0
    with pytest.raises(ValueError, match="match_channels applies to mode='tokens'"):
        tome.patch.diffusers(unet, mode="kv", match_channels=8)


def test_denoiser_forward_reports_the_original_signature():
    import inspect

    unet = make_unet()
    expected = inspect.signature(unet.forward)
    tome.patch.diffusers(unet, ratio=0.5)
    assert inspect.signature(unet.forward) == expected and "encoder_hidden_states" in expected.parameters


# --- precision: similarities are scored in float32 ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_blocks_pick_the_partners_of_tomesd_in_float32(dtype):
    """Near-tied scores rounded to fp16/bf16 pick other partners. Scored in float32, a
    half-precision block input merges exactly as tomesd merges the same values upcast
    to float32 (and as this block does in float32)."""
    from tomesd.merge import bipartite_soft_matching_random2d

    from tome.patch._diffusers import _Step

    unet = make_unet()
    tome.patch.diffusers(unet, ratio=0.5, use_rand=False)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    step = _Step(unet._tome_settings, 1, 32, 32, None)
    x = torch.randn(2, 32 * 32, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    one_hot = torch.eye(32 * 32).expand(2, -1, -1)  # row i: token i; merged and unmerged, the rows show the groups

    def groups(merge, unmerge):
        return unmerge(merge(one_hot, mode="mean")) > 0

    merge, unmerge = bipartite_soft_matching_random2d(x.float(), 32, 32, 2, 2, int(32 * 32 * 0.5), no_rand=True)
    want = groups(merge, unmerge)
    for inputs in (x, x.float()):
        plan = block._tome_plan(inputs, step).assignment
        assert torch.equal(groups(plan.merge, plan.unmerge), want)
    assert plan.merge(x).dtype == dtype  # the values themselves merge in the model's dtype


@pytest.mark.parametrize("mode", ["tokens", "kv"])
def test_every_matching_of_a_bf16_model_scores_in_float32(mode, monkeypatch):
    import tome.merge

    seen = []
    original = tome.merge.match_stride_2d
    monkeypatch.setattr(tome.merge, "match_stride_2d", lambda metric, *a, **k: seen.append(metric.dtype) or original(metric, *a, **k))
    model = _duplicated_transformer().to(torch.bfloat16)
    tome.patch.diffusers(model, ratio=0.5, mode=mode)
    with torch.no_grad():
        model(torch.randn(2, 16, 8, 8, dtype=torch.bfloat16))
    assert seen and set(seen) == {torch.float32}


# --- SD3 and Flux ControlNets; a refused pipeline is left as it was ----------------------------


def make_sd3_controlnet(**overrides):
    from diffusers import SD3ControlNetModel

    config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                  pos_embed_max_size=16)
    return _trained_scale(SD3ControlNetModel(**{**config, **overrides}))


def make_flux_controlnet():
    from diffusers import FluxControlNetModel

    return _trained_scale(FluxControlNetModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ))


def _controlnet_samples(model, inputs):
    args, kwargs = inputs()
    cond = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(*args, controlnet_cond=cond, **kwargs)
    samples = list(out.controlnet_block_samples) + list(getattr(out, "controlnet_single_block_samples", None) or ())
    return torch.cat([s.flatten() for s in samples])


@pytest.mark.parametrize("make,inputs,patch_size", [(make_sd3_controlnet, sd3_inputs, 2), (make_flux_controlnet, flux_inputs, 1)],
                         ids=["sd3", "flux"])
def test_sd3_and_flux_controlnets_merge_keys_and_values(make, inputs, patch_size):
    model = make()
    before = _controlnet_samples(model, inputs)
    tome.patch.diffusers(model, ratio=0.5)
    assert model._tome_patch == (1, patch_size, patch_size)  # SD3's ControlNet patchifies 2x2 latent pixels, like SD3
    assert model.mode == "kv" and model._tome_info["merging_blocks"] == 2
    # A wrong patch size gives a grid that does not cover the image tokens: nothing would merge.
    assert (_controlnet_samples(model, inputs) - before).abs().max() > 1e-3
    model.ratio = 0.0
    assert torch.equal(_controlnet_samples(model, inputs), before)
    model.ratio = 0.5
    tome.remove_patch(model)
    assert torch.equal(_controlnet_samples(model, inputs), before)


def _sd3_controlnet_pipeline(controlnet):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetPipeline

    return StableDiffusion3ControlNetPipeline(
        transformer=make_sd3(), controlnet=controlnet, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def test_sd3_and_flux_controlnet_pipelines_are_patched_whole():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline

    flux = FluxControlNetPipeline(
        transformer=make_flux(), controlnet=make_flux_controlnet(), scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    for pipe in (_sd3_controlnet_pipeline(make_sd3_controlnet()), flux):
        tome.apply_patch(pipe, ratio=0.5)
        assert tome.patch.is_patched(pipe.transformer) and tome.patch.is_patched(pipe.controlnet)
        tome.remove_patch(pipe)
        assert not tome.patch.is_patched(pipe.transformer) and not tome.patch.is_patched(pipe.controlnet)


def test_a_refused_pipeline_is_left_as_it_was():
    # SD 3.5 Large's ControlNet takes tokens the transformer embedded: no grid, not supported
    pipe = _sd3_controlnet_pipeline(make_sd3_controlnet(joint_attention_dim=None, use_pos_embed=False))
    with pytest.raises(TypeError, match="SD3ControlNetModel with SD3SingleTransformerBlocks"):
        tome.apply_patch(pipe, ratio=0.5)
    assert not [m for m in pipe.transformer.modules() if tome.patch.is_patched(m)]
    assert not [k for m in pipe.transformer.modules() for k in vars(m) if k.startswith("_tome")]
    # An option the second denoiser refuses: this ControlNet has attention in its middle block (x2) only.
    pipe = _pipeline(controlnet=lambda unet: ControlNetModel(
        block_out_channels=(32, 32), down_block_types=("DownBlock2D", "DownBlock2D"), layers_per_block=1,
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=8, conditioning_channels=3,
        conditioning_embedding_out_channels=(16,)))
    with pytest.raises(ValueError, match=r"no transformer block of ControlNetModel.*max_downsample=1"):
        tome.apply_patch(pipe, ratio=0.5, max_downsample=1)
    assert not tome.patch.is_patched(pipe.unet) and "_tome_lowest_level" not in vars(pipe.unet)
    tome.apply_patch(pipe, ratio=0.3)  # max_downsample=None: x1 in the UNet, x2 in the ControlNet
    with pytest.raises(ValueError, match="max_downsample=1"):
        tome.apply_patch(pipe, ratio=0.6, max_downsample=1)
    assert pipe.unet.ratio == pipe.controlnet.ratio == 0.3 and pipe.unet.max_downsample is None


# --- Stable Video Diffusion ------------------------------------------------------------------


def make_svd_unet():
    from diffusers import UNetSpatioTemporalConditionModel

    return _trained_scale(UNetSpatioTemporalConditionModel(
        sample_size=16, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, cross_attention_dim=16,
        num_attention_heads=(2, 2), num_frames=3,
    ))


def svd_inputs(frames=3):
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(2, frames, 8, 16, 16, generator=gen), torch.tensor(10.0),
            torch.randn(2, 1, 16, generator=gen), torch.randn(2, 3, generator=gen))


def test_stable_video_diffusion_merges_in_its_spatial_blocks_only():
    unet = make_svd_unet()
    inputs = svd_inputs()
    before = run(unet, inputs)
    spatial, temporal = [], []
    for name, module in unet.named_modules():
        if name.endswith("attn1.to_q"):
            calls = temporal if "temporal_transformer_blocks" in name else spatial
            module.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(tuple(a[0].shape)))
    tome.patch.diffusers(unet, ratio=0.5)
    info = unet._tome_info
    assert info["mode"] == "tokens" and (info["merging_blocks"], info["blocks"]) == (3, 4)
    assert len(info["skipped_blocks"]) == 4 and all("temporal_transformer_blocks" in n for n in info["skipped_blocks"])
    assert "merging in 3 of 4 transformer blocks" in info["description"] and "4 temporal/other blocks" in info["description"]
    spatial.clear(), temporal.clear()
    assert (run(unet, inputs) - before).abs().max() > 1e-2
    # every frame of both samples merges its 16x16 grid to 128 tokens; attention over frames sees all 3
    assert spatial.count((2 * 3, 128, 32)) == 3 and (2 * 3, 64, 32) in spatial
    assert temporal and {shape[1] for shape in temporal} == {3}
    unet.ratio = 0.0
    assert torch.equal(run(unet, inputs), before)
    unet.ratio = 0.5
    tome.remove_patch(unet)
    assert torch.equal(run(unet, inputs), before)


def test_stable_video_diffusion_refuses_gradient_checkpointing_while_merging():
    unet = make_svd_unet()
    unet.enable_gradient_checkpointing()
    tome.patch.diffusers(unet, ratio=0.5)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        unet(*svd_inputs())
    with torch.no_grad():
        run(unet, svd_inputs())  # inference does not recompute anything


def test_an_unreadable_token_grid_warns_instead_of_merging_silently():
    model = make_flux()
    args, kwargs = flux_inputs()
    tome.patch.diffusers(model, ratio=0.5)
    kwargs["img_ids"] = kwargs["img_ids"] + torch.tensor([0.0, 1.0, 0.0])  # rows 1..6: no 6x4 grid from 0
    with pytest.warns(RuntimeWarning, match="could not read the token grid"), torch.no_grad():
        model(*args, **kwargs)


def _column_major_ids(height=6, width=4):
    index = torch.arange(height * width)
    return torch.stack([torch.zeros(height * width), index % height, index // height], dim=-1)


@pytest.mark.parametrize("ids", [
    _column_major_ids,  # a 6 x 4 extent, laid out column by column
    lambda: flux_inputs()[1]["img_ids"][torch.randperm(24, generator=torch.Generator().manual_seed(0))],  # shuffled
    lambda: torch.randn(24, 3, generator=torch.Generator().manual_seed(0)),  # as diffusers' own model tests pass
], ids=["transposed", "shuffled", "random"])
def test_flux_ids_that_are_not_a_row_major_grid_warn_and_merge_nothing(ids):
    # The ids' extent alone is no grid: transposed or shuffled ids cover 6 x 4 as well, and
    # merging by sequence position would then pair tokens that are not neighbours, silently.
    model = make_flux()
    args, kwargs = flux_inputs()
    kwargs["img_ids"] = ids()
    with torch.no_grad():
        before = model(*args, **kwargs).sample
        tome.patch.diffusers(model, ratio=0.5)
        with pytest.warns(RuntimeWarning, match="row by row"):
            after = model(*args, **kwargs).sample
    assert torch.equal(after, before)
    args, kwargs = flux_inputs()  # the pipelines' row-major ids merge, in the deprecated 3-D form too
    kwargs["img_ids"] = kwargs["img_ids"][None]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", RuntimeWarning)
        assert model._tome_grid_reader(model, args[0], kwargs["img_ids"]) == (1, 6, 4)
