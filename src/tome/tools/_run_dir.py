"""What the small-model trainers (``tome vlm-train``, ``tome video-train``) share: the run
directory with its resume / overwrite rules, the ``log.jsonl`` history, the session options
and the two command-line entry points, and the auxiliary-loss modules trained beside a model."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ._common import positive_int


def prepare_run_dir(args: argparse.Namespace, checkpoint: str, run_files: Sequence[str]) -> Tuple[Path, Optional[Path]]:
    """The output directory ``args.output_dir`` (created) and the checkpoint to resume from, if any.

    Args:
        args: with ``output_dir``, ``resume`` (None, ``"auto"`` or a path) and ``overwrite``.
        checkpoint: the checkpoint's file name inside the directory (``--resume auto``).
        run_files: the names a run writes there; ``--overwrite`` deletes only these.

    Raises:
        ValueError: for a directory that holds a run without ``--resume``/``--overwrite``,
            or a ``--resume`` path that is not a file.
    """
    out = Path(args.output_dir)
    checkpoint_path = out / checkpoint
    resume: Optional[Path] = None
    if args.resume == "auto":
        resume = checkpoint_path if checkpoint_path.is_file() else None
    elif args.resume:
        resume = Path(args.resume)
        if not resume.is_file():
            raise ValueError(f"--resume {args.resume!r}: no checkpoint file there")
    found = [name for name in run_files if (out / name).exists()]
    if resume is None and found:
        if not args.overwrite:
            raise ValueError(f"output directory {str(out)!r} already holds a run ({', '.join(found)}); pass "
                             "--resume auto to continue it or --overwrite to start over")
        for name in found:  # only the run's own files: anything else in the directory stays
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out, resume


def append_log(path: Path, entry: Dict[str, Any]) -> None:
    """Append ``entry`` as one JSON line to ``path`` (the run's ``log.jsonl``)."""
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one training session: threads, time limit, early stop, resume, overwrite, progress."""
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="minutes after which training stops and the final folder is written (0: none)")
    parser.add_argument("--stop-at-step", type=int, default=0,
                        help="stop this session at this step, as --time-limit does (0: run to --steps)")
    parser.add_argument("--resume", default=None, help="'auto' (DIR/checkpoint.pt if present) or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true", help="delete a run already in --output-dir")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (default: a bar on a terminal)")


@dataclass(frozen=True)
class TrainerCommand:
    """A trainer's entry points: ``tome NAME ...`` (:meth:`add_parser`) and ``python -m MODULE ...``
    (:meth:`main`). Both parse with ``build`` (which adds the options to a parser and returns it),
    record the arguments that followed the command in ``args.argv`` (the run's ``log.jsonl`` keeps
    the command line), call ``train(args)`` and print the final record it returns as JSON."""

    name: str
    module: str
    help: str
    description: str
    build: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
    train: Callable[[argparse.Namespace], Dict[str, Any]]

    def run(self, args: argparse.Namespace) -> int:
        if not hasattr(args, "argv"):  # called as `tome NAME ...`: record what followed the command
            args.argv = sys.argv[sys.argv.index(self.name) + 1:] if self.name in sys.argv else []
        print(json.dumps(self.train(args)))
        return 0

    def add_parser(self, subparsers: argparse._SubParsersAction) -> None:
        """Register ``tome NAME``."""
        parser = subparsers.add_parser(self.name, help=self.help, description=self.description)
        self.build(parser)
        parser.set_defaults(func=self.run)

    def main(self, argv: Optional[Sequence[str]] = None) -> int:
        """``python -m MODULE ...``."""
        argv = list(sys.argv[1:] if argv is None else argv)
        parser = self.build(argparse.ArgumentParser(prog=f"python -m {self.module}", description=self.description))
        args = parser.parse_args(argv)
        args.argv = argv
        return self.run(args)


def add_loop_arguments(parser: argparse.ArgumentParser, *, log_every: int, val_every: int, checkpoint_every: int,
                       val_help: str = "steps between validations") -> None:
    """The cadence options :func:`train_loop` reads: ``--log-every``, ``--val-every``,
    ``--checkpoint-every`` (steps), with each trainer's defaults."""
    parser.add_argument("--val-every", type=positive_int, default=val_every, help=f"{val_help} (default: %(default)s)")
    parser.add_argument("--log-every", type=positive_int, default=log_every,
                        help="steps between log.jsonl entries (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=checkpoint_every,
                        help="steps between checkpoints (default: %(default)s)")


def train_loop(run: Any, step: int, desc: str, rate: str,
               validate: Callable[[int, Any], None]) -> Tuple[int, bool]:
    """Train from ``step`` to ``run.args.steps`` (or the time limit / ``--stop-at-step``), logging
    every ``--log-every`` steps (mean loss, learning rate and ``rate``: items per second of
    training), validating every ``--val-every`` (``validate(step, progress_bar)``) and
    checkpointing every ``--checkpoint-every`` steps and at the end, behind a tqdm bar.

    ``run`` has ``args``, ``model``, ``optimizer``, ``step(step) -> loss``, ``log(entry)`` and
    ``save(step)``. Returns the step reached and whether it stopped before ``--steps``.
    """
    from tqdm import tqdm

    args = run.args
    run.model.train()
    deadline = time.time() + 60 * args.time_limit if args.time_limit else math.inf
    window_loss, window_count, window_start = 0.0, 0, time.time()
    bar = tqdm(total=args.steps, initial=step, desc=desc, disable=None if args.progress else True, unit="step")
    stopped_early = False
    while step < args.steps:
        if time.time() > deadline or (args.stop_at_step and step >= args.stop_at_step):
            stopped_early = True
            break
        window_loss += run.step(step)
        step += 1
        window_count += 1
        bar.update()
        if step % args.log_every == 0 or step == args.steps:
            entry = {"step": step, "loss": window_loss / window_count, "lr": run.optimizer.param_groups[0]["lr"],
                     rate: window_count * args.batch_size / (time.time() - window_start), "time": time.time()}
            run.log(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", per_s=f"{entry[rate]:.1f}")
            window_loss, window_count, window_start = 0.0, 0, time.time()
        if step % args.val_every == 0 or step == args.steps:
            validate(step, bar)
            window_start = time.time()  # validation time is not training throughput
        if step % args.checkpoint_every == 0 or step == args.steps:
            run.save(step)
    bar.close()
    run.save(step)
    return step, stopped_early


def decay_groups(named: Iterable[Tuple[str, Any]], decays: Callable[[str, Any], bool], weight_decay: float,
                 lr: Optional[float] = None) -> List[Dict[str, Any]]:
    """Two AdamW parameter groups of ``named`` (``(name, parameter)`` pairs), in this order: those
    ``decays(name, parameter)`` picks, with ``weight_decay``, then the others, with none; both at
    ``lr`` when given (else the optimizer's). The order is part of a checkpoint's optimizer state."""
    named = list(named)
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return groups if lr is None else [dict(group, lr=lr) for group in groups]


def warmup_cosine(optimizer: Any, args: argparse.Namespace) -> Any:
    """timm's cosine schedule over ``args.steps`` optimizer steps, after ``args.warmup`` linear
    warm-up steps from 1 % of ``args.lr``, down to 2 % of it (``step_update`` per step)."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(optimizer, t_initial=args.steps, lr_min=args.lr * 0.02, warmup_t=args.warmup,
                             warmup_lr_init=args.lr * 0.01, t_in_epochs=False)


class AuxiliaryLoss:
    """A module trained beside a trainer's model by an extra loss term (``vlm-train --scene-loss``,
    ``video-train --repa``), with an AdamW and :func:`warmup_cosine` of its own, so the model's
    optimizer state, and checkpoints of runs without the term, stay as they are.

    Args:
        build: Makes the module; called under ``torch.manual_seed(args.seed)`` in a forked RNG,
            so the module starts from ``--seed`` alone.
        args: The trainer's options (``seed``, ``lr``, ``weight_decay``, ``steps``, ``warmup``).
        weight: The term's weight in the loss.
        betas: AdamW's betas (the trainer's own).
        key: The module's entry in :meth:`state_dict` (beside ``"optimizer"``).
    """

    def __init__(self, build: Callable[[], Any], args: argparse.Namespace, weight: float,
                 betas: Tuple[float, float], key: str) -> None:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            self.module = build()
        self.weight, self.key = weight, key
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=args.lr, betas=betas,
                                           weight_decay=args.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, args)
        self._window: List[Dict[str, float]] = []

    def state_dict(self) -> Dict[str, Any]:
        return {self.key: self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state[self.key])
        self.optimizer.load_state_dict(state["optimizer"])

    def step(self, step: int, clip_grad: float) -> None:
        """After the backward of training step ``step``: clip, update, and schedule step ``step + 1``."""
        import torch

        torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip_grad)
        self.optimizer.step()
        self.scheduler.step_update(step + 1)

    def record(self, values: Dict[str, float]) -> None:
        """Keep one training step's values (the term, accuracies) for :meth:`summary`."""
        self._window.append(values)

    def summary(self) -> Dict[str, float]:
        """The mean of each recorded value since the last call (over the steps that recorded it)."""
        window, self._window = self._window, []
        keys = sorted({key for entry in window for key in entry})
        return {key: sum(e[key] for e in window if key in e) / sum(key in e for e in window) for key in keys}
