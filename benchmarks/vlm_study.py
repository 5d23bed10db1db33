"""Visual-token reduction on the small VLMs trained here: accuracy kept per method, budget and slice.

For each model (the shipped ``vqa-qwen2_5_vl`` and ``vqa-llava`` of :mod:`tome.vlm_models`,
or ``--model PATH`` folders saved by ``tome.tools.vlm_train``), each visual-token method of
:data:`tome.visual_tokens.METHODS` (through ``tome.apply_patch(model, visual_tokens=f,
method=m)``) plus ``tower-tome`` (ToMe inside the vision tower, where the tower is a family
the ``hf`` patch supports: CLIP in LLaVA; Qwen2.5-VL's tower has none) and each budget
(a fraction of an image's visual tokens), the greedy first answer token of one forward on
the first ``--questions`` validation questions of :mod:`tome.data.vqa` (as
``tome.tools.vlm_train.evaluate`` validates; its batching is reused), every question's hit
kept so that each row is compared with the unreduced model on the same questions:

- ``share kept``: accuracy reduced / accuracy unreduced, with the delta-method standard error
  of the ratio of the two paired means, ``std(c_r - s * c_f) / (sqrt(n) * acc_f)``;
- ``delta``: the paired difference in points, with ``std(c_r - c_f) / sqrt(n)``.

Also measured, the choices the integration leaves to measurement: 1-D ``positions="keep"``
against ``"renumber"`` on LLaVA (every method, every budget, paired), and ``prop_attn=True``
(``log(size)`` on the merged tokens' keys in the language model) against without, for the
merging methods (``PROP_METHODS``) on both models (paired). The merged-token
position rule is the integration's only one (the size-weighted mean of the members'
positions), so it is reported, not compared.

Video (models with a video input: Qwen2.5-VL): the same questions asked about clips of
:func:`tome.data.vqa.make_clip` (the scene over ``--video-frames`` frames, its objects moving
together), the budget per video, every method, plus ``tome-spatial``: ``"tome"`` without its
temporal rule (the clip's grid withheld, so it matches over space only), the ablation of the
rule that merges tokens at one place of consecutive frames first.

``--parts images`` or ``--parts video`` runs one part; the other is then taken from the
existing ``--json`` file, so a part can be rerun alone.

Methods the integration refuses (``ValueError``, e.g. one whose inputs are not wired yet) are
listed with the refusal instead of numbers.

Usage (the command docs/vlm_study.md records):

    OMP_NUM_THREADS=1 uv run python benchmarks/vlm_study.py --questions 500 \\
        --out docs/vlm_study.md --json docs/vlm_study.json --plot docs/vlm_study.png

``--quick`` (10 questions, 2 methods, 1 budget) is the test's path. The tables go to stdout and
between the ``<!-- results:begin -->`` and ``<!-- results:end -->`` markers of ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import write_markdown  # noqa: E402

import tome  # noqa: E402
from tome import visual_tokens as vt  # noqa: E402
from tome.data import vqa  # noqa: E402
from tome.tools.vlm_train import _batch  # noqa: E402
from tome.vlm_models import SHIPPED_VLMS  # noqa: E402

BUDGETS = (0.5, 0.25, 0.11, 0.05)
TOWER = "tower-tome"
PROP_METHODS = ("pool", "tome")  # the methods whose passed-on tokens stand for several: prop_attn changes them
QUICK_METHODS = ("pool", "tome")
NO_TOWER = {"qwen2_5_vl": "no in-tower ToMe for Qwen2.5-VL's vision tower (windowed attention, 2x2 merger): "
                          "the hf family does not patch it"}
VIDEO_FRAMES = 8
NO_VIDEO = {"llava": "the LLaVA-style model takes images only (LLaVA-1.5 has no video input)"}
SPATIAL_ONLY = "tome-spatial"
PARTS = ("images", "video")
POSITION_RULE = "size-weighted mean of the members' positions (the integration's only rule)"


# ----------------------------------------------------------------------------- statistics


def paired(reduced: Sequence[int], full: Sequence[int]) -> Dict[str, float]:
    """Share kept and paired difference of per-question hits (0/1) against the unreduced ones.

    Returns:
        ``accuracy`` and ``full_accuracy`` (fractions), ``share`` and ``share_se`` (percent:
        ``acc_r / acc_f`` and its delta-method standard error, NaN when ``acc_f`` is 0),
        ``delta`` and ``delta_se`` (points: ``acc_r - acc_f`` and the SE of the paired mean).
    """
    n = len(full)
    if n != len(reduced) or n == 0:
        raise ValueError(f"need as many reduced as unreduced hits (> 0), got {len(reduced)} and {n}")
    r = torch.tensor(reduced, dtype=torch.float64)
    f = torch.tensor(full, dtype=torch.float64)
    acc_r, acc_f = float(r.mean()), float(f.mean())
    sd = (lambda x: float(x.std()) if n > 1 else 0.0)
    out = {"accuracy": acc_r, "full_accuracy": acc_f, "delta": 100 * (acc_r - acc_f),
           "delta_se": 100 * sd(r - f) / math.sqrt(n), "share": math.nan, "share_se": math.nan}
    if acc_f > 0:
        share = acc_r / acc_f
        out["share"] = 100 * share
        out["share_se"] = 100 * sd(r - share * f) / (math.sqrt(n) * acc_f)
    return out


# ----------------------------------------------------------------------------- evaluation


def load(path: Path) -> Tuple[Any, Any, str]:
    """``(model in eval mode, processor, arch)`` from a ``save_pretrained`` folder, offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    arch = model.config.model_type
    if arch not in ("qwen2_5_vl", "llava"):
        raise ValueError(f"{path} holds a {arch!r} model; the study knows 'qwen2_5_vl' and 'llava'")
    return model.eval(), processor, arch


def _drop_image_tokens(inputs: Dict[str, torch.Tensor], image_token: int, keep: int) -> Dict[str, torch.Tensor]:
    """Keep the first ``keep`` image placeholders of every row (in-tower merging passes fewer features)."""
    ids = inputs["input_ids"]
    is_image = ids == image_token
    rank = is_image.long().cumsum(1)
    kept = ~is_image | (rank <= keep)
    length = int(kept[0].sum())
    if not bool((kept.sum(1) == length).all()):
        raise ValueError("rows hold different numbers of image tokens; the study batches one image per question")
    out = dict(inputs)
    for key in ("input_ids", "attention_mask"):
        out[key] = inputs[key][kept].view(ids.shape[0], length)
    return out


@torch.no_grad()
def hits(model: Any, processor: Any, arch: str, samples: Sequence[vqa.VQASample], batch_size: int = 50,
         tower_tokens: Optional[int] = None) -> List[int]:
    """1 where the greedy first answer token of one forward is the answer, per question.

    ``tower_tokens``: the visual tokens a merging vision tower passes per image; the prompt keeps
    that many placeholders (consecutive 1-D positions, as a tower that returns fewer tokens gives).
    """
    out: List[int] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        inputs = _batch(processor, arch, chunk, with_answers=False)
        if tower_tokens is not None:
            inputs = _drop_image_tokens(inputs, model.config.image_token_id, tower_tokens)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        predicted = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        out += [int(p == s.answer) for p, s in zip(predicted, chunk)]
    return out


def tower_schedule(patches: int, layers: int, keep: int) -> List[int]:
    """Per-layer ToMe ``r`` that takes ``patches`` tokens (class token apart) to ``keep`` in ``layers``
    layers: as even as possible, but never fewer than the later layers (each removing at most half)
    need."""
    schedule, n = [], patches
    for left in range(layers, 0, -1):
        remaining = n - keep
        even = math.ceil(remaining / left)
        need = n - keep * 2 ** (left - 1)
        r = max(0, min(n // 2, max(even, need)))
        schedule.append(r)
        n -= r
    return schedule


def _slice_hits(samples: Sequence[vqa.VQASample], h: Sequence[int]) -> Dict[str, List[int]]:
    per: Dict[str, List[int]] = {}
    for sample, hit in zip(samples, h):
        per.setdefault(sample.slice, []).append(hit)
    return per


def _row(samples: Sequence[vqa.VQASample], h: List[int], full: List[int], **fields: Any) -> Dict[str, Any]:
    row = dict(fields, hits=h, **paired(h, full))
    fs, rs = _slice_hits(samples, full), _slice_hits(samples, h)
    row["slices"] = {name: paired(rs[name], fs[name]) for name in vqa.SLICES if name in fs}
    return row


def _tower_row(model: Any, processor: Any, arch: str, samples: Sequence[vqa.VQASample], full: List[int],
               fraction: float, tokens: int, batch_size: int) -> Dict[str, Any]:
    if arch in NO_TOWER:
        return {"method": TOWER, "budget": fraction, "skipped": NO_TOWER[arch]}
    tower = model.model.vision_tower
    layers = tower.config.num_hidden_layers
    feature_layer = model.config.vision_feature_layer
    merging = layers + 1 + feature_layer if feature_layer < 0 else feature_layer  # layers before the features
    keep = vt.resolve_budget(fraction, tokens)
    schedule = tower_schedule(tokens, merging, keep)
    tome.apply_patch(tower, r=schedule + [0] * (layers - merging))
    try:
        probe = tower(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[feature_layer]
        passed = probe.shape[1] - 1  # the "default" strategy drops the class token
        h = hits(model, processor, arch, samples, batch_size, tower_tokens=passed)
    finally:
        tome.remove_patch(tower)
    return _row(samples, h, full, method=TOWER, budget=fraction, tokens=passed, positions="renumber",
                schedule=schedule)


def _tome_spatial(features: torch.Tensor, budget: int, context: vt.VisualContext) -> vt.Reduction:
    """``"tome"`` with the clip's grid withheld: bipartite matching over all tokens, no temporal rule."""
    return vt.METHODS["tome"](features, budget, vt.VisualContext(metric=context.metric))


def clip_prompt(question: str) -> str:
    """Qwen2.5-VL's input text for a question about a clip (the video placeholder, then the question)."""
    return f"{vqa.VISION_START}{vqa.VIDEO_TOKEN}{vqa.VISION_END} {question}"


@torch.no_grad()
def clip_hits(model: Any, processor: Any, clips: Sequence[vqa.VQAClip], batch_size: int = 50) -> List[int]:
    """1 where the greedy first answer token of one forward on the clip's question is the answer."""
    out: List[int] = []
    for start in range(0, len(clips), batch_size):
        chunk = clips[start:start + batch_size]
        inputs = processor(text=[clip_prompt(c.question) for c in chunk], videos=[list(c.frames) for c in chunk],
                           return_tensors="pt", padding=True, do_sample_frames=False)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        predicted = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        out += [int(p == c.answer) for p, c in zip(predicted, chunk)]
    return out


def study_video(path: Path, methods: Sequence[str], budgets: Sequence[float], clips: Sequence[vqa.VQAClip],
                batch_size: int, log: Any = print) -> Dict[str, Any]:
    """Every method (and ``tome-spatial``) at every budget per clip, on one model's video input."""
    model, processor, arch = load(path)
    if arch in NO_VIDEO:
        return {"skipped": NO_VIDEO[arch]}
    frames = clips[0].frames.shape[0]
    tokens = -(-frames // 2) * (224 // 28) ** 2  # temporal patch 2, then the 2x2 merger
    full = clip_hits(model, processor, clips, batch_size)
    result: Dict[str, Any] = {"frames": frames, "visual_tokens": tokens,
                              "full": _row(clips, full, full, method="none", budget=1.0, tokens=tokens), "rows": []}
    video_methods = [m for m in methods if m != TOWER]
    if "tome" in video_methods:
        video_methods.append(SPATIAL_ONLY)
    for method in video_methods:
        for fraction in budgets:
            start = time.perf_counter()
            vt.register_method(SPATIAL_ONLY)(_tome_spatial)  # for this study only
            tome.apply_patch(model, visual_tokens=fraction, method=method, seed=0)
            try:
                h = clip_hits(model, processor, clips, batch_size)
            finally:
                tome.remove_patch(model)
                vt.METHODS.pop(SPATIAL_ONLY, None)
            row = _row(clips, h, full, method=method, budget=fraction, tokens=vt.resolve_budget(fraction, tokens))
            result["rows"].append(row)
            log(f"{arch} video {method} {fraction}: {row['accuracy']} ({time.perf_counter() - start:.1f} s)")
    return result


def study_model(path: Path, methods: Sequence[str], budgets: Sequence[float], samples: Sequence[vqa.VQASample],
                batch_size: int, log: Any = print) -> Dict[str, Any]:
    """Every method at every budget on one model (and, for 1-D models, both position rules)."""
    model, processor, arch = load(path)
    # Visual tokens of one 224-px image as the model's own processor expands it (64 for the
    # Qwen model's 2 x 2 merger; (224 / patch) ** 2 for a LLaVA tower).
    probe = processor(text=vqa.prompt_text(samples[0].question, arch), images=vqa.to_pil(samples[0]),
                      return_tensors="pt")
    tokens = int((probe["input_ids"] == model.config.image_token_id).sum())
    full = hits(model, processor, arch, samples, batch_size)
    result: Dict[str, Any] = {"model": str(path), "arch": arch, "visual_tokens": tokens,
                              "full": _row(samples, full, full, method="none", budget=1.0, tokens=tokens),
                              "rows": []}
    position_rules = ("keep",) if arch == "qwen2_5_vl" else ("keep", "renumber")
    for method in methods:
        for fraction in budgets:
            start = time.perf_counter()
            if method == TOWER:
                row = _tower_row(model, processor, arch, samples, full, fraction, tokens, batch_size)
                result["rows"].append(row)
                log(f"{arch} {method} {fraction}: {row.get('accuracy', row.get('skipped'))}"
                    f" ({time.perf_counter() - start:.1f} s)")
                continue
            # Each position rule, and prop_attn (positions kept) for the methods whose tokens merge.
            arms = [(rule, False) for rule in position_rules] + ([("keep", True)] if method in PROP_METHODS else [])
            for rule, prop in arms:
                extra = {"prop_attn": True} if prop else {}
                try:
                    tome.apply_patch(model, visual_tokens=fraction, method=method, positions=rule, prop_attn=prop,
                                     seed=0)
                    h = hits(model, processor, arch, samples, batch_size)
                    row = _row(samples, h, full, method=method, budget=fraction,
                               tokens=vt.resolve_budget(fraction, tokens), positions=rule, **extra)
                except ValueError as error:  # a method the integration refuses (not wired yet)
                    row = {"method": method, "budget": fraction, "positions": rule, **extra, "skipped": str(error)}
                finally:
                    tome.remove_patch(model)
                result["rows"].append(row)
                log(f"{arch} {method} {fraction} {rule}{' prop_attn' if prop else ''}: "
                    f"{row.get('accuracy', row.get('skipped'))} ({time.perf_counter() - start:.1f} s)")
    return result


# ----------------------------------------------------------------------------- tables and plot


def _pm(value: float, se: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} ± {se:.1f}"


def _name(result: Dict[str, Any]) -> str:
    return f"`{Path(result['model']).name}`"


def tables(results: Dict[str, Any]) -> str:
    """The study's markdown: overall, per slice, positions, and what was skipped."""
    head = ("| model | method | budget | tokens | accuracy % | share kept % ± SE | delta points ± SE |\n"
            "|---|---|---|---|---|---|---|")
    lines = [f"{results['questions']} validation questions (seed {results['seed']}, "
             f"{results['questions'] // len(vqa.SLICES)} per slice); greedy first answer token of one forward. "
             "Share kept: reduced / unreduced accuracy, delta-method SE; delta: paired difference, its SE.",
             "", head]
    skipped: Dict[Tuple[str, str, str], List[float]] = {}
    for res in results["models"]:
        full = res["full"]
        lines.append(f"| {_name(res)} | none | 100 % | {full['tokens']} | {100 * full['accuracy']:.1f} | 100 | 0 |")
        for row in res["rows"]:
            if "skipped" in row:
                if row.get("positions", "keep") == "keep" and not row.get("prop_attn"):
                    skipped.setdefault((_name(res), row["method"], row["skipped"]), []).append(row["budget"])
                continue
            if (row.get("positions") == "renumber" and row["method"] != TOWER) or row.get("prop_attn"):
                continue
            lines.append(f"| {_name(res)} | {row['method']} | {row['budget']:.0%} | {row['tokens']} | "
                         f"{100 * row['accuracy']:.1f} | {_pm(row['share'], row['share_se'])} | "
                         f"{_pm(row['delta'], row['delta_se'])} |")
    slices = " | ".join(vqa.SLICES)
    lines += ["", "Share kept per slice (%; the unreduced accuracy per slice in the `none` row):", "",
              f"| model | method | budget | {slices} |", "|---|---|---|" + "---|" * len(vqa.SLICES)]
    for res in results["models"]:
        fs = res["full"]["slices"]
        lines.append(f"| {_name(res)} | none (accuracy %) | 100 % | "
                     + " | ".join(f"{100 * fs[s]['accuracy']:.1f}" for s in vqa.SLICES if s in fs) + " |")
        for row in res["rows"]:
            if "skipped" in row or (row.get("positions") == "renumber" and row["method"] != TOWER) or row.get("prop_attn"):
                continue
            cells = ("n/a" if math.isnan(row["slices"][s]["share"]) else f"{row['slices'][s]['share']:.0f}"
                     for s in vqa.SLICES if s in row["slices"])
            lines.append(f"| {_name(res)} | {row['method']} | {row['budget']:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "1-D positions on LLaVA: `renumber` against `keep`, paired difference in points ± SE:", "",
              "| model | method | budget | keep % | renumber % | renumber - keep |", "|---|---|---|---|---|---|"]
    for res in results["models"]:
        keep = _plain_rows(res)
        for row in res["rows"]:
            other = keep.get((row["method"], row["budget"]))
            if row.get("positions") != "renumber" or "skipped" in row or other is None:
                continue
            d = paired(row["hits"], other["hits"])
            lines.append(f"| {_name(res)} | {row['method']} | {row['budget']:.0%} | {100 * other['accuracy']:.1f} | "
                         f"{100 * row['accuracy']:.1f} | {_pm(d['delta'], d['delta_se'])} |")
    lines += ["", "Proportional attention in the language model (`prop_attn=True`: log(size) on each merged token's "
              "key) against without, positions kept, paired difference in points ± SE:", "",
              "| model | method | budget | without % | prop_attn % | prop_attn - without | share kept with prop_attn % |",
              "|---|---|---|---|---|---|---|"]
    for res in results["models"]:
        keep = _plain_rows(res)
        for row in res["rows"]:
            other = keep.get((row["method"], row["budget"]))
            if not row.get("prop_attn") or other is None:
                continue
            d = paired(row["hits"], other["hits"])
            lines.append(f"| {_name(res)} | {row['method']} | {row['budget']:.0%} | {100 * other['accuracy']:.1f} | "
                         f"{100 * row['accuracy']:.1f} | {_pm(d['delta'], d['delta_se'])} | "
                         f"{_pm(row['share'], row['share_se'])} |")
    lines += ["", f"Merged-token positions: {POSITION_RULE}.", ""] + _video_lines(results) + ["",
              "Not measured (the reason as the integration or the study gives it):", "",
              "| model | method | budgets | reason |", "|---|---|---|---|"]
    lines += [f"| {name} | {method} | {', '.join(f'{b:.0%}' for b in budgets)} | {reason} |"
              for (name, method, reason), budgets in skipped.items()]
    return "\n".join(lines)


def _plain_rows(result: Dict[str, Any]) -> Dict[Tuple[str, float], Dict[str, Any]]:
    """``{(method, budget): row}`` of one model's main rows: positions kept, no ``prop_attn``."""
    return {(r["method"], r["budget"]): r for r in result["rows"]
            if r.get("positions") == "keep" and "skipped" not in r and not r.get("prop_attn")}


def _video_lines(results: Dict[str, Any]) -> List[str]:
    videos = [(res, res.get("video")) for res in results["models"]]
    if not any(v for _, v in videos):
        return ["Video: not measured (run with `--parts video`)."]
    lines = ["Video: the same questions about clips (`tome.data.vqa.make_clip`, objects moving), the budget per "
             f"clip; `{SPATIAL_ONLY}` is `tome` without its temporal rule:", "",
             "| model | method | budget | tokens | accuracy % | share kept % ± SE | delta points ± SE |",
             "|---|---|---|---|---|---|---|"]
    for res, video in videos:
        if not video:
            continue
        if "skipped" in video:
            lines.append(f"| {_name(res)} | – | – | – | – | {video['skipped']} | – |")
            continue
        full = video["full"]
        lines.append(f"| {_name(res)} | none ({video['frames']} frames) | 100 % | {full['tokens']} | "
                     f"{100 * full['accuracy']:.1f} | 100 | 0 |")
        for row in video["rows"]:
            lines.append(f"| {_name(res)} | {row['method']} | {row['budget']:.0%} | {row['tokens']} | "
                         f"{100 * row['accuracy']:.1f} | {_pm(row['share'], row['share_se'])} | "
                         f"{_pm(row['delta'], row['delta_se'])} |")
    return lines


def plot(results: Dict[str, Any], path: Path) -> None:
    """Share kept against the budget, one line per method, one panel per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{Path(res['model']).name}", res["rows"], res["full"]) for res in results["models"]]
    panels += [(f"{Path(res['model']).name}, {res['video']['frames']}-frame clips", res["video"]["rows"],
                res["video"]["full"]) for res in results["models"] if res.get("video") and "rows" in res["video"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (title, all_rows, full) in zip(axes[0], panels):
        methods = sorted({r["method"] for r in all_rows if "skipped" not in r})
        for number, method in enumerate(methods):
            rows = sorted((r for r in all_rows if r["method"] == method and "skipped" not in r and not r.get("prop_attn")
                           and (r.get("positions", "keep") == "keep" or method == TOWER)), key=lambda r: r["budget"])
            x = [100 * r["budget"] * 1.03 ** (number - len(methods) / 2) for r in rows]  # spread the error bars
            ax.errorbar(x, [r["share"] for r in rows], yerr=[r["share_se"] for r in rows], marker="o",
                        capsize=2, label=method)
        ax.axhline(100, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks([100 * b for b in results["budgets"]], [f"{b:.0%}" for b in results["budgets"]])
        ax.set_xlabel("visual tokens kept")
        ax.set_title(f"{title} (unreduced {100 * full['accuracy']:.1f} %)", fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of unreduced accuracy kept (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def _methods(text: str) -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    valid = sorted(vt.METHODS) + [TOWER]
    bad = [m for m in names if m not in valid]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--methods {text!r}: unknown {bad}; choose from {valid}")
    return names


def _budgets(text: str) -> List[float]:
    try:
        values = [float(b) for b in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < b <= 1 for b in values):
        raise argparse.ArgumentTypeError(f"--budgets {text!r} must be fractions in (0, 1], comma-separated")
    return values


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", type=Path, default=None,
                        help="a save_pretrained VLM folder (repeatable; default: the shipped models)")
    parser.add_argument("--methods", type=_methods, default=None,
                        help=f"comma-separated (default: every registered method and {TOWER})")
    parser.add_argument("--budgets", type=_budgets, default=None,
                        help="fractions of the visual tokens kept (default: 0.5,0.25,0.11,0.05)")
    parser.add_argument("--questions", type=int, default=500, help="validation questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the task's seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="10 questions, 2 methods, 1 budget (for tests)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file with results markers")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of share kept against budget")
    parser.add_argument("--from-json", action="store_true", help="only redraw the tables and plot from --json")
    parser.add_argument("--parts", type=_parts, default=list(PARTS),
                        help="images, video or both (default); a part not run is taken from --json")
    parser.add_argument("--video-frames", type=int, default=VIDEO_FRAMES,
                        help="frames per clip of the video part (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.from_json:
        if args.json is None:
            parser.error("--from-json needs --json")
        return _report(_hits_codec(json.loads(args.json.read_text()), decode=True), args, write_json=False)
    if args.questions < 1:
        parser.error(f"--questions must be >= 1, got {args.questions}")
    if args.video_frames < 2:
        parser.error(f"--video-frames must be >= 2, got {args.video_frames}")
    methods = args.methods or (list(QUICK_METHODS) if args.quick else sorted(vt.METHODS) + [TOWER])
    budgets = args.budgets or ([0.25] if args.quick else list(BUDGETS))
    questions = 10 if args.quick else args.questions
    paths = args.model or [SHIPPED_VLMS["vqa-qwen2_5_vl"], SHIPPED_VLMS["vqa-llava"]]
    torch.manual_seed(0)
    # Drawn only for the parts that run (a clip renders its scene once per frame).
    samples = [vqa.make_sample(i, "val", seed=args.seed, image_size=224) for i in range(questions)
               ] if "images" in args.parts else []
    clips = [vqa.make_clip(i, "val", seed=args.seed, frames=args.video_frames) for i in range(questions)
             ] if "video" in args.parts else []
    previous = None
    if set(args.parts) != set(PARTS) and args.json is not None and args.json.exists():
        previous = _hits_codec(json.loads(args.json.read_text()), decode=True)
        if (previous["questions"], previous["seed"]) != (questions, args.seed):  # unpaired otherwise
            parser.error(f"{args.json} holds {previous['questions']} questions of seed {previous['seed']}, not "
                         f"{questions} of seed {args.seed}: rerun both parts")
    if "images" not in args.parts and previous is None:
        parser.error("--parts video takes the image part from --json, which is not given or does not exist")
    log = (lambda text: print(text, file=sys.stderr))
    models = []
    for path in paths:
        old = next((m for m in (previous or {"models": []})["models"] if Path(m["model"]).name == Path(path).name), {})
        if "images" in args.parts:
            result = study_model(path, methods, budgets, samples, args.batch_size, log)
        elif old:
            result = {k: v for k, v in old.items() if k != "video"}
        else:
            parser.error(f"{args.json} has no image results for {path}: run --parts images first")
        result["video"] = (study_video(path, methods, budgets, clips, args.batch_size, log)
                           if "video" in args.parts else old.get("video"))
        models.append(result)
    results = {"questions": questions, "seed": args.seed, "budgets": budgets, "methods": methods,
               "position_rule": POSITION_RULE, "torch_threads": torch.get_num_threads(), "models": models}
    return _report(results, args, write_json=True)


def _parts(text: str) -> List[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names or any(p not in PARTS for p in names):
        raise argparse.ArgumentTypeError(f"--parts {text!r}: choose from {list(PARTS)}, comma-separated")
    return names


def _hits_codec(results: Dict[str, Any], decode: bool) -> Dict[str, Any]:
    """Per-question hits as a ``"0110..."`` string in the JSON file (a list of ints in memory)."""
    def convert(row: Dict[str, Any]) -> Dict[str, Any]:
        if "hits" not in row:
            return row
        hits = [int(c) for c in row["hits"]] if decode else "".join(str(h) for h in row["hits"])
        return dict(row, hits=hits)

    def convert_part(part: Any) -> Any:
        if not part or "full" not in part:
            return part
        return dict(part, full=convert(part["full"]), rows=[convert(r) for r in part["rows"]])

    models = [dict(convert_part(res), video=convert_part(res.get("video"))) for res in results["models"]]
    return dict(results, models=models)


def _report(results: Dict[str, Any], args: argparse.Namespace, write_json: bool) -> int:
    table = tables(results)
    print(table)
    if args.out is not None:
        write_markdown(args.out, table)
    if write_json and args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_hits_codec(results, decode=False), indent=1) + "\n")
    if args.plot is not None:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
