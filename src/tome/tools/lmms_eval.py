"""Evaluate vision-language models with visual-token reduction in lmms-eval, and export the generated task for it.

`lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ is the harness VLM papers report
with (MME, POPE, GQA, TextVQA, ...). This module plugs the library into it without a fork:

- **The model** ``tome_vlm``, registered through the ``lmms_eval.models`` entry point of this
  package (:func:`manifests`), is lmms-eval's own Hugging Face chat model (``huggingface``:
  its chat templates, batching and ``generate`` loop) with ``tome.apply_patch(model,
  visual_tokens=..., method=...)`` applied to the model it loaded::

      lmms-eval --model tome_vlm \\
          --model_args pretrained=Qwen/Qwen2.5-VL-3B-Instruct,visual_tokens=64,method=pool \\
          --tasks pope --batch_size 1

  ``visual_tokens`` is an int (tokens per image or video), a fraction in ``(0, 1]`` or
  ``none`` (no reduction: the unpatched model's answers); ``method`` names a method of
  :mod:`tome.visual_tokens`; ``positions``, ``seed`` and ``prop_attn`` are passed on to
  ``apply_patch`` too.
  Every other ``--model_args`` key is the ``huggingface`` model's (``device``,
  ``attn_implementation``, ``max_num_frames``, ...), except that ``device_map`` defaults to
  ``device`` (not ``"auto"``), so ``device=cpu`` runs on the CPU.
- **The task**: :func:`export_task` (``tome vlm-export-task``) writes questions of the
  generated task (:mod:`tome.data.vqa`) as a local lmms-eval task folder (images, a jsonl,
  the task YAML and its ``utils.py``) for ``--include_path``; the metric is exact match of
  the one-word answer, overall and per slice.

lmms-eval is imported only inside the functions that need it (install it with the ``lmms``
extra); this module is imported by lmms-eval, never by the rest of the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..data import vqa

__all__ = ["MODEL_NAME", "TASK_NAME", "manifests", "parse_visual_tokens", "export_task", "add_parser", "main"]

MODEL_NAME = "tome_vlm"
"""The name lmms-eval knows the wrapper by (``--model tome_vlm``)."""

TASK_NAME = "tome_vqa"
"""Default name of the exported task (``--tasks tome_vqa``)."""


def manifests() -> List[Any]:
    """The payload of the ``lmms_eval.models`` entry point: one ``ModelManifest`` for ``tome_vlm``.

    lmms-eval calls this when it builds its model registry (``lmms_eval.models``); the class is
    imported only when ``--model tome_vlm`` is asked for.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, chat_class_path=f"{__name__}.TomeVLM")]


def parse_visual_tokens(value: Any) -> Optional[Union[int, float]]:
    """``visual_tokens`` from a ``--model_args`` value: an int, a fraction, or no reduction.

    lmms-eval hands ``key=value`` strings over already converted (``"64"`` -> 64,
    ``"0.25"`` -> 0.25); strings are accepted too, for the Python API.

    Args:
        value: An int ``>= 1`` (tokens per image or video), a float in ``(0, 1]`` (the
            fraction kept), or None / ``"none"`` / ``""`` (keep every token).

    Returns:
        The budget for ``tome.apply_patch(..., visual_tokens=...)``.

    Raises:
        ValueError: for a boolean, a number out of range or a string that is none of these.
    """
    from ..visual_tokens import check_budget

    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "null"):
            return None
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"visual_tokens={value!r} is not valid; expected an int >= 1 (tokens per image or "
                                 "video), a float in (0, 1] (the fraction kept) or 'none'") from None
    check_budget(value)  # ValueError naming the value and what is valid
    return value


class _ProcessorCall:
    """A processor as lmms-eval 0.7.3's ``huggingface`` model calls it, made right for transformers 5.

    That model calls ``processor(text=..., images=..., videos=..., audios=...)`` with empty
    lists for the media a request has none of; transformers 5 refuses ``audios`` (renamed
    ``audio``), and processors without a video or audio side refuse those keywords. Empty
    media are left out and ``audios`` is passed as ``audio``; everything else is the processor's.
    """

    def __init__(self, processor: Any) -> None:
        self.__dict__["_processor"] = processor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_processor"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "audios" in kwargs:
            kwargs["audio"] = kwargs.pop("audios")
        for key in ("images", "videos", "audio"):
            if key in kwargs and kwargs[key] is not None and len(kwargs[key]) == 0:
                del kwargs[key]
        return self.__dict__["_processor"](*args, **kwargs)


def _wrapper_class() -> type:
    """Build ``TomeVLM`` (a subclass of lmms-eval's ``huggingface`` chat model) on first use."""
    from unittest import mock

    from lmms_eval.models.chat import huggingface
    from lmms_eval.models.chat.huggingface import Huggingface
    from transformers import AutoModelForImageTextToText

    import tome
    from tome.patch import VisualTokenSettings

    class TomeVLM(Huggingface):
        """lmms-eval's Hugging Face chat model with ``tome.apply_patch`` on the loaded model.

        Args:
            pretrained: A hub id or a ``save_pretrained`` folder of a supported VLM (with its processor).
            visual_tokens: Visual tokens each image or video passes on: an int, a float in
                ``(0, 1]`` or ``"none"`` (:func:`parse_visual_tokens`).
            method: A method of :data:`tome.visual_tokens.METHODS`; the library's default when None.
            positions: Where merged or kept tokens sit in 1-D models (``"keep"`` or
                ``"renumber"``); the library's default when None.
            seed: Seed of ``method=random`` (drawn afresh every forward when None).
            prop_attn: Proportional attention over merged tokens in the language model
                (``VisualTokenSettings.prop_attn``); the library's default when None.
            device: Where the model runs (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
            device_map: Passed to ``from_pretrained``; ``device`` when None (``"auto"`` shards
                a model over the visible GPUs, as lmms-eval's default does).
            **kwargs: The ``huggingface`` model's other arguments (``batch_size``,
                ``attn_implementation``, ``max_num_frames``, ``system_prompt``, ...).

        Raises:
            ValueError: for a bad ``visual_tokens``, ``method``, ``positions``, ``seed`` or ``prop_attn``, before
                the model is loaded.
            TypeError: from ``tome.apply_patch`` if the model is not a supported VLM.
        """

        is_simple = False

        def __init__(self, pretrained: str, visual_tokens: Any = None, method: Optional[str] = None,
                     positions: Optional[str] = None, seed: Optional[int] = None, prop_attn: Optional[bool] = None,
                     device: Optional[str] = "cuda", device_map: Optional[str] = None, **kwargs: Any) -> None:
            budget = parse_visual_tokens(visual_tokens)
            given = {"method": method, "positions": positions, "seed": seed, "prop_attn": prop_attn}
            options = {name: value for name, value in given.items() if value is not None}
            VisualTokenSettings(visual_tokens=budget, **options).validate()  # fail before a long load
            # lmms-eval 0.7.3 picks the model class by testing ``config.model_type`` against the
            # keys of the auto classes' mappings, which are config classes: the test never passes
            # and every model loads with ``AutoModel``, the VLM's base model without its language
            # head (no ``generate``). Its fallback is made the image-text-to-text class instead.
            with mock.patch.object(huggingface, "AutoModel", AutoModelForImageTextToText):
                super().__init__(pretrained=pretrained, device=device, device_map=device_map or device, **kwargs)
            self.processor = _ProcessorCall(self.processor)
            tome.apply_patch(self.model, visual_tokens=budget, **options)
            self.visual_tokens = budget

    TomeVLM.__module__ = __name__
    TomeVLM.__qualname__ = "TomeVLM"
    return TomeVLM


_CLASSES: Dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # ``TomeVLM`` is built on first access so that importing this module needs no lmms-eval.
    if name == "TomeVLM":
        if name not in _CLASSES:
            _CLASSES[name] = _wrapper_class()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The exported task's helpers: plain Python (PIL only), so the folder needs no tome to run.
_UTILS = '''"""lmms-eval helpers of a task exported by `tome vlm-export-task` (tome.tools.lmms_eval)."""

from pathlib import Path

from PIL import Image

SLICES = {slices!r}
_HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    with Image.open(_HERE / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def _normalise(text):
    words = text.strip().lower().rstrip(".").split()
    return " ".join(words)


def process_results(doc, results):
    correct = float(_normalise(results[0]) == doc["answer"])
    per_slice = {{"slice": doc["slice"], "correct": correct}}
    return {{"accuracy": correct, **{{f"accuracy_{{name}}": per_slice for name in SLICES}}}}


def _slice_mean(name):
    def aggregate(items):
        scores = [item["correct"] for item in items if item["slice"] == name]
        return sum(scores) / len(scores) if scores else float("nan")

    aggregate.__name__ = f"aggregate_{{name}}"
    return aggregate


{aggregators}
'''


def _task_yaml(task: str, data_file: Path, cache_dir: Path, split: str) -> str:
    metrics = "\n".join(
        f"  - metric: accuracy_{name}\n    aggregation: !function utils.aggregate_{name}\n    higher_is_better: true"
        for name in vqa.SLICES)
    return f"""# Written by `tome vlm-export-task` (tome.tools.lmms_eval): questions of tome.data.vqa.
# The data file's path is absolute: export again after moving the folder.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {json.dumps(str(data_file))}
  cache_dir: {json.dumps(str(cache_dir))}
test_split: {split}
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 2
  temperature: 0
  do_sample: false
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
{metrics}
metadata:
  version: 1.0
"""


def export_task(output: Union[str, Path], split: str = "val", count: int = 250, first: int = 0, seed: int = 0,
                image_size: int = 224, task: str = TASK_NAME) -> Path:
    """Write questions of the generated task as a local lmms-eval task folder.

    The folder holds ``images/<split>_<index>.png``, ``<task>.jsonl`` (one question per line:
    ``question_id``, ``index``, ``image``, ``question``, ``answer``, ``slice``), ``<task>.yaml``
    and ``utils.py``. ``lmms-eval --include_path <output> --tasks <task> ...`` then asks each
    question once (greedy, at most two new tokens) and reports ``accuracy`` (exact match of
    the answer word, case and a final full stop ignored) and ``accuracy_<slice>`` for each
    slice of :data:`tome.data.vqa.SLICES`.

    Args:
        output: The folder to write (created; files of an earlier export are replaced).
        split: ``"train"`` or ``"val"``.
        count: Number of questions (consecutive indices, so the slices take turns).
        first: Index of the first question.
        seed: Seed of the task.
        image_size: Image side in pixels (224 for the shipped models).
        task: The task's name in lmms-eval (letters, digits and ``_``).

    Returns:
        The folder, as an absolute path.

    Raises:
        ValueError: for a count below 1, a negative first index, a task name that is not an
            identifier, or what :func:`tome.data.vqa.make_sample` refuses.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"first must be a non-negative int, got {first!r}")
    if not isinstance(task, str) or not task.isidentifier():
        raise ValueError(f"task must be a name of letters, digits and '_', got {task!r}")
    folder = Path(output).resolve()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(first, first + count):
        sample = vqa.make_sample(index, split, seed, image_size)
        image = f"images/{split}_{index:06d}.png"
        vqa.to_pil(sample).save(folder / image)
        rows.append({"question_id": f"{split}-{seed}-{index}", "index": index, "image": image,
                     "question": sample.question, "answer": sample.answer, "slice": sample.slice})
    data_file = folder / f"{task}.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{task}.yaml").write_text(_task_yaml(task, data_file, folder / ".cache", split))
    aggregators = "\n".join(f"aggregate_{name} = _slice_mean({name!r})" for name in vqa.SLICES)
    (folder / "utils.py").write_text(_UTILS.format(slices=tuple(vqa.SLICES), aggregators=aggregators))
    return folder


def _run(args: argparse.Namespace) -> int:
    folder = export_task(args.output, args.split, args.count, args.first, args.seed, args.image_size, args.task)
    print(f"wrote {args.count} questions to {folder}; evaluate with:\n"
          f"  lmms-eval --model {MODEL_NAME} --model_args pretrained=MODEL,device=cpu,visual_tokens=16,method=pool "
          f"--include_path {folder} --tasks {args.task} --batch_size 8")
    return 0


def _build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--output", required=True, help="folder to write the task to")
    parser.add_argument("--split", choices=["train", "val"], default="val", help="split (default: %(default)s)")
    parser.add_argument("--count", type=int, default=250, help="number of questions (default: %(default)s)")
    parser.add_argument("--first", type=int, default=0, help="first question index (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--task", default=TASK_NAME, help="task name in lmms-eval (default: %(default)s)")
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome vlm-export-task``."""
    parser = subparsers.add_parser("vlm-export-task", help="write generated questions as a local lmms-eval task",
                                   description="Write questions of the generated visual-question task as a local "
                                               "lmms-eval task folder (for --include_path).")
    _build_parser(parser)
    parser.set_defaults(func=_run)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m tome.tools.lmms_eval ...`` (the same options as ``tome vlm-export-task``)."""
    parser = _build_parser(argparse.ArgumentParser(prog="python -m tome.tools.lmms_eval",
                                                   description="Write generated questions as a local lmms-eval task."))
    return _run(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    raise SystemExit(main())
