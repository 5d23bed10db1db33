"""Accuracy and throughput of a ToMe model on an image folder: ``tome eval``.

Every batch is loaded once and run at every requested r, so one pass over the
data fills the whole table. Under ``torchrun`` each process takes every
``world_size``-th image (no padding, so nothing is counted twice) and the counts
are summed with ``all_reduce``; gloo is used on CPU, NCCL on CUDA. Images that
cannot be read are skipped and reported; a folder where none can be read is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import tome
from tome._benchmark import autocast, time_calls
from tome.export import main_output

from . import _runtime as runtime
from ._common import (
    SCHEDULE_HELP,
    Schedule,
    add_method_argument,
    expand_settings,
    format_table,
    non_negative_int,
    parse_dtype,
    positive_int,
    prepare_output_file,
    progress_bar,
    schedule_json,
    schedule_label,
    schedules_arg,
)
from ._models import (
    add_model_arguments,
    data_config_of,
    input_size_of,
    label_names_of,
    load_model_from_args,
    num_classes_of,
)

__all__ = ["EvalResult", "SkippingImageFolder", "evaluate", "image_folder", "add_parser"]

_SHOWN_SKIPS = 5


class SkippingImageFolder(Dataset):
    """A ``torchvision.datasets.ImageFolder`` whose unreadable images yield ``None``.

    Items are ``(image, label, path)``; ``image`` is None when the file could not
    be decoded. :func:`collate_skipping` drops those and reports their paths.
    Images are read with :func:`tome.data.open_image` (16-bit images scaled to 8 bit).
    Class directories named ``<number>_<name>`` (``tome data export``) are class
    ``<name>`` (see :func:`tome.data.class_names`).

    Args:
        root: Directory with one sub-directory per class.
        transform: Applied to each 8-bit RGB ``PIL.Image``.
        label_names: The model's class names in label order; when every class of the
            folder is among them, labels follow the model's order instead of the
            sorted directory order.
    """

    def __init__(self, root: str, transform: Any = None, label_names: Optional[Sequence[str]] = None) -> None:
        from torchvision.datasets import ImageFolder

        from tome.data import class_names, open_image

        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r} is not a directory")
        try:
            self.folder = ImageFolder(root, transform=transform, loader=open_image)
        except (FileNotFoundError, RuntimeError) as error:
            # torchvision raises these for a folder without class directories or images.
            raise ValueError(f"--data {root!r} is not an image folder (root/<class>/<image>): {error}") from None
        self.classes: List[str] = class_names(self.folder.classes)
        names = list(label_names or ())
        self.matches_model = bool(names) and all(name in names for name in self.classes)
        self.labels: List[int] = [names.index(name) for name in self.classes] if self.matches_model \
            else list(range(len(self.classes)))

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int, str]:
        path, folder_label = self.folder.samples[index]
        label = self.labels[folder_label]
        try:
            image, _ = self.folder[index]
        except Exception:  # any decoder failure: truncated, not an image, decompression bomb, ...
            return None, label, path
        return image, label, path


def collate_skipping(items: Sequence[Tuple[Optional[torch.Tensor], int, str]]):
    """Batch the readable images; return ``(images or None, labels, skipped paths)``."""
    good = [(image, label) for image, label, _ in items if image is not None]
    skipped = [path for image, _, path in items if image is None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, skipped


def image_folder(root: str, model: nn.Module, overrides: Optional[Dict[str, Any]] = None) -> SkippingImageFolder:
    """The image folder at ``root``, preprocessed with the model's own timm data config.

    When the model names its classes (``pretrained_cfg["label_names"]``, as models
    from ``tome train`` do, or a Hugging Face ``config.id2label``) and the folder's
    classes are among them, labels follow the model's order.
    """
    import timm.data

    config = data_config_of(model, overrides)
    transform = timm.data.create_transform(**config, is_training=False)
    return SkippingImageFolder(root, transform, label_names=label_names_of(model))


@dataclass
class EvalResult:
    """Counts for one merge setting, summed over every process.

    Attributes:
        r: The merge setting (None: the model as it was set).
        method: The merge method (None: the model's own).
        correct1, correct5: Images whose label is the top-1 / within the top-5 prediction.
        total: Images evaluated.
        seconds: Model time (forwards only) of the slowest process.
    """

    r: Optional[Schedule]
    method: Optional[str] = None
    correct1: int = 0
    correct5: int = 0
    total: int = 0
    seconds: float = 0.0

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * self.correct1 / self.total if self.total else float("nan")

    @property
    def top5(self) -> float:
        """Top-5 accuracy in percent."""
        return 100.0 * self.correct5 / self.total if self.total else float("nan")

    @property
    def images_per_s(self) -> float:
        """Images evaluated per second of model time (all processes together)."""
        return self.total / self.seconds if self.seconds else float("nan")

    def as_dict(self) -> Dict[str, Any]:
        return {
            "r": schedule_json(self.r),
            "label": schedule_label(self.r),
            "method": self.method,
            "correct1": self.correct1,
            "correct5": self.correct5,
            "total": self.total,
            "top1": self.top1,
            "top5": self.top5,
            "images_per_s": self.images_per_s,
            "seconds": self.seconds,
        }


@dataclass
class EvalReport:
    """All of ``tome eval``'s results."""

    results: List[EvalResult]
    images: int
    skipped: int
    skipped_examples: List[str] = field(default_factory=list)
    world_size: int = 1

    def as_dict(self) -> Dict[str, Any]:
        return {
            "images": self.images,
            "skipped": self.skipped,
            "skipped_examples": self.skipped_examples,
            "world_size": self.world_size,
            "results": [result.as_dict() for result in self.results],
        }


def count_correct(
    model: nn.Module,
    batches: Iterable[Tuple[Optional[torch.Tensor], torch.Tensor, List[str]]],
    schedules: Sequence[Optional[Schedule]] = (None,),
    *,
    device: torch.device,
    dtype: Optional[torch.dtype] = None,
    methods: Optional[Sequence[Optional[str]]] = None,
) -> Tuple[List[EvalResult], int, List[str]]:
    """Top-1 and top-5 hits of ``model`` over ``batches``, for each merge setting, summed over processes.

    The one evaluation loop of the tools (``tome eval`` and ``tome train``'s validation).
    Each batch is moved to ``device`` once and run at every setting; every forward is
    timed. Call it on every torchrun process, each with its own share of the data.

    Args:
        model: A classifier in eval mode on ``device``, giving logits ``(batch, classes)``.
        batches: ``(images (batch, channels, height, width) or None, labels (batch,), unreadable
            names)`` as :func:`collate_skipping` makes them; a batch without images only counts
            its unreadable ones.
        schedules: Merge settings, each run with :func:`tome.merging`; None runs the model as set.
        device: Where the model runs.
        dtype: Autocast dtype (None or ``torch.float32``: full precision).
        methods: Merge method for each setting (parallel to ``schedules``; None: the model's).

    Returns:
        ``(results, skipped, skipped_examples)``: one :class:`EvalResult` per setting (counts
        summed over all processes, ``seconds`` of the slowest), the number of unreadable images
        over all processes and the first few of their names.
    """
    methods = list(methods) if methods is not None else [None] * len(schedules)
    results = [EvalResult(schedule, method) for schedule, method in zip(schedules, methods)]
    skipped = 0
    examples: List[str] = []
    with torch.inference_mode():
        for images, labels, unreadable in batches:
            skipped += len(unreadable)
            examples += unreadable[: max(0, _SHOWN_SKIPS - len(examples))]
            if images is not None:
                for result in results:
                    _count_batch(model, images.to(device, non_blocking=True), labels.to(device, non_blocking=True),
                                 result, device, dtype)
    counts = runtime.all_sum([float(n) for r in results for n in (r.correct1, r.correct5, r.total)] + [float(skipped)],
                             device)
    seconds = runtime.all_max([r.seconds for r in results], device)
    for index, result in enumerate(results):
        result.correct1, result.correct5, result.total = (int(n) for n in counts[3 * index:3 * index + 3])
        result.seconds = seconds[index]
    examples = [name for part in runtime.all_gather(examples) for name in part][:_SHOWN_SKIPS]
    return results, int(counts[-1]), examples


def _count_batch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, result: EvalResult,
                 device: torch.device, dtype: Optional[torch.dtype]) -> None:
    """Run one batch at ``result``'s setting, timed, and add its hits to ``result``."""
    outputs: List[torch.Tensor] = []

    def forward() -> None:
        with autocast(device, dtype):
            outputs.append(main_output(model(images)))  # Hugging Face models return an output object

    with tome.merging(model, result.r, result.method) if result.r is not None else contextlib.nullcontext():
        result.seconds += time_calls(forward, device)
    logits = outputs[0]
    # Top-1 is the argmax (the first of tied maxima); top-5 any of the 5 highest.
    result.correct1 += int((logits.argmax(dim=-1) == labels).sum())
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    result.correct5 += int((top == labels[:, None]).any(dim=-1).sum())
    result.total += int(labels.numel())


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    schedules: Sequence[Schedule],
    *,
    batch_size: int = 64,
    workers: int = 4,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    warmup: bool = True,
    methods: Optional[Sequence[Optional[str]]] = None,
) -> EvalReport:
    """Top-1/top-5 accuracy and throughput for each merge setting.

    Under torchrun (a process group running), this process evaluates images
    ``rank, rank + world_size, ...`` and the counts of all processes are summed.

    Args:
        model: A ToMe-patched classifier (``model.r`` is restored afterwards).
        dataset: Items ``(image or None, label, path)``, e.g. :class:`SkippingImageFolder`.
        schedules: Merge settings to evaluate, all on the same batches.
        batch_size: Images per forward.
        workers: DataLoader worker processes.
        device: Where to run.
        dtype: Autocast dtype (``torch.float32``: none).
        progress: Show a progress bar (on rank 0).
        warmup: Run each setting once on random input before timing.
        methods: Merge method of each setting, parallel to ``schedules`` (None: the model's own;
            see :func:`tome.tools._common.expand_settings`).

    Returns:
        The counts for each setting and the skipped images.

    Raises:
        ValueError: if the dataset has images but none of them could be read.
    """
    if not hasattr(model, "_tome_info"):
        raise TypeError(f"{type(model).__name__} is not patched for token merging; call tome.apply_patch(model) first")
    rank, world_size = runtime.world()
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skipping,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )
    model.eval().to(device)
    # Untimed warm-up (lazy initialisation, kernel selection) at the batch shape.
    if warmup and len(shard):
        dummy = torch.rand(min(batch_size, len(shard)), *input_size_of(model), device=device)
        with torch.inference_mode():
            for schedule, method in zip(schedules, methods or [None] * len(schedules)):
                with tome.merging(model, schedule, method), autocast(device, dtype):
                    model(dummy)
    batches = progress_bar(loader, enabled=progress and rank == 0, desc="eval", unit="batch", leave=False)
    results, skipped, examples = count_correct(model, batches, schedules, device=device, dtype=dtype,
                                               methods=methods)
    if len(dataset) and results and results[0].total == 0:
        named = ", ".join(examples) or "none named"
        raise ValueError(f"none of the {len(dataset)} images could be read (e.g. {named}); nothing was evaluated")
    return EvalReport(results, len(dataset), skipped, examples, world_size)


def print_report(report: EvalReport) -> None:
    """The ``tome eval`` table and the skipped-image note."""
    base = next((r for r in report.results if r.r == 0), None)
    with_method = any(result.method is not None for result in report.results)
    rows = []
    for result in report.results:
        speedup = f"{result.images_per_s / base.images_per_s:.2f}x" if base and base.images_per_s > 0 else "-"
        method = [result.method or "-"] if with_method else []
        rows.append([schedule_label(result.r), *method, result.top1, result.top5, result.images_per_s, speedup,
                     f"{result.correct1}/{result.total}"])
    headers = ["r", *(["method"] if with_method else []), "top-1 %", "top-5 %", "img/s", "speed-up", "correct/total"]
    print(format_table(headers, rows))
    evaluated = report.results[0].total if report.results else 0
    print(f"{evaluated} of {report.images} images evaluated on {report.world_size} process(es); {report.skipped} skipped")
    if report.skipped:
        print("Unreadable images skipped, e.g.: " + ", ".join(report.skipped_examples))


def run_eval(args: argparse.Namespace) -> EvalReport:
    """``tome eval``: evaluate each r on an image folder and print one table."""
    device = runtime.process_device(args.device)
    with runtime.process_group(device):
        rank, world_size = runtime.world()
        if args.json:
            prepare_output_file(args.json, "--json")
        loaded = load_model_from_args(args, default_to_demo=True)
        if loaded.classifier is False:
            raise ValueError(f"tome eval measures classifiers; --model {args.model!r} is a {type(loaded.model).__name__}, "
                             "which has no classification head (an hf: folder of a ...ForImageClassification model has)")
        schedules = args.r if args.r is not None else ([0, loaded.default_r] if loaded.default_r else [0, 8, 16])
        model = loaded.patch()
        schedules, methods = expand_settings(schedules, args.method)
        dataset = image_folder(args.data, model, loaded.data_overrides)
        num_classes = num_classes_of(model)
        if num_classes and not dataset.matches_model and len(dataset.classes) > num_classes:
            raise ValueError(
                f"--data {args.data!r} has {len(dataset.classes)} classes but the model predicts {num_classes}"
            )
        dtype_name = args.dtype or "fp32"
        if rank == 0:
            print(f"Model: {loaded.description}")
            order = "matched to the model's class names" if dataset.matches_model else "in sorted directory order"
            print(f"Data: {args.data} ({len(dataset)} images, {len(dataset.classes)} classes {order}), "
                  f"{device}, {dtype_name}, {world_size} process(es)")
        report = evaluate(
            model, dataset, schedules, batch_size=args.batch_size, workers=args.workers, device=device,
            dtype=parse_dtype(dtype_name), methods=methods,
        )
        if rank == 0:
            print_report(report)
            if args.json:
                path = Path(args.json)
                path.write_text(json.dumps({"model": loaded.description, "data": str(args.data), **report.as_dict()}, indent=2))
                print(f"Wrote {path}")
        return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="top-1/top-5 and throughput on an image folder for several r (torchrun for several processes)",
        description="Evaluate a classifier with token merging (a timm model, a shipped model, or hf:<id or folder>) "
        "on an ImageFolder (root/<class>/<image>). "
        "Run under torchrun --nproc_per_node N for several processes.",
    )
    add_model_arguments(parser, demo_default=True)
    parser.add_argument("--data", required=True,
                        help="image folder, one sub-directory per class: matched by name to the model's classes when "
                        "it names them (models from tome train), else in sorted order as the model's labels")
    parser.add_argument("-r", "--r", type=schedules_arg, default=None,
                        help=f"{SCHEDULE_HELP} (default: 0,8,16, or 0 and the checkpoint's r for a published ToMe "
                        "checkpoint)")
    add_method_argument(parser, "each r > 0 is evaluated with each method")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward (default: %(default)s)")
    parser.add_argument("--workers", type=non_negative_int, default=min(4, os.cpu_count() or 1),
                        help="data loading processes per rank (default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda (default: cuda when available; each torchrun rank takes its own GPU)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="autocast dtype (default: fp32)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.set_defaults(func=run_eval)
