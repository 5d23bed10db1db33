"""No file a user hands to tome runs code when loaded, and bad files are named in clear errors.

Every path that loads a file is covered: ``tome train --init``, ``--resume PATH``,
``--resume auto``, and ``--checkpoint`` of ``eval`` / ``bench`` / ``visualize`` (through
:func:`tome.tools.checkpoints.read_state_dict` and ``load_checkpoint``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tome import cli
from tome.tools import checkpoints
from tome.tools.train import TrainConfig, train

from tools_helpers import TINY_ARGS, tiny_model

TINY_TRAIN = dict(
    model="vit_tiny_patch16_224",
    model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8},
    image_size=32, val_size=0, warmup_epochs=0.0, progress=False, train_size=16, batch_size=8, epochs=1,
)


class _TouchOnLoad:
    """Unpickling this creates ``path``: harmless, but proof that loading ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(path: Path, payload: dict, marker: Path) -> Path:
    """Save ``payload`` plus a code-running object to ``path``; check that an unsafe load would run it."""
    torch.save({**payload, "extra": _TouchOnLoad(marker)}, path)
    torch.load(path, weights_only=False)  # the test could fail: an unsafe loader creates the marker
    assert marker.exists()
    marker.unlink()
    return path


def _train_checkpoint(out: Path) -> Path:
    """A genuine checkpoint of a 1-step run (stopped before the end), for the resume paths."""
    train(TrainConfig(**{**TINY_TRAIN, "epochs": 2}, output_dir=str(out), stop_after=1))
    return out / "checkpoint.pt"


def test_train_init_refuses_code(tmp_path):
    marker = tmp_path / "MARKER"
    evil = _plant(tmp_path / "init.pth", {"model": tiny_model().state_dict()}, marker)
    with pytest.raises(ValueError, match=r"init\.pth.*Python objects.*not a weights-only"):
        train(TrainConfig(**TINY_TRAIN, init=str(evil)))
    assert not marker.exists()


@pytest.mark.parametrize("how", ["path", "auto"])
def test_train_resume_refuses_code(tmp_path, how):
    marker = tmp_path / "MARKER"
    out = tmp_path / "run"
    genuine = torch.load(_train_checkpoint(out), weights_only=True)  # real checkpoints load safely
    _plant(out / "checkpoint.pt", genuine, marker)
    resume = "auto" if how == "auto" else str(out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*Python objects.*not a weights-only"):
        train(TrainConfig(**{**TINY_TRAIN, "epochs": 2}, output_dir=str(out), resume=resume))
    assert not marker.exists()


def test_train_checkpoint_holds_only_weights_only_types(tmp_path):
    checkpoint = torch.load(_train_checkpoint(tmp_path / "run"), weights_only=True)
    assert checkpoint["step"] == 1 and isinstance(checkpoint["torch_rng"][0], torch.Tensor)


@pytest.mark.parametrize("reader", ["read_state_dict", "load_checkpoint"])
def test_checkpoint_readers_refuse_code(tmp_path, reader):
    marker = tmp_path / "MARKER"
    evil = _plant(tmp_path / "weights.pth", {"model": tiny_model().state_dict()}, marker)
    with pytest.raises(ValueError, match=r"weights\.pth.*Python objects.*not a weights-only"):
        if reader == "read_state_dict":
            checkpoints.read_state_dict(str(evil))
        else:
            checkpoints.load_checkpoint(tiny_model(), str(evil))
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "bench", "visualize"])
def test_commands_refuse_code(tmp_path, capsys, command, image_folder, picture):
    marker = tmp_path / "MARKER"
    evil = _plant(tmp_path / "weights.pth", tiny_model().state_dict(), marker)
    args = {"eval": ["eval", "--data", str(image_folder)], "bench": ["bench"],
            "visualize": ["visualize", str(picture), "-o", str(tmp_path / "out.png")]}[command]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, *TINY_ARGS, "--checkpoint", str(evil)])
    assert exit_info.value.code == 2
    assert "Python objects" in capsys.readouterr().err
    assert not marker.exists()


def _bad_files(tmp_path: Path) -> dict:
    files = {
        "empty.pt": b"",
        "random.safetensors": os.urandom(256),
        "notes.pth": b"these are my notes\nnot a checkpoint\n",
        "truncated.pt": None,
    }
    for name, content in files.items():
        if content is None:  # a real checkpoint cut short, as by a full disk
            torch.save(tiny_model().state_dict(), tmp_path / name)
            content = (tmp_path / name).read_bytes()[:1000]
        (tmp_path / name).write_bytes(content)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize(
    "name, message",
    [
        ("empty.pt", "not a PyTorch checkpoint.*empty file"),
        ("notes.pth", "not a PyTorch checkpoint"),
        ("truncated.pt", "not a readable PyTorch checkpoint"),
        ("random.safetensors", "not a readable .safetensors file"),
    ],
)
def test_bad_checkpoint_files_are_named(tmp_path, name, message):
    path = _bad_files(tmp_path)[name]
    with pytest.raises(ValueError, match=rf"{name}.*{message}") as error:
        checkpoints.read_state_dict(str(path))
    assert "Python objects" not in str(error.value)


@pytest.mark.parametrize("name", ["notes.pth", "empty.pt", "truncated.pt"])
def test_train_init_and_resume_name_bad_files(tmp_path, name):
    path = _bad_files(tmp_path)[name]
    with pytest.raises(ValueError, match=rf"{name}.*PyTorch checkpoint"):
        train(TrainConfig(**TINY_TRAIN, init=str(path)))
    with pytest.raises(ValueError, match=rf"{name}.*PyTorch checkpoint"):
        train(TrainConfig(**TINY_TRAIN, output_dir=str(tmp_path / "run"), resume=str(path)))


def test_train_resume_names_a_foreign_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(ValueError, match=r"weights\.pth.*not a tome train checkpoint"):
        train(TrainConfig(**TINY_TRAIN, output_dir=str(tmp_path / "run"), resume=str(path)))


def test_train_init_names_a_bad_safetensors_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(os.urandom(256))
    (tmp_path / "model.json").write_text('{"format": "tome-model/1"}')
    with pytest.raises(ValueError, match=r"model\.safetensors.*not a readable \.safetensors"):
        train(TrainConfig(**TINY_TRAIN, init=str(tmp_path / "model.safetensors")))
