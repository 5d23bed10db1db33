"""diffusers' caches combined with token merging: First Block Cache, Pyramid Attention
Broadcast, FasterCache, TaylorSeer and MagCache, on tiny Wan (both modes), Flux and PixArt
transformers and on a tiny Wan pipeline (whose timestep loop drives the caches that need it).

For each pair: the cache really skips work; applying the cache before or after patching
gives the same model, bit for bit; at ratio 0 the output is the cache's alone; at ratio 0.5
every attention call the cache lets run sees the merged key count and the output moves; and
undoing either one leaves the other working as if it had been applied alone."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import tome

diffusers = pytest.importorskip("diffusers")

from diffusers.hooks import (  # noqa: E402
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context  # noqa: E402

from conftest import KeyLengths  # noqa: E402

STEPS = (900, 700, 500, 300)  # the timesteps of a short sampling loop, in diffusers' 0-1000 scale


@dataclass
class Case:
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[int], Tuple[tuple, dict]]  # (args, kwargs) of the call at a timestep
    keys: int  # image (+ joint text) keys of a self-attention unmerged ...
    merged_keys: int  # ... and at ratio 0.5
    text_keys: int  # keys of a cross-attention to the text (never merged)
    tensor_format: str  # FasterCache's layout of hidden_states
    guidance_distilled: bool = False
    options: Dict = None


def _wan_case(mode):
    from test_wan import make_wan, wan_inputs

    def inputs(t):
        kwargs = wan_inputs(frames=2, height=8, width=8)
        kwargs["timestep"] = torch.tensor([t, t])
        return (), kwargs

    # 2 latent frames of 4 x 4 tokens: 32 keys, 16 after merging half (one destination per 2 x 2 cell)
    return Case(lambda: make_wan(head_dim=12), inputs, 32, 16, 5, "BCFHW", options=dict(mode=mode))


def _flux_case():
    from test_diffusers import flux_inputs, make_flux

    def inputs(t):
        args, kwargs = flux_inputs()
        kwargs["timestep"] = torch.tensor([t / 1000] * 2)
        return args, kwargs

    # joint attention over 5 text and 6 x 4 image tokens; half of the image keys merge
    return Case(make_flux, inputs, 29, 17, 29, "BCHW", guidance_distilled=True)


def _pixart_case():
    from test_diffusion_registry import make_pixart, pixart_inputs

    def inputs(t):
        args, kwargs = pixart_inputs(0)
        kwargs["timestep"] = torch.tensor([t, t])
        return args, kwargs

    return Case(make_pixart, inputs, 64, 32, 5, "BCHW")


CASES = {"wan_kv": lambda: _wan_case("kv"), "wan_tokens": lambda: _wan_case("tokens"), "flux": _flux_case,
         "pixart": _pixart_case}

_clock = {"t": STEPS[0]}  # what a pipeline's `current_timestep` is, for the caches that read it

# Wan's and PixArt's attention modules are `attn1`/`attn2`, which TaylorSeer's default patterns
# (`^blocks.*attn`, full match) miss: without these it would cache nothing there.
_TAYLOR_MODULES = [r"(blocks|transformer_blocks|single_transformer_blocks)\.\d+\.attn\d?"]


def _config(cache: str, case: Case):
    timestep = lambda: _clock["t"]  # noqa: E731
    if cache == "first_block":
        return FirstBlockCacheConfig(threshold=1.0)  # generous: the blocks after the first are skipped
    if cache == "pyramid":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=timestep,
                                               spatial_attention_timestep_skip_range=(-1, 1000))
    if cache == "faster":  # the first step (t=900) computes, later ones may be approximated
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 800),
                                 unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 800),
                                 attention_weight_callback=lambda _: 0.5, tensor_format=case.tensor_format,
                                 is_guidance_distilled=case.guidance_distilled, current_timestep_callback=timestep)
    if cache == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32,
                                     cache_identifiers=_TAYLOR_MODULES)
    if cache == "magcache":  # ratios of 1: no accumulated error, so blocks skip as often as allowed
        return MagCacheConfig(mag_ratios=[1.0] * len(STEPS), num_inference_steps=len(STEPS), threshold=0.5,
                              retention_ratio=0.25)
    raise AssertionError(cache)


_APPLY = {"first_block": apply_first_block_cache, "pyramid": apply_pyramid_attention_broadcast,
          "faster": apply_faster_cache, "taylorseer": apply_taylorseer_cache, "magcache": apply_mag_cache}
CACHES = list(_APPLY)


def _enable_cache(model, cache: str, case: Case):
    if hasattr(model, "enable_cache"):  # diffusers' CacheMixin (Wan, Flux)
        model.enable_cache(_config(cache, case))
    else:  # PixArt has no CacheMixin: the hook functions directly
        _APPLY[cache](model, _config(cache, case))
    return model


def _generate(model, case: Case) -> Tuple[torch.Tensor, List[int]]:
    """A fresh sampling loop (the caches' state reset first): the outputs at every step and
    the key count of every attention call."""
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    if hasattr(model, "cache_context"):
        context = model.cache_context("cond")
    else:  # what CacheMixin.cache_context does
        _set_cache_context(model, CacheContext("cond"))
        context = contextlib.nullcontext()
    spy, outputs = KeyLengths(), []
    with spy, context, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in STEPS:
            _clock["t"] = t
            args, kwargs = case.inputs(t)
            outputs.append(model(*args, **kwargs).sample)
    # A step whose merging blocks (or their attention) the cache skipped is no bypass to report.
    assert not [str(w.message) for w in caught if "nothing merged" in str(w.message)]
    return torch.stack(outputs), spy.lengths


def _both(case: Case, cache: str, order: str, ratio: float):
    model = case.make()
    if order == "cache_first":
        _enable_cache(model, cache, case)
        tome.patch.diffusers(model, ratio=ratio, **(case.options or {}))
    else:
        tome.patch.diffusers(model, ratio=ratio, **(case.options or {}))
        _enable_cache(model, cache, case)
    return model


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("case_name", list(CASES))
def test_caches_and_merging_combine_in_either_order(case_name, cache):
    case = CASES[case_name]()
    plain, plain_keys = _generate(case.make(), case)
    cached, cached_keys = _generate(_enable_cache(case.make(), cache, case), case)
    assert len(cached_keys) < len(plain_keys)  # the cache really skips attention calls here
    merged = {}
    for order in ("cache_first", "patch_first"):
        model = _both(case, cache, order, ratio=0.0)
        out, keys = _generate(model, case)
        assert torch.equal(out, cached) and keys == cached_keys, order  # ratio 0: the cache alone, bit for bit
        model.ratio = 0.5
        merged[order], keys = _generate(model, case)
        # every self-attention the cache lets run sees the merged keys; text keys stay whole
        assert set(keys) <= {case.merged_keys, case.text_keys} and case.merged_keys in keys, (order, keys)
        assert not torch.equal(merged[order], cached)
    assert torch.equal(merged["cache_first"], merged["patch_first"])


@pytest.mark.parametrize("cache", CACHES)
def test_undoing_merging_or_the_cache_leaves_the_other(cache):
    case = CASES["wan_kv"]()
    cached, _ = _generate(_enable_cache(case.make(), cache, case), case)
    model = case.make()
    tome.patch.diffusers(model, ratio=0.5)
    merged, _ = _generate(model, case)
    _enable_cache(model, cache, case)
    both, _ = _generate(model, case)
    tome.remove_patch(model)
    assert torch.equal(_generate(model, case)[0], cached)
    tome.patch.diffusers(model, ratio=0.5)
    assert torch.equal(_generate(model, case)[0], both)
    model.disable_cache()
    assert torch.equal(_generate(model, case)[0], merged)


# --- a pipeline: the caches read the timestep of its loop ------------------------------------


def _wan_pipeline():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from test_wan import make_wan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=make_wan(head_dim=12),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _sample(pipe):
    """4 steps with classifier-free guidance (a conditional and an unconditional call per step)
    of 5 frames at 64 x 64 px: 2 latent frames of 4 x 4 tokens; latents out, no decoding."""
    gen = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, 5, 16, generator=gen), torch.randn(1, 5, 16, generator=gen)
    spy = KeyLengths()
    with spy, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=64, width=64, num_frames=5,
                   num_inference_steps=4, guidance_scale=3.0, output_type="latent",
                   generator=torch.Generator().manual_seed(1)).frames
    assert not [str(w.message) for w in caught if "nothing merged" in str(w.message)]
    return out, spy.lengths


def _pipeline_cache(pipe, cache):
    timestep = lambda: pipe.current_timestep  # noqa: E731  (as the diffusers docs show)
    if cache == "pyramid":
        config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=timestep,
                                                 spatial_attention_timestep_skip_range=(-1, 1000))
    else:
        config = FirstBlockCacheConfig(threshold=1.0)
    pipe.transformer.enable_cache(config)


# FasterCache is left out here: with WanPipeline's separate conditional and unconditional calls
# (batch 1 each) it raises an IndexError in diffusers 0.42.1 itself, merging or not.
@pytest.mark.parametrize("cache", ["pyramid", "first_block"])
def test_timestep_driven_caches_in_a_pipeline_with_merging(cache):
    pipe = _wan_pipeline()
    plain, plain_keys = _sample(pipe)
    _pipeline_cache(pipe, cache)
    cached, cached_keys = _sample(pipe)
    assert len(cached_keys) < len(plain_keys)
    merged = {}
    for order in ("cache_first", "patch_first"):
        pipe = _wan_pipeline()
        if order == "cache_first":
            _pipeline_cache(pipe, cache)
            tome.apply_patch(pipe, ratio=0.0)
        else:
            tome.apply_patch(pipe, ratio=0.0)
            _pipeline_cache(pipe, cache)
        out, keys = _sample(pipe)
        assert torch.equal(out, cached) and keys == cached_keys
        pipe.transformer.ratio = 0.5
        merged[order], keys = _sample(pipe)
        assert set(keys) <= {16, 5} and 16 in keys, keys
        assert not torch.equal(merged[order], cached)
    assert torch.equal(merged["cache_first"], merged["patch_first"])
