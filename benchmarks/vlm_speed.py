"""Speed and memory of visual-token reduction: prefill, the method's own selection, decoding, KV cache.

    uv run python benchmarks/vlm_speed.py            # the default grid (37 min on 2 CPU cores at load 10-17)
    uv run python benchmarks/vlm_speed.py --quick    # tiny widths, the same code paths in about a minute

The model is a Qwen2.5-VL built from a config with random weights (nothing is downloaded):
Qwen2.5-VL-3B's widths (language model: hidden 2048, 16 heads, 2 KV heads, intermediate
11008, vocabulary 151936; vision tower: width 1280, 16 heads, intermediate 3420, 2x2 patch
merger) at reduced depth (``--lm-layers``, ``--tower-layers``; recorded in the table). The
inputs: one 896 x 896 image (64 x 64 patches of 14 px = 1024 visual tokens after the merger)
or one 8-frame 448 x 448 video (4 x 16 x 16 = 1024 tokens), and ~30 text tokens around it.

Groups, each timed in interleaved rounds in one process (the order rotating each round;
medians over rounds; a speed-up is the median of the per-round ratios ``t_unreduced / t``):

- ``tower``: the vision tower alone (``get_image_features`` / ``get_video_features``): the
  fixed cost reduction cannot remove.
- ``lm``: the language-model part of prefill: ``model(**inputs, mm_encoder_outputs=...,
  logits_to_keep=1, use_cache=True)`` with the tower's features given, for the unreduced
  model and every method at every budget (the method's selection and the sequence
  bookkeeping included). Beside it the arithmetic ceiling (``lm_layer_flops``) and the
  method's own selection time (``SelectionTimer``: ``vt.reduce_tokens`` and the scores a method
  ranks by, FastV's probe of the first ``K`` layers or VisionZip's attention from the tower's
  queries and keys, timed inside the same forwards) as a share of the prefill it belongs to
  (tower + LM part). ``"fastv"`` runs at ``fastv_layer = min(2, LM layers - 1)`` (the paper's
  K = 2 where the depth allows). The decoder layers' own span (from the first
  layer's input to the last layer's output, ``LayerTimer``) is timed in the same forwards: the
  part of the LM time the ceiling counts, without the embedding, the selection, the final norm
  and the one-token LM head, which do not shrink with the tokens.
- ``pixels``: methods that rank by the vision tower's attention (``TOWER_METHODS``:
  ``"visionzip"``), which the ``lm`` rows' precomputed features do not carry: the whole
  prefill with the pixels in (``model(**inputs, logits_to_keep=1, use_cache=True)``), unreduced,
  for them and, beside them, the default method, at every budget; selection as in ``lm``.
- with ``--prop-attn``, the merging methods (``PROP_METHODS``) once more with ``prop_attn=True``
  (proportional attention in the language model: an additive mask on every layer), rows
  ``"<method>+prop_attn"``: what the mask costs.
- ``generate`` (image): ``model.generate(**inputs, max_new_tokens=1 + D)`` with the default
  method at every budget: time to first token end to end (pixels in), decode tokens/s over
  the next ``D`` greedy tokens (stamped by a logits processor), and the KV-cache bytes after
  prefill (from the cache object of one prefill).

Writes ``<out>/<name>.json`` and ``<out>/<name>.md``. ``benchmarks/gpu.py --sections vlm``
runs the same groups on CUDA in bf16.
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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import tome  # noqa: E402
from tome import visual_tokens as vt  # noqa: E402
from tome.patch import _vlm, _vlm_attention  # noqa: E402
from tome.patch._vlm import VisualTokenSettings  # noqa: E402
from tome.patch._vlm_fastv import language_layers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("random", "pool", "tome", "divprune", "cdpruner", "visionzip", "fastv")
PROP_METHODS = ("pool", "tome")  # the methods whose tokens stand for several, so prop_attn applies
# Methods that rank by the vision tower's attention (the integration's own list): the language-model
# rows pass the tower's features precomputed (``mm_encoder_outputs``), which carry no attention, so
# they cannot run there. They are timed in the ``pixels`` group instead (the whole prefill, pixels in).
TOWER_METHODS = _vlm._TOWER_METHODS
# What a method computes to rank the tokens, outside ``vt.reduce_tokens``: FastV's probe (the
# language model's first K layers on the full sequence) and VisionZip's attention recomputed
# from the Qwen tower's captured queries and keys. Module attributes, looked up at call time.
SCORE_FUNCTIONS = ((_vlm, "_fastv_row"), (_vlm_attention, "_qwen_scores"))
FASTV_LAYER = 2  # FastV's K in the paper (Chen et al., ECCV 2024); lowered to the depth when it has fewer layers
BUDGETS = (0.5, 0.25, 0.11, 0.05)  # besides 100 %, the unreduced model
DEFAULT_METHOD = VisualTokenSettings().method
IMAGE, VIDEO, START, END, PAD = 151655, 151656, 151652, 151653, 151643  # Qwen2.5-VL's token ids

QWEN2_5_VL_3B_TEXT = dict(  # Qwen/Qwen2.5-VL-3B-Instruct, config.json
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
    max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN2_5_VL_3B_VISION = dict(  # its vision_config
    hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu", in_channels=3,
)
QWEN2_5_VL_3B_DEPTH = (36, 32, (7, 15, 23, 31))  # language layers, tower layers, full-attention tower layers


@dataclass(frozen=True)
class Setup:
    """One model and its inputs (a preset; ``--lm-layers`` and friends change a copy)."""

    text: Dict[str, Any]
    vision: Dict[str, Any]
    lm_layers: int
    tower_layers: int
    image_px: int  # square image side
    video_frames: int
    video_px: int
    text_before: int  # text tokens before the vision start token (plus the same count after, minus two)
    text_after: int
    decode_tokens: int
    rounds: int
    warmup: int
    dtype: str = "bf16"
    budgets: Sequence[float] = BUDGETS

    def describe(self) -> str:
        return (f"Qwen2.5-VL-shaped, random weights: language model {self.lm_layers} layers of width "
                f"{self.text['hidden_size']} ({self.text['num_attention_heads']} heads, "
                f"{self.text['num_key_value_heads']} KV heads, MLP {self.text['intermediate_size']}, vocabulary "
                f"{self.text['vocab_size']}), vision tower {self.tower_layers} layers of width "
                f"{self.vision['hidden_size']} (the last one full attention, the others windowed), {self.dtype}")


PRESETS = {
    "full": Setup(text=QWEN2_5_VL_3B_TEXT, vision=QWEN2_5_VL_3B_VISION, lm_layers=2, tower_layers=2, image_px=896,
                  video_frames=8, video_px=448, text_before=14, text_after=14, decode_tokens=4, rounds=3, warmup=1),
    "quick": Setup(
        text=dict(QWEN2_5_VL_3B_TEXT, vocab_size=151936, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [2, 3, 3]}, tie_word_embeddings=True),
        vision=dict(QWEN2_5_VL_3B_VISION, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    window_size=56),
        lm_layers=2, tower_layers=2, image_px=224, video_frames=4, video_px=112, text_before=6, text_after=6,
        decode_tokens=2, rounds=2, warmup=0, budgets=(0.5, 0.11)),
}


# ----------------------------------------------------------------------------- model and inputs


def build_model(setup: Setup, device: torch.device) -> torch.nn.Module:
    """A Qwen2.5-VL with random weights from ``setup`` (sdpa attention), patched with no budget."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(setup.text, num_hidden_layers=setup.lm_layers, pad_token_id=PAD, eos_token_id=PAD, bos_token_id=PAD)
    vision = dict(setup.vision, depth=setup.tower_layers, fullatt_block_indexes=[setup.tower_layers - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                              vision_start_token_id=START, vision_end_token_id=END,
                              tie_word_embeddings=setup.text["tie_word_embeddings"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                               dtype=DTYPES[setup.dtype])
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return tome.apply_patch(model, visual_tokens=None, method=DEFAULT_METHOD, seed=0)


def make_inputs(model: torch.nn.Module, setup: Setup, kind: str, device: torch.device) -> Dict[str, torch.Tensor]:
    """``input_ids`` (text, ``<start>``, the placeholders, ``<end>``, text), mask, token types,
    and random pixels for one image (``kind="image"``) or one video."""
    vision = model.config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    side = (setup.image_px if kind == "image" else setup.video_px) // patch
    frames = 1 if kind == "image" else setup.video_frames // temporal
    tokens = frames * (side // merge) ** 2
    generator = torch.Generator().manual_seed(1)
    words = torch.randint(1000, 100000, (setup.text_before + setup.text_after,), generator=generator).tolist()
    token = IMAGE if kind == "image" else VIDEO
    ids = words[: setup.text_before] + [START] + [token] * tokens + [END] + words[setup.text_before:]
    types = [0] * (setup.text_before + 1) + [1 if kind == "image" else 2] * tokens + [0] * (setup.text_after + 1)
    pixels = torch.randn(frames * side * side, 3 * temporal * patch**2, generator=generator)
    dtype = next(model.parameters()).dtype
    prefix = "" if kind == "image" else "_videos"
    grid = "image_grid_thw" if kind == "image" else "video_grid_thw"
    return {
        "input_ids": torch.tensor([ids], device=device), "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        "mm_token_type_ids": torch.tensor([types], device=device), f"pixel_values{prefix}": pixels.to(device, dtype),
        grid: torch.tensor([[frames, side, side]], device=device),
    }


def encode(model: torch.nn.Module, inputs: Dict[str, torch.Tensor], kind: str) -> Any:
    """The vision tower's output for the inputs' image or video (``pooler_output``: one tensor per item)."""
    if kind == "image":
        return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)


def without_pixels(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}


# ----------------------------------------------------------------------------- arithmetic


def lm_layer_flops(n: int, text: Dict[str, Any]) -> float:
    """FLOPs of one language-model layer's causal prefill of ``n`` tokens (2 per multiply-add).

    ``2n(2dhe + 2dge) + 2n * 3dm + 2n(n+1)he``: the q and o projections (``h`` heads of ``e``
    channels), k and v (``g`` KV heads), the gated MLP (three ``d x m`` matrices), and the
    scores and weighted values over the ``n(n+1)/2`` query-key pairs a causal mask leaves.
    Norms, rotary embeddings and softmax are left out (a few per cent of one matmul).
    """
    d, m = text["hidden_size"], text["intermediate_size"]
    h, g = text["num_attention_heads"], text["num_key_value_heads"]
    e = text.get("head_dim") or d // h
    return 2 * n * (2 * d * h * e + 2 * d * g * e) + 2 * n * 3 * d * m + 2 * n * (n + 1) * h * e


def tower_flops(patches: int, vision: Dict[str, Any], layers: int, full_layers: int) -> float:
    """FLOPs of the Qwen2.5-VL vision tower on ``patches`` patches (one image or video).

    Patch embedding, per layer the qkv and output projections and the gated MLP, attention
    within windows of ``(window_size / patch_size)**2`` patches (``full_layers`` of the
    layers attend over all patches), and the 2x2 patch merger's MLP.
    """
    d, i = vision["hidden_size"], vision["intermediate_size"]
    window = (vision["window_size"] // vision["patch_size"]) ** 2
    embed = 2 * patches * 3 * vision["temporal_patch_size"] * vision["patch_size"] ** 2 * d
    linear = 2 * patches * (4 * d * d + 3 * d * i)
    total = embed + layers * linear
    total += (layers - full_layers) * 4 * patches * min(window, patches) * d + full_layers * 4 * patches**2 * d
    merged, wide = patches // vision["spatial_merge_size"] ** 2, d * vision["spatial_merge_size"] ** 2
    return total + 2 * merged * (wide * wide + wide * vision["out_hidden_size"])


def kv_bytes(cache: Any) -> int:
    """Bytes of the keys and values a transformers cache holds (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    if not total:  # older caches
        for tensors in (getattr(cache, "key_cache", []), getattr(cache, "value_cache", [])):
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SelectionTimer:
    """Wall time of the method's own selection while active: inside
    ``tome.visual_tokens.reduce_tokens`` and the score functions of ``SCORE_FUNCTIONS`` (FastV's
    probe, VisionZip's tower attention). The integration calls each through its module, so
    wrapping the attributes catches every call. Synchronizes CUDA around each call."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def _timed(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            return out

        return timed

    @contextlib.contextmanager
    def active(self) -> Iterator["SelectionTimer"]:
        targets = ((vt, "reduce_tokens"),) + SCORE_FUNCTIONS
        originals = [getattr(module, name) for module, name in targets]
        for (module, name), original in zip(targets, originals):
            setattr(module, name, self._timed(original))
        try:
            yield self
        finally:
            for (module, name), original in zip(targets, originals):
                setattr(module, name, original)


class LayerTimer:
    """Wall time from the first decoder layer's input to the last one's output, per forward.

    Forward hooks on ``layers[0]`` (pre) and ``layers[-1]`` (post), synchronizing CUDA, while
    active; ``seconds`` sums the spans of every forward in that time (one per prefill).

    Args:
        layers: The language model's decoder layers (a ``torch.nn.ModuleList``), or None (then
            ``seconds`` stays 0).
    """

    def __init__(self, layers: Optional[Sequence[torch.nn.Module]], device: torch.device) -> None:
        self.layers, self.device, self.seconds = layers, device, 0.0
        self._start: Optional[float] = None

    def _enter(self, *_: Any) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def _leave(self, *_: Any) -> None:
        synchronize(self.device)
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    @contextlib.contextmanager
    def active(self) -> Iterator["LayerTimer"]:
        if not self.layers:
            yield self
            return
        handles = [self.layers[0].register_forward_pre_hook(self._enter),
                   self.layers[-1].register_forward_hook(self._leave)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class Variant:
    """One row: a label, one call, a context entered around it (untimed), what else to record."""

    label: str
    call: Callable[[], Any]
    context: Callable[[], ContextManager] = contextlib.nullcontext
    info: Dict[str, Any] = field(default_factory=dict)
    times: List[float] = field(default_factory=list)
    selection: List[float] = field(default_factory=list)
    layers: List[float] = field(default_factory=list)  # s in the decoder layers (``LayerTimer``)
    extra: List[Any] = field(default_factory=list)  # what ``call`` returned (generate: its stamps)


def interleave(variants: Sequence[Variant], device: torch.device, rounds: int, warmup: int,
               progress: Callable[[str], None] = print, layers: Optional[Sequence[torch.nn.Module]] = None) -> None:
    """``warmup`` untimed then ``rounds`` timed rounds, every variant once per round, the order
    rotating; fills ``times`` (s), ``selection`` (s inside ``reduce_tokens``), ``layers`` (s in
    the decoder ``layers``, when given) and ``extra``."""
    for index in range(warmup + rounds):
        offset = index % len(variants)
        for variant in list(variants[offset:]) + list(variants[:offset]):
            timer, layer_timer = SelectionTimer(device), LayerTimer(layers, device)
            with variant.context(), timer.active(), layer_timer.active(), torch.inference_mode():
                synchronize(device)
                start = time.perf_counter()
                out = variant.call()
                synchronize(device)
                elapsed = time.perf_counter() - start
            if index >= warmup:
                variant.times.append(elapsed)
                variant.selection.append(timer.seconds)
                variant.layers.append(layer_timer.seconds)
                variant.extra.append(out)
        if index >= warmup:
            progress(f"    round {index - warmup + 1}/{rounds}: "
                     + ", ".join(f"{v.label} {v.times[-1] * 1e3:.0f} ms" for v in variants))


def _quartiles(values: Sequence[float]) -> tuple:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def speedups(reference: Sequence[float], times: Sequence[float]) -> Dict[str, float]:
    ratios = [r / t for r, t in zip(reference, times)]
    q1, q3 = _quartiles(ratios)
    return {"speedup": statistics.median(ratios), "speedup_q1": q1, "speedup_q3": q3}


def method_settings(model: torch.nn.Module, method: Optional[str]) -> Dict[str, Any]:
    """Settings beside the method: ``fastv_layer`` for ``"fastv"`` (``FASTV_LAYER``, or the
    language model's last layer but one when it has fewer layers)."""
    if method != "fastv":
        return {}
    return {"fastv_layer": min(FASTV_LAYER, len(language_layers(model.model)) - 1)}


def reduction_context(model: torch.nn.Module, method: Optional[str], budget: Optional[float],
                      prop_attn: bool = False) -> Callable[[], ContextManager]:
    if budget is None:
        return contextlib.nullcontext
    return lambda: tome.merging(model, visual_tokens=budget, method=method, prop_attn=prop_attn,
                                **method_settings(model, method))


def wired_methods(model: torch.nn.Module) -> Dict[str, Optional[str]]:
    """``{method: None}`` when the integration runs it, else the reason it refuses."""
    status: Dict[str, Optional[str]] = {}
    for method in METHODS:
        try:
            with tome.merging(model, visual_tokens=0.5, method=method, **method_settings(model, method)):
                status[method] = None
        except ValueError as error:
            status[method] = str(error)
    return status


# ----------------------------------------------------------------------------- the groups


def prefill_group(model: torch.nn.Module, setup: Setup, kind: str, methods: Sequence[str], device: torch.device,
                  progress: Callable[[str], None], prop_attn: bool = False) -> Dict[str, Any]:
    """The tower alone, and the language-model part of prefill unreduced and for every method
    at every budget (and, with ``prop_attn``, each of ``PROP_METHODS`` with ``prop_attn=True``),
    interleaved; rows with ceiling and selection share."""
    inputs = make_inputs(model, setup, kind, device)
    with torch.inference_mode():
        features = encode(model, inputs, kind)
    short = without_pixels(inputs)
    encoded = {kind: features}
    num = int(features.pooler_output[0].shape[0])
    length = inputs["input_ids"].shape[1]

    def prefill() -> Any:
        return model(**short, mm_encoder_outputs=encoded, logits_to_keep=1, use_cache=True).past_key_values

    tower = Variant("vision tower", lambda: encode(model, inputs, kind))
    variants = [tower, Variant("unreduced", prefill, info={"method": "-", "budget": 1.0})]
    for method in methods:
        for budget in setup.budgets:
            variants.append(Variant(f"{method} {budget:.0%}", prefill, reduction_context(model, method, budget),
                                    info={"method": method, "budget": budget}))
            if prop_attn and method in PROP_METHODS:
                variants.append(Variant(f"{method}+prop_attn {budget:.0%}", prefill,
                                        reduction_context(model, method, budget, prop_attn=True),
                                        info={"method": f"{method}+prop_attn", "budget": budget}))
    progress(f"  {kind}: {num} visual tokens, sequence {length}; {len(variants)} variants")
    interleave(variants, device, setup.rounds, setup.warmup, progress, layers=language_layers(model.model))
    tower_s = statistics.median(tower.times)
    base = variants[1]
    full = lm_layer_flops(length, setup.text)
    rows = []
    for variant in variants[1:]:
        sequence = variant.extra[-1].get_seq_length()  # what was passed on (pool may pass fewer than the budget)
        passed = sequence - (length - num)
        lm_s = statistics.median(variant.times)
        selection_s = statistics.median(variant.selection)
        row = {"kind": kind, "label": variant.label, **variant.info, "visual_tokens": passed, "sequence": sequence,
               "lm_s": lm_s, **speedups(base.times, variant.times), "ceiling": full / lm_layer_flops(sequence, setup.text),
               "selection_s": selection_s, "selection_share": selection_s / (tower_s + lm_s),
               "times_s": variant.times, "selection_times_s": variant.selection,
               "kv_bytes": kv_bytes(variant.extra[-1]), "layers_s": statistics.median(variant.layers),
               "layers_times_s": variant.layers,
               **{f"layers_{k}": v for k, v in speedups(base.layers, variant.layers).items()}}
        row["of_ceiling"] = row["speedup"] / row["ceiling"]
        row["layers_of_ceiling"] = row["layers_speedup"] / row["ceiling"]
        rows.append(row)
    return {"kind": kind, "tokens": num, "sequence": length, "tower_s": tower_s, "tower_times_s": tower.times,
            "tower_share_unreduced": tower_s / (tower_s + statistics.median(base.times)), "rows": rows}


def pixels_group(model: torch.nn.Module, setup: Setup, kind: str, methods: Sequence[str], device: torch.device,
                 progress: Callable[[str], None]) -> Dict[str, Any]:
    """The whole prefill with the pixels in (tower and language model), unreduced and for
    ``methods`` at every budget, interleaved: the rows of the methods that rank by the tower's
    attention, with their selection (``SelectionTimer``) as a share of that prefill."""
    inputs = make_inputs(model, setup, kind, device)
    length = inputs["input_ids"].shape[1]
    num = int((inputs["input_ids"] == (IMAGE if kind == "image" else VIDEO)).sum())  # visual tokens unreduced

    def prefill() -> Any:
        return model(**inputs, logits_to_keep=1, use_cache=True).past_key_values

    variants = [Variant("unreduced", prefill, info={"method": "-", "budget": 1.0})]
    for method in methods:
        for budget in setup.budgets:
            variants.append(Variant(f"{method} {budget:.0%}", prefill, reduction_context(model, method, budget),
                                    info={"method": method, "budget": budget}))
    progress(f"  {kind} with pixels: sequence {length}; {len(variants)} variants")
    interleave(variants, device, setup.rounds, setup.warmup, progress)
    rows = []
    for variant in variants:
        sequence = variant.extra[-1].get_seq_length()
        prefill_s, selection_s = statistics.median(variant.times), statistics.median(variant.selection)
        rows.append({"kind": kind, "label": variant.label, **variant.info, "sequence": sequence,
                     "visual_tokens": sequence - (length - num), "prefill_s": prefill_s, "times_s": variant.times,
                     **speedups(variants[0].times, variant.times), "selection_s": selection_s,
                     "selection_times_s": variant.selection, "selection_share": selection_s / prefill_s})
    return {"kind": kind, "tokens": num, "sequence": length, "rows": rows}


class Stamps:
    """A logits processor that records the time it is called at (once per generated token)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def generate_group(model: torch.nn.Module, setup: Setup, device: torch.device,
                   progress: Callable[[str], None]) -> Dict[str, Any]:
    """``generate`` with the default method at every budget (image): time to first token, decode
    tokens/s, KV-cache bytes after prefill."""
    from transformers import LogitsProcessorList

    inputs = make_inputs(model, setup, "image", device)
    steps = 1 + setup.decode_tokens

    def run() -> tuple:
        stamps = Stamps(device)
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       logits_processor=LogitsProcessorList([stamps]))
        return start, stamps.times

    variants = [Variant("unreduced", run, info={"budget": 1.0})]
    for budget in setup.budgets:
        variants.append(Variant(f"{DEFAULT_METHOD} {budget:.0%}", run, reduction_context(model, DEFAULT_METHOD, budget),
                                info={"budget": budget}))
    progress(f"  generate: {len(variants)} variants, {steps} tokens each")
    interleave(variants, device, setup.rounds, setup.warmup, progress)
    rows = []
    first = {v.label: [stamps[0] - start for start, stamps in v.extra] for v in variants}
    for variant in variants:
        ttft = first[variant.label]
        decode = [setup.decode_tokens / (stamps[-1] - stamps[0]) for _, stamps in variant.extra]
        with variant.context(), torch.inference_mode():
            cache = model(**inputs, logits_to_keep=1, use_cache=True).past_key_values
            length = cache.get_seq_length()
        rows.append({"label": variant.label, "method": DEFAULT_METHOD if variant.info["budget"] < 1 else "-",
                     **variant.info, "ttft_s": statistics.median(ttft), "ttft_times_s": ttft,
                     **speedups(first["unreduced"], ttft), "decode_tokens_per_s": statistics.median(decode),
                     "decode_times_tokens_per_s": decode, "cache_tokens": length, "kv_bytes": kv_bytes(cache)})
    return {"decode_tokens": setup.decode_tokens, "rows": rows}


def end_to_end_ceilings(setup: Setup, patches: int, tokens: int, length: int, passed: int) -> Dict[str, float]:
    """Prefill FLOP ceilings with the tower's fixed cost: at this depth and at the 3B's depth."""
    full, short = lm_layer_flops(length, setup.text), lm_layer_flops(length - tokens + passed, setup.text)
    here = tower_flops(patches, setup.vision, setup.tower_layers, 1)
    lm3b, tower3b, full3b = QWEN2_5_VL_3B_DEPTH
    deep = tower_flops(patches, setup.vision, tower3b, len(full3b))
    return {"ceiling_here": (here + setup.lm_layers * full) / (here + setup.lm_layers * short),
            "ceiling_3b_depth": (deep + lm3b * full) / (deep + lm3b * short)}


# ----------------------------------------------------------------------------- report


def measure(setup: Setup, device: torch.device, methods: Optional[Sequence[str]] = None, kinds: Sequence[str] = ("image", "video"),
            decode: bool = True, progress: Callable[[str], None] = print,
            save: Callable[[Dict[str, Any]], None] = lambda report: None, prop_attn: bool = False) -> Dict[str, Any]:
    """Every group on one model; returns the report (see ``markdown``), passing it to ``save``
    after each group (a run cut short keeps what it measured)."""
    model = build_model(setup, device)
    status = wired_methods(model)
    runs = [m for m in (methods or METHODS) if status.get(m) is None and m in status]
    chosen = [m for m in runs if m not in TOWER_METHODS]
    tower = [m for m in runs if m in TOWER_METHODS]
    report: Dict[str, Any] = {"setup": asdict(setup), "describe": setup.describe(), "device": str(device),
                              "methods": chosen, "tower_methods": tower,
                              "not_wired": {m: status[m] for m in METHODS if status[m]},
                              "prefill": [], "pixels": [], "generate": None}
    for kind in kinds:
        if tower:
            report["pixels"].append(pixels_group(model, setup, kind, [DEFAULT_METHOD] + tower, device, progress))
        group = prefill_group(model, setup, kind, chosen, device, progress, prop_attn=prop_attn)
        vision = model.config.vision_config
        side = (setup.image_px if kind == "image" else setup.video_px) // vision.patch_size
        patches = side * side * (1 if kind == "image" else setup.video_frames // vision.temporal_patch_size)
        group["patches"] = patches
        for row in group["rows"]:
            row.update(end_to_end_ceilings(setup, patches, group["tokens"], group["sequence"], row["visual_tokens"]))
        report["prefill"].append(group)
        save(report)
    if decode:
        report["generate"] = generate_group(model, setup, device, progress)
        vision = model.config.vision_config
        patches = (setup.image_px // vision.patch_size) ** 2
        image = next((g for g in report["prefill"] if g["kind"] == "image"), None)
        for row in report["generate"]["rows"]:
            tokens = (setup.image_px // vision.patch_size // vision.spatial_merge_size) ** 2
            length = setup.text_before + setup.text_after + 2 + tokens
            row.update(end_to_end_ceilings(setup, patches, tokens, length, row["cache_tokens"] - (length - tokens)))
            if image is not None:
                row["tower_s"] = image["tower_s"]
    return report


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g}"


def markdown(report: Dict[str, Any]) -> str:
    """The tables of one run (the ``vlm`` part of a report)."""
    lines = [f"Model: {report['describe']}; device {report['device']}.", ""]
    for group in report["prefill"]:
        lines += [f"### Prefill, one {group['kind']}: {group['tokens']} visual tokens ({group['patches']} patches "
                  f"before the merger), sequence {group['sequence']}", "",
                  f"Vision tower alone: {group['tower_s'] * 1e3:.0f} ms (fixed). LM part: `model(..., "
                  "mm_encoder_outputs=...)` with the tower's features given.", "",
                  "| method | budget | visual tokens | sequence | LM prefill ms | LM speed-up [IQR] | LM FLOP ceiling | "
                  "of ceiling | layers ms | layers speed-up (of ceiling) | selection ms | selection share of prefill | "
                  "KV cache MiB | e2e ceiling (this depth / 3B depth) |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---|"]
        for row in group["rows"]:
            lines.append(
                f"| {row['method']} | {row['budget']:.0%} | {row['visual_tokens']} | {row['sequence']} | "
                f"{row['lm_s'] * 1e3:.0f} | {row['speedup']:.2f}x [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}] | "
                f"{row['ceiling']:.2f}x | {row['of_ceiling']:.2f} | {row['layers_s'] * 1e3:.0f} | "
                f"{row['layers_speedup']:.2f}x ({row['layers_of_ceiling']:.2f}) | {row['selection_s'] * 1e3:.1f} | "
                f"{100 * row['selection_share']:.1f}% | {_mib(row['kv_bytes'])} | "
                f"{row['ceiling_here']:.2f}x / {row['ceiling_3b_depth']:.2f}x |")
        lines.append("")
    for group in report.get("pixels", []):
        lines += [f"### Prefill with the pixels in, one {group['kind']}: the methods that rank by the tower's "
                  f"attention, beside `{DEFAULT_METHOD}`", "",
                  "`model(**inputs, logits_to_keep=1, use_cache=True)`: vision tower and language model; the "
                  "selection includes the method's scores (VisionZip's attention from the tower's queries and keys).", "",
                  "| method | budget | visual tokens | sequence | prefill ms | speed-up [IQR] | selection ms | "
                  "selection share of prefill |", "|---|---:|---:|---:|---:|---|---:|---:|"]
        for row in group["rows"]:
            lines.append(
                f"| {row['method']} | {row['budget']:.0%} | {row['visual_tokens']} | {row['sequence']} | "
                f"{row['prefill_s'] * 1e3:.0f} | {row['speedup']:.2f}x [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}] | "
                f"{row['selection_s'] * 1e3:.1f} | {100 * row['selection_share']:.1f}% |")
        lines.append("")
    if report["generate"]:
        decode = report["generate"]["decode_tokens"]
        lines += [f"### generate (one image, default method `{DEFAULT_METHOD}`): time to first token, then {decode} "
                  "greedy tokens with the KV cache", "",
                  "| method | budget | cached tokens | TTFT ms | TTFT speed-up [IQR] | e2e ceiling (this depth / 3B depth) | "
                  "decode tokens/s | KV cache MiB |", "|---|---:|---:|---:|---|---|---:|---:|"]
        for row in report["generate"]["rows"]:
            lines.append(
                f"| {row['method']} | {row['budget']:.0%} | {row['cache_tokens']} | {row['ttft_s'] * 1e3:.0f} | "
                f"{row['speedup']:.2f}x [{row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}] | "
                f"{row['ceiling_here']:.2f}x / {row['ceiling_3b_depth']:.2f}x | {row['decode_tokens_per_s']:.2f} | "
                f"{_mib(row['kv_bytes'])} |")
        lines.append("")
    if report["not_wired"]:
        lines.append("Not measured (refused by the integration): " + "; ".join(
            f"`{m}`: {reason}" for m, reason in report["not_wired"].items()))
    return "\n".join(lines) + "\n"


def machine(device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info: Dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
                            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny widths, 2 rounds: the code paths in about a minute")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default: bf16)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default: 2)")
    parser.add_argument("--lm-layers", type=int, help="language-model layers (default: 2)")
    parser.add_argument("--tower-layers", type=int, help="vision-tower layers, the last one full attention (default: 2)")
    parser.add_argument("--rounds", type=int, help="timed interleaved rounds (default: 3; quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default: 1)")
    parser.add_argument("--decode-tokens", type=int, help="greedy tokens timed after the first (default: 4)")
    parser.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default: every one the integration runs)")
    parser.add_argument("--kinds", default="image,video", help="comma list of image, video")
    parser.add_argument("--no-generate", action="store_true", help="skip the generate / decode / KV group")
    parser.add_argument("--prop-attn", action="store_true",
                        help=f"also time {', '.join(PROP_METHODS)} with prop_attn=True (rows '<method>+prop_attn')")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--name", help="file stem (default: vlm-speed, vlm-speed-quick with --quick)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    setup = PRESETS["quick" if args.quick else "full"]
    changes = {key: value for key, value in (("lm_layers", args.lm_layers), ("tower_layers", args.tower_layers),
                                             ("rounds", args.rounds), ("warmup", args.warmup),
                                             ("decode_tokens", args.decode_tokens), ("dtype", args.dtype))
               if value is not None}
    setup = replace(setup, **changes)
    methods = args.methods.split(",") if args.methods else None
    unknown = set(methods or ()) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    kinds = [k for k in args.kinds.split(",") if k]
    if set(kinds) - {"image", "video"}:
        parser.error(f"--kinds {args.kinds!r}: choose from image, video")
    start = time.time()
    info = machine(device)
    print(f"machine: {info}", flush=True)
    name = args.name or ("vlm-speed-quick" if args.quick else "vlm-speed")
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/vlm_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(report: Dict[str, Any]) -> str:
        info["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        report.update(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"), machine=info,
                      elapsed_s=time.time() - start)
        text = (f"Machine: {info['gpu'] if 'gpu' in info else info['cpu']}, {info['threads']} threads, torch "
                f"{info['torch']}; load average (1 / 5 / 15 min) {_load(info.get('load_average'))} at the start, "
                f"{_load(info.get('load_average_after'))} at the end; {report['date']}; command `{command}`; "
                f"{report['elapsed_s']:.0f} s.\n\n" + markdown(report))
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(text)
        return text

    report = measure(setup, device, methods, kinds, not args.no_generate,
                     progress=lambda line: print(line, flush=True), save=save, prop_attn=args.prop_attn)
    print(save(report))
    print(f"wrote {os.path.join(args.out, name)}.json/.md")
    return report


def _load(values: Optional[Sequence[float]]) -> str:
    return "-" if not values else " / ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
