"""``tome train``: train or fine-tune a timm Vision Transformer with token merging active.

The recipe is the usual ViT one (AdamW, linear warm-up then cosine decay, label
smoothing, gradient clipping, mixed precision where it pays) with a ToMe schedule
set on the model for every training forward, as in Bolya et al., "Token Merging:
Your ViT but Faster" (ICLR 2023, section 4.3: training with ToMe). Gradients flow
through the size-weighted averages of merged tokens; the matching itself is a
discrete choice and passes none.

Data is the generated task of :mod:`tome.data.synthetic` (``data="synthetic"``) or
any ImageFolder tree with ``train/`` and ``val/`` sub-directories. Run under
``torchrun --nproc-per-node N`` to train with DistributedDataParallel (gloo on
CPU, NCCL on GPU); the batch size is global, so the recipe does not change with N
(results agree up to floating-point rounding).

    from tome.tools.train import TrainConfig, train
    result = train(TrainConfig(train_size=9600, r=8, output_dir="outputs/quick"))

Trained models are written as ``<name>.safetensors`` plus ``<name>.json`` (the
architecture, ``pretrained_cfg`` and how it was trained) and read back with
:func:`load_model`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

import tome
from tome._schedule import RSchedule, check_r
from tome.tools import _runtime as runtime
from tome.tools._common import model_kwarg_arg, parse_model_kwargs, parse_schedule, schedule_label

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "build_model",
    "build_datasets",
    "save_model",
    "load_model",
    "add_parser",
    "config_to_command",
    "parse_schedule",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "tome-train-checkpoint/2"  # 2: timm's optimizer parameter groups
MODEL_NAME = "model"
MODEL_FORMAT = "tome-model/1"


@dataclass
class TrainConfig:
    """Everything that defines a training run (validated by :meth:`validate`).

    The defaults are the recipe of the model shipped in ``tome/assets`` (see docs/results.md).

    Attributes:
        model: timm model name; the architecture, not weights (never downloaded).
        model_kwargs: Extra ``timm.create_model`` arguments, e.g. ``{"depth": 6, "patch_size": 8}``.
        image_size: Input height and width in pixels.
        data: ``"synthetic"`` for :class:`tome.data.SyntheticShapes`, or a directory
            holding ``train/`` and ``val/`` ImageFolder trees.
        train_size: Training images of the synthetic task (ignored for a directory).
        val_size: Validation images of the synthetic task; for a directory, at most
            this many (a fixed, evenly spaced subset), 0 for all.
        data_seed: Seed of the synthetic task.
        epochs: Passes over the training set.
        batch_size: Global batch size (split evenly over torchrun processes).
        lr: Peak learning rate (AdamW).
        min_lr: Learning rate at the end of the cosine decay.
        weight_decay: AdamW weight decay (not applied to biases, norms and tokens).
        warmup_epochs: Linear warm-up length, in epochs (fractions allowed).
        label_smoothing: Cross-entropy label smoothing in [0, 1).
        grad_clip: Clip the global gradient norm to this (0 or None: no clipping).
        drop_path: Stochastic depth rate of the model.
        r: ToMe schedule during training (int, per-layer list or ``(r, inflection)``); 0 trains without merging.
        prop_attn: Proportional attention while merging.
        amp: ``"auto"`` (bf16/fp16 autocast on CUDA, none on CPU), ``"off"``, ``"bf16"`` or ``"fp16"`` (CUDA only).
        init: Weights to start from (fine-tuning): a ``.safetensors`` file saved by
            :func:`save_model`, or a training checkpoint ``.pt``.
        output_dir: Where checkpoints, ``log.jsonl`` and the final model go (None: nothing is written).
        resume: A checkpoint to continue from, or ``"auto"`` for ``output_dir/checkpoint.pt`` when it exists.
        overwrite: Start afresh in an ``output_dir`` that already holds a run: its checkpoint,
            ``log.jsonl`` and exported model are deleted first. Without it (and without
            ``resume``) such a directory is refused, so a forgotten ``resume`` loses nothing.
        checkpoint_every: Also checkpoint every this many steps (0: only at the end of each epoch).
        stop_after: Stop once this many steps are done in all (after checkpointing), to split a
            run into slices; continue it with ``resume``. None runs to the end.
        val_every: Validate every this many epochs (0: only after the last one).
        num_workers: DataLoader worker processes per training process.
        seed: Seed for initialisation and data order.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA when available.
        progress: Show tqdm progress bars (first process only).
        export_name: File stem of the final model in ``output_dir``.
    """

    model: str = "vit_tiny_patch16_224"
    model_kwargs: Dict[str, Any] = field(
        default_factory=lambda: {"embed_dim": 128, "num_heads": 4, "depth": 6, "patch_size": 8}
    )
    image_size: int = 64
    data: str = "synthetic"
    train_size: int = 96_000
    val_size: int = 2_000
    data_seed: int = 0
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: Optional[float] = 1.0
    drop_path: float = 0.0
    r: RSchedule = 0
    prop_attn: bool = True
    amp: str = "auto"
    init: Optional[str] = None
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    checkpoint_every: int = 0
    stop_after: Optional[int] = None
    val_every: int = 1
    num_workers: int = 0
    seed: int = 0
    device: Optional[str] = None
    progress: bool = True
    export_name: str = MODEL_NAME

    def validate(self) -> "TrainConfig":
        """Check every field; returns ``self``.

        Raises:
            ValueError: naming the first bad field and its value.
        """

        def positive_int(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                kind = "a non-negative" if allow_zero else "a positive"
                raise ValueError(f"{name} must be {kind} int, got {value!r}")

        def number(name: str, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if value < low or (low_open and value == low) or value > high or (high_open and value == high):
                left, right = "(" if low_open else "[", ")" if high_open else "]"
                raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {value!r}")

        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a timm model name, got {self.model!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict, got {self.model_kwargs!r}")
        for reserved in ("pretrained", "num_classes", "img_size", "drop_path_rate"):
            if reserved in self.model_kwargs:
                raise ValueError(
                    f"model_kwargs may not set {reserved!r} ({self.model_kwargs[reserved]!r}); it follows from "
                    "the data, image_size and drop_path settings"
                )
        positive_int("image_size")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be 'synthetic' or a directory, got {self.data!r}")
        positive_int("train_size")
        positive_int("val_size", allow_zero=True)
        for name in ("epochs", "batch_size"):
            positive_int(name)
        for name in ("checkpoint_every", "val_every", "num_workers"):
            positive_int(name, allow_zero=True)
        if self.stop_after is not None and (
            isinstance(self.stop_after, bool) or not isinstance(self.stop_after, int) or self.stop_after < 1
        ):
            raise ValueError(f"stop_after must be a positive int or None, got {self.stop_after!r}")
        if isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int):
            raise ValueError(f"data_seed must be an int, got {self.data_seed!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        number("lr", 0.0, low_open=True)
        number("min_lr", 0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr!r}) must not exceed lr ({self.lr!r})")
        number("weight_decay", 0.0)
        number("warmup_epochs", 0.0)
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs!r}) must not exceed epochs ({self.epochs!r})")
        number("label_smoothing", 0.0, 1.0, high_open=True)
        if self.grad_clip is not None:
            number("grad_clip", 0.0)
        number("drop_path", 0.0, 1.0, high_open=True)
        check_r(self.r)
        if self.amp not in runtime.AMP_CHOICES:
            raise ValueError(f"amp must be one of {runtime.AMP_CHOICES}, got {self.amp!r}")
        if self.resume is not None and self.resume != "auto" and not Path(self.resume).is_file():
            raise ValueError(f"resume checkpoint {self.resume!r} does not exist")
        if self.resume == "auto" and self.output_dir is None:
            raise ValueError("resume='auto' needs output_dir (it looks for output_dir/checkpoint.pt)")
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"overwrite must be a bool, got {self.overwrite!r}")
        if self.overwrite and self.resume is not None:
            raise ValueError(f"overwrite=True starts afresh and resume={self.resume!r} continues a run; pass one of them")
        if self.init is not None and not Path(self.init).is_file():
            raise ValueError(f"init weights {self.init!r} do not exist")
        if not isinstance(self.export_name, str) or not self.export_name or "/" in self.export_name:
            raise ValueError(f"export_name must be a plain file stem, got {self.export_name!r}")
        return self


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: The trained model (unwrapped, in eval mode, still patched with the training ``r``).
        val_accuracy: Top-1 accuracy in [0, 1] after the last epoch, with the training ``r``
            (None without validation data).
        history: One dict per epoch: ``epoch``, ``step``, ``train_loss``, ``skipped_images`` (unreadable
            training images), ``val_accuracy``, ``seconds``.
        wall_seconds: Wall-clock time of the run (a resumed run adds the time of its earlier parts).
        cpu_seconds: CPU time of this process (all its threads), counted the same way.
        model_path: The exported ``.safetensors`` file (None without ``output_dir``).
    """

    model: nn.Module
    val_accuracy: Optional[float]
    history: List[Dict[str, Any]]
    wall_seconds: float
    cpu_seconds: float
    model_path: Optional[Path] = None


# ---------------------------------------------------------------------------------------------
# Model and data


def build_model(config: TrainConfig, num_classes: int, class_names: Sequence[str] = (),
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> nn.Module:
    """The timm model described by ``config`` (random weights), with a ``pretrained_cfg`` that matches it.

    Raises:
        ValueError: if timm does not know ``config.model`` or rejects ``model_kwargs``.
    """
    return _create(config.model, dict(config.model_kwargs), config.image_size, num_classes, class_names,
                   mean, std, drop_path=config.drop_path)


def _create(architecture: str, model_kwargs: Dict[str, Any], image_size: int, num_classes: int,
            class_names: Sequence[str], mean: Sequence[float], std: Sequence[float], drop_path: float = 0.0) -> nn.Module:
    import timm

    if not timm.is_model(architecture):
        raise ValueError(f"model={architecture!r} is not a timm model name (see timm.list_models())")
    # The overlay replaces the named weights' metadata: these weights are not those.
    overlay = {
        "input_size": (3, image_size, image_size),
        "fixed_input_size": True,
        "mean": tuple(mean),
        "std": tuple(std),
        "num_classes": num_classes,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "url": "",
        "hf_hub_id": "",
        "tag": "",
        "custom_load": False,
    }
    if class_names:
        overlay["label_names"] = list(class_names)
    try:
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes, img_size=image_size,
                                 drop_path_rate=drop_path, pretrained_cfg_overlay=overlay, **model_kwargs)
    except TypeError as error:
        raise ValueError(f"timm rejected model_kwargs={model_kwargs!r} for {architecture!r}: {error}") from error


class _Resized:
    """Resize a PIL image to a square of ``size`` (bicubic) before :func:`tome.data.image_to_tensor`."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        from tome.data import image_to_tensor

        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC)
        return image_to_tensor(image, self.mean, self.std)


def build_datasets(config: TrainConfig) -> Tuple[Dataset, Optional[Dataset], List[str]]:
    """``(train, val, class_names)`` for ``config.data``; ``val`` is None when there is none.

    Raises:
        ValueError: if ``config.data`` is neither ``"synthetic"`` nor a directory with ``train/``.
    """
    from tome import data as tdata

    if config.data == "synthetic":
        transform = _Resized(config.image_size, tdata.MEAN, tdata.STD)
        train_set = tdata.SyntheticShapes("train", config.train_size, config.data_seed, config.image_size, transform)
        val_set = (tdata.SyntheticShapes("val", config.val_size, config.data_seed, config.image_size, transform)
                   if config.val_size else None)
        return train_set, val_set, list(tdata.CLASSES)
    root = Path(config.data)
    if not (root / "train").is_dir():
        raise ValueError(f"data={config.data!r} must be 'synthetic' or a directory with train/ (and val/) inside")
    mean, std = _data_stats(root)
    transform = _Resized(config.image_size, mean, std)
    train_set = tdata.ImageFolder(root / "train", transform)
    val_set: Optional[Dataset] = None
    if (root / "val").is_dir():
        val_set = tdata.ImageFolder(root / "val", transform, classes=train_set.classes)
        if config.val_size and config.val_size < len(val_set):
            step = len(val_set) / config.val_size
            val_set = torch.utils.data.Subset(val_set, [int(i * step) for i in range(config.val_size)])
    return train_set, val_set, list(train_set.classes)


class _SkipUnreadable(Dataset):
    """Items ``(image, label, "")``, or ``(None, -1, name)`` for an image that cannot be read.

    As in ``tome eval``, one broken file is skipped and named rather than fatal;
    :func:`tome.tools.evaluate.collate_skipping` batches these items.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int, str]:
        try:
            image, label = self.dataset[index]
        except Exception:  # any decoder failure: truncated, not an image, decompression bomb, ...
            return None, -1, _item_name(self.dataset, index)
        return image, label, ""


def _item_name(dataset: Any, index: int) -> str:
    """The file behind ``dataset[index]`` (through ``Subset``s), else ``"item <index>"``."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else f"item {index}"


_SHOWN_SKIPS = 5


def _warn_skipped(count: int, names: List[str], where: str) -> None:
    """One warning (first process) naming a few of the ``count`` unreadable images skipped in ``where``.

    ``count`` and ``names`` are over all processes.
    """
    if count and runtime.world()[0] == 0:
        warnings.warn(f"{count} unreadable image(s) skipped in {where}, e.g. {', '.join(names[:_SHOWN_SKIPS])}",
                      stacklevel=3)


def _data_stats(root: Path) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Normalisation of an ImageFolder export: from its ``dataset.json`` if any, else ImageNet's."""
    info = root / "dataset.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        if "mean" in meta and "std" in meta:
            return tuple(meta["mean"]), tuple(meta["std"])
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _EpochBatchSampler(Sampler[List[int]]):
    """This process's batches of one epoch, from step ``start`` on (a resumed epoch skips the done ones).

    Every process draws the same seeded permutation; step ``i`` uses global positions
    ``[i * batch_size, (i + 1) * batch_size)``, of which process ``rank`` takes its slice. So
    the images of a step do not depend on the number of processes. The incomplete last batch
    is dropped.
    """

    def __init__(self, num_items: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0) -> None:
        self.num_items, self.batch_size, self.epoch, self.seed = num_items, batch_size, epoch, seed
        self.rank, self.world, self.start = rank, world, start

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.start

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        local = self.batch_size // self.world
        for step in range(self.start, self.num_items // self.batch_size):
            first = step * self.batch_size + self.rank * local
            yield order[first:first + local]


def _lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``.

    Not timm's ``CosineLRScheduler``: its warm-up rises from ``warmup_lr_init`` as
    ``init + step * (1 - init) / warmup`` and cannot give this ``(step + 1) / warmup``, with
    which the shipped model was trained.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_model(model: nn.Module, path: Union[str, Path], metadata: Optional[Dict[str, Any]] = None,
               dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` as ``path`` (``.safetensors``) plus a JSON description next to it.

    The JSON records the timm architecture and constructor arguments, the
    ``pretrained_cfg`` (input size, normalisation, class names) and ``metadata``.

    Args:
        model: A timm ViT built by :func:`build_model` (patched or not).
        path: Target ``.safetensors`` file; the JSON is ``path`` with suffix ``.json``.
        metadata: Extra JSON-serialisable information (how it was trained, accuracy...).
        dtype: Store floating-point tensors in this dtype (e.g. ``torch.float16`` to halve the size).

    Returns:
        The ``.safetensors`` path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model path must end in .safetensors, got {str(path)!r}")
    spec = getattr(model, "_tome_train_spec", None)
    if spec is None:
        raise ValueError("save_model needs a model made by tome.tools.train.build_model or load_model")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    save_file(state, str(path), metadata={"format": MODEL_FORMAT})
    cfg = model.pretrained_cfg
    description = {
        "format": MODEL_FORMAT,
        "architecture": spec["architecture"],
        "model_kwargs": spec["model_kwargs"],
        "image_size": spec["image_size"],
        "num_classes": spec["num_classes"],
        "pretrained_cfg": {
            "input_size": list(cfg["input_size"]),
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "label_names": list(cfg.get("label_names", [])),
        },
        **(metadata or {}),
    }
    path.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    return path


def load_model(path: Union[str, Path]) -> Tuple[nn.Module, Dict[str, Any]]:
    """Read a model written by :func:`save_model`; returns ``(model in eval mode, its JSON description)``.

    Weights come back as float32 whatever dtype they were stored in.

    Args:
        path: The ``.safetensors`` file or its ``.json``.

    Raises:
        FileNotFoundError: if either file is missing.
        ValueError: if the JSON is not a tome model description.
    """
    from tome.tools.checkpoints import _safetensors_load

    path = Path(path)
    weights, description_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for required in (weights, description_path):
        if not required.is_file():
            raise FileNotFoundError(f"model file {str(required)!r} does not exist")
    try:
        description = json.loads(description_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(description_path)!r} is not a {MODEL_FORMAT} JSON description: {error}") from None
    if not isinstance(description, dict) or description.get("format") != MODEL_FORMAT:
        raise ValueError(f"{str(description_path)!r} is not a {MODEL_FORMAT} description")
    state = {name: tensor.float() if tensor.is_floating_point() else tensor
             for name, tensor in _safetensors_load(weights).items()}
    missing = [key for key in ("architecture", "model_kwargs", "image_size", "num_classes", "pretrained_cfg")
               if key not in description]
    if missing:
        raise ValueError(f"{str(description_path)!r} lacks {missing}; save_model writes them")
    cfg = description["pretrained_cfg"]
    model = _create(description["architecture"], dict(description["model_kwargs"]), description["image_size"],
                    description["num_classes"], cfg.get("label_names", ()), cfg["mean"], cfg["std"])
    model.load_state_dict(state)
    model._tome_train_spec = _spec(description["architecture"], description["model_kwargs"],
                                   description["image_size"], description["num_classes"])
    return model.eval(), description


def _spec(architecture: str, model_kwargs: Dict[str, Any], image_size: int, num_classes: int) -> Dict[str, Any]:
    return {"architecture": architecture, "model_kwargs": dict(model_kwargs), "image_size": image_size,
            "num_classes": num_classes}


def _load_init(model: nn.Module, init: str) -> None:
    """Load starting weights for fine-tuning from a ``.safetensors`` model or a checkpoint.

    A checkpoint is read with ``weights_only=True``: a file that would run code is refused.
    """
    from tome.tools.checkpoints import read_state_dict

    if init.endswith(".safetensors") or init.endswith(".json"):
        source, _ = load_model(init)
        state = source.state_dict()
    else:
        # An absolute path is never mistaken for a published checkpoint name or a URL.
        state = read_state_dict(os.path.abspath(init))
    own = model.state_dict()
    mismatched = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(f"init weights {init!r} do not fit the model: {len(mismatched)} tensors differ, e.g. {mismatched[:3]}")
    model.load_state_dict(state)


def _prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and check that files can be written there, before any training.

    Raises:
        ValueError: naming ``out_dir`` when it is a file, lies under one, or is not writable.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output_dir {str(out_dir)!r} is a file, not a directory; pass a directory (it is created)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output_dir {str(out_dir)!r} cannot be written to ({error.strerror or error}); "
                         "pass a writable directory") from None


def _run_files(out_dir: Path, export_name: str) -> List[Path]:
    """The files and folders of an earlier run in ``out_dir`` that a new run would replace or extend."""
    names = (CHECKPOINT_NAME, "log.jsonl", f"{export_name}.safetensors", f"{export_name}.json", f"{export_name}-timm")
    return [out_dir / name for name in names if (out_dir / name).exists()]


def _check_earlier_run(config: TrainConfig, out_dir: Path) -> None:
    """Refuse to start a fresh run over an earlier one unless ``resume`` or ``overwrite`` says what to do.

    Raises:
        ValueError: naming ``out_dir`` and the files found, when neither is set.
    """
    found = _run_files(out_dir, config.export_name)
    if found and config.resume is None and not config.overwrite:
        raise ValueError(
            f"output_dir {str(out_dir)!r} already holds a run ({', '.join(path.name for path in found)}); "
            "pass --resume auto (resume='auto') to continue it, or --overwrite (overwrite=True) to delete it "
            "and start over, or pick another --output-dir")


def _clear_earlier_run(out_dir: Path, export_name: str) -> None:
    """Delete what an earlier run wrote to ``out_dir`` (``overwrite``), so the new run starts a clean log."""
    import shutil

    for path in _run_files(out_dir, export_name):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _save_checkpoint(path: Path, run: "_Run", epoch_sums: Tuple[float, float, float],
                     rng_states: Dict[str, List[Optional[torch.Tensor]]]) -> None:
    """Everything a resumed run needs to continue bit for bit, in types ``weights_only`` loading accepts.

    ``epoch_sums`` are the loss sum, loss count and skipped images of the current epoch so far,
    over all processes; ``rng_states`` the CPU (``torch_rng``) and CUDA (``cuda_rng``) random
    states of every process after ``run.step`` (drop-path masks draw from them).
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "elapsed": run.elapsed(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),  # empty unless amp is fp16
        "step": run.step,
        "config": _config_dict(run.config),
        "history": run.history,
        "epoch_sums": epoch_sums,
        **rng_states,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


_CHECKPOINT_KEYS = ("model", "optimizer", "step", "config", "history", "torch_rng")


def _read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by :func:`_save_checkpoint`, loaded with ``weights_only=True``.

    Raises:
        ValueError: naming ``path`` when it is not a PyTorch checkpoint, would run code when
            loaded, or is not a ``tome train`` checkpoint.
    """
    from tome.tools.checkpoints import _torch_load

    checkpoint = _torch_load(path)
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"{path!r} is not a tome train checkpoint (it lacks {missing}); resume from the "
                         f"{CHECKPOINT_NAME} that tome train writes in its output directory")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is a checkpoint of an earlier tome train (format {checkpoint.get('format')!r}, "
                         f"this one reads {CHECKPOINT_FORMAT!r}, whose optimizer state is laid out differently); "
                         "finish that run with the tome version that started it, or start again")
    return checkpoint


def _config_dict(config: TrainConfig) -> Dict[str, Any]:
    values = asdict(config)
    if isinstance(values["r"], tuple):
        values["r"] = list(values["r"])
    return values


# Settings that say where and how a run goes, not what it computes: a resumed run may change
# them. Every other field must keep its saved value, or model.json would record a command
# that does not reproduce the run.
_RESUME_FREE = ("resume", "overwrite", "stop_after", "device", "progress", "checkpoint_every", "num_workers", "output_dir",
                "export_name")


def _check_same_run(saved: Dict[str, Any], config: TrainConfig, path: str) -> None:
    """Refuse to resume the checkpoint at ``path`` (its config ``saved``) with settings that change the run.

    Raises:
        ValueError: listing every changed field with its saved and given values.
    """
    defaults = _config_dict(TrainConfig())
    changed = [
        f"{name}: saved {saved.get(name, defaults[name])!r}, given {value!r}"
        for name, value in _config_dict(config).items()
        if name not in _RESUME_FREE and saved.get(name, defaults[name]) != value
    ]
    if changed:
        raise ValueError(
            f"checkpoint {path!r} belongs to another run ({'; '.join(changed)}); resume with the saved settings, "
            "or start the new run in another output_dir"
        )


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 128, device: Union[str, torch.device, None] = None,
             amp: str = "off", progress: bool = False, num_workers: int = 0) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` with whatever ``model.r`` is set.

    Under torchrun each process evaluates a strided share and the counts are summed.

    Args:
        model: A classifier; put in eval mode (and left there).
        dataset: Items ``(image tensor, label)``.
        batch_size: Images per forward (per process).
        device: Where to run; defaults to the model's device.
        amp: ``"off"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` as in :class:`TrainConfig`.
        progress: Show a tqdm bar.
        num_workers: DataLoader workers.

    Returns:
        Accuracy in [0, 1].
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp_dtype = runtime.amp_dtype(amp, device)  # refuses an unknown amp
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    rank, world = runtime.world()
    from tome.tools.evaluate import collate_skipping, count_correct

    share = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    # A generator of its own: validating must not move the global one that training draws from.
    loader = DataLoader(_SkipUnreadable(share), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skipping, generator=torch.Generator().manual_seed(0))
    model.eval()
    batches = tqdm(loader, desc="val", leave=False, disable=not progress or rank != 0)
    (counts,), skipped, names = count_correct(model, batches, device=device, dtype=amp_dtype)
    _warn_skipped(skipped, names, "validation")
    if not counts.total:
        raise ValueError(f"none of the {len(dataset)} validation images could be read")
    return counts.correct1 / counts.total


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class _Run:
    """A training run in progress: built by :func:`_setup`, advanced one epoch at a time by :func:`_train_epoch`.

    ``step`` counts optimiser steps over the whole run; ``elapsed_before`` holds the wall and
    CPU seconds of the earlier parts of a resumed run, ``resumed_sums`` the loss sum, loss
    count and skipped images of the resumed epoch before its checkpoint (over all processes).
    """

    config: TrainConfig
    device: torch.device
    rank: int
    world: int
    autocast: Callable[[], ContextManager]
    model: nn.Module
    wrapped: nn.Module  # the model, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    train_set: Dataset
    val_set: Optional[Dataset]
    out_dir: Optional[Path]
    steps_per_epoch: int
    warmup_steps: int
    started: Tuple[float, float]  # perf_counter and process_time when this part began
    step: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    elapsed_before: Tuple[float, float] = (0.0, 0.0)
    resumed_sums: Tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    def elapsed(self) -> Tuple[float, float]:
        """Wall and CPU seconds of the whole run, earlier parts included."""
        return (self.elapsed_before[0] + time.perf_counter() - self.started[0],
                self.elapsed_before[1] + time.process_time() - self.started[1])

    def set_lr(self) -> float:
        """Set and return the learning rate of the current step."""
        config = self.config
        lr = config.lr * _lr_factor(self.step, self.warmup_steps, self.total_steps, config.min_lr / config.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def _find_checkpoint(config: TrainConfig, out_dir: Optional[Path]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(path, checkpoint)`` to resume from, None for a fresh run; refuses a checkpoint of another run."""
    path = config.resume
    if path == "auto":
        candidate = out_dir / CHECKPOINT_NAME  # type: ignore[operator]
        path = str(candidate) if candidate.is_file() else None
    if path is None:
        return None
    checkpoint = _read_checkpoint(path)
    _check_same_run(checkpoint["config"], config, path)
    return path, checkpoint


def _setup(config: TrainConfig, device: torch.device, out_dir: Optional[Path], checkpoint: Optional[Dict[str, Any]],
           started: Tuple[float, float]) -> _Run:
    """Data, model, optimiser and the rest of a run, continued from ``checkpoint`` when given."""
    from timm.optim import create_optimizer_v2

    from tome import data as tdata

    rank, world = runtime.world()
    amp_dtype = runtime.amp_dtype(config.amp, device)
    torch.manual_seed(config.seed)
    train_set, val_set, class_names = build_datasets(config)
    if len(train_set) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(train_set)} training images")
    mean, std = ((tdata.MEAN, tdata.STD) if config.data == "synthetic" else _data_stats(Path(config.data)))
    model = build_model(config, len(class_names), class_names, mean, std)
    model._tome_train_spec = _spec(config.model, config.model_kwargs, config.image_size, len(class_names))
    if config.init is not None and checkpoint is None:  # a checkpoint's weights replace the init weights
        _load_init(model, config.init)
    tome.apply_patch(model, r=config.r, prop_attn=config.prop_attn)
    model.to(device)
    # timm's AdamW parameter groups: no weight decay on 1-d parameters (biases, norms) and on
    # what the model lists in no_weight_decay() (for a ViT its position embedding and tokens).
    optimizer = create_optimizer_v2(model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(train_set) // config.batch_size
    run = _Run(
        config=config, device=device, rank=rank, world=world,
        autocast=functools.partial(runtime.autocast, device, amp_dtype), model=model, wrapped=model,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing), train_set=train_set,
        val_set=val_set, out_dir=out_dir, steps_per_epoch=steps_per_epoch,
        warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
        started=started,
    )
    if checkpoint is not None:
        _restore(run, checkpoint)
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        run.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return run


def _restore(run: _Run, checkpoint: Dict[str, Any]) -> None:
    """Continue ``run`` where ``checkpoint`` was taken: weights, optimiser, step, history, random states."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    run.step, run.history = int(checkpoint["step"]), list(checkpoint["history"])
    run.elapsed_before = tuple(checkpoint.get("elapsed", (0.0, 0.0)))  # type: ignore[assignment]
    if run.rank == 0:  # the saved sums are over all processes: count them once
        run.resumed_sums = tuple(checkpoint.get("epoch_sums", (0.0, 0.0, 0.0)))  # type: ignore[assignment]
    # This process's own states (with another number of processes the run cannot be exact anyway).
    cpu_states, cuda_states = checkpoint["torch_rng"], checkpoint.get("cuda_rng") or [None]
    torch.set_rng_state(cpu_states[run.rank % len(cpu_states)].cpu())
    cuda_state = cuda_states[run.rank % len(cuda_states)]
    if run.device.type == "cuda" and cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state.cpu(), run.device)


def _checkpoint(run: _Run, epoch_sums: Tuple[float, float, float]) -> None:
    """Write ``output_dir/checkpoint.pt`` (first process; the others wait), if there is an output_dir."""
    if run.out_dir is None:
        return
    epoch_sums = tuple(runtime.all_sum(list(epoch_sums), run.device))  # type: ignore[assignment]
    # Every process keeps its own random states: they part when processes draw different
    # amounts (a share with an unreadable image has a smaller batch, so fewer drop-path draws).
    own = (torch.get_rng_state(), torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None)
    states = runtime.all_gather(own)
    if run.rank == 0:
        rng_states = {"torch_rng": [cpu for cpu, _ in states], "cuda_rng": [cuda for _, cuda in states]}
        _save_checkpoint(run.out_dir / CHECKPOINT_NAME, run, epoch_sums, rng_states)
    runtime.barrier()


def _train_step(run: _Run, images: Optional[torch.Tensor], labels: torch.Tensor) -> Optional[float]:
    """One optimiser step; returns its loss, or None when none of the step's images could be read."""
    config, device = run.config, run.device
    empty = images is None
    if empty:  # a zero-weighted step on a blank image keeps torchrun processes in step
        images = torch.zeros(1, 3, config.image_size, config.image_size)
        labels = torch.zeros(1, dtype=torch.long)
    images = images.to(device, non_blocking=True)  # type: ignore[union-attr]
    labels = labels.to(device, non_blocking=True)
    with run.autocast():
        loss = run.criterion(run.wrapped(images), labels)
    if empty:
        loss = loss * 0.0
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()  # GradScaler is a no-op unless amp is fp16
    run.scaler.unscale_(run.optimizer)
    if config.grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    loss_value = float(loss.detach())
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"training loss became {loss_value} at step {run.step}; lower lr or disable amp")
    return None if empty else loss_value


def _train_epoch(run: _Run, epoch: int) -> bool:
    """Train ``epoch`` (from where a resumed run stands), validate, log and checkpoint it.

    Returns:
        False when ``stop_after`` ended the epoch early (after checkpointing), else True.
    """
    from tqdm import tqdm

    from tome.tools.evaluate import collate_skipping

    config = run.config
    done = run.step - epoch * run.steps_per_epoch  # steps of this epoch before a resume
    sampler = _EpochBatchSampler(len(run.train_set), config.batch_size, epoch, config.seed, run.rank, run.world,
                                 start=done)
    # The loader's own generator: iterating must not draw from the global one, whose state
    # the drop-path masks use and a checkpoint restores.
    loader = DataLoader(_SkipUnreadable(run.train_set), batch_sampler=sampler, num_workers=config.num_workers,
                        collate_fn=collate_skipping, pin_memory=run.device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    run.wrapped.train()
    epoch_start = time.perf_counter()
    loss_sum, loss_count, skipped = run.resumed_sums if done else (0.0, 0.0, 0.0)
    skipped_names: List[str] = []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", initial=done, total=run.steps_per_epoch,
               disable=not config.progress or run.rank != 0, dynamic_ncols=True)
    for images, labels, unreadable in bar:
        lr = run.set_lr()
        skipped += len(unreadable)
        skipped_names += unreadable[:_SHOWN_SKIPS - len(skipped_names)]
        loss = _train_step(run, images, labels)
        if loss is not None:
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
        bar.set_postfix(loss=f"{loss_sum / max(1.0, loss_count):.3f}", lr=f"{lr:.2e}")
        if run.step % run.steps_per_epoch == 0:
            continue  # the end of the epoch checkpoints below, after validating
        if (config.checkpoint_every and run.step % config.checkpoint_every == 0) or run.step == config.stop_after:
            _checkpoint(run, (loss_sum, loss_count, skipped))
        if run.step == config.stop_after:
            bar.close()
            return False
    bar.close()

    loss_sum, loss_count, skipped = runtime.all_sum([loss_sum, float(loss_count), float(skipped)], run.device)
    skipped_names = [name for part in runtime.all_gather(skipped_names) for name in part]
    _warn_skipped(int(skipped), skipped_names, f"epoch {epoch + 1}")
    last = epoch + 1 == config.epochs
    val_accuracy = None
    if run.val_set is not None and (last or (config.val_every and (epoch + 1) % config.val_every == 0)):
        val_accuracy = evaluate(run.model, run.val_set, batch_size=max(1, config.batch_size // run.world),
                                device=run.device, amp=config.amp, progress=config.progress)
    record = {"epoch": epoch + 1, "step": run.step, "train_loss": loss_sum / max(1.0, loss_count),
              "skipped_images": int(skipped), "val_accuracy": val_accuracy,
              "seconds": time.perf_counter() - epoch_start}
    run.history.append(record)
    if run.rank == 0:
        accuracy = "-" if val_accuracy is None else f"{100 * val_accuracy:.2f}%"
        print(f"epoch {epoch + 1}/{config.epochs}: train loss {record['train_loss']:.4f}, "
              f"val acc {accuracy}, {record['seconds']:.0f}s", flush=True)
        if run.out_dir is not None:
            with open(run.out_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
    _checkpoint(run, (0.0, 0.0, 0.0))
    return True


def save_timm(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``model`` in timm's own format: plain timm loads it with
    ``timm.create_model("local-dir:" + directory, pretrained=True)`` (no ``tome`` needed).

    The directory holds ``model.safetensors`` and timm's ``config.json`` (architecture,
    constructor arguments, input size, normalisation and class names).

    Args:
        model: A timm ViT built by :func:`build_model` (patched or not: patching
            changes no weight).
        directory: The folder to write (created if missing).

    Returns:
        ``directory``.

    Raises:
        ValueError: if ``model`` was not made by :func:`build_model` or :func:`load_model`.
    """
    from timm.models import save_for_hf

    spec = getattr(model, "_tome_train_spec", None)
    if spec is None:
        raise ValueError("save_timm needs a model made by tome.tools.train.build_model or load_model")
    model_args = {**spec["model_kwargs"], "img_size": spec["image_size"], "num_classes": spec["num_classes"]}
    save_for_hf(model, str(directory), model_args=model_args, safe_serialization=True)
    return Path(directory)


def _export(run: _Run) -> Optional[Path]:
    """Write the trained model and its description to ``output_dir`` (None without one)."""
    if run.out_dir is None:
        return None
    config = run.config
    model_path = run.out_dir / f"{config.export_name}.safetensors"
    if run.rank == 0:
        wall, cpu = run.elapsed()
        timing = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "threads": torch.get_num_threads()}
        training = {**_config_dict(config), "world_size": run.world, **timing, "command": config_to_command(config)}
        val_accuracy = run.history[-1]["val_accuracy"] if run.history else None
        save_model(run.model, model_path, {"training": training, "val_accuracy": val_accuracy,
                                           "history": run.history})
        save_timm(run.model, run.out_dir / f"{config.export_name}-timm")
    runtime.barrier()
    return model_path


def train(config: TrainConfig) -> TrainResult:
    """Train (or fine-tune, with ``config.init``) a timm ViT with the ToMe schedule ``config.r``.

    Works alone or under ``torchrun`` (DistributedDataParallel). Checkpoints
    (``output_dir/checkpoint.pt``) hold the model, optimiser, step, random states and the
    epoch's running sums, so a resumed run continues exactly where the checkpoint was taken.

    Args:
        config: The run; see :class:`TrainConfig`.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: for invalid settings, an output_dir that cannot be written, weights that
            do not fit, a file that is not a weights-only checkpoint, or a resume checkpoint
            of a different run.
    """
    config.validate()
    started = (time.perf_counter(), time.process_time())
    device = runtime.process_device(config.device)
    with runtime.process_group(device):
        rank, world = runtime.world()
        if config.batch_size % world:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the {world} processes")
        out_dir = Path(config.output_dir) if config.output_dir is not None else None
        if out_dir is not None:
            # Every process checks (and refuses) alike; only the first one writes or deletes. No
            # process reads what is deleted: overwrite and resume exclude each other.
            _check_earlier_run(config, out_dir)
            if rank == 0:
                _prepare_output_dir(out_dir)
                if config.overwrite:
                    _clear_earlier_run(out_dir, config.export_name)
        # The checkpoint is read first: a run it cannot continue is refused before any work.
        found = _find_checkpoint(config, out_dir)
        run = _setup(config, device, out_dir, found[1] if found is not None else None, started)

        finished = True
        for epoch in range(run.step // run.steps_per_epoch, config.epochs):
            if config.stop_after is not None and run.step >= config.stop_after:
                finished = False
                break
            if not _train_epoch(run, epoch):
                finished = False
                break
        run.model.eval()
        if not finished and rank == 0:
            print(f"stopped after step {run.step} of {run.total_steps}; continue with resume", flush=True)
        model_path = _export(run) if finished else None
        val_accuracy = run.history[-1]["val_accuracy"] if run.history else None
        wall, cpu = run.elapsed()
        return TrainResult(run.model, val_accuracy, run.history, wall, cpu, model_path)


# ---------------------------------------------------------------------------------------------
# Command line


def config_to_command(config: TrainConfig) -> str:
    """The ``tome train`` command line that runs ``config`` (settings left at their defaults are omitted).

    Where a run goes (``resume``, ``overwrite``, ``stop_after``, ``device``, progress bars) is left out: it
    does not change the result.
    """
    defaults = TrainConfig()
    words = ["tome", "train"]
    if config.model_kwargs != defaults.model_kwargs:
        words.append("--model-kwargs")
        for key, value in config.model_kwargs.items():
            # A string reads back as itself unless it looks like a literal ("32", "True"): then quote it.
            plain = isinstance(value, str) and parse_model_kwargs([f"{key}={value}"])[key] == value
            words.append(f"{key}={value if plain else repr(value)}")
    skip = {"model_kwargs", "r", "prop_attn", "resume", "overwrite", "stop_after", "device", "progress"}
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name in skip or value == getattr(defaults, f.name):
            continue
        words += [f"--{f.name.replace('_', '-')}", "0" if value is None else str(value)]
    if config.r != defaults.r:
        r = config.r
        words += ["-r", schedule_label(r)]
    if not config.prop_attn:
        words.append("--no-prop-attn")
    return shlex.join(words)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.model_arg is None and args.model_kwargs is None:
        values["model_kwargs"] = TrainConfig().model_kwargs
    else:
        values["model_kwargs"] = {**dict(args.model_arg or ()), **parse_model_kwargs(args.model_kwargs)}
    values["r"] = parse_schedule(args.r)
    values["progress"] = not args.no_progress
    values["grad_clip"] = args.grad_clip or None
    return TrainConfig(**values)


def _run(args: argparse.Namespace) -> None:
    config = _config_from_args(args)
    try:
        result = train(config)
    except KeyboardInterrupt:
        if config.output_dir is None:
            hint = "nothing was saved (no --output-dir)"
        else:
            hint = (f"the same command with --resume auto (and --output-dir {shlex.quote(config.output_dir)}) "
                    "continues from the last checkpoint (one per epoch, and every --checkpoint-every steps)")
        print(f"\ntome train: interrupted; {hint}", file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports it
    if runtime.torchrun_env()[0] == 0:
        accuracy = "n/a" if result.val_accuracy is None else f"{100 * result.val_accuracy:.2f}%"
        print(f"done: val acc {accuracy} (r={config.r!r}), {result.wall_seconds:.0f}s wall, "
              f"{result.cpu_seconds:.0f}s CPU in this process")
        if result.model_path is not None:
            print(f"model: {result.model_path} (+ .json)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome train``."""
    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a timm ViT with token merging active",
        description="Train or fine-tune a timm ViT with a ToMe schedule active during training. "
        "The defaults are the recipe of the model shipped with tome (docs/results.md). "
        "Run under `torchrun --nproc-per-node N -m tome.cli train ...` for multi-process (DDP) training "
        "(write the schedule as -r there: torchrun mistakes --r for its own options).",
    )
    add = parser.add_argument
    kwargs_default = " ".join(f"{k}={v}" for k, v in defaults.model_kwargs.items())
    add("--data", default=defaults.data,
        help="'synthetic' (generated shapes) or a directory with train/ and val/ (default: %(default)s)")
    add("--model", default=defaults.model, help="timm architecture name (default: %(default)s)")
    add("--model-kwargs", nargs="+", metavar="KEY=VALUE",
        help=f"timm.create_model arguments; replace all defaults (default: {kwargs_default})")
    # The earlier spelling (repeated, one KEY=VALUE each, values read as JSON), kept so recorded commands run.
    add("--model-arg", action="append", type=model_kwarg_arg, help=argparse.SUPPRESS)
    add("--image-size", type=int, default=defaults.image_size,
        help="input height and width in pixels (default: %(default)s)")
    add("--train-size", type=int, default=defaults.train_size, help="synthetic training images (default: %(default)s)")
    add("--val-size", type=int, default=defaults.val_size,
        help="validation images; for a directory at most this many, 0 for all (default: %(default)s)")
    add("--data-seed", type=int, default=defaults.data_seed, help="seed of the synthetic task (default: %(default)s)")
    add("--epochs", type=int, default=defaults.epochs, help="passes over the training set (default: %(default)s)")
    add("--batch-size", type=int, default=defaults.batch_size,
        help="global batch size, split over torchrun processes (default: %(default)s)")
    add("--lr", type=float, default=defaults.lr, help="peak learning rate of AdamW (default: %(default)s)")
    add("--min-lr", type=float, default=defaults.min_lr,
        help="learning rate at the end of the cosine decay (default: %(default)s)")
    add("--weight-decay", type=float, default=defaults.weight_decay,
        help="AdamW weight decay, not on biases, norms and tokens (default: %(default)s)")
    add("--warmup-epochs", type=float, default=defaults.warmup_epochs,
        help="linear warm-up length in epochs, fractions allowed (default: %(default)s)")
    add("--label-smoothing", type=float, default=defaults.label_smoothing,
        help="cross-entropy label smoothing in [0, 1) (default: %(default)s)")
    add("--grad-clip", type=float, default=defaults.grad_clip,
        help="clip the global gradient norm to this; 0 disables (default: %(default)s)")
    add("--drop-path", type=float, default=defaults.drop_path, help="stochastic depth rate (default: %(default)s)")
    add("-r", "--r", default="0",
        help="ToMe schedule while training: 8, '8,-1' (decreasing) or '[8,8,4]' (default: %(default)s)")
    add("--no-prop-attn", dest="prop_attn", action="store_false",
        help="train without proportional attention (default: with it)")
    add("--amp", choices=runtime.AMP_CHOICES, default=defaults.amp,
        help="mixed precision; auto = bf16/fp16 on CUDA, none on CPU (default: %(default)s)")
    add("--init", default=None,
        help="start from these weights: a .safetensors from tome train, or a checkpoint (default: random weights)")
    add("--output-dir", default=None,
        help="checkpoints, log.jsonl and the final model go here (default: none, nothing is written)")
    add("--resume", default=None,
        help="checkpoint to continue, or 'auto' for OUTPUT_DIR/checkpoint.pt when it exists (default: a fresh run; "
        "an OUTPUT_DIR that already holds a run is then refused)")
    add("--overwrite", action="store_true",
        help="start afresh in an OUTPUT_DIR that holds an earlier run: delete its checkpoint, log.jsonl and model "
        "first (default: refuse such a directory)")
    add("--checkpoint-every", type=int, default=defaults.checkpoint_every,
        help="also checkpoint every this many steps; 0: at the end of each epoch only (default: %(default)s)")
    add("--stop-after", type=int, default=None,
        help="stop after this many steps in all, to continue with --resume (default: run to the end)")
    add("--val-every", type=int, default=defaults.val_every,
        help="epochs between validations; 0: after the last only (default: %(default)s)")
    add("--num-workers", type=int, default=defaults.num_workers,
        help="DataLoader worker processes per training process (default: %(default)s)")
    add("--seed", type=int, default=defaults.seed, help="seed of initialisation and data order (default: %(default)s)")
    add("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when available)")
    add("--export-name", default=defaults.export_name, help="file stem of the final model (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress bars (default: shown)")
    parser.set_defaults(func=_run)


if __name__ == "__main__":  # python -m tome.tools.train ..., e.g. under torchrun
    from tome.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
