"""Diffusion benchmark: one denoiser step, unmerged vs tomesd vs tome.patch.diffusers.

    uv run python benchmarks/diffusion.py                       # default grid (~20-30 min on 2 CPU cores)
    uv run python benchmarks/diffusion.py --quick               # SD 1.5 at 512 px, ratio 0.5 (~3 min)
    uv run python benchmarks/diffusion.py --models sd15 --sizes 512 768 --ratios 0.3 0.5 0.7 --batch 2
    uv run python benchmarks/diffusion.py --models wan --sizes 480 --frames 5 --batch 1   # 7800 tokens

Full-size denoisers are built from their published configs with random weights
(nothing is downloaded): the SD 1.5 UNet, the SDXL UNet and PixArt-alpha's
transformer. Every variant of one (model, resolution) is timed in the same
rounds, interleaved, on the same model object (patched and unpatched between
forwards); the speed-up is the median over rounds of the per-round ratio. The
regime (device, dtype, batch, attention kernel, one step) heads the table so
readers compare like with like. Writes JSON, a Markdown table and a PNG plot to
``--out``. See docs/diffusion.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, Iterator, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tome  # noqa: E402
from tome.patch import _diffusers  # noqa: E402
from tome_bench.timing import Variant, summarize, time_variants  # noqa: E402

# Published configs (the fields that shape compute); weights are random.
CONFIGS: Dict[str, dict] = {
    "sd15": dict(
        cls="UNet2DConditionModel", latent_scale=8, text=(77, 768),
        config=dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
    ),
    # The highest-resolution transformer of the SD 1.5 UNet alone (one of the 5 that
    # max_downsample=1 merges): where ToMe's speed-up comes from, timed without the convolutions.
    "sd15_level1": dict(
        cls="Transformer2DModel", latent_scale=8, text=(77, 768), channels=320,
        config=dict(num_attention_heads=8, attention_head_dim=40, in_channels=320, cross_attention_dim=768,
                    norm_num_groups=32),
    ),
    "sdxl": dict(
        cls="UNet2DConditionModel", latent_scale=8, text=(77, 2048), sdxl=True,
        config=dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
    ),
    "pixart": dict(
        cls="PixArtTransformer2DModel", latent_scale=8, text=(120, 4096), pixart=True,
        config=dict(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
            norm_type="ada_norm_single", use_additional_conditions=False,
        ),
    ),
    # Wan 2.1 T2V 1.3B's widths (12 heads x 128, ffn 8960, umT5 text 512 x 4096) at reduced depth
    # (2 of 30 blocks); a size is the video height in px at 480p's aspect (480 -> 832 px wide) and
    # 17 frames (5 latent frames): 480 gives 5 x 30 x 52 = 7800 tokens per sample.
    "wan": dict(
        cls="WanTransformer3DModel", latent_scale=8, text=(512, 4096), video=dict(frames=5, aspect=832 / 480),
        config=dict(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        ),
    ),
}

PRESETS = {
    "quick": dict(models=["sd15_level1"], sizes=[512], ratios=[0.5], batch=2, rounds=3, modes=["tokens", "kv"]),
    "default": dict(models=["sd15", "pixart"], sizes=[256, 512, 768], ratios=[0.3, 0.5, 0.7], batch=2, rounds=3,
                    modes=["tokens", "kv"]),
}


def build(name: str, dtype: torch.dtype, device: torch.device, layers: Optional[int] = None) -> torch.nn.Module:
    """The denoiser from its config with random weights N(0, 0.02); ``layers`` overrides a
    transformer's depth. Buffers (Wan's rotary tables) keep the values its constructor computed:
    ``to_empty`` alone leaves them uninitialised memory, which made Wan's outputs NaN."""
    model = _meta_model(name, layers, keep_buffers=True)
    buffers = {key: value.clone() for key, value in model.named_buffers()}
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for key, value in model.named_buffers():
            value.copy_(buffers[key])
    return model.to(dtype).eval()


def _meta_model(name: str, layers: Optional[int] = None, keep_buffers: bool = False) -> torch.nn.Module:
    """Parameters on the meta device (no memory); buffers too, unless ``keep_buffers``."""
    import diffusers
    from accelerate import init_empty_weights

    spec = CONFIGS[name]
    config = dict(spec["config"], **({"num_layers": layers} if layers and "num_layers" in spec["config"] else {}))
    torch.manual_seed(0)
    with init_empty_weights(include_buffers=not keep_buffers):
        return getattr(diffusers, spec["cls"])(**config).eval()


def make_inputs(name: str, size: int, batch: int, dtype: torch.dtype, device: torch.device,
                frames: Optional[int] = None) -> tuple:
    """``(args, kwargs)`` of one denoiser call; ``frames``: latent frames of a video model (its default if None)."""
    spec = CONFIGS[name]
    latent = size // spec["latent_scale"]
    sample = torch.randn(batch, spec.get("channels", 4), latent, latent, device=device, dtype=dtype)
    context = torch.randn(batch, *spec["text"], device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device)
    video = spec.get("video")
    if video:  # (batch, channels, frames, height, width), the width rounded to whole 2 x 2 patches
        width = int(round(latent * video["aspect"] / 2)) * 2
        sample = torch.randn(batch, spec["config"]["in_channels"], frames or video["frames"], latent, width, device=device,
                             dtype=dtype)
        return (sample,), dict(encoder_hidden_states=context, timestep=t)
    if spec.get("sdxl"):
        extra = {"added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype),
        }}
    elif spec.get("pixart"):
        extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    else:
        extra = {}
    if spec["cls"] == "UNet2DConditionModel":
        return (sample, t, context), extra
    return (sample,), dict(encoder_hidden_states=context, timestep=t, **extra)


@contextlib.contextmanager
def patched(model: torch.nn.Module, kind: str, options: dict) -> Iterator[None]:
    if kind == "tomesd":
        import tomesd

        tomesd.apply_patch(model, **options)
        try:
            yield
        finally:
            tomesd.remove_patch(model)
    elif kind == "tome":
        tome.patch.diffusers(model, **options)
        try:
            yield
        finally:
            tome.remove_patch(model)
    else:
        yield


def flop_ceilings(name: str, size: int, batch: int, specs: List[tuple], frames: Optional[int] = None,
                  layers: Optional[int] = None) -> Dict[str, float]:
    """Per variant, the step's FLOPs unmerged over its FLOPs merged: the speed-up if time followed
    FLOPs. Counted by ``torch.utils.flop_counter`` on a copy of the model on the meta device (no
    memory, no arithmetic): every matmul and attention call of the step, matching included."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model(name, layers)
    args, kwargs = make_inputs(name, size, batch, torch.float32, torch.device("meta"), frames)
    flops = {}
    for label, kind, options in specs:
        if kind == "tomesd":
            continue
        with patched(model, kind, options), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(*args, **kwargs)
        flops[label] = counter.get_total_flops()
    return {label: flops[specs[0][0]] / count for label, count in flops.items()}


def tokens_of(name: str, size: int, frames: Optional[int] = None) -> int:
    """Latent tokens per sample of one denoiser call (after patchifying)."""
    args, _ = make_inputs(name, size, 1, torch.float32, torch.device("meta"), frames)
    shape = args[0].shape
    patch = CONFIGS[name]["config"].get("patch_size", 1)
    if isinstance(patch, (tuple, list)):  # (time, height, width)
        return (shape[2] // patch[0]) * (shape[3] // patch[1]) * (shape[4] // patch[2])
    return (shape[-2] // patch) * (shape[-1] // patch)


class MatchTimer:
    """Wall time spent in matching (the similarity matrix and the assignment)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def active(self) -> Iterator["MatchTimer"]:
        # the 2-D matching of images and the 3-D matching of video tokens
        targets = [(_diffusers, "match_stride_2d"), (_diffusers._merge, "match_stride_3d")]
        originals = [getattr(module, attr) for module, attr in targets]

        def timer(original):
            def timed(*args, **kwargs):
                start = time.perf_counter()
                out = original(*args, **kwargs)
                self.seconds += time.perf_counter() - start
                return out
            return timed

        for (module, attr), original in zip(targets, originals):
            setattr(module, attr, timer(original))
        try:
            yield self
        finally:
            for (module, attr), original in zip(targets, originals):
                setattr(module, attr, original)


def variants_for(name: str, ratios: List[float], modes: List[str], with_tomesd: bool,
                 match_channels: Optional[int] = None) -> List[tuple]:
    """``(label, kind, options)``; the first is the unmerged reference."""
    out = [("unmerged", "none", {})]
    unet = CONFIGS[name]["cls"] in ("UNet2DConditionModel", "Transformer2DModel")
    for ratio in ratios:
        if with_tomesd and unet:
            # tomesd's own defaults (max_downsample=1): on SDXL that level has no attention.
            out.append((f"tomesd r={ratio}", "tomesd", dict(ratio=ratio, use_rand=False)))
        for mode in modes:
            out.append((f"tome {mode} r={ratio}", "tome", dict(ratio=ratio, mode=mode, use_rand=False)))
            if mode == "tokens" and match_channels:
                out.append((f"tome tokens mc{match_channels} r={ratio}", "tome",
                            dict(ratio=ratio, mode=mode, use_rand=False, match_channels=match_channels)))
    return out


def run_case(model, name: str, size: int, batch: int, ratios, modes, rounds: int, dtype, device, log,
             match_channels: Optional[int] = None, frames: Optional[int] = None,
             layers: Optional[int] = None) -> List[dict]:
    args, kwargs = make_inputs(name, size, batch, dtype, device, frames)
    specs = variants_for(name, ratios, modes, with_tomesd=_has_tomesd(), match_channels=match_channels)
    ceilings = flop_ceilings(name, size, batch, specs, frames, layers)
    tokens = tokens_of(name, size, frames)

    def forward():
        with torch.no_grad():
            model(*args, **kwargs)

    variants = [Variant(label, forward, merges=False, context=(lambda k=kind, o=options: patched(model, k, o)))
                for label, kind, options in specs]
    time_variants(variants, rounds=rounds, warmup=1, device=device, progress=log)
    summary = summarize(variants, batch)
    rows = []
    for label, kind, options in specs:
        share = None
        if kind == "tome":
            timer = MatchTimer()
            with patched(model, kind, options), timer.active():
                start = time.perf_counter()
                forward()
                share = timer.seconds / (time.perf_counter() - start)
        s = summary[label]
        rows.append(dict(model=name, size=size, tokens=tokens, batch=batch, variant=label, kind=kind,
                         **{"mode": None, **options}, flop_ceiling=ceilings.get(label), median_s=s["median_s"], speedup=s["speedup"], speedup_q1=s["speedup_q1"],
                         speedup_q3=s["speedup_q3"], match_share=share, times_s=s["times_s"]))
        log(f"  {name} {size}px {label}: {s['median_s']:.3g}s/step, {s['speedup']:.2f}x")
    return rows


def _has_tomesd() -> bool:
    try:
        import tomesd  # noqa: F401
    except ImportError:
        return False
    return True


def table(rows: List[dict], regime: str) -> str:
    lines = [f"Regime: {regime}", "",
             "| model | px | tokens | variant | s/step | speed-up (IQR) | FLOP ceiling | matching share |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        share = "" if row["match_share"] is None else f"{100 * row['match_share']:.1f}%"
        ceiling = "" if row.get("flop_ceiling") is None else f"{row['flop_ceiling']:.2f}x"
        lines.append(f"| {row['model']} | {row['size']} | {row.get('tokens', '')} | {row['variant']} | "
                     f"{row['median_s']:.3g} | {row['speedup']:.2f}x ({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}) | "
                     f"{ceiling} | {share} |")
    return "\n".join(lines)


def plot(rows: List[dict], path: str, regime: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = sorted({(r["model"], r["size"]) for r in rows})
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.6), squeeze=False)
    for ax, (model, size) in zip(axes[0], cases):
        for kind_label in sorted({r["variant"].rsplit(" r=", 1)[0] for r in rows if r["kind"] != "none"}):
            pts = [(r["ratio"], r["speedup"]) for r in rows
                   if r["model"] == model and r["size"] == size and r["variant"].startswith(kind_label + " r=")]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=kind_label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{model} {size}px")
        ax.set_xlabel("ratio")
        ax.set_ylabel("speed-up per step")
        ax.legend(fontsize=7)
    fig.suptitle(regime, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SD 1.5's top-level transformer at 512 px, ratio 0.5 only")
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), help="default: sd15 pixart")
    parser.add_argument("--sizes", nargs="+", type=int, help="image sizes in pixels (default: 256 512 768)")
    parser.add_argument("--ratios", nargs="+", type=float, help="merge ratios (default: 0.3 0.5 0.7)")
    parser.add_argument("--modes", nargs="+", choices=list(_diffusers.MODES), help="default: tokens kv")
    parser.add_argument("--match-channels", type=int, default=None,
                        help="also time mode='tokens' matching on this many projected channels")
    parser.add_argument("--frames", type=int, default=None,
                        help="latent frames of a video model (wan: default 5; 21 is an 81-frame video)")
    parser.add_argument("--layers", type=int, default=None, help="transformer depth (wan: default 2 of 30 blocks)")
    parser.add_argument("--batch", type=int, help="batch size (default 2: one prompt with classifier-free guidance)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="default: fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    parser.add_argument("--out", default="benchmarks/out/diffusion", help="output prefix (.json, .md, .png)")
    args = parser.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "default"])
    for key in ("models", "sizes", "ratios", "modes", "batch", "rounds"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    # Random weights can drive activations (of Wan's blocks, measured) into denormal floats, which
    # slow CPU kernels several-fold and only in some variants; flush them so they distort no timing.
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    kernel = "sdpa (torch.nn.functional.scaled_dot_product_attention)"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    regime = (f"one denoiser step (forward, no grad), batch {preset['batch']}, {args.dtype}, {kernel}, {where}; "
              f"torch {torch.__version__}; median of {preset['rounds']} interleaved rounds"
              f"{'; denormals flushed to zero' if flushed else ''}")
    print(regime, flush=True)
    rows: List[dict] = []
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    def save() -> str:  # after every case, so a run cut short keeps what it measured
        with open(args.out + ".json", "w") as f:
            json.dump({"regime": regime, "date": datetime.date.today().isoformat(), "rows": rows}, f, indent=1)
        text = table(rows, regime)
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")
        return text

    for name in preset["models"]:
        model = build(name, dtype, device, args.layers)
        for size in preset["sizes"]:
            rows += run_case(model, name, size, preset["batch"], preset["ratios"], preset["modes"], preset["rounds"],
                             dtype, device, log=lambda m: print(m, flush=True), match_channels=args.match_channels,
                             frames=args.frames, layers=args.layers)
            save()
        del model
    plot(rows, args.out + ".png", regime)
    print(save())
    print(f"Reproduce: uv run python benchmarks/diffusion.py {' '.join(argv if argv is not None else sys.argv[1:])}")


if __name__ == "__main__":
    main()
