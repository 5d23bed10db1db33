"""What defines a ``tome train`` run: :class:`TrainConfig` (validated), :class:`TrainResult`,
and the command line that reproduces a configuration."""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import nn

from tome._schedule import RSchedule, check_r
from tome.tools import _runtime as runtime
from tome.tools._common import parse_model_kwargs, schedule_label

__all__ = ["TrainConfig", "TrainResult", "config_to_command", "CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "MODEL_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "tome-train-checkpoint/2"  # 2: timm's optimizer parameter groups
MODEL_NAME = "model"


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
        _check_model(self)
        _check_counts(self)
        _check_optimisation(self)
        _check_run(self)
        return self


def _int_field(config: TrainConfig, name: str, allow_zero: bool = False) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} int, got {value!r}")


def _number_field(config: TrainConfig, name: str, low: float, high: float = math.inf, low_open: bool = False,
                  high_open: bool = False) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {value!r}")


def _check_model(config: TrainConfig) -> None:
    """``model``, ``model_kwargs``, ``image_size``."""
    if not isinstance(config.model, str) or not config.model:
        raise ValueError(f"model must be a timm model name, got {config.model!r}")
    if not isinstance(config.model_kwargs, dict):
        raise ValueError(f"model_kwargs must be a dict, got {config.model_kwargs!r}")
    for reserved in ("pretrained", "num_classes", "img_size", "drop_path_rate"):
        if reserved in config.model_kwargs:
            raise ValueError(
                f"model_kwargs may not set {reserved!r} ({config.model_kwargs[reserved]!r}); it follows from "
                "the data, image_size and drop_path settings"
            )
    _int_field(config, "image_size")
    if config.image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {config.image_size!r}")


def _check_counts(config: TrainConfig) -> None:
    """The data, sizes, steps and seeds."""
    if not isinstance(config.data, str) or not config.data:
        raise ValueError(f"data must be 'synthetic' or a directory, got {config.data!r}")
    _int_field(config, "train_size")
    _int_field(config, "val_size", allow_zero=True)
    for name in ("epochs", "batch_size"):
        _int_field(config, name)
    for name in ("checkpoint_every", "val_every", "num_workers"):
        _int_field(config, name, allow_zero=True)
    if config.stop_after is not None and (
        isinstance(config.stop_after, bool) or not isinstance(config.stop_after, int) or config.stop_after < 1
    ):
        raise ValueError(f"stop_after must be a positive int or None, got {config.stop_after!r}")
    for name in ("data_seed", "seed"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")


def _check_optimisation(config: TrainConfig) -> None:
    """Learning rates, regularisation, the merge schedule and mixed precision."""
    _number_field(config, "lr", 0.0, low_open=True)
    _number_field(config, "min_lr", 0.0)
    if config.min_lr > config.lr:
        raise ValueError(f"min_lr ({config.min_lr!r}) must not exceed lr ({config.lr!r})")
    _number_field(config, "weight_decay", 0.0)
    _number_field(config, "warmup_epochs", 0.0)
    if config.warmup_epochs > config.epochs:
        raise ValueError(f"warmup_epochs ({config.warmup_epochs!r}) must not exceed epochs ({config.epochs!r})")
    _number_field(config, "label_smoothing", 0.0, 1.0, high_open=True)
    if config.grad_clip is not None:
        _number_field(config, "grad_clip", 0.0)
    _number_field(config, "drop_path", 0.0, 1.0, high_open=True)
    check_r(config.r)
    if config.amp not in runtime.AMP_CHOICES:
        raise ValueError(f"amp must be one of {runtime.AMP_CHOICES}, got {config.amp!r}")


def _check_run(config: TrainConfig) -> None:
    """Where the run starts from and where it goes: ``resume``, ``overwrite``, ``init``, ``export_name``."""
    if config.resume is not None and config.resume != "auto" and not Path(config.resume).is_file():
        raise ValueError(f"resume checkpoint {config.resume!r} does not exist")
    if config.resume == "auto" and config.output_dir is None:
        raise ValueError("resume='auto' needs output_dir (it looks for output_dir/checkpoint.pt)")
    if not isinstance(config.overwrite, bool):
        raise ValueError(f"overwrite must be a bool, got {config.overwrite!r}")
    if config.overwrite and config.resume is not None:
        raise ValueError(f"overwrite=True starts afresh and resume={config.resume!r} continues a run; pass one of them")
    if config.init is not None and not Path(config.init).is_file():
        raise ValueError(f"init weights {config.init!r} do not exist")
    if not isinstance(config.export_name, str) or not config.export_name or "/" in config.export_name:
        raise ValueError(f"export_name must be a plain file stem, got {config.export_name!r}")


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


def _config_dict(config: TrainConfig) -> Dict[str, Any]:
    values = asdict(config)
    if isinstance(values["r"], tuple):
        values["r"] = list(values["r"])
    return values


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
