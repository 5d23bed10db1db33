"""benchmarks/video_quality.py runs end to end on a tiny untrained model: a row per (mode, ratio), ratio 0 identical."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "video_quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("video_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_two_samples_give_the_full_table(tmp_path, capsys):
    script = _load()
    result = script.main(["--model", "untrained-tiny", "--classes", "2", "--per-class", "1", "--steps", "2",
                          "--frames", "2", "--size-px", "16", "--threads", "1", "--ratios", "0", "0.5",
                          "--out", str(tmp_path / "q.json")])
    rows = result["rows"]
    assert [(r["mode"], r["ratio"]) for r in rows] == [("-", "real clips (val)"), ("-", "unmerged"), ("kv", 0.0),
                                                       ("kv", 0.5), ("tokens", 0.0), ("tokens", 0.5)]
    assert result["clips"] == 2
    for row in rows[2:]:
        assert 0 <= row["accuracy"] <= 1
        if row["ratio"] == 0:
            assert math.isinf(row["psnr_mean"])  # ratio 0 is the unmerged model, bit for bit
        else:
            assert math.isfinite(row["psnr_mean"]) and row["psnr_min"] <= row["psnr_mean"]  # merging changed the clips
    text = capsys.readouterr().out
    assert "benchmarks/video_quality.py --model untrained-tiny" in text
    assert text.count("\n| ") == 1 + len(rows)  # header row and one line per row (after the separator)
    assert json.loads((tmp_path / "q.json").read_text())["rows"][1]["ratio"] == "unmerged"


def test_psnr_per_clip():
    script = _load()
    a = torch.zeros(2, 3, 2, 4, 4)
    b = a.clone()
    b[1] += 0.2  # 0.1 in [0, 1] pixels: 20 dB
    psnr = script.psnr_per_clip(b, a)
    assert math.isinf(psnr[0]) and psnr[1].item() == pytest.approx(20.0)


def test_bad_arguments_are_refused():
    script = _load()
    with pytest.raises(ValueError, match="every ratio must be in"):
        script.main(["--model", "untrained-tiny", "--ratios", "1.5"])
    with pytest.raises(ValueError, match="--classes must be in"):
        script.main(["--model", "untrained-tiny", "--classes", "0"])


def test_a_run_checkpoint_loads_at_the_run_s_size(tmp_path):
    from tome import video_models

    script = _load()
    model = video_models.build_model("tiny", seed=3)
    torch.save({"model": model.state_dict(), "step": 7}, tmp_path / "checkpoint.pt")
    (tmp_path / "log.jsonl").write_text(json.dumps({"event": "start", "args": {"size": "tiny"}}) + "\n")
    loaded = script._load(str(tmp_path / "checkpoint.pt"))
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_the_real_clips_take_the_background_the_run_trained_on(tmp_path):
    from tome import video_models

    script = _load()
    video_models.save_model(video_models.build_model("tiny"), tmp_path / "final")
    assert script._run_settings(str(tmp_path / "final")) == {}
    (tmp_path / "final" / "log.jsonl").write_text(json.dumps({"event": "start", "args": {"background": "plain"}}) + "\n")
    assert script._run_settings(str(tmp_path / "final"))["background"] == "plain"
    assert script._run_settings(str(tmp_path / "final" / "checkpoint.pt")) == {}


def test_the_shipped_model_loads_by_name_and_is_what_its_card_says(tmp_path, monkeypatch):
    import tome
    from tome import video_models

    script = _load()
    folder = video_models.SHIPPED_VIDEO_MODELS["clips-wan"]
    model = script._load("clips-wan")
    assert not model.training and tuple(model.transformer.config.patch_size) == (1, 6, 6)
    assert sum(p.numel() for p in model.parameters()) == json.loads(
        (folder / "log.jsonl").read_text().splitlines()[0])["parameters"]
    settings = script._run_settings("clips-wan")  # the real clips take the background it trained on
    assert (settings["background"], settings["repa"], settings["size_px"], settings["frames"]) == ("plain", 0.5, 48, 8)
    assert "representation alignment (REPA)" in (folder / "README.md").read_text()
    # Two Euler steps of one clip per class from fixed noise: finite, and ratio 0 is the model bit for bit.
    labels = torch.arange(2)
    noise = torch.randn(2, 3, 8, 48, 48, generator=torch.Generator().manual_seed(0))
    plain = video_models.sample(model, labels, noise, steps=2)
    assert plain.shape == noise.shape and torch.isfinite(plain).all()
    tome.apply_patch(model.transformer, ratio=0.0, mode="kv")
    try:
        assert torch.equal(video_models.sample(model, labels, noise, steps=2), plain)
    finally:
        tome.remove_patch(model.transformer)
    # A local folder of that name wins over the shipped one; an unknown name lists the shipped ones.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips-wan").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no class_conditioned_wan.json\); the shipped ones are \['clips-wan'\]"):
        video_models.load_model("clips-wan")
