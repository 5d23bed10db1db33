"""``tome train`` on the command line: its options, and a :class:`TrainConfig` from them."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from typing import Any, Callable

from tome.tools import _runtime as runtime
from tome.tools._common import model_kwarg_arg, parse_model_kwargs, parse_schedule

from .config import TrainConfig
from .loop import train

__all__ = ["add_parser"]

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
    _add_model_and_data(parser.add_argument, defaults)
    _add_recipe(parser.add_argument, defaults)
    _add_run_options(parser.add_argument, defaults)
    parser.set_defaults(func=_run)


def _add_model_and_data(add: Callable[..., Any], defaults: TrainConfig) -> None:
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


def _add_recipe(add: Callable[..., Any], defaults: TrainConfig) -> None:
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
        help="the one merge schedule while training, in the grammar of every command: R (8), R:INFLECTION "
        "(8:-1, decreasing) or R/R/R (8/8/4) (default: %(default)s)")
    add("--no-prop-attn", dest="prop_attn", action="store_false",
        help="train without proportional attention (default: with it)")
    add("--amp", choices=runtime.AMP_CHOICES, default=defaults.amp,
        help="mixed precision; auto = bf16/fp16 on CUDA, none on CPU (default: %(default)s)")


def _add_run_options(add: Callable[..., Any], defaults: TrainConfig) -> None:
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
