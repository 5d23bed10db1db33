"""diffusers' caches and token merging, together and apart, over a short denoising loop.

    OMP_WAIT_POLICY=PASSIVE nice -n 5 uv run python benchmarks/diffusion_caches.py   # ~15 min on 2 CPU cores

A Wan-shaped transformer (Wan 2.1 1.3B's widths, reduced depth, random weights; the ``wan``
entry of ``benchmarks/diffusion.py``) runs a whole generation: ``--steps`` flow-matching Euler
steps from the same noise, the caches driven by the loop's timestep as a pipeline drives
them. Variants: nothing, a cache alone (First Block Cache, Pyramid Attention Broadcast),
merging alone (``kv`` and ``tokens`` at ``--ratio``) and each cache with each merging mode.
Every variant is timed in the same rounds, interleaved; the speed-up is the median over
rounds of the per-round ratio to the plain loop, in wall time and in the process's CPU time
(all threads; on a shared machine it drifts far less than wall time, which also counts the
time other jobs held the cores). Quality is the PSNR of the final latent
against the plain loop's (the peak being the plain latent's range), the same noise and text
for all. Writes JSON and a Markdown table to ``--out``. See docs/diffusion.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusion import build, make_inputs, tokens_of  # noqa: E402

import tome  # noqa: E402
from tome_bench.timing import Variant, summarize, time_variants  # noqa: E402


class AttentionCalls(TorchFunctionMode):
    """Counts the self-attention calls (``scaled_dot_product_attention`` over other keys than the
    ``text_tokens`` of cross-attention) and the keys they saw; its cost is negligible here."""

    def __init__(self, text_tokens: int) -> None:
        super().__init__()
        self.text_tokens = text_tokens
        self.calls = 0
        self.keys = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            keys = (kwargs["key"] if "key" in kwargs else args[1]).shape[-2]
            if keys != self.text_tokens:
                self.calls += 1
                self.keys += keys
        return func(*args, **kwargs)


def cache_config(name: str, timestep: Callable[[], float]):
    from diffusers.hooks import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if name == "fbc":  # diffusers' documented starting threshold
        return FirstBlockCacheConfig(threshold=0.2)
    if name == "pab":  # diffusers' defaults, self-attention recomputed every 2nd step between t=100 and 800
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=timestep,
                                               spatial_attention_timestep_skip_range=(100, 800))
    raise ValueError(f"unknown cache {name!r}; valid: 'fbc', 'pab'")


CACHE_LABELS = {"fbc": "First Block Cache", "pab": "Pyramid Attention Broadcast"}


@contextlib.contextmanager
def configured(model, cache: Optional[str], merge: Optional[dict], clock: dict) -> Iterator[None]:
    """The model with the cache enabled first and then patched (either order gives the same model,
    tests/patch/test_diffusion_caches.py), undone afterwards."""
    if cache:
        model.enable_cache(cache_config(cache, lambda: clock["t"]))
    if merge:
        tome.patch.diffusers(model, use_rand=False, **merge)
    try:
        yield
    finally:
        if merge:
            tome.remove_patch(model)
        if cache:
            model.disable_cache()


def generate(model, noise: torch.Tensor, kwargs: dict, steps: int, clock: dict, counter: AttentionCalls) -> torch.Tensor:
    """``steps`` flow-matching Euler steps (shift 3, as Wan's pipelines at 480p) from ``noise``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.hooks import HookRegistry

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)  # a fresh generation
    latent = noise.clone()
    with torch.no_grad(), model.cache_context("cond"), counter:
        for t in scheduler.timesteps:
            clock["t"] = float(t)
            velocity = model(latent, timestep=t.expand(latent.shape[0]), **kwargs).sample
            latent = scheduler.step(velocity, t, latent).prev_sample
    return latent


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    mse = (reference - other).double().pow(2).mean().item()
    peak = (reference.max() - reference.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def table(rows: List[dict], regime: str) -> str:
    lines = [f"Regime: {regime}", "",
             "| variant | s/generation | speed-up (IQR) | CPU s/generation | CPU-time speed-up | self-attention calls "
             "| mean keys per call | PSNR vs plain (dB) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        value = "exact" if math.isinf(row["psnr"]) else f"{row['psnr']:.1f}"
        lines.append(f"| {row['variant']} | {row['median_s']:.3g} | {row['speedup']:.2f}x "
                     f"({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}) | {row['cpu_s']:.3g} | {row['cpu_speedup']:.2f}x | "
                     f"{row['attention_calls']} | "
                     f"{row['mean_keys']:.0f} | {value} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=240, help="video height in px at 480p's aspect (default 240)")
    parser.add_argument("--frames", type=int, default=5, help="latent frames (default 5: 17 video frames)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2 of Wan 1.3B's 30)")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps (default 6)")
    parser.add_argument("--ratio", type=float, default=0.5, help="merge ratio (default 0.5)")
    parser.add_argument("--caches", nargs="+", default=["fbc", "pab"], choices=sorted(CACHE_LABELS))
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    parser.add_argument("--out", default="benchmarks/out/diffusion-caches-cpu", help="output prefix (.json, .md)")
    args = parser.parse_args(argv)
    device, dtype = torch.device("cpu"), torch.float32
    torch.set_flush_denormal(True)  # see benchmarks/diffusion.py: random weights produce denormals
    model = build("wan", dtype, device, args.layers)
    (noise,), kwargs = make_inputs("wan", args.size, 1, dtype, device, args.frames)
    kwargs.pop("timestep")
    tokens = tokens_of("wan", args.size, args.frames)
    regime = (f"Wan-shaped transformer (12 heads x 128, ffn 8960, {args.layers} blocks, random weights), "
              f"{tokens} video tokens ({args.frames} latent frames, {args.size} px high), batch 1 (one conditional "
              f"call per step), {args.steps} flow-matching Euler steps, fp32, sdpa, CPU "
              f"({platform.processor() or 'CPU'}), {torch.get_num_threads()} threads; torch {torch.__version__}; "
              f"median of {args.rounds} interleaved rounds; denormals flushed to zero")
    print(regime, flush=True)

    merges = {f"kv {args.ratio}": dict(ratio=args.ratio, mode="kv"),
              f"tokens {args.ratio}": dict(ratio=args.ratio, mode="tokens")}
    specs: List[tuple] = [("plain", None, None)]
    specs += [(CACHE_LABELS[cache], cache, None) for cache in args.caches]
    specs += [(f"merge {label}", None, merge) for label, merge in merges.items()]
    specs += [(f"{CACHE_LABELS[cache]} + merge {label}", cache, merge)
              for cache in args.caches for label, merge in merges.items()]

    clock: Dict[str, float] = {"t": 1000.0}
    finals: Dict[str, torch.Tensor] = {}
    counts: Dict[str, AttentionCalls] = {}
    cpu_seconds: Dict[str, List[float]] = {label: [] for label, _, _ in specs}

    def forward_for(label: str) -> Callable[[], None]:
        def forward() -> None:
            counts[label] = AttentionCalls(kwargs["encoder_hidden_states"].shape[1])
            start = time.process_time()
            finals[label] = generate(model, noise, kwargs, args.steps, clock, counts[label])
            cpu_seconds[label].append(time.process_time() - start)
        return forward

    with torch.no_grad():  # one untimed call: first-call allocations
        model(noise, timestep=torch.tensor([999]), **kwargs)
    variants = [Variant(label, forward_for(label), merges=False,
                        context=(lambda c=cache, m=merge: configured(model, c, m, clock)))
                for label, cache, merge in specs]
    time_variants(variants, rounds=args.rounds, warmup=0, device=device, progress=lambda m: print(m, flush=True))
    summary = summarize(variants, 1)
    rows = []
    for label, cache, merge in specs:
        s = summary[label]
        cpu = [plain / own for plain, own in zip(cpu_seconds["plain"], cpu_seconds[label])]
        rows.append(dict(variant=label, cache=cache, merge=merge, tokens=tokens, median_s=s["median_s"],
                         cpu_s=statistics.median(cpu_seconds[label]), cpu_speedup=statistics.median(cpu),
                         speedup=s["speedup"], speedup_q1=s["speedup_q1"], speedup_q3=s["speedup_q3"],
                         times_s=s["times_s"], psnr=psnr(finals["plain"], finals[label]),
                         attention_calls=counts[label].calls, mean_keys=counts[label].keys / max(counts[label].calls, 1)))
    text = table(rows, regime)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"regime": regime, "date": datetime.date.today().isoformat(), "args": vars(args),
                   "rows": [{**r, "psnr": None if math.isinf(r["psnr"]) else r["psnr"]} for r in rows]}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"Reproduce: uv run python benchmarks/diffusion_caches.py {' '.join(argv if argv is not None else sys.argv[1:])}")


if __name__ == "__main__":
    main()
