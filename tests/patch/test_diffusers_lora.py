"""LoRA on patched pipelines: ``load_lora_weights``, ``fuse_lora``, ``unfuse_lora`` and
``unload_lora_weights`` on a tiny Stable Diffusion and Flux pipeline and one of each newer row, patched before
or after the LoRA is loaded. The LoRA is made with peft on a copy of the denoiser, saved
with the pipeline's ``save_lora_weights`` (safetensors) and loaded from ``tmp_path``."""

from __future__ import annotations

import warnings

import pytest
import torch

import tome

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusionPipeline,
)
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from test_diffusers import flux_inputs, make_flux, make_unet, unet_inputs  # noqa: E402
from test_dit_rows import NEWER_PIPELINES, NEWER_ROWS, sample  # noqa: E402

from conftest import KeyLengths  # noqa: E402


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)


def _sd_pipeline() -> StableDiffusionPipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableDiffusionPipeline(
            vae=_vae(), text_encoder=None, tokenizer=None, unet=make_unet(), scheduler=DDIMScheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def _flux_pipeline() -> FluxPipeline:
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=make_flux())


def _unet_call(pipe):
    with torch.no_grad():
        return pipe.unet(*unet_inputs()).sample


def _flux_call(pipe):
    args, kwargs = flux_inputs()
    with torch.no_grad():
        return pipe.transformer(*args, **kwargs).sample


# (pipeline, denoiser attribute, save_lora_weights argument, a denoiser call)
CASES = {
    "sd": (_sd_pipeline, "unet", "unet_lora_layers", _unet_call),
    "flux": (_flux_pipeline, "transformer", "transformer_lora_layers", _flux_call),
}


def _newer_call(row):
    def call(pipe):
        with torch.no_grad():
            return sample(pipe.transformer(**NEWER_ROWS[row][1]()))
    return call


# the newer rows whose pipelines have a LoRA loader (HunyuanVideo 1.5's has none)
CASES.update({row: (NEWER_PIPELINES[row][0], "transformer", "transformer_lora_layers", _newer_call(row))
              for row in NEWER_PIPELINES})


@pytest.fixture
def lora_dir(tmp_path, request):
    """A LoRA on every attention projection, random (not zero) so that it changes outputs."""
    build, attr, argument, _ = CASES[request.param]
    donor = getattr(build(), attr)
    donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    type(build()).save_lora_weights(tmp_path, **{argument: get_peft_model_state_dict(donor)})
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    return request.param, tmp_path


def _load(pipe, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no LoRA keys for the text encoder": there is none
        pipe.load_lora_weights(path, adapter_name="style")


def _lifecycle(pipe, path, call, patch_at=None, ratio=0.0):
    """Outputs after each LoRA step; ``patch_at`` names the step before which the pipeline is patched."""
    outputs = {"base": call(pipe)}
    if patch_at == "before_load":
        tome.apply_patch(pipe, ratio=ratio)
    _load(pipe, path)
    if patch_at == "after_load":
        tome.apply_patch(pipe, ratio=ratio)
    outputs["lora"] = call(pipe)
    pipe.fuse_lora()
    outputs["fused"] = call(pipe)
    pipe.unfuse_lora()
    outputs["unfused"] = call(pipe)
    pipe.unload_lora_weights()
    outputs["unloaded"] = call(pipe)
    return outputs


@pytest.mark.parametrize("patch_at", ["before_load", "after_load"])
@pytest.mark.parametrize("lora_dir", list(CASES), indirect=True)
def test_lora_on_a_pipeline_patched_at_ratio_zero_is_the_unpatched_lora(lora_dir, patch_at):
    family, path = lora_dir
    build, _, _, call = CASES[family]
    want = _lifecycle(build(), path, call)
    got = _lifecycle(build(), path, call, patch_at=patch_at)
    assert (want["lora"] - want["base"]).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(want["fused"], want["lora"], atol=1e-4, rtol=1e-4)
    for step, output in want.items():
        assert torch.equal(got[step], output), step


@pytest.mark.parametrize("lora_dir", list(CASES), indirect=True)
def test_lora_on_a_merging_pipeline_still_merges(lora_dir):
    family, path = lora_dir
    build, attr, _, call = CASES[family]
    full, merged = KeyLengths(), KeyLengths()
    unpatched = build()
    _load(unpatched, path)
    with full:
        lora = call(unpatched)

    before, after = build(), build()
    tome.apply_patch(before, ratio=0.5)
    _load(before, path)
    _load(after, path)
    tome.apply_patch(after, ratio=0.5)
    with merged:
        got = call(before)
    assert torch.equal(call(after), got)  # the order does not matter
    if family != "sana":  # Sana's self-attention is linear (no SDPA to spy on): it runs on merged tokens
        assert sum(merged.lengths) < sum(full.lengths)  # attention saw fewer keys
    assert (got - lora).abs().max() > 1e-3
    base = build()
    tome.apply_patch(base, ratio=0.5)
    assert (got - call(base)).abs().max() > 1e-2  # and the LoRA still acts while merging

    before.fuse_lora()
    torch.testing.assert_close(call(before), got, atol=1e-4, rtol=1e-4)
    before.unfuse_lora()
    before.unload_lora_weights()
    torch.testing.assert_close(call(before), call(base), atol=1e-5, rtol=1e-5)
    tome.remove_patch(after)
    assert torch.equal(call(after), lora)  # undoing the patch leaves the LoRA model
    assert not tome.patch.is_patched(getattr(after, attr))
