"""The training loop of ``tome train``: set up a run, train it epoch by epoch, validate, export.

A ToMe schedule is set on the model for every training forward (Bolya et al., "Token
Merging: Your ViT but Faster", ICLR 2023, section 4.3: training with ToMe). Gradients
flow through the size-weighted averages of merged tokens; the matching itself is a
discrete choice and passes none. Under ``torchrun`` the model is wrapped in
DistributedDataParallel and the global batch is split over the processes.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import tome
from tome.tools import _runtime as runtime
from tome.tools.model_io import create_timm_model, load_model, save_model, save_timm, train_spec

from .checkpointing import (
    _check_earlier_run,
    _clear_earlier_run,
    _find_checkpoint,
    _prepare_output_dir,
    _save_checkpoint,
)
from .config import CHECKPOINT_NAME, TrainConfig, TrainResult, _config_dict, config_to_command
from .data import _SHOWN_SKIPS, _data_stats, _EpochBatchSampler, _SkipUnreadable, _warn_skipped, build_datasets

__all__ = ["train", "evaluate", "build_model"]

def build_model(config: TrainConfig, num_classes: int, class_names: Sequence[str] = (),
                mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> nn.Module:
    """The timm model described by ``config`` (random weights), with a ``pretrained_cfg`` that matches it.

    Raises:
        ValueError: if timm does not know ``config.model`` or rejects ``model_kwargs``.
    """
    return create_timm_model(config.model, dict(config.model_kwargs), config.image_size, num_classes, class_names,
                   mean, std, drop_path=config.drop_path)


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
    model._tome_train_spec = train_spec(config.model, config.model_kwargs, config.image_size, len(class_names))
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

    config = run.config
    done = run.step - epoch * run.steps_per_epoch  # steps of this epoch before a resume
    loader = _epoch_loader(run, epoch, done)
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
    _finish_epoch(run, epoch, (loss_sum, loss_count, skipped), skipped_names, epoch_start)
    return True


def _epoch_loader(run: _Run, epoch: int, done: int) -> DataLoader:
    """This process's batches of ``epoch``, from step ``done`` of the epoch on."""
    from tome.tools.evaluate import collate_skipping

    config = run.config
    sampler = _EpochBatchSampler(len(run.train_set), config.batch_size, epoch, config.seed, run.rank, run.world,
                                 start=done)
    # The loader's own generator: iterating must not draw from the global one, whose state
    # the drop-path masks use and a checkpoint restores.
    return DataLoader(_SkipUnreadable(run.train_set), batch_sampler=sampler, num_workers=config.num_workers,
                      collate_fn=collate_skipping, pin_memory=run.device.type == "cuda",
                      generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))


def _finish_epoch(run: _Run, epoch: int, sums: Tuple[float, float, float], skipped_names: List[str],
                  epoch_start: float) -> None:
    """Sum the epoch over processes, validate when due, log it and checkpoint."""
    config = run.config
    loss_sum, loss_count, skipped = runtime.all_sum([sums[0], float(sums[1]), float(sums[2])], run.device)
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
