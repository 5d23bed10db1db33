"""Resuming a `tome train` run is exact, keeps the whole epoch's loss, and refuses changed settings."""

from __future__ import annotations

import json

import pytest
import torch

from tome.tools.train import TrainConfig, train

# 3 steps of 8 images per epoch, 2 epochs; drop_path makes every step draw random numbers.
RUN = dict(
    model="vit_tiny_patch16_224",
    model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8},
    image_size=32, train_size=24, batch_size=8, epochs=2, val_size=8, warmup_epochs=0.0,
    progress=False, r=2, drop_path=0.2,
)


def _losses(out):
    return [json.loads(line)["train_loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stop_after", [2, 3])  # mid-epoch, and at the end of the first epoch
def test_resume_with_stochastic_depth_is_exact(tmp_path, stop_after):
    straight = train(TrainConfig(**RUN, output_dir=str(tmp_path / "straight")))
    out = tmp_path / "sliced"
    train(TrainConfig(**RUN, output_dir=str(out), stop_after=stop_after))
    resumed = train(TrainConfig(**RUN, output_dir=str(out), resume="auto"))
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    # The resumed epoch's loss covers its steps before the stop too.
    assert _losses(out) == _losses(tmp_path / "straight")
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]


def test_stochastic_depth_changes_the_run(tmp_path):
    # The exactness test above means something: drop_path really draws random numbers.
    with_drop = train(TrainConfig(**RUN))
    without = train(TrainConfig(**{**RUN, "drop_path": 0.0}))
    assert not torch.equal(with_drop.model.state_dict()["head.weight"], without.model.state_dict()["head.weight"])


@pytest.mark.parametrize(
    "change",
    [dict(r=4), dict(lr=2e-3), dict(prop_attn=False), dict(drop_path=0.1), dict(grad_clip=None),
     dict(amp="bf16"), dict(val_every=0), dict(init="other.safetensors")],
)
def test_resume_refuses_changed_settings(tmp_path, change):
    out = tmp_path / "run"
    train(TrainConfig(**RUN, output_dir=str(out), stop_after=1))
    (tmp_path / "other.safetensors").touch()
    change = {k: str(tmp_path / v) if k == "init" else v for k, v in change.items()}
    with pytest.raises(ValueError, match="another run") as error:
        train(TrainConfig(**{**RUN, **change}, output_dir=str(out), resume="auto"))
    (name, value), = change.items()
    saved = RUN.get(name, TrainConfig().__dict__[name])
    assert f"{name}: saved {saved!r}, given {value!r}" in str(error.value)


def test_resume_accepts_settings_that_do_not_change_the_run(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**RUN, output_dir=str(out), stop_after=1))
    train(TrainConfig(**RUN, output_dir=str(out), resume="auto", stop_after=2, checkpoint_every=1, num_workers=0,
                      device="cpu", export_name="other"))
    result = train(TrainConfig(**RUN, output_dir=str(out), resume="auto"))
    assert [r["step"] for r in result.history] == [3, 6]


# ---------------------------------------------------------------------------------------------
# Unreadable images, interruptions, output directories, progress


def test_unreadable_images_are_skipped_and_named(tmp_path):
    from tools_helpers import write_image_folder

    root = tmp_path / "data"
    write_image_folder(root / "train", per_class=4, corrupt=1)  # 9 files: 8 readable
    write_image_folder(root / "val", per_class=2, corrupt=1, seed=1)
    config = TrainConfig(**{**RUN, "data": str(root), "batch_size": 3, "epochs": 1, "val_size": 0})
    with pytest.warns(UserWarning) as caught:
        result = train(config)
    messages = [str(w.message) for w in caught]
    assert any("1 unreadable image(s) skipped in epoch 1" in m and "broken_0.png" in m for m in messages), messages
    assert any("skipped in validation" in m for m in messages), messages
    assert result.history[0]["skipped_images"] == 1 and result.history[0]["step"] == 3
    assert result.val_accuracy is not None


def test_a_step_without_readable_images_is_skipped(tmp_path):
    from tools_helpers import write_image_folder

    root = tmp_path / "data"
    write_image_folder(root / "train", classes=1, per_class=0, corrupt=2)
    (root / "train" / "class_1").mkdir()
    write_image_folder(root / "train", classes=2, per_class=1, corrupt=0)
    # Files in order: class_0/0.png, class_0/broken_0.png, class_0/broken_1.png, class_1/0.png. Pick a seed
    # whose shuffle puts both broken files into one batch.
    from tome.tools.train import _EpochBatchSampler

    seed = next(s for s in range(100) if sorted(next(iter(_EpochBatchSampler(4, 2, 0, s)))) in ([1, 2], [0, 3]))
    with pytest.warns(UserWarning, match="2 unreadable"):
        result = train(TrainConfig(**{**RUN, "data": str(root), "batch_size": 2, "epochs": 1, "val_size": 0,
                                      "drop_path": 0.0, "seed": seed}))
    assert result.history[0]["skipped_images"] == 2
    assert result.history[0]["train_loss"] > 0  # the mean over the steps that had images


def test_interrupt_prints_the_resume_hint(tmp_path, monkeypatch, capsys):
    from tome import cli
    from tome.tools.train import cli as train_cli  # where `tome train` calls train()

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "train", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume auto" in err and str(tmp_path / "run") in err
    assert "Traceback" not in err


def test_a_fresh_run_into_an_earlier_runs_directory_is_refused(tmp_path, monkeypatch, capsys):
    """A forgotten --resume must not overwrite the earlier checkpoint nor append to its log."""
    from tome import cli
    from tome.tools.train import loop as train_loop  # where a run builds its datasets

    out = tmp_path / "run"
    train(TrainConfig(**RUN, output_dir=str(out), stop_after=3))
    checkpoint, log = (out / "checkpoint.pt").read_bytes(), (out / "log.jsonl").read_text()
    monkeypatch.setattr(train_loop, "build_datasets", lambda config: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"run'? already holds a run \(checkpoint.pt, log.jsonl\).*--resume auto.*--overwrite"):
        train(TrainConfig(**RUN, output_dir=str(out)))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--output-dir", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume auto" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "checkpoint.pt").read_bytes() == checkpoint and (out / "log.jsonl").read_text() == log
    with pytest.raises(ValueError, match="overwrite=True.*resume='auto'.*one of them"):
        train(TrainConfig(**RUN, output_dir=str(out), resume="auto", overwrite=True))


def test_a_finished_run_is_also_protected(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**{**RUN, "epochs": 1, "val_size": 0}, output_dir=str(out)))
    (out / "checkpoint.pt").unlink()  # the exported model alone is a run too
    (out / "log.jsonl").unlink()
    with pytest.raises(ValueError, match=r"already holds a run \(model.safetensors, model.json, model-timm\)"):
        train(TrainConfig(**{**RUN, "epochs": 1, "val_size": 0}, output_dir=str(out)))


def test_overwrite_starts_a_clean_run(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**RUN, output_dir=str(out), stop_after=3))
    (out / "notes.txt").write_text("mine")
    straight = train(TrainConfig(**RUN, output_dir=str(tmp_path / "straight")))
    train(TrainConfig(**RUN, output_dir=str(out), overwrite=True, stop_after=1))
    assert not (out / "log.jsonl").exists()  # the earlier run's log is gone
    again = train(TrainConfig(**RUN, output_dir=str(out), resume="auto"))  # a run started with overwrite resumes
    # One epoch line each: the earlier run's lines are gone, and the result is a fresh run's.
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert _losses(out) == _losses(tmp_path / "straight")
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name
    assert (out / "notes.txt").read_text() == "mine"  # nothing else is touched
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_dir_that_cannot_hold_files_is_refused_before_training(tmp_path, where, monkeypatch):
    from tome.tools.train import loop as train_loop  # where a run builds its datasets

    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    monkeypatch.setattr(train_loop, "build_datasets", lambda config: pytest.fail("training started"))
    with pytest.raises(ValueError, match="output_dir.*taken"):
        train(TrainConfig(**RUN, output_dir=str(out)))


def test_unwritable_output_dir_is_refused(tmp_path, monkeypatch):
    from pathlib import Path

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "touch", refuse)  # root may write anywhere: simulate a read-only directory
    with pytest.raises(ValueError, match="cannot be written.*Permission denied"):
        train(TrainConfig(**RUN, output_dir=str(tmp_path / "run")))


def test_resumed_progress_bar_counts_from_the_resumed_step(tmp_path, monkeypatch):
    import tqdm

    bars = []
    real = tqdm.tqdm

    def recording(*args, **kwargs):
        bars.append((kwargs.get("desc"), kwargs.get("initial", 0), kwargs.get("total")))
        return real(*args, **kwargs)

    out = tmp_path / "run"
    train(TrainConfig(**RUN, output_dir=str(out), stop_after=2))
    monkeypatch.setattr(tqdm, "tqdm", recording)
    train(TrainConfig(**RUN, output_dir=str(out), resume="auto"))
    assert [bar for bar in bars if bar[0].startswith("epoch")] == [("epoch 1/2", 2, 3), ("epoch 2/2", 0, 3)]


# ---------------------------------------------------------------------------------------------
# The pieces of a run


def test_batches_do_not_depend_on_the_process_count():
    from tome.tools.train import _EpochBatchSampler

    alone = list(_EpochBatchSampler(50, 8, epoch=3, seed=1))
    assert len(alone) == 6 and all(len(batch) == 8 for batch in alone) and len({i for b in alone for i in b}) == 48
    shares = [list(_EpochBatchSampler(50, 8, epoch=3, seed=1, rank=rank, world=4)) for rank in range(4)]
    assert [sum((share[step] for share in shares), []) for step in range(6)] == alone
    assert list(_EpochBatchSampler(50, 8, epoch=3, seed=1, start=4)) == alone[4:]
    assert alone != list(_EpochBatchSampler(50, 8, epoch=4, seed=1))  # a new order every epoch


def test_no_weight_decay_on_biases_norms_tokens_and_positions():
    from tome.tools.train import _setup

    run = _setup(TrainConfig(**RUN), torch.device("cpu"), None, None, (0.0, 0.0))
    names = {id(p): n for n, p in run.model.named_parameters()}
    undecayed = {names[id(p)] for g in run.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decayed = {names[id(p)] for g in run.optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias", "blocks.0.attn.qkv.bias"} <= undecayed
    assert decayed == {n for n in names.values() if n.endswith(".weight") and "norm" not in n}
    assert not run.scaler.is_enabled()  # fp32 on CPU: the GradScaler passes through


def test_checkpoint_of_an_earlier_format_is_refused(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**RUN, output_dir=str(out), stop_after=1))
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    del checkpoint["format"]
    torch.save(checkpoint, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="earlier tome train"):
        train(TrainConfig(**RUN, output_dir=str(out), resume="auto"))


def test_each_process_resumes_its_own_random_state(tmp_path):
    # Under torchrun the processes' states part (a share with an unreadable image draws fewer
    # drop-path masks): the checkpoint keeps one per process and each takes back its own.
    import dataclasses

    from tome.tools.train import _checkpoint, _restore, _setup

    run = _setup(TrainConfig(**RUN), torch.device("cpu"), tmp_path, None, (0.0, 0.0))
    _checkpoint(run, (0.0, 0.0, 0.0))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    first = torch.get_rng_state()
    torch.rand(5)
    second = torch.get_rng_state()
    checkpoint["torch_rng"] = [first, second]
    _restore(dataclasses.replace(run, rank=1, world=2), checkpoint)
    assert torch.equal(torch.get_rng_state(), second)
    _restore(dataclasses.replace(run, rank=0, world=2), checkpoint)
    assert torch.equal(torch.get_rng_state(), first)
