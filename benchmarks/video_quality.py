"""Quality of token merging on a video diffusion transformer trained here.

    uv run python benchmarks/video_quality.py --model RUN_DIR/final   (a tome video-train run)
    uv run python benchmarks/video_quality.py --model DIR --per-class 2 --ratios 0 0.5 --modes kv

The model is the class-conditional pixel-space ``WanTransformer3DModel`` of
:mod:`tome.video_models`, trained on the generated clips of :mod:`tome.data.clips` by
``tome video-train`` (docs/video.md). For every class it samples ``--per-class`` clips,
each from its own fixed noise, with the unmerged transformer and with the transformer
patched by ``tome.apply_patch(transformer, ratio=..., mode=...)`` for every ratio and mode,
the same noise, steps and guidance each time. It reports, per ratio and mode:

- **PSNR** (dB) of the merged model's clips against the unmerged model's from the same
  noise (pixels in [0, 1]; the mean over clips of each clip's PSNR, and the worst clip);
  ``inf`` means bit-identical;
- **class accuracy**: the fraction of sampled frames in which the shipped shapes classifier
  (``shapes-long``, frames resized to its 64 px) finds the requested class, merged against
  unmerged, and on real clips of the validation split for reference.

Prints a Markdown table headed by the command and the regime, and writes it with the raw
numbers as JSON to ``--out`` when given. Quality only: nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import tome
from tome import video_models
from tome.data import clips
from tome.data.synthetic import CLASSES
from tome.tools.video_train import classifier_accuracy, load_classifier


def psnr_per_clip(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each clip ``(batch, 3, frames, H, W)`` in ``[-1, 1]`` against ``reference``
    (pixels mapped to ``[0, 1]``); ``inf`` where they are identical."""
    error = ((videos - reference) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / error)


def _sample(model: video_models.ClassConditionedWan, labels: torch.Tensor, noise: torch.Tensor, args: Any) -> torch.Tensor:
    return torch.cat([video_models.sample(model, y, n, args.steps, args.guidance)
                      for y, n in zip(labels.split(args.chunk), noise.split(args.chunk))])


def measure(model: video_models.ClassConditionedWan, args: Any, classifier: torch.nn.Module) -> Dict[str, Any]:
    """Sample unmerged and merged from the same noise; PSNR and class accuracy per (mode, ratio)."""
    frames, size = args.frames, args.size_px
    labels = torch.arange(args.classes).repeat_interleave(args.per_class)
    noise = torch.randn((len(labels), 3, frames, size, size), generator=torch.Generator().manual_seed(args.seed))
    # Real clips of the same classes: clip i of the val split has label i % 10.
    real_indices = [label + len(CLASSES) * k for label in range(args.classes) for k in range(args.per_class)]
    real, real_labels = clips.clip_batch(real_indices, "val", args.seed, frames, size, args.background)
    started = time.time()
    reference = _sample(model, labels, noise, args)
    rows: List[Dict[str, Any]] = [{"mode": "-", "ratio": "real clips (val)", "psnr_mean": None, "psnr_min": None,
                                   "accuracy": classifier_accuracy(classifier, real, real_labels)},
                                  {"mode": "-", "ratio": "unmerged", "psnr_mean": math.inf, "psnr_min": math.inf,
                                   "accuracy": classifier_accuracy(classifier, reference, labels)}]
    for mode in args.modes:
        for ratio in args.ratios:
            tome.apply_patch(model.transformer, ratio=ratio, mode=mode)
            try:
                merged = _sample(model, labels, noise, args)
            finally:
                tome.remove_patch(model.transformer)
            psnr = psnr_per_clip(merged, reference)
            rows.append({"mode": mode, "ratio": ratio, "psnr_mean": float(psnr.mean()), "psnr_min": float(psnr.min()),
                         "accuracy": classifier_accuracy(classifier, merged, labels)})
    return {"rows": rows, "clips": len(labels), "seconds": time.time() - started}


def _db(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "identical" if math.isinf(value) else f"{value:.1f}"


def table(result: Dict[str, Any]) -> str:
    """The Markdown table of :func:`measure`'s rows."""
    lines = ["| mode | ratio | PSNR vs unmerged, mean dB | worst clip dB | class accuracy % | vs unmerged (points) |",
             "|---|---|---|---|---|---|"]
    unmerged = next(row["accuracy"] for row in result["rows"] if row["ratio"] == "unmerged")
    for row in result["rows"]:
        delta = "-" if row["mode"] == "-" else f"{100 * (row['accuracy'] - unmerged):+.1f}"
        lines.append(f"| {row['mode']} | {row['ratio']} | {_db(row['psnr_mean'])} | {_db(row['psnr_min'])} | "
                     f"{100 * row['accuracy']:.1f} | {delta} |")
    return "\n".join(lines)


def _run_settings(name: str) -> Dict[str, Any]:
    """The training settings of the run ``--model`` names (the ``start`` entry of the
    ``log.jsonl`` in a ``final/`` folder or beside a ``checkpoint.pt``); ``{}`` if none."""
    path = video_models.model_folder(name)
    log = (path.parent if path.is_file() else path) / "log.jsonl"
    if not log.is_file():
        return {}
    starts = [json.loads(line) for line in log.read_text().splitlines() if '"start"' in line]
    return starts[-1].get("args", {}) if starts else {}


def _load(name: str) -> video_models.ClassConditionedWan:
    """The model named by ``--model``: a ``final/`` folder, a run's ``checkpoint.pt`` (the run's
    ``log.jsonl`` beside it says the size) or ``untrained-tiny``."""
    if name == "untrained-tiny":
        return video_models.build_model("tiny").eval()
    path = Path(name)
    if path.is_file():
        model = video_models.build_model(_run_settings(name).get("size", "small"))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        return model.eval()
    return video_models.load_model(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/video_quality.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="a folder written by tome video-train (its final/), a run's checkpoint.pt "
                             "(mid-run), a shipped model's name (tome.video_models.SHIPPED_VIDEO_MODELS: "
                             "'clips-wan') or 'untrained-tiny' (tests)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7], help="merge ratios")
    parser.add_argument("--modes", nargs="+", default=["kv", "tokens"], choices=["kv", "tokens"], help="merge modes")
    parser.add_argument("--classes", type=int, default=len(CLASSES),
                        help="sample the first this many classes (default: all %(default)s)")
    parser.add_argument("--per-class", type=int, default=4, help="clips sampled per class (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps per sample (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip, as trained (default: %(default)s)")
    parser.add_argument("--size-px", type=int, default=48, help="frame side, as trained (default: %(default)s)")
    parser.add_argument("--background", choices=clips.BACKGROUNDS, default=None,
                        help="background of the real clips (the classifier's ceiling row); default: the one the "
                             "run trained on, from its log.jsonl (cluttered if the log does not say)")
    parser.add_argument("--chunk", type=int, default=20, help="clips sampled at once (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and of the real clips")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    for ratio in args.ratios:
        if not 0 <= ratio < 1:
            raise ValueError(f"every ratio must be in [0, 1), got {ratio!r}")
    if not 1 <= args.classes <= len(CLASSES):
        raise ValueError(f"--classes must be in [1, {len(CLASSES)}], got {args.classes!r}")
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class!r}")
    torch.set_num_threads(args.threads)
    if args.background is None:
        args.background = _run_settings(args.model).get("background", "cluttered")
    model = _load(args.model)
    result = measure(model, args, load_classifier())
    command = "uv run python benchmarks/video_quality.py " + " ".join(shlex.quote(a) for a in argv)
    regime = (f"{result['clips']} clips ({args.per_class} per class) of {args.frames} x {args.size_px} x "
              f"{args.size_px} px ({args.background} background for the real clips), {args.steps} Euler steps, guidance {args.guidance}, seed {args.seed}; "
              f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads, "
              f"{result['seconds']:.0f} s in all")
    text = f"```bash\n{command}\n```\n\n{regime}\n\n{table(result)}\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": command, "regime": regime, **result,
                                              "markdown": text}, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
