"""Training the tiny video diffusion transformer: loss finite and falling, resume is exact, the final folder loads and samples."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("timm")

from tome import cli, video_models  # noqa: E402
from tome.tools import video_train  # noqa: E402


def _argv(out, *extra):
    return ["--size", "tiny", "--output-dir", str(out), "--steps", "4", "--batch-size", "2", "--frames", "2",
            "--size-px", "16", "--val-clips", "3", "--val-every", "2", "--sample-steps", "2", "--log-every", "1",
            "--checkpoint-every", "1", "--warmup", "1", "--no-progress", *extra]


def _history(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, capsys):
    video_train.main(_argv(tmp_path / "whole"))
    video_train.main(_argv(tmp_path / "split", "--stop-at-step", "2"))
    video_train.main(_argv(tmp_path / "split", "--resume", "auto"))
    whole, split = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("whole", "split"))
    assert whole["step"] == split["step"] == 4
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    losses = [{e["step"]: e["loss"] for e in _history(tmp_path / d) if "loss" in e} for d in ("whole", "split")]
    assert losses[0] == losses[1] and all(map(torch.isfinite, map(torch.tensor, losses[0].values())))
    start = video_models.build_model("tiny").state_dict()
    assert any(not torch.equal(start[name], tensor) for name, tensor in whole["model"].items())  # it trained
    # Each validation left a strip of samples: a row per class, a column per frame.
    from PIL import Image

    strip = Image.open(tmp_path / "whole" / "samples" / "step_000004.png")
    assert strip.size == (2 * 16 * 2, 10 * 16 * 2)
    vals = [e for e in _history(tmp_path / "whole") if "val_loss" in e]
    assert [e["step"] for e in vals] == [2, 4] and all(0 <= e["sample_accuracy"] <= 1 for e in vals)


def test_the_loss_falls_on_a_repeated_batch():
    torch.manual_seed(0)
    model = video_models.build_model("tiny")
    from tome.data.clips import clip_batch

    videos, labels = clip_batch(range(4), frames=2, size=16)
    noise, sigmas = torch.randn_like(videos), torch.full((4,), 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model((1 - 0.5) * videos + 0.5 * noise, sigmas, labels), noise - videos)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_final_folder_loads_and_samples_the_right_shape(tmp_path, capsys):
    video_train.main(_argv(tmp_path))
    folder = tmp_path / "final"
    card = (folder / "README.md").read_text()
    assert "python -m tome.tools.video_train --size tiny" in card and "| 4 |" in card
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "samples.png").is_file() and (folder / "log.jsonl").is_file()
    assert (folder / "training.png").is_file()
    model = video_models.load_model(folder)
    from diffusers import WanTransformer3DModel

    assert type(model.transformer) is WanTransformer3DModel
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    noise = torch.randn(3, 3, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 9])
    clips = video_models.sample(model, labels, noise, steps=3)
    assert clips.shape == noise.shape and clips.abs().max() <= 1
    assert torch.equal(clips, video_models.sample(model, labels, noise, steps=3))  # same noise, same clips
    assert not torch.equal(clips, video_models.sample(model, torch.tensor([1, 4, 9]), noise, steps=3))


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be >= 1, got 0"),
    ({"guidance": 0.5}, "guidance must be >= 1, got 0.5"),
    ({"labels": torch.tensor([0])}, r"labels must have shape \(2,\)"),
])
def test_bad_sampling_arguments_are_refused(kwargs, message):
    model = video_models.build_model("tiny")
    arguments = {"labels": torch.tensor([0, 1]), "noise": torch.randn(2, 3, 2, 16, 16), **kwargs}
    with pytest.raises(ValueError, match=message):
        video_models.sample(model, **arguments)


def test_bad_sizes_and_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="size must be one of"):
        video_models.build_model("huge")
    with pytest.raises(FileNotFoundError, match="no class-conditioned Wan model"):
        video_models.load_model(tmp_path)


def test_a_run_is_never_overwritten_by_accident(tmp_path, capsys):
    video_train.main(_argv(tmp_path, "--steps", "1", "--val-every", "1"))
    with pytest.raises(ValueError, match="--resume auto.*--overwrite"):
        video_train.main(_argv(tmp_path, "--steps", "1"))


def test_registered_in_the_cli(tmp_path, capsys):
    assert cli.main(["video-train", *_argv(tmp_path, "--steps", "1", "--val-every", "1")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 1


def test_plain_background_is_trained_on_and_recorded(tmp_path, monkeypatch):
    from tome.data import clips

    seen = []
    real = clips.clip_batch
    monkeypatch.setattr(clips, "clip_batch", lambda *a, **k: seen.append(a[5:] + tuple(k.values())) or real(*a, **k))
    video_train.main(_argv(tmp_path / "run", "--background", "plain", "--steps", "2"))
    assert seen and all(called == ("plain",) for called in seen)
    assert _history(tmp_path / "run")[0]["args"]["background"] == "plain"
    assert "plain background" in (tmp_path / "run" / "final" / "README.md").read_text()


def _repa_argv(out, *extra):
    # 32 px frames at the tiny size's patch 4: the 8 x 8 grid per frame of the 64 px classifier.
    argv = _argv(out, "--size-px", "32", "--repa", "0.5", "--repa-block", "0", *extra)
    return argv


def test_repa_targets_are_the_classifiers_patch_tokens_in_the_denoisers_order():
    from tome.data.clips import clip_batch

    model = video_models.build_model("tiny")
    classifier = video_train.load_classifier()
    repa = video_train.RepresentationAlignment(model, classifier, 0)
    videos, labels = clip_batch(range(2), frames=3, size=32)
    targets = repa.targets(videos)
    assert targets.shape == (2, 3 * 64, classifier.embed_dim)
    # Frame 1 of clip 1, by hand: the 64 px frame through all blocks but the last, patch tokens only.
    frame = torch.nn.functional.interpolate(videos[1:2, :, 1], size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        x = classifier._pos_embed(classifier.patch_embed(frame))
        for block in classifier.blocks[:-1]:
            x = block(x)
    torch.testing.assert_close(targets[1, 64:128], x[0, 1:])
    sigmas = torch.full((2,), 0.5)
    model(videos, sigmas, labels)
    loss = repa.loss(videos)
    assert -1 <= loss.item() <= 1
    loss.backward()
    first = model.transformer.blocks[0].attn1.to_q.weight.grad
    assert first is not None and first.abs().sum() > 0  # the alignment reaches the denoiser
    assert not any(p.grad is not None for p in classifier.parameters())  # the classifier stays frozen
    with pytest.raises(RuntimeError, match="forward first"):
        repa.loss(videos)
    small = clip_batch(range(1), frames=2, size=16)[0]  # 4 x 4 patches per frame, not the classifier's 8 x 8
    with pytest.raises(ValueError, match="64 patches per frame are not the denoiser's 16"):
        repa.targets(small)
    repa.remove()
    with pytest.raises(ValueError, match=r"repa block must be in \[0, 0\], got 1"):
        video_train.RepresentationAlignment(model, classifier, 1)


def test_repa_resumes_exactly_and_is_recorded(tmp_path, capsys):
    video_train.main(_repa_argv(tmp_path / "whole"))
    video_train.main(_repa_argv(tmp_path / "split", "--stop-at-step", "2"))
    video_train.main(_repa_argv(tmp_path / "split", "--resume", "auto"))
    whole, split = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("whole", "split"))
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    for name, tensor in whole["repa"]["projector"].items():
        assert torch.equal(tensor, split["repa"]["projector"][name]), name
    vals = [e for e in _history(tmp_path / "whole") if "val_loss" in e]
    assert all(-1 <= e["repa_train"] <= 1 for e in vals)
    # The projector is not part of the model: the final folder loads as a plain model.
    assert set(whole["model"]) == set(video_models.build_model("tiny").state_dict())
    assert "representation alignment (REPA) of block 0" in (tmp_path / "whole" / "final" / "README.md").read_text()
    video_models.load_model(tmp_path / "whole" / "final")
    # A run may take REPA up on resume: its projector starts fresh, and the log says so.
    video_train.main(_argv(tmp_path / "late", "--size-px", "32", "--stop-at-step", "2"))
    video_train.main(_repa_argv(tmp_path / "late", "--resume", "auto"))
    resume = next(e for e in _history(tmp_path / "late") if e.get("event") == "resume")
    assert resume["repa_projector"] == "new"
