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
