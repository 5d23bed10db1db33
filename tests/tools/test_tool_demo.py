"""`tome demo`: the README's first command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import tome.tools.demo_model as demo_model
from tome import cli
from tome.tools.demo import demo_schedules, run_demo
from tome.tools.sample_image import sample_image
from tome.tools.visualize import LABEL_HEIGHT, MIN_PANEL, PANEL_GAP

from tools_helpers import tiny_model


@pytest.fixture
def tiny_demo_model(monkeypatch):
    """Stand in a tiny model for the embedded default (the real one is tested by its owner)."""
    calls = []

    def load():
        calls.append(1)
        return tiny_model(), "tiny stand-in model"

    monkeypatch.setattr(demo_model, "load_demo_model", load)
    return calls


def test_demo_schedules():
    assert demo_schedules(197, 1, 12) == [0, 8, 13, 16]  # the paper's values for ViT/16 at 224
    # The shipped model (64 patches, 6 blocks): the same share of patches merged as the paper's r.
    assert demo_schedules(65, 1, 6) == [0, 5, 8, 10]
    small = demo_schedules(17, 1, 2)
    assert small[0] == 0 and small == sorted(set(small)) and max(small) == 8  # 8 is the most 17 tokens allow
    assert demo_schedules(1, 1, 2) == [0]


def test_demo_command(tiny_demo_model, tmp_path, capsys):
    out_dir = tmp_path / "outputs"
    cli.main(["demo", "-o", str(out_dir), "--runs", "1", "--batch-size", "2", "--min-time", "0"])
    text = capsys.readouterr().out
    assert tiny_demo_model == [1]
    assert "tiny stand-in model" in text and "tokens left" in text and "speed-up" in text
    assert str(out_dir / "demo_merges.png") in text and str(out_dir / "demo_benchmark.json") in text
    report = json.loads((out_dir / "demo_benchmark.json").read_text())
    shown = [row["r"] for row in report["results"]]
    assert shown[0] == 0 and len(shown) >= 2
    scale = -(-MIN_PANEL // 32)
    with Image.open(out_dir / "demo_merges.png") as image:
        panels = len(shown)  # the input, then every r but 0
        assert image.size == (panels * 32 * scale + (panels - 1) * PANEL_GAP, 32 * scale + LABEL_HEIGHT)


def test_demo_runs_shapes_long_by_default(tmp_path, capsys):
    cli.main(["demo", "-o", str(tmp_path), "--runs", "1", "--batch-size", "2", "--min-time", "0"])
    text = capsys.readouterr().out
    assert "ToMe demo on shipped model shapes-long " in text and "95.85% val top-1" in text


def test_demo_default_output_dir(tiny_demo_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_demo(batch_size=1, rounds=1, min_time=0)
    assert result["visualization"] == Path("tome_outputs") / "demo_merges.png"
    assert result["json"] == Path("tome_outputs") / "demo_benchmark.json"
    assert (tmp_path / "tome_outputs" / "demo_merges.png").is_file()
    assert (tmp_path / "tome_outputs" / "demo_benchmark.json").is_file()


def test_demo_output_dir_checked_before_the_model_loads(tiny_demo_model, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "-o", str(blocker / "out")])
    assert exit_info.value.code == 2
    assert f"lies under {str(blocker)!r}, which is a file" in capsys.readouterr().err
    assert tiny_demo_model == []  # nothing was loaded or timed


def test_sample_image_is_deterministic():
    a, b = sample_image(64), sample_image(64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="8"):
        sample_image(8)
