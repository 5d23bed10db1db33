"""The GPU benchmark: ViTs, an SD 1.5-shaped UNet and a Flux-shaped DiT, every row side by side in one process.

    python benchmarks/gpu.py                        # on CUDA: the whole grid, budgeted to 7 min on one H100
    python benchmarks/gpu.py --device cpu --quick   # the same code paths on tiny shapes, about a minute
    python benchmarks/gpu.py --device cpu --sections attention --attention-batch 16 --rounds 15
                                                    # the CPU measurement behind tome.set_prop_attn_kernel("auto")

Sections, in the order they run (the most wanted numbers first, so a run cut short by
``--budget-s`` still has them):

- ``attention``: proportional attention alone at ViT sizes: ``scaled_dot_product_attention``
  with the ``log(size)`` bias as a float mask against the bias folded into a query/key
  channel (``tome.set_prop_attn_kernel``), and without any bias, with the SDPA backend
  each one ran.
- ``vit``: ViT-B/16 and ViT-L/16 (timm, random weights), fp16 and bf16, batch 256, 32 and 1:
  timm unmerged, this library at r = 0, 8, 16 and the decreasing schedule (16, -1),
  r = 16 with the mask kernel and without proportional attention, and the published
  code's merge step at r = 16 (``tome_bench/published.py``).
- ``unet``: an SD 1.5-shaped UNet (the published config, random weights) at 512 px, fp16,
  batch 1 and 4, one denoiser step: unmerged, tomesd 0.1.3, and this library's
  ``tokens`` and ``kv`` modes at ratios 0.3, 0.5, 0.7.
- ``flux``: a Flux-shaped transformer (FLUX.1-dev's widths, 2 + 4 blocks instead of 19 + 38)
  at 1024 px, bf16, batch 1, ``kv`` mode at ratios 0.3, 0.5, 0.7.
- ``compile``: ViT-B/16 fp16 compiled, batch 256 (default mode) and batch 1
  (``mode="reduce-overhead"``, CUDA graphs), timm against r = 16, and r switched
  16 -> 8 -> 16 -> 8 on the compiled model, counting recompilations.
- ``vlm``: vision-language prefill (``benchmarks/vlm_speed.py``'s groups): a Qwen2.5-VL with
  Qwen2.5-VL-3B's widths at 4 + 4 layers (2 + 2 with ``--quick``), random weights, bf16, one
  896 px image (1024 visual tokens) and one 8-frame 448 px video: the vision tower alone,
  the language model's prefill unreduced and for every wired method at 50 / 25 / 11 / 5 %
  of the visual tokens beside its FLOP ceiling, the whole prefill with the pixels in for
  ``visionzip`` beside the default, each method's selection (its scores included) as a share
  of prefill, and ``generate``'s time to first token, decode tokens/s and KV-cache bytes.

Every group times its variants in interleaved rounds (the order rotating), each
timing repeating the forward for at least ``--min-time`` seconds; a speed-up is the
median over rounds of the per-round ratio ``t_reference / t_variant``, with its
quartiles. Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` (tables ready for
docs/benchmarks.md). Models are built from configs with random weights: nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import tome  # noqa: E402
from tome._attention import key_bias_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SECTIONS = ("attention", "vit", "unet", "flux", "compile", "vlm")

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5, unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
FLUX_REDUCED = dict(  # black-forest-labs/FLUX.1-dev, transformer/config.json, with 2 + 4 blocks instead of 19 + 38
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)


@dataclass(frozen=True)
class Preset:
    vit_models: Sequence[str]
    vit_dtypes: Sequence[str]
    vit_batches: Sequence[int]
    attention_batches: Sequence[int]
    attention_tokens: Sequence[int]
    attention_heads: int
    unet: Dict[str, Any]
    unet_pixels: int
    unet_context: int
    unet_batches: Sequence[int]
    unet_dtype: str
    flux: Dict[str, Any]
    flux_pixels: int
    flux_text: int
    flux_dtype: str
    compile_model: str
    compile_dtype: str
    compile_batches: Sequence[int]
    rounds: int
    warmup: int
    min_time: float
    budget_s: float
    ratios: Sequence[float] = (0.3, 0.5, 0.7)
    vit_depth: Optional[int] = None  # fewer blocks than the model's (the quick run)


PRESETS = {
    "full": Preset(
        vit_models=("vit_b16", "vit_l16"), vit_dtypes=("fp16", "bf16"), vit_batches=(256, 32, 1),
        attention_batches=(256, 32), attention_tokens=(197, 149, 101, 53), attention_heads=12,
        unet=SD15_UNET, unet_pixels=512, unet_context=77, unet_batches=(1, 4), unet_dtype="fp16",
        flux=FLUX_REDUCED, flux_pixels=1024, flux_text=512, flux_dtype="bf16",
        compile_model="vit_b16", compile_dtype="fp16", compile_batches=(1, 256),
        rounds=7, warmup=2, min_time=0.05, budget_s=420.0,
    ),
    "quick": Preset(
        vit_models=("vit_tiny_patch16_224",), vit_dtypes=("fp32",), vit_batches=(2, 1),
        attention_batches=(2,), attention_tokens=(65, 33), attention_heads=3,
        unet=dict(SD15_UNET, block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32,
                  norm_num_groups=8),
        unet_pixels=64, unet_context=7, unet_batches=(1, 2), unet_dtype="fp32",
        flux=dict(FLUX_REDUCED, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        flux_pixels=128, flux_text=16, flux_dtype="fp32",
        compile_model="vit_tiny_patch16_224", compile_dtype="fp32", compile_batches=(1,),
        rounds=2, warmup=1, min_time=0.0, budget_s=300.0, ratios=(0.5,), vit_depth=2,
    ),
}


# --- timing -------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Variant:
    """One row: a label, one forward, and a context entered around its timings (untimed)."""

    label: str
    forward: Callable[[], Any]
    context: Callable[[], ContextManager] = contextlib.nullcontext
    info: Dict[str, Any] = field(default_factory=dict)
    times: List[float] = field(default_factory=list)
    repeats: int = 1


def _run(variant: Variant, count: int, device: torch.device) -> float:
    with variant.context():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            variant.forward()
        synchronize(device)
        return time.perf_counter() - start


def side_by_side(variants: Sequence[Variant], device: torch.device, rounds: int, warmup: int, min_time: float) -> None:
    """Time every variant in ``rounds`` interleaved rounds (rotating order), filling ``variant.times``
    with seconds per forward. The first variant is the reference of the speed-ups."""
    for _ in range(warmup):
        for variant in variants:
            _run(variant, 1, device)
    for variant in variants:  # forwards per timing, doubled until they cover min_time
        while min_time > 0 and _run(variant, variant.repeats, device) < min_time and variant.repeats < 1 << 12:
            variant.repeats *= 2
    for index in range(rounds):
        offset = index % len(variants)
        for variant in list(variants[offset:]) + list(variants[:offset]):
            variant.times.append(_run(variant, variant.repeats, device) / variant.repeats)


def _quartiles(values: Sequence[float]) -> tuple:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(variants: Sequence[Variant], items_per_forward: int) -> List[Dict[str, Any]]:
    reference = variants[0]
    rows = []
    for variant in variants:
        ratios = [r / t for r, t in zip(reference.times, variant.times)]
        q1, q3 = _quartiles(ratios)
        median = statistics.median(variant.times)
        rows.append({
            "variant": variant.label, "median_s": median, "per_s": items_per_forward / median,
            "speedup": statistics.median(ratios), "speedup_q1": q1, "speedup_q3": q3,
            "times_s": variant.times, "repeats": variant.repeats, **variant.info,
        })
    return rows


# --- which SDPA backend ran ---------------------------------------------------------------

_BACKEND_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
_KERNEL_HINTS = (("flash", "flash"), ("fmha", "efficient/cudnn fmha"), ("cudnn", "cudnn"), ("attention", "attention"))


def sdpa_backends(forward: Callable[[], Any], device: torch.device) -> Dict[str, Any]:
    """The SDPA backends one call of ``forward`` ran, from torch.profiler: aten ops (eager and
    inductor's extern calls) and, on CUDA, attention kernels by name (CUDA graph replays
    show no aten ops)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        forward()
        synchronize(device)
    counts: Dict[str, int] = {}
    kernels: Dict[str, int] = {}
    for event in prof.events():
        name = event.name
        if name in _BACKEND_OPS:
            counts[_BACKEND_OPS[name]] = counts.get(_BACKEND_OPS[name], 0) + 1
        elif event.device_type == DeviceType.CUDA and any(hint in name.lower() for hint, _ in _KERNEL_HINTS):
            kernels[name[:80]] = kernels.get(name[:80], 0) + 1
    if counts:
        label = " + ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    elif kernels:
        hints = sorted({hint for name in kernels for key, hint in _KERNEL_HINTS if key in name.lower()})
        label = "kernels: " + ", ".join(hints)
    else:
        label = "none"
    return {"sdpa": label, "sdpa_ops": counts, "attention_kernels": dict(sorted(kernels.items())[:6])}


# --- sections -----------------------------------------------------------------------------


def build_vit(key: str, device: torch.device, depth: Optional[int]) -> tuple:
    """A timm ViT with random weights (``tome_bench.models.build_model``), with ``depth`` blocks if given."""
    from tome_bench.models import build_model

    base, spec = build_model(key, device)
    if depth is not None:
        base.blocks = base.blocks[:depth]
    return base, spec


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.time()

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)


def run_attention(preset: Preset, device: torch.device, dtypes: Sequence[str], args: argparse.Namespace) -> List[dict]:
    """Proportional attention alone: the bias as a mask, folded into a channel, and no bias."""
    rows = []
    heads, head_dim = preset.attention_heads, 64
    gen = torch.Generator().manual_seed(0)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for batch in args.attention_batch or preset.attention_batches:
            for tokens in preset.attention_tokens:
                q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=gen).to(device, dtype) for _ in range(3))
                size = torch.randint(1, 8, (batch, tokens, 1), generator=gen).float().to(device)
                bias = size.log().transpose(1, 2).unsqueeze(1)
                mask = bias.to(dtype)
                scale = head_dim**-0.5
                F = torch.nn.functional
                variants = [
                    Variant("mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)),
                    Variant("channel", lambda: key_bias_attention(q, k, v, bias, scale=scale)),
                    Variant("no bias", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)),
                ]
                with torch.inference_mode():
                    difference = (variants[1].forward().float() - variants[0].forward().float()).abs().max().item()
                    for variant in variants:
                        variant.info.update(sdpa_backends(variant.forward, device))
                    side_by_side(variants, device, args.rounds or preset.rounds, args.warmup, args.min_time)
                for row in summarize(variants, batch):
                    row.update(dtype=dtype_name, batch=batch, tokens=tokens, heads=heads, head_dim=head_dim,
                               channel_vs_mask_max_abs_diff=difference)
                    rows.append(row)
                line = ", ".join(f"{r['variant']} {r['median_s'] * 1e3:.3f} ms ({r['sdpa']})" for r in rows[-3:])
                print(f"  attention {dtype_name} batch {batch} tokens {tokens}: {line}", flush=True)
    return rows


def _vit_variants(base: torch.nn.Module, tokens: int, x: torch.Tensor) -> List[Variant]:
    from tome_bench.flops import ceiling
    from tome_bench.models import patched_twin
    from tome_bench.published import published_style

    twin = patched_twin(base)
    plain = tome.apply_patch(patched_twin(base), prop_attn=False)

    def merged(model: torch.nn.Module, r: Any, kernel: Optional[str] = None) -> Callable[[], ContextManager]:
        @contextlib.contextmanager
        def context():
            with tome.merging(model, r), (tome.prop_attn_kernel(kernel) if kernel else contextlib.nullcontext()):
                yield

        return context

    @contextlib.contextmanager
    def published():
        with tome.merging(twin, 16), published_style():
            yield

    variants = [Variant("timm", lambda: base(x), info={"ceiling": 1.0})]
    for label, r, kernel, model in (
        ("tome r=0", 0, None, twin), ("tome r=8", 8, None, twin), ("tome r=16", 16, None, twin),
        ("tome r=(16,-1)", (16, -1.0), None, twin), ("tome r=16, mask kernel", 16, "mask", twin),
        ("tome r=16, channel kernel", 16, "channel", twin), ("tome r=16, prop_attn off", 16, None, plain),
    ):
        variants.append(Variant(label, (lambda m=model: m(x)), merged(model, r, kernel),
                                info={"ceiling": ceiling(base, r, tokens)["ceiling"]}))
    variants.append(Variant("published merge r=16", lambda: twin(x), published,
                            info={"ceiling": ceiling(base, 16, tokens)["ceiling"]}))
    return variants


def run_vit(preset: Preset, device: torch.device, dtypes: Sequence[str], args: argparse.Namespace, budget: Budget,
            skipped: List[str], rows: List[dict], save: Callable[[], None]) -> List[dict]:
    """``rows`` grows and ``save`` runs after each group (a run cut short keeps what it measured)."""
    backends: Dict[tuple, Dict[str, Any]] = {}
    for model_key in args.vit_models or preset.vit_models:
        base, spec = build_vit(model_key, device, preset.vit_depth)
        for dtype_name in dtypes:
            base.to(DTYPES[dtype_name])
            tokens = (spec.image_size // 16) ** 2 + base.num_prefix_tokens
            for batch in preset.vit_batches:
                group = f"vit {model_key} {dtype_name} batch {batch}"
                if budget.left() < 0:
                    skipped.append(f"{group}: time budget spent")
                    continue
                x = torch.randn(batch, 3, spec.image_size, spec.image_size, device=device, dtype=DTYPES[dtype_name])
                variants = _vit_variants(base, tokens, x)
                with torch.inference_mode():
                    outputs = {}
                    for variant in variants:
                        with variant.context():
                            outputs[variant.label] = variant.forward().float()
                            # SDPA picks its backend by dtype, head size, mask: profiled at one batch per model and dtype.
                            key = (model_key, dtype_name, variant.label)
                            if key not in backends:
                                backends[key] = sdpa_backends(variant.forward, device)
                            variant.info.update(backends[key])
                    for variant in variants:
                        out = outputs[variant.label]
                        variant.info["max_abs_logit_diff_vs_timm"] = (out - outputs["timm"]).abs().max().item()
                        variant.info["max_abs_logit_diff_vs_tome_r16"] = (out - outputs["tome r=16"]).abs().max().item()
                    del outputs
                    side_by_side(variants, device, args.rounds or preset.rounds, args.warmup, args.min_time)
                for row in summarize(variants, batch):
                    row.update(model=model_key, timm_name=spec.timm_name, dtype=dtype_name, batch=batch)
                    row["of_ceiling"] = row["speedup"] / row["ceiling"]
                    rows.append(row)
                print(f"  {group}: " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x" for r in rows[-len(variants):]),
                      flush=True)
                save()
        del base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _unet_inputs(preset: Preset, batch: int, device: torch.device, dtype: torch.dtype) -> tuple:
    gen = torch.Generator().manual_seed(1)
    latent = preset.unet_pixels // 8
    sample = torch.randn(batch, 4, latent, latent, generator=gen).to(device, dtype)
    context = torch.randn(batch, preset.unet_context, preset.unet["cross_attention_dim"], generator=gen).to(device, dtype)
    return sample, torch.tensor(500, device=device), context


def _tomesd_context(unet: torch.nn.Module, ratio: float) -> Callable[[], ContextManager]:
    @contextlib.contextmanager
    def context():
        import tomesd

        tomesd.apply_patch(unet, ratio=ratio)
        try:
            yield
        finally:
            tomesd.remove_patch(unet)
            unet.__dict__.pop("_tome_info", None)  # tomesd leaves its record behind

    return context


def _tome_context(denoiser: torch.nn.Module, kernel: Optional[str] = None, **options: Any) -> Callable[[], ContextManager]:
    @contextlib.contextmanager
    def context():
        tome.patch.diffusers(denoiser, **options)
        try:
            with tome.prop_attn_kernel(kernel) if kernel else contextlib.nullcontext():
                yield
        finally:
            tome.remove_patch(denoiser)

    return context


def _diffusion_rows(variants: List[Variant], device: torch.device, args: argparse.Namespace, preset: Preset,
                    batch: int, extra: Dict[str, Any]) -> List[dict]:
    with torch.inference_mode():
        reference = variants[0].forward().float()
        for variant in variants:
            with variant.context():
                variant.info["max_abs_diff_vs_unmerged"] = (variant.forward().float() - reference).abs().max().item()
                variant.info.update(sdpa_backends(variant.forward, device))
        side_by_side(variants, device, args.rounds or preset.rounds, args.warmup, args.min_time)
    rows = summarize(variants, batch)
    for row in rows:
        row.update(batch=batch, **extra)
    return rows


def run_unet(preset: Preset, device: torch.device, args: argparse.Namespace, budget: Budget,
             skipped: List[str]) -> List[dict]:
    from diffusers import UNet2DConditionModel

    dtype = DTYPES[preset.unet_dtype]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**preset.unet).eval().to(dtype)
    rows = []
    for batch in preset.unet_batches:
        if budget.left() < 0:
            skipped.append(f"unet batch {batch}: time budget spent")
            continue
        inputs = _unet_inputs(preset, batch, device, dtype)
        variants = [Variant("unmerged", lambda: unet(*inputs).sample)]
        for ratio in preset.ratios:
            variants.append(Variant(f"tomesd 0.1.3 ratio={ratio}", lambda: unet(*inputs).sample, _tomesd_context(unet, ratio)))
        for mode in ("tokens", "kv"):
            for ratio in preset.ratios:
                variants.append(Variant(f"tome {mode} ratio={ratio}", lambda: unet(*inputs).sample,
                                        _tome_context(unet, ratio=ratio, mode=mode)))
        variants.append(Variant("tome kv ratio=0.5, mask kernel", lambda: unet(*inputs).sample,
                                _tome_context(unet, kernel="mask", ratio=0.5, mode="kv")))
        rows += _diffusion_rows(variants, device, args, preset, batch,
                                {"model": "SD 1.5-shaped UNet", "pixels": preset.unet_pixels, "dtype": preset.unet_dtype})
        print(f"  unet batch {batch}: " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x" for r in rows[-len(variants):]),
              flush=True)
    return rows


def run_flux(preset: Preset, device: torch.device, args: argparse.Namespace) -> List[dict]:
    from diffusers import FluxTransformer2DModel

    dtype = DTYPES[preset.flux_dtype]
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**preset.flux).eval().to(dtype)
    gen = torch.Generator().manual_seed(2)
    side = preset.flux_pixels // 16  # 8x VAE, then 2x2 packing
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None]
    inputs = dict(
        hidden_states=torch.randn(1, side * side, preset.flux["in_channels"], generator=gen).to(device, dtype),
        encoder_hidden_states=torch.randn(1, preset.flux_text, preset.flux["joint_attention_dim"], generator=gen).to(device, dtype),
        pooled_projections=torch.randn(1, preset.flux["pooled_projection_dim"], generator=gen).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype), img_ids=ids.reshape(-1, 3).to(device),
        txt_ids=torch.zeros(preset.flux_text, 3, device=device),
    )
    if preset.flux.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5], device=device, dtype=dtype)

    def forward():
        return model(**inputs).sample

    variants = [Variant("unmerged", forward)]
    for ratio in preset.ratios:
        variants.append(Variant(f"tome kv ratio={ratio}", forward, _tome_context(model, ratio=ratio, mode="kv")))
    variants.append(Variant("tome kv ratio=0.5, mask kernel", forward, _tome_context(model, kernel="mask", ratio=0.5, mode="kv")))
    rows = _diffusion_rows(variants, device, args, preset, 1, {
        "model": f"Flux-shaped ({preset.flux['num_layers']} + {preset.flux['num_single_layers']} blocks)",
        "pixels": preset.flux_pixels, "dtype": preset.flux_dtype, "image_tokens": side * side, "text_tokens": preset.flux_text,
    })
    print("  flux: " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x" for r in rows), flush=True)
    return rows


def run_compile(preset: Preset, device: torch.device, args: argparse.Namespace, budget: Budget,
                skipped: List[str], rows: List[dict], save: Callable[[], None]) -> List[dict]:
    """timm and r = 16 compiled (batch 1: CUDA graphs), and r switched on the compiled model
    (at batch 1, where CUDA graphs make it matter); ``rows`` grows and ``save`` runs after each batch."""
    from torch._dynamo.utils import counters

    from tome_bench.models import patched_twin

    dtype = DTYPES[preset.compile_dtype]
    base, spec = build_vit(preset.compile_model, device, preset.vit_depth)
    base.to(dtype)
    for batch in preset.compile_batches:
        # Three cold inductor compilations of ViT-B take a minute or two on a 16-core host.
        if budget.left() < (120 if device.type == "cuda" else 0):
            skipped.append(f"compile batch {batch}: {budget.left():.0f} s of the time budget left, too little to compile")
            continue
        mode = "reduce-overhead" if batch == 1 else "default"
        if device.type == "cuda":
            compile_options: Dict[str, Any] = {"mode": mode}
        else:  # the quick CPU run checks the code path with dynamo alone (inductor takes minutes here)
            compile_options, mode = {"backend": "eager"}, "backend=eager"
        x = torch.randn(batch, 3, spec.image_size, spec.image_size, device=device, dtype=dtype)
        twin = patched_twin(base)
        twin.r = 16
        torch._dynamo.reset()
        counters.clear()
        compiled_base = torch.compile(base, **compile_options)
        compiled_twin = torch.compile(twin, **compile_options)
        compile_s = {}
        with torch.inference_mode():
            for label, fn in (("timm compiled", compiled_base), ("tome r=16 compiled", compiled_twin)):
                start = time.perf_counter()
                for _ in range(3):  # the CUDA graph is recorded on the third call
                    fn(x)
                synchronize(device)
                compile_s[label] = time.perf_counter() - start
            recompiles, switch_times = None, []
            if batch == min(preset.compile_batches):
                # r switched back and forth on the compiled model: one compilation per schedule, then none.
                twin.r = 8
                start = time.perf_counter()
                for _ in range(3):
                    compiled_twin(x)
                synchronize(device)
                compile_s["tome r=8 compiled"] = time.perf_counter() - start
                frames = counters["stats"]["unique_graphs"]
                for r in (16, 8, 16, 8):
                    twin.r = r
                    synchronize(device)
                    start = time.perf_counter()
                    compiled_twin(x)
                    synchronize(device)
                    switch_times.append(time.perf_counter() - start)
                recompiles = counters["stats"]["unique_graphs"] - frames
                twin.r = 16
            difference = (compiled_twin(x).float() - twin(x).float()).abs().max().item()
        variants = [
            Variant("timm eager", lambda: base(x)),
            Variant("timm compiled", lambda: compiled_base(x)),
            Variant("tome r=16 eager", lambda: twin(x)),
            Variant("tome r=16 compiled", lambda: compiled_twin(x)),
        ]
        with torch.inference_mode():
            for variant in variants:
                variant.info.update(sdpa_backends(variant.forward, device))
                variant.info["compile_s"] = compile_s.get(variant.label)
            side_by_side(variants, device, args.rounds or preset.rounds, args.warmup, args.min_time)
        for row in summarize(variants, batch):
            row.update(model=preset.compile_model, dtype=preset.compile_dtype, batch=batch, mode=mode,
                       recompiles_on_r_switch=recompiles, r_switch_call_s=switch_times,
                       compiled_vs_eager_max_abs_diff=difference, compile_s_r8=compile_s.get("tome r=8 compiled"))
            rows.append(row)
        print(f"  compile batch {batch} ({mode}): " + ", ".join(f"{r['variant']} {r['speedup']:.2f}x"
              for r in rows[-4:]) + f"; recompiles on r switch: {recompiles}", flush=True)
        save()
    torch._dynamo.reset()
    return rows


def run_vlm(preset: Preset, device: torch.device, args: argparse.Namespace) -> Dict[str, Any]:
    """``benchmarks/vlm_speed.py``'s groups in bf16: Qwen2.5-VL-3B widths at 4 + 4 layers
    (its quick preset with ``--quick``), ``--rounds`` / ``--warmup`` as for the other sections,
    with the ``prop_attn`` rows (``vlm_speed.py --prop-attn``)."""
    import dataclasses

    import vlm_speed

    if preset is PRESETS["quick"]:
        setup = vlm_speed.PRESETS["quick"]
    else:
        setup = dataclasses.replace(vlm_speed.PRESETS["full"], lm_layers=4, tower_layers=4, decode_tokens=16)
    setup = dataclasses.replace(setup, dtype="bf16", rounds=args.rounds or preset.rounds,
                                warmup=args.warmup if args.warmup is not None else preset.warmup)
    # prop_attn rows too: on CUDA its additive mask rules out SDPA's FlashAttention backend,
    # the cost that decides whether it can be the default (docs/vlm_reduction.md).
    return vlm_speed.measure(setup, device, progress=lambda line: print(line, flush=True), prop_attn=True)


# --- report -------------------------------------------------------------------------------


def _speedup(row: dict) -> str:
    return f"{row['speedup']:.2f}x [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}]"


def markdown(report: dict) -> str:
    lines = [f"Device: {report['machine'].get('gpu') or report['machine']['cpu']}; torch {report['machine']['torch']}; "
             f"{report['date']}; command `{report['command']}`; {report['elapsed_s']:.0f} s.", ""]
    if report["attention"]:
        lines += ["### Proportional attention alone (heads x 64 channels)", "",
                  "| dtype | batch | tokens | mask ms | channel ms | no bias ms | channel vs mask | backends (mask / channel / none) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        rows = report["attention"]
        for i in range(0, len(rows), 3):
            mask, channel, none = rows[i : i + 3]
            lines.append(f"| {mask['dtype']} | {mask['batch']} | {mask['tokens']} | {mask['median_s'] * 1e3:.3f} | "
                         f"{channel['median_s'] * 1e3:.3f} | {none['median_s'] * 1e3:.3f} | "
                         f"{1 / channel['speedup']:.2f}x the time | {mask['sdpa']} / {channel['sdpa']} / {none['sdpa']} |")
        lines.append("")
    if report["vit"]:
        lines += ["### ViTs (timm, random weights)", "",
                  "| model | dtype | batch | variant | img/s | speed-up [IQR] | FLOP ceiling | of ceiling | SDPA |",
                  "|---|---|---:|---|---:|---|---:|---:|---|"]
        for row in report["vit"]:
            lines.append(f"| {row['model']} | {row['dtype']} | {row['batch']} | {row['variant']} | {row['per_s']:.1f} | "
                         f"{_speedup(row)} | {row['ceiling']:.2f}x | {row['of_ceiling']:.2f} | {row['sdpa']} |")
        lines.append("")
    for key, title in (("unet", "SD 1.5-shaped UNet, one denoiser step"), ("flux", "Flux-shaped transformer, kv mode")):
        if report[key]:
            first = report[key][0]
            lines += [f"### {title} ({first['model']}, {first['pixels']} px, {first['dtype']})", "",
                      "| batch | variant | ms per step | speed-up [IQR] | max abs diff vs unmerged | SDPA |",
                      "|---:|---|---:|---|---:|---|"]
            for row in report[key]:
                lines.append(f"| {row['batch']} | {row['variant']} | {row['median_s'] * 1e3:.1f} | {_speedup(row)} | "
                             f"{row['max_abs_diff_vs_unmerged']:.3g} | {row['sdpa']} |")
            lines.append("")
    if report["compile"]:
        lines += ["### torch.compile", "",
                  "| model | dtype | batch | mode | variant | img/s | speed-up vs timm eager [IQR] | compile s | "
                  "recompiles on r switch | SDPA |", "|---|---|---:|---|---|---:|---|---:|---:|---|"]
        for row in report["compile"]:
            compile_s = f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else "-"
            recompiles = row["recompiles_on_r_switch"]
            lines.append(f"| {row['model']} | {row['dtype']} | {row['batch']} | {row['mode']} | {row['variant']} | "
                         f"{row['per_s']:.1f} | {_speedup(row)} | {compile_s} | "
                         f"{'-' if recompiles is None else recompiles} | {row['sdpa']} |")
        lines.append("")
    if isinstance(report["vlm"], dict):
        import vlm_speed

        lines += ["### Vision-language prefill, decode and KV cache (benchmarks/vlm_speed.py's groups)", "",
                  vlm_speed.markdown(report["vlm"])]
    else:
        lines.append(f"Vision-language prefill: {report['vlm']}")
    if report["skipped"]:
        lines += ["", "Not run: " + "; ".join(report["skipped"])]
    if report["errors"]:
        lines += ["", "Failed: " + "; ".join(report["errors"])]
    return "\n".join(lines) + "\n"


def machine(device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: Dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
                            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    for name in ("timm", "diffusers", "tomesd"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["flash_sdp_enabled"] = torch.backends.cuda.flash_sdp_enabled()
    return info


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: the code paths in about a minute "
                        "(without it the full grid runs, on any device: on a CPU, name a section or two)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--dtypes", help="comma list for the attention and ViT sections (default: fp16,bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--vit-models", help="comma list of ViTs (short names of tome_bench.models or timm names)")
    parser.add_argument("--attention-batch", type=int, action="append", help="batch of the attention section (repeatable)")
    parser.add_argument("--rounds", type=int, help="timed interleaved rounds per group")
    parser.add_argument("--warmup", type=int, help="untimed rounds first")
    parser.add_argument("--min-time", type=float, help="least seconds behind each timing")
    parser.add_argument("--budget-s", type=float, help="stop starting new groups after this many seconds")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--name", help="file stem (default: gpu-<device>, gpu-quick-<device> with --quick)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    preset = PRESETS["quick" if args.quick else "full"]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.warmup = preset.warmup if args.warmup is None else args.warmup
    args.min_time = preset.min_time if args.min_time is None else args.min_time
    args.vit_models = args.vit_models.split(",") if args.vit_models else None
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    name = args.name or (f"gpu-quick-{device.type}" if args.quick else f"gpu-{device.type}")
    budget = Budget(args.budget_s or preset.budget_s)
    report: Dict[str, Any] = {
        "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(device),
        "device": str(device), "preset": "quick" if args.quick else "full",
        "prop_attn_kernel_default": tome.get_prop_attn_kernel(), "rounds": args.rounds or preset.rounds,
        "warmup": args.warmup, "min_time": args.min_time, "budget_s": budget.seconds,
        "attention": [], "vit": [], "unet": [], "flux": [], "compile": [], "skipped": [], "errors": [],
        "vlm": "not run (section vlm not asked for)",
        "section_s": {},
    }
    print(f"machine: {report['machine']}", flush=True)
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:
        report["elapsed_s"] = time.time() - budget.start
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(markdown(report))

    for section in SECTIONS:
        if section not in sections:
            continue
        if budget.left() < 0:
            report["skipped"].append(f"{section}: time budget spent")
            continue
        print(f"== {section} ({budget.left():.0f} s of budget left)", flush=True)
        started = time.time()
        try:
            if section == "attention":
                report["attention"] = run_attention(preset, device, dtypes, args)
            elif section == "vit":
                run_vit(preset, device, dtypes, args, budget, report["skipped"], report["vit"], save)
            elif section == "unet":
                report["unet"] = run_unet(preset, device, args, budget, report["skipped"])
            elif section == "flux":
                report["flux"] = run_flux(preset, device, args)
            elif section == "compile":
                run_compile(preset, device, args, budget, report["skipped"], report["compile"], save)
            elif section == "vlm":
                report["vlm"] = run_vlm(preset, device, args)
        except Exception as error:  # one section failing must not lose the others' numbers
            report["errors"].append(f"{section}: {type(error).__name__}: {error}")
            traceback.print_exc()
        report["section_s"][section] = time.time() - started
        save()
    save()
    print(markdown(report))
    print(f"wrote {os.path.join(args.out, name)}.json/.md in {report['elapsed_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
