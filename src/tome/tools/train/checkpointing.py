"""A ``tome train`` run on disk: its output directory and ``checkpoint.pt``.

A checkpoint holds everything a resumed run needs to continue bit for bit (weights,
optimiser, step, history, random states, the epoch's running sums), in types that
``torch.load(weights_only=True)`` accepts. A fresh run refuses a directory that holds
an earlier run unless told to continue it or to start over; a resumed run refuses
settings that would change what it computes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from tome.tools.checkpoints import load_weights_only

from .config import CHECKPOINT_FORMAT, CHECKPOINT_NAME, TrainConfig, _config_dict


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


def _save_checkpoint(path: Path, run: Any, epoch_sums: Tuple[float, float, float],
                     rng_states: Dict[str, List[Optional[torch.Tensor]]]) -> None:
    """Everything a resumed run needs to continue bit for bit, in types ``weights_only`` loading accepts.

    ``run`` is the run in progress (:class:`tome.tools.train.loop._Run`); ``epoch_sums`` are the loss sum, loss count and skipped images of the current epoch so far,
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
    checkpoint = load_weights_only(path)
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"{path!r} is not a tome train checkpoint (it lacks {missing}); resume from the "
                         f"{CHECKPOINT_NAME} that tome train writes in its output directory")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is a checkpoint of an earlier tome train (format {checkpoint.get('format')!r}, "
                         f"this one reads {CHECKPOINT_FORMAT!r}, whose optimizer state is laid out differently); "
                         "finish that run with the tome version that started it, or start again")
    return checkpoint



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
