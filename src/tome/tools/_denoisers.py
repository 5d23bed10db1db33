"""Diffusers denoisers for the ``tome`` commands: ``--model diffusers:<folder>`` and ``--ratio``.

A folder written by ``save_pretrained`` holds a denoiser (``config.json`` naming its
class) or a whole pipeline (``model_index.json``; its ``unet`` or ``transformer`` is
read, the other components are not needed). Diffusion merges a fraction of each
level's tokens (ToMe for Stable Diffusion, Bolya & Hoffman, CVPRW 2023), so its
setting is a ratio, not r. One denoiser step is measured on random latents and
conditioning of the shapes the denoiser's config describes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from tome._benchmark import autocast, time_calls

from ._common import format_table
from ._timing import add_timings, count_call_flops, peak_memory_mib, time_rounds

__all__ = ["DENOISERS", "load_denoiser", "denoiser_inputs", "parse_ratios", "measure_ratios", "print_ratio_rows"]

TEXT_TOKENS = 77
"""Length of the stand-in text conditioning (CLIP's prompt length)."""

FLUX_GRID = 32
"""Image tokens per side of a Flux step (a 512 px image: 64 x 64 latents, packed 2 x 2)."""

Inputs = Tuple[tuple, Dict[str, Any]]


def load_denoiser(folder: str) -> Tuple[nn.Module, str]:
    """The denoiser saved in ``folder`` (a denoiser folder, or a pipeline folder's ``unet`` / ``transformer``).

    Returns:
        ``(denoiser in eval mode, one line describing it)``.

    Raises:
        FileNotFoundError: if ``folder`` is not a folder.
        ValueError: if it holds no diffusers denoiser of a class the tools can run (the classes are named).
        ImportError: if diffusers is not installed.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--model diffusers:{folder}: {folder!r} is not a folder; diffusers: takes a local "
                                "folder written by save_pretrained (a denoiser, or a pipeline holding one)")
    subfolder, class_name = _denoiser_in(path, folder)
    try:
        import diffusers
    except ImportError:
        raise ImportError("--model diffusers:... needs diffusers: pip install 'token-merging[diffusers]'") from None
    model = getattr(diffusers, class_name).from_pretrained(str(path), subfolder=subfolder)
    where = f" ({subfolder} of the pipeline)" if subfolder else ""
    return model.eval(), f"diffusers:{folder}{where} ({class_name})"


def _denoiser_in(path: Path, folder: str) -> Tuple[Any, str]:
    """``(subfolder or None, class name)`` of the denoiser in a denoiser or pipeline folder."""
    index = path / "model_index.json"
    if index.is_file():
        components = json.loads(index.read_text())
        for name in ("unet", "transformer"):
            entry = components.get(name)
            if isinstance(entry, list) and len(entry) == 2 and entry[1] in DENOISERS:
                return name, entry[1]
        found = {k: v[1] for k, v in components.items() if isinstance(v, list) and len(v) == 2 and v[1]}
        raise ValueError(f"--model diffusers:{folder}: the pipeline holds no denoiser the tools run ({found}); "
                         f"they run {', '.join(DENOISERS)}")
    config = path / "config.json"
    class_name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    if class_name not in DENOISERS:
        found = f"a {class_name}" if class_name else "no diffusers config.json or model_index.json"
        raise ValueError(f"--model diffusers:{folder}: the folder holds {found}; the tools run a denoiser "
                         f"({', '.join(DENOISERS)}) or a pipeline folder holding one")
    return None, class_name


def _unet_inputs(config: Any, batch: int) -> Inputs:
    size = _pair(config.sample_size)
    sample = torch.randn(batch, config.in_channels, *size)
    context_dim = config.encoder_hid_dim or config.cross_attention_dim
    context_dim = context_dim if isinstance(context_dim, int) else context_dim[0]
    kwargs: Dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, context_dim)}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size/crop conditioning
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        height, width = (8 * s for s in size)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text),
                                       "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch,
                                                                dtype=torch.float32)}
    elif config.addition_embed_type is not None:
        raise ValueError(f"UNet2DConditionModel with addition_embed_type={config.addition_embed_type!r} is not run by "
                         "the tools (SD 1.x/2.x and SDXL layouts are)")
    return (sample, torch.full((batch,), 500)), kwargs


def _pixart_inputs(config: Any, batch: int) -> Inputs:
    sample = torch.randn(batch, config.in_channels, *_pair(config.sample_size))
    return (sample,), {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.caption_channels),
                       "timestep": torch.full((batch,), 500),
                       "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _sd3_inputs(config: Any, batch: int) -> Inputs:
    sample = torch.randn(batch, config.in_channels, *_pair(config.sample_size))
    return (sample,), {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.joint_attention_dim),
                       "pooled_projections": torch.randn(batch, config.pooled_projection_dim),
                       "timestep": torch.full((batch,), 500)}


def _flux_inputs(config: Any, batch: int) -> Inputs:
    ids = torch.zeros(FLUX_GRID, FLUX_GRID, 3)
    ids[..., 1] = torch.arange(FLUX_GRID)[:, None]
    ids[..., 2] = torch.arange(FLUX_GRID)[None]
    kwargs = {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config.joint_attention_dim),
              "pooled_projections": torch.randn(batch, config.pooled_projection_dim),
              "timestep": torch.full((batch,), 0.5), "img_ids": ids.reshape(-1, 3),
              "txt_ids": torch.zeros(TEXT_TOKENS, 3)}
    if config.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return (torch.randn(batch, FLUX_GRID * FLUX_GRID, config.in_channels),), kwargs


DENOISERS: Dict[str, Callable[[Any, int], Inputs]] = {
    "UNet2DConditionModel": _unet_inputs,
    "PixArtTransformer2DModel": _pixart_inputs,
    "SD3Transformer2DModel": _sd3_inputs,
    "FluxTransformer2DModel": _flux_inputs,
}
"""The denoiser classes the tools run, and how one step's inputs are made from the config."""


def _pair(value: Any) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def denoiser_inputs(model: nn.Module, batch: int, device: torch.device) -> Inputs:
    """``(args, kwargs)`` of one denoiser step on random latents and conditioning, seeded.

    Sizes come from the denoiser's config: its ``sample_size`` latents, a
    :data:`TEXT_TOKENS`-token text conditioning of its width, SDXL's extra conditioning.

    Raises:
        ValueError: for a class not in :data:`DENOISERS`.
    """
    name = next((cls.__name__ for cls in type(model).__mro__ if cls.__name__ in DENOISERS), None)
    if name is None:
        raise ValueError(f"{type(model).__name__} is not a denoiser the tools run; they run {', '.join(DENOISERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        args, kwargs = DENOISERS[name](model.config, batch)

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return tuple(move(a) for a in args), move(kwargs)


def parse_ratios(text: str) -> List[float]:
    """``--ratio``: fractions of tokens merged away, comma-separated, each in [0, 1) (``"0.3,0.5"``).

    Raises:
        ValueError: quoting a bad or repeated entry.
    """
    ratios = []
    for item in (part.strip() for part in str(text).split(",")):
        try:
            ratio = float(item)
        except ValueError:
            ratio = float("nan")
        if not 0 <= ratio < 1:
            raise ValueError(f"--ratio {item!r} (in {text!r}) is not a fraction in [0, 1) of the tokens merged away "
                             "(e.g. 0.5, or several: 0.3,0.5)")
        ratios.append(ratio)
    if len(set(ratios)) != len(ratios):
        raise ValueError(f"--ratio {text!r} repeats a ratio")
    return ratios


def ratios_arg(text: str) -> List[float]:
    """argparse type of ``--ratio``."""
    try:
        return parse_ratios(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def measure_ratios(model: nn.Module, ratios: Sequence[float], *, batch_size: int, device: torch.device,
                   dtype: torch.dtype = torch.float32, rounds: int = 10, warmup: int = 2, min_time: float = 0.0,
                   progress: bool = False) -> List[Dict[str, Any]]:
    """Steps per second, speed-up and FLOPs of a patched denoiser at each merge ratio (0 first, the baseline).

    Timed in interleaved rounds as :func:`tome.tools.benchmark.time_interleaved`; FLOPs are
    counted on one sample. ``model.ratio`` is restored afterwards.

    Args:
        model: A denoiser patched by ``tome.apply_patch(model, ratio=...)``.
        ratios: Merge ratios; 0 is measured as the baseline even if absent.
        batch_size: Samples per timed step (2: one classifier-free-guidance pair).
        device: Where to run.
        dtype: Autocast dtype (``torch.float32``: none).
        rounds: Timed rounds (each times every ratio once).
        warmup: Untimed rounds.
        min_time: Least seconds behind each timing.
        progress: Show a progress bar (on a terminal only).

    Returns:
        One dict per ratio: ``ratio``, ``label``, ``merging_blocks``, ``gflops`` (per sample),
        ``seconds_per_batch``, ``images_per_s`` (samples per second), ``speedup`` with
        ``speedup_low`` / ``speedup_high``, ``flops_ratio``, ``noisy``, ``peak_memory_mib``.
    """
    ratios = [0.0] + [ratio for ratio in ratios if ratio != 0]
    model.eval().to(device)
    args, kwargs = denoiser_inputs(model, batch_size, device)
    previous = model.ratio
    try:
        rows = _flop_rows(model, ratios, device, dtype)

        def run(index: int, count: int) -> float:
            model.ratio = ratios[index]
            return time_calls(lambda: model(*args, **kwargs), device, count)

        with torch.inference_mode(), autocast(device, dtype):
            times = time_rounds(run, len(ratios), rounds=rounds, warmup=warmup, min_time=min_time, progress=progress)
            add_timings(rows, times, 0, batch_size)
            for ratio, row in zip(ratios, rows):
                model.ratio = ratio
                row["peak_memory_mib"] = (peak_memory_mib(lambda: model(*args, **kwargs), device)
                                          if device.type == "cuda" else None)
    finally:
        model.ratio = previous
    return rows


def _flop_rows(model: nn.Module, ratios: Sequence[float], device: torch.device,
               dtype: torch.dtype) -> List[Dict[str, Any]]:
    """One row per ratio: its label, the blocks that merge and the GFLOPs of one sample's step."""
    args, kwargs = denoiser_inputs(model, 1, device)
    rows = []
    for ratio in ratios:
        model.ratio = ratio
        with autocast(device, dtype):
            flops = count_call_flops(lambda: model(*args, **kwargs))
        merging = model._tome_info.get("merging_blocks") if ratio else 0
        rows.append({"ratio": ratio, "label": f"{ratio:g}", "merging_blocks": merging,
                     "gflops": flops / 1e9})
    return rows


def print_ratio_rows(rows: Sequence[Dict[str, Any]]) -> None:
    """The table of :func:`measure_ratios`, with a note under it for noisy rows."""
    with_memory = any(row.get("peak_memory_mib") is not None for row in rows)
    headers = ["ratio", "merging blocks", "samples/s", "speed-up", "range", "GFLOPs", "FLOPs ratio"]
    table = []
    for row in rows:
        cells = [row["label"], row["merging_blocks"], row["images_per_s"],
                 f"{row['speedup']:.2f}x" + (" noisy" if row["noisy"] else ""),
                 f"{row['speedup_low']:.2f}-{row['speedup_high']:.2f}x", row["gflops"], row["flops_ratio"]]
        table.append(cells + ([row["peak_memory_mib"]] if with_memory else []))
    print(format_table(headers + (["peak MiB"] if with_memory else []), table))
    print("speed-up: median over rounds of the per-round ratio to ratio 0 (one denoiser step); range: lowest-highest "
          "round.")
    noisy = [row["label"] for row in rows if row["noisy"]]
    if noisy:
        print(f"noisy (ratio = {', '.join(noisy)}): the speed-up exceeds 1 / FLOPs ratio; the machine was busy. "
              "Rerun with more --runs or --min-time, on a quieter machine.", flush=True)
