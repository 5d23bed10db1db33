"""Hooks added before or after patching: accelerate's offloading and dispatch, diffusers'
hook registry and group offloading. A hook keeps the forward it wrapped in the module's
instance dict; a class swap must keep it calling the current class's forward, so a
hooked model merges (and after remove_patch is the unpatched model again, hook intact).
All on CPU: accelerate's hooks accept it as the execution device. Tiny random models."""

from __future__ import annotations

import warnings

import pytest
import torch

import tome

accelerate = pytest.importorskip("accelerate")
diffusers = pytest.importorskip("diffusers")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from accelerate import cpu_offload, cpu_offload_with_hook, dispatch_model  # noqa: E402
from accelerate.hooks import ModelHook, add_hook_to_module  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.hooks import HookRegistry, apply_group_offloading  # noqa: E402
from diffusers.hooks import ModelHook as DiffusersHook  # noqa: E402
from test_dit_rows import NEWER_PIPELINES, NEWER_ROWS, newer_row, sample  # noqa: E402

from conftest import trained_like_  # noqa: E402

CONTEXT = 32


class CountingHook(ModelHook):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


# --- models: (build, patch, call) per family --------------------------------------------------


def _unet() -> torch.nn.Module:
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=8,
    )
    return trained_like_(unet).eval()


def _call_unet(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, CONTEXT, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor(500), c).sample


def _vit() -> torch.nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=3, num_heads=2, num_classes=5)
    return trained_like_(model).eval()


def _hf_vit() -> torch.nn.Module:
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=64, num_labels=5)
    return trained_like_(transformers.ViTForImageClassification(config)).eval()


def _images(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return getattr(out, "logits", out)


def _patch_vit(model: torch.nn.Module) -> None:
    tome.apply_patch(model)
    model.r = 4


FAMILIES = {
    "diffusers-unet": (_unet, lambda m: tome.apply_patch(m, ratio=0.5, use_rand=False), _call_unet),
    "timm-vit": (_vit, _patch_vit, _images),
    "hf-vit": (_hf_vit, _patch_vit, _images),
}


def _add_counting_hook(model: torch.nn.Module) -> None:
    add_hook_to_module(model, CountingHook())


def _diffusers_registry(model: torch.nn.Module) -> None:
    HookRegistry.check_if_exists_or_initialize(model).register_hook(DiffusersHook(), "plain")


def _group_offloading(model: torch.nn.Module) -> None:
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)


HOOKS = {
    "add_hook_to_module": _add_counting_hook,
    "cpu_offload_with_hook": lambda m: cpu_offload_with_hook(m, execution_device="cpu"),
    # what enable_sequential_cpu_offload does to each component: weights on the meta device,
    # loaded by a hook on every module that holds some
    "cpu_offload": lambda m: cpu_offload(m, execution_device="cpu"),
    "dispatch_model": lambda m: dispatch_model(m, device_map={"": "cpu"}, force_hooks=True),
    "diffusers_hook_registry": _diffusers_registry,
    "diffusers_group_offloading": _group_offloading,
}


CASES = [(family, hook) for family in FAMILIES for hook in HOOKS
         if family == "diffusers-unet" or hook != "diffusers_group_offloading"]  # group offloading: diffusers models


@pytest.mark.parametrize("order", ["hook_then_patch", "patch_then_hook"])
@pytest.mark.parametrize("family,hook", CASES)
def test_hooked_model_merges_and_unpatches_exactly(family, hook, order):
    build, patch, call = FAMILIES[family]
    reference = build()
    unpatched = call(reference)
    patch(reference)
    merged = call(reference)
    assert (merged - unpatched).abs().max() > 1e-2  # merging changes the outputs

    model = build()  # same seed: the same weights
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some parameters are on the meta device")
        if order == "hook_then_patch":
            HOOKS[hook](model)
            patch(model)
        else:
            patch(model)
            HOOKS[hook](model)
        assert torch.equal(call(model), merged)
        tome.remove_patch(model)
        assert not tome.patch.is_patched(model)
        assert torch.equal(call(model), unpatched)
    if hook == "add_hook_to_module":
        assert model._hf_hook.calls == 2  # the hook ran before every forward, patched or not


def test_a_hook_removed_before_patching_leaves_no_stale_forward():
    # remove_hook_from_module puts the wrapped forward back as an instance attribute
    from accelerate.hooks import remove_hook_from_module

    reference, model = _unet(), _unet()
    tome.apply_patch(reference, ratio=0.5, use_rand=False)
    add_hook_to_module(model, ModelHook())
    remove_hook_from_module(model)
    tome.apply_patch(model, ratio=0.5, use_rand=False)
    assert torch.equal(_call_unet(model), _call_unet(reference))


# --- a real pipeline with model offloading ---------------------------------------------------


def _pipeline() -> StableDiffusionPipeline:
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=_unet(), scheduler=DDIMScheduler(clip_sample=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: StableDiffusionPipeline) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 7, CONTEXT, generator=gen)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=2,
                output_type="latent", height=32, width=32, generator=gen).images


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
def test_pipeline_with_model_cpu_offload_merges_in_both_orders(order):
    reference = _pipeline()
    unpatched = _generate(reference)
    tome.apply_patch(reference, ratio=0.5)
    merged = _generate(reference)
    assert (merged - unpatched).abs().max() > 1e-2

    pipe = _pipeline()
    if order == "offload_then_patch":  # the order the diffusers docs show
        pipe.enable_model_cpu_offload(device="cpu")
        tome.apply_patch(pipe, ratio=0.5)
    else:
        tome.apply_patch(pipe, ratio=0.5)
        pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook")
    assert torch.equal(_generate(pipe), merged)
    tome.remove_patch(pipe)
    assert torch.equal(_generate(pipe), unpatched)
    pipe.remove_all_hooks()
    assert torch.equal(_generate(pipe), unpatched)


# --- a bypass that cannot be repaired is reported, not silent --------------------------------


def test_a_wrapper_that_bypasses_the_patched_denoiser_warns():
    unet = _unet()
    unpatched = _call_unet(unet)
    kept = unet.forward  # a hand-made wrapper around the unpatched forward: nothing can follow it
    unet.forward = lambda *args, **kwargs: kept(*args, **kwargs)
    tome.apply_patch(unet, ratio=0.5)
    with pytest.warns(RuntimeWarning, match=r"UNet2DConditionModel is patched to merge.*did not run"):
        out = _call_unet(unet)
    assert torch.equal(out, unpatched)  # what the warning is about
    unet.ratio = 0.0  # merging nothing is what the user asked for: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call_unet(unet)


def test_wrappers_that_bypass_the_patched_blocks_warn():
    unet = _unet()
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        kept = block.forward
        block.forward = (lambda fn: lambda *args, **kwargs: fn(*args, **kwargs))(kept)
    unpatched = _call_unet(unet)
    tome.apply_patch(unet, ratio=0.5)
    with pytest.warns(RuntimeWarning, match=r"none of its patched transformer blocks received"):
        out = _call_unet(unet)
    assert torch.equal(out, unpatched)


def test_a_patched_model_in_normal_use_does_not_warn():
    unet = _unet()
    tome.apply_patch(unet, ratio=0.5)
    add_hook_to_module(unet, CountingHook())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call_unet(unet)
        unet.ratio = 0.0
        _call_unet(unet)


# --- diffusion transformer pipelines: offloading before or after patching ---------------------
# A tiny Flux, Wan, PixArt, LTX-Video and Qwen-Image pipeline, run for two steps to latents. The
# offload and execution device are both the CPU here, so no weight moves between devices, but the
# hooks are the real ones. enable_sequential_cpu_offload fails on this CPU-only setup for the Flux,
# Wan and PixArt pipelines before any patching (accelerate 1.15 with torch 2.15: "Cannot copy out
# of meta tensor" or a TypeError in set_module_tensor_to_device), so its hooks are tested through accelerate's
# cpu_offload on the one transformer where it runs unpatched here (Wan); the UNet above covers it too.


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)


def _flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=trained_like_(transformer).eval())


def _flux_generate(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt_embeds=torch.randn(1, 5, 16, generator=gen), pooled_prompt_embeds=torch.randn(1, 16, generator=gen),
                height=12, width=8, num_inference_steps=2, output_type="latent", generator=gen).images


def _wan_pipeline():
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )
    scheduler = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
    return WanPipeline(tokenizer=None, text_encoder=None, transformer=trained_like_(transformer).eval(), vae=None,
                       scheduler=scheduler)


def _wan_generate(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 5, 16, generator=gen)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), height=64, width=64,
                num_frames=9, num_inference_steps=2, output_type="latent", generator=gen).frames


def _pixart_pipeline():
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=_tiny_vae(),
                               transformer=trained_like_(transformer).eval(), scheduler=DDIMScheduler())


def _pixart_generate(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    embeds, mask = torch.randn(1, 5, 16, generator=gen), torch.ones(1, 5)
    return pipe(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=None,
                negative_prompt_embeds=torch.zeros_like(embeds), negative_prompt_attention_mask=mask, height=16,
                width=16, num_inference_steps=2, output_type="latent", generator=gen,
                use_resolution_binning=False).images


DIT_PIPELINES = {
    "flux": (_flux_pipeline, _flux_generate),
    "wan": (_wan_pipeline, _wan_generate),
    "pixart": (_pixart_pipeline, _pixart_generate),
    **NEWER_PIPELINES,
}


def _group_offload(pipe, offload_type: str) -> None:
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type, **options)


OFFLOADS = {
    "model_cpu_offload": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
    "group_offload_block_level": lambda pipe: _group_offload(pipe, "block_level"),
    "group_offload_leaf_level": lambda pipe: _group_offload(pipe, "leaf_level"),
    "accelerate_cpu_offload": lambda pipe: cpu_offload(pipe.transformer, execution_device="cpu"),
}
DIT_CASES = [(family, offload) for family in DIT_PIPELINES for offload in OFFLOADS
             if offload != "accelerate_cpu_offload" or family == "wan"]


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
@pytest.mark.parametrize("family,offload", DIT_CASES)
def test_dit_pipeline_with_offloading_merges_in_both_orders(family, offload, order):
    build, generate = DIT_PIPELINES[family]
    reference = build()
    reference.set_progress_bar_config(disable=True)
    unpatched = generate(reference)
    tome.apply_patch(reference, ratio=0.5)
    merged = generate(reference)
    assert (merged - unpatched).abs().max() > 1e-2  # merging changes the outputs

    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    if order == "offload_then_patch":
        OFFLOADS[offload](pipe)
        tome.apply_patch(pipe, ratio=0.5)
    else:
        tome.apply_patch(pipe, ratio=0.5)
        OFFLOADS[offload](pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a denoiser that merged nothing would say so
        assert torch.equal(generate(pipe), merged)
    tome.remove_patch(pipe)
    assert torch.equal(generate(pipe), unpatched)


# --- the newer rows: offloading hooks on the transformer itself, before or after patching --------
# What enable_model_cpu_offload and enable_sequential_cpu_offload install on each component
# (accelerate's cpu_offload_with_hook and cpu_offload), and diffusers' group offloading at block
# and leaf level, on each newer row's tiny transformer.

TRANSFORMER_OFFLOADS = {
    "model_cpu_offload_hook": lambda m: cpu_offload_with_hook(m, execution_device="cpu"),
    # what enable_sequential_cpu_offload installs: weights on the meta device, loaded per module
    "sequential_cpu_offload_hooks": lambda m: cpu_offload(m, execution_device="cpu"),
    "group_offload_block_level": lambda m: m.enable_group_offload(
        onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1),
    "group_offload_leaf_level": lambda m: m.enable_group_offload(onload_device=torch.device("cpu"),
                                                                 offload_type="leaf_level"),
}


@pytest.mark.parametrize("row", list(NEWER_ROWS))
def test_newer_rows_with_offloading_hooks_merge_in_both_orders(row):
    model, inputs = newer_row(row)
    with torch.no_grad():
        unpatched = sample(model(**inputs))
        tome.patch.diffusers(model, ratio=0.5)
        merged = sample(model(**inputs))
    assert ((merged - unpatched).norm() / unpatched.norm()).item() > 1e-3  # merging changes the outputs
    for name, offload in TRANSFORMER_OFFLOADS.items():
        for order in ("offload_then_patch", "patch_then_offload"):
            model, _ = newer_row(row)
            if order == "offload_then_patch":
                offload(model)
                tome.patch.diffusers(model, ratio=0.5)
            else:
                tome.patch.diffusers(model, ratio=0.5)
                offload(model)
            assert any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in model.modules()), name
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a denoiser that merged nothing would say so
                warnings.filterwarnings("ignore", message="Some parameters are on the meta device")
                assert torch.equal(sample(model(**inputs)), merged), (name, order)
                tome.remove_patch(model)
                assert torch.equal(sample(model(**inputs)), unpatched), (name, order)
