"""Answer a few generated questions with a shipped VLM, offline.

``python -m tome.tools.vlm_demo --model vqa-qwen2_5_vl --count 5`` loads the model shipped in the
package (:func:`tome.vlm_models.load_demo_vlm`), asks it questions of the validation split of
:mod:`tome.data.vqa` through ``processor(...)`` and ``model.generate(...)``, and prints each
question, the true answer and the model's.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

from .. import vlm_models
from ..data import vqa

__all__ = ["answer_questions", "save_example_grid", "plot_history", "add_parser", "main"]


def answer_questions(model: Any, processor: Any, indices: Sequence[int], seed: int = 0) -> List[Dict[str, Any]]:
    """Greedy answers of ``model`` to validation questions ``indices`` of the task.

    Args:
        model: A model of :mod:`tome.vlm_models` (``Qwen2_5_VLForConditionalGeneration`` or
            ``LlavaForConditionalGeneration``).
        processor: Its processor.
        indices: Sample numbers of the validation split.
        seed: Seed of the task.

    Returns:
        One ``{"index", "slice", "question", "answer", "predicted", "correct"}`` per index.
    """
    import torch

    arch = "qwen2_5_vl" if model.config.model_type == "qwen2_5_vl" else "llava"
    size = 224 if arch == "llava" else int(processor.image_processor.size["longest_edge"] ** 0.5)
    rows = []
    for index in indices:
        sample = vqa.make_sample(index, "val", seed, size)
        inputs = processor(text=vqa.prompt_text(sample.question, arch), images=vqa.to_pil(sample), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        predicted = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        rows.append({"index": index, "slice": sample.slice, "question": sample.question, "answer": sample.answer,
                     "predicted": predicted, "correct": predicted == sample.answer})
    return rows


def save_example_grid(path: str, per_slice: int = 2, image_size: int = 224, seed: int = 0) -> None:
    """Save a PNG of validation samples: one column per slice, each image captioned with its question and answer.

    Args:
        path: PNG file to write.
        per_slice: Rows (samples per slice).
        image_size: Image side in pixels.
        seed: Seed of the task.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()  # PIL's built-in bitmap font: no font file needed
    caption = 30
    cell_w, cell_h = image_size + 8, image_size + caption + 8
    grid = Image.new("RGB", (cell_w * len(vqa.SLICES), cell_h * per_slice), "white")
    draw = ImageDraw.Draw(grid)
    for column in range(len(vqa.SLICES)):
        indices = range(column, column + per_slice * len(vqa.SLICES), len(vqa.SLICES))  # slice = index % 5
        for row, index in enumerate(indices):
            sample = vqa.make_sample(index, "val", seed, image_size)
            x, y = column * cell_w + 4, row * cell_h + 4
            grid.paste(vqa.to_pil(sample), (x, y))
            words = sample.question.split()
            lines = [" ".join(words[: (len(words) + 1) // 2]), " ".join(words[(len(words) + 1) // 2:])]
            draw.text((x, y + image_size + 2), lines[0], fill="black", font=font)
            draw.text((x, y + image_size + 15), f"{lines[1]}  -> {sample.answer}", fill="black", font=font)
    grid.quantize(colors=256, dither=Image.Dither.NONE).save(path, optimize=True)  # a palette PNG: docs-sized


def plot_history(logs: Dict[str, str], path: str) -> None:
    """Plot validation accuracy per slice against the training step, one panel per run.

    Args:
        logs: Panel title -> a run's ``log.jsonl`` (from :mod:`tome.tools.vlm_train`).
        path: PNG file to write (needs matplotlib, the ``plot`` extra).
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(logs), figsize=(5.5 * len(logs), 3.6), squeeze=False)
    for axis, (title, log) in zip(axes[0], logs.items()):
        entries = [json.loads(line) for line in open(log)]
        validations = {e["step"]: e["val"] for e in entries if "val" in e}  # a resumed step's last one wins
        steps = sorted(validations)
        for name in vqa.SLICES:
            axis.plot(steps, [100 * validations[s]["slices"][name] for s in steps], marker=".", label=name)
            axis.axhline(100 / len(vqa.ANSWERS[name]), color=axis.lines[-1].get_color(), lw=0.6, ls=":")
        axis.plot(steps, [100 * validations[s]["overall"] for s in steps], color="black", lw=2, label="overall")
        axis.set(title=title, xlabel="training step (16 questions each)", ylabel="val accuracy %", ylim=(0, 100))
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _run(args: argparse.Namespace) -> int:
    model, processor = vlm_models.load_demo_vlm(args.model)
    rows = answer_questions(model, processor, range(args.first, args.first + args.count), args.seed)
    for row in rows:
        mark = "ok " if row["correct"] else "-- "
        print(f"{mark}[{row['slice']:7s}] {row['question']:<48s} true: {row['answer']:<7s} model: {row['predicted']}")
    print(f"{sum(r['correct'] for r in rows)}/{len(rows)} correct")
    return 0


def _build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", choices=sorted(vlm_models.SHIPPED_VLMS), default="vqa-qwen2_5_vl",
                        help="shipped model (default: %(default)s)")
    parser.add_argument("--count", type=int, default=10, help="questions to ask (default: %(default)s)")
    parser.add_argument("--first", type=int, default=0, help="first validation index (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task (default: %(default)s)")
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome vlm-demo`` (the lead wires it into ``tome.cli``)."""
    parser = subparsers.add_parser("vlm-demo", help="a shipped VLM answers generated questions, offline",
                                   description=__doc__.split("\n\n")[0])
    _build_parser(parser)
    parser.set_defaults(func=_run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m tome.tools.vlm_demo ...``."""
    parser = _build_parser(argparse.ArgumentParser(prog="python -m tome.tools.vlm_demo",
                                                   description=__doc__.split("\n\n")[0]))
    return _run(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    raise SystemExit(main())
