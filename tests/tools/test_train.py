"""Training with ToMe (`tome train`), model files, and the shipped model."""

from __future__ import annotations

import json

import pytest
import torch

import tome
from tome import cli
from tome.data import CLASSES, SyntheticShapes
from tome.tools.demo_model import SHIPPED_MODELS, load_demo_model
from tome.tools.train import TrainConfig, evaluate, load_model, parse_schedule, save_model, train

# A ViT small enough for a few CPU steps per second: 32x32 images, patch 8 -> 16 tokens + class token.
TINY = dict(
    model="vit_tiny_patch16_224",
    model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8},
    image_size=32,
    val_size=0,
    warmup_epochs=0.0,
    label_smoothing=0.0,
    progress=False,
    r=2,
)


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def test_steps_lower_the_loss_with_merging_active():
    # One fixed batch (train_size == batch_size): every epoch is one step on the same images.
    result = train(tiny_config(train_size=16, batch_size=16, epochs=6, lr=3e-3, min_lr=3e-3, r=4))
    losses = [record["train_loss"] for record in result.history]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    model = result.model
    assert tome.patch.is_patched(model) and model.r == 4
    model(torch.zeros(1, 3, 32, 32))
    assert model._tome_info["size"].shape[1] == 17 - 4 - 4  # merging really ran


def test_checkpoint_resume_round_trip(tmp_path):
    config = dict(train_size=32, batch_size=8, epochs=2, lr=1e-3, val_size=10)
    straight = train(tiny_config(output_dir=str(tmp_path / "straight"), **config))

    # The same run, stopped mid-epoch after 3 of 8 steps, then resumed from its checkpoint.
    out = tmp_path / "sliced"
    first = train(tiny_config(output_dir=str(out), stop_after=3, **config))
    assert (out / "checkpoint.pt").is_file() and not (out / "model.safetensors").exists()
    assert first.history == []
    resumed = train(tiny_config(output_dir=str(out), resume="auto", **config))
    assert [r["step"] for r in resumed.history] == [4, 8]

    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.val_accuracy == straight.val_accuracy
    assert resumed.wall_seconds > first.wall_seconds  # a resumed run counts its earlier part too
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    # A checkpoint from another run is refused.
    with pytest.raises(ValueError, match="another run"):
        train(tiny_config(output_dir=str(out), resume=str(out / "checkpoint.pt"), **{**config, "batch_size": 16}))


def test_save_and_load_model(tmp_path):
    result = train(tiny_config(train_size=8, batch_size=8, epochs=1))
    model = result.model
    path = save_model(model, tmp_path / "m.safetensors", {"note": "test"})
    loaded, info = load_model(path)
    assert info["note"] == "test" and info["num_classes"] == len(CLASSES)
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)
    assert loaded.pretrained_cfg["label_names"] == list(CLASSES)
    x = torch.randn(2, 3, 32, 32)
    tome.remove_patch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    half = save_model(loaded, tmp_path / "h.safetensors", dtype=torch.float16)
    assert half.stat().st_size < path.stat().st_size * 0.6
    with torch.no_grad():
        torch.testing.assert_close(load_model(half.with_suffix(".json"))[0](x), model(x), rtol=0.02, atol=0.02)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")


def test_trained_model_loads_in_plain_timm(tmp_path):
    import timm

    from tome.tools.train import save_timm

    result = train(tiny_config(train_size=8, batch_size=8, epochs=1, output_dir=str(tmp_path / "run")))
    exported = tmp_path / "run" / "model-timm"
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
    plain = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    assert not tome.patch.is_patched(plain)
    assert plain.pretrained_cfg["label_names"] == list(CLASSES)
    assert plain.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    model = tome.remove_patch(result.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="build_model"):
        save_timm(torch.nn.Linear(2, 2), tmp_path / "nope")


def test_fine_tune_from_saved_weights(tmp_path):
    base = train(tiny_config(train_size=8, batch_size=8, epochs=1, r=0, output_dir=str(tmp_path / "base")))
    tuned = train(tiny_config(train_size=8, batch_size=8, epochs=1, r=2, lr=1e-12, min_lr=0.0,
                              init=str(base.model_path)))
    for name, tensor in base.model.state_dict().items():
        torch.testing.assert_close(tuned.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        train(tiny_config(train_size=8, batch_size=8, epochs=1, init=str(base.model_path),
                          model_kwargs={**TINY["model_kwargs"], "embed_dim": 64}))


def test_train_on_image_folder(tmp_path):
    from tome.data import export_image_folder

    root = export_image_folder(tmp_path / "shapes", train=16, val=8, image_size=40, progress=False)
    result = train(tiny_config(data=str(root), batch_size=8, epochs=1, val_size=0))
    assert result.val_accuracy is not None  # the val/ folder is used
    with pytest.raises(ValueError, match="train/"):
        train(tiny_config(data=str(tmp_path)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(epochs=0), "epochs"),
        (dict(batch_size=-2), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(lr=1e-3, min_lr=1e-2), "min_lr"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(warmup_epochs=5.0, epochs=2), "warmup_epochs"),
        (dict(r=-1), "r"),
        (dict(r=(4, 2.0)), "inflection"),
        (dict(amp="fp8"), "amp"),
        (dict(model_kwargs={"num_classes": 3}), "num_classes"),
        (dict(resume="/nonexistent/checkpoint.pt"), "resume"),
        (dict(resume="auto"), "output_dir"),
        (dict(init="/nonexistent.safetensors"), "init"),
        (dict(stop_after=0), "stop_after"),
        (dict(model="not_a_model"), "not a timm model"),
        (dict(batch_size=64, train_size=32), "exceeds"),
        (dict(amp="fp16", device="cpu"), "CUDA"),
    ],
)
def test_bad_arguments_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(**{"train_size": 32, "batch_size": 8, **overrides}))


def test_parse_schedule():
    # tome train reads the one schedule grammar of every command.
    assert parse_schedule("8") == 8
    assert parse_schedule("8:-1") == (8, -1.0)
    assert parse_schedule("4/2") == [4, 2]
    assert parse_schedule("[4, 2]") == [4, 2]
    with pytest.raises(ValueError, match="write 8:-1"):  # the old tome train spelling: one grammar everywhere now
        parse_schedule("8,-1")
    with pytest.raises(ValueError, match="not a schedule"):
        parse_schedule("eight")


def test_config_to_command_round_trips():
    from tome.cli import build_parser
    from tome.tools.train import _config_from_args, config_to_command

    config = TrainConfig(model_kwargs={"embed_dim": 128, "depth": 6}, r=(8, -1.0), lr=2e-4, prop_attn=False,
                         grad_clip=None, init="base.safetensors", train_size=1000)
    command = config_to_command(config)
    assert command.startswith("tome train ") and "--no-prop-attn" in command
    assert _config_from_args(build_parser().parse_args(command.split()[1:])) == config


@pytest.mark.parametrize("model_kwargs", [{"global_pool": "avg", "depth": 2}, {"class_token": False, "mlp_ratio": 2.5},
                                          {"weight_init": "32", "qkv_bias": True}, TrainConfig().model_kwargs])
def test_model_kwargs_round_trip_through_the_command(model_kwargs):
    import shlex

    from tome.cli import build_parser
    from tome.tools.train import _config_from_args, config_to_command

    config = TrainConfig(model_kwargs=model_kwargs)
    command = config_to_command(config)
    assert "--model-arg " not in command and ("--model-kwargs" in command) == (model_kwargs != TINY_DEFAULTS)
    assert _config_from_args(build_parser().parse_args(shlex.split(command)[1:])).model_kwargs == model_kwargs


TINY_DEFAULTS = TrainConfig().model_kwargs


def test_model_kwargs_spellings():
    from tome.cli import build_parser
    from tome.tools.train import _config_from_args

    parse = build_parser().parse_args
    assert _config_from_args(parse(["train", "--model-kwargs", "depth=2", "global_pool=avg"])).model_kwargs == {
        "depth": 2, "global_pool": "avg"}
    # The earlier repeated --model-arg (in recorded commands) still works, but is not advertised.
    assert _config_from_args(parse(["train", "--model-arg", "depth=2", "--model-arg", "embed_dim=64"])).model_kwargs == {
        "depth": 2, "embed_dim": 64}
    assert _config_from_args(parse(["train"])).model_kwargs == TINY_DEFAULTS
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _config_from_args(parse(["train", "--model-kwargs", "depth"]))


def test_every_train_option_has_help_with_its_default():
    import argparse

    from tome.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = subparsers.choices["train"]
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
    assert len(shown) == 31
    missing = [a.option_strings[-1] for a in shown if not a.help or "default" not in a.help]
    assert missing == []
    help_text = " ".join(parser.format_help().split())
    assert "--model-arg " not in help_text and "(default: 0.001)" in help_text


def test_train_command(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2", "patch_size=8",
            "--image-size", "32", "--train-size", "16", "--val-size", "8",
            "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--r", "2:-1", "--no-progress",
            "--output-dir", str(out)]
    assert cli.main(args) == 0
    info = json.loads((out / "model.json").read_text())
    assert info["training"]["r"] == [2, -1.0] and info["model_kwargs"]["depth"] == 2
    assert "val acc" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--epochs", "0", "--no-progress"])


# ---------------------------------------------------------------------------------------------
# The model shipped in tome/assets


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_shipped_model_files_are_small_and_described(name):
    path = SHIPPED_MODELS[name]
    info = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size < 8 * 2**20
    assert info["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert "command" in info["training"] and 0 < info["val_accuracy"] <= 1
    assert info["history"] and info["history"][-1]["val_accuracy"] == info["val_accuracy"]  # the training curve


@pytest.mark.parametrize("name", sorted(SHIPPED_MODELS))
def test_shipped_model_reaches_its_documented_accuracy(name):
    model, description = load_demo_model(name)
    info = json.loads(SHIPPED_MODELS[name].with_suffix(".json").read_text())
    assert isinstance(description, str) and "SyntheticShapes" in description
    assert model.pretrained_cfg["input_size"] == (3, 64, 64) and not model.training
    # A fixed subset: the first 200 validation images (20 per class).
    subset = SyntheticShapes("val", length=200, seed=info["training"]["data_seed"], image_size=info["image_size"])
    accuracy = evaluate(model, subset, batch_size=100)
    assert accuracy >= info["val_accuracy"] - 0.05, (accuracy, info["val_accuracy"])


def test_longer_training_made_a_better_model():
    short, long = (json.loads(SHIPPED_MODELS[n].with_suffix(".json").read_text()) for n in ("shapes", "shapes-long"))
    assert long["history"][-1]["step"] > short["history"][-1]["step"]
    assert long["val_accuracy"] > short["val_accuracy"] + 0.05


def test_the_default_shipped_model_is_the_better_trained_one():
    from tome.tools._models import load_model as load_for_tools
    from tome.tools.demo_model import DEFAULT_MODEL, DEMO_MODEL_PATH

    assert DEFAULT_MODEL == "shapes-long" and DEMO_MODEL_PATH == SHIPPED_MODELS["shapes-long"]
    default, description = load_demo_model()
    assert description.startswith("shipped model shapes-long ") and "95.85% val top-1" in description
    expected = load_model(SHIPPED_MODELS["shapes-long"])[0].state_dict()
    for loaded in (default, load_for_tools(default_to_demo=True).model):  # what tome demo, visualize, eval use
        assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
    short, _ = load_demo_model("shapes")  # still there by name
    assert not torch.equal(short.head.weight, default.head.weight)


def test_unknown_shipped_model_is_refused():
    with pytest.raises(ValueError, match=r"'shapes-xl'.*\['shapes', 'shapes-long'\]"):
        load_demo_model("shapes-xl")
