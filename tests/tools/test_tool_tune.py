"""`tome tune`: the smallest r meeting a FLOPs or speed-up target."""

from __future__ import annotations

import json

import pytest
import torch

import tome
from tome import cli
from tome.tools import tune
from tome.tools.benchmark import count_flops

from tools_helpers import TINY_ARGS, tiny_model


def _ratio(model, schedule):
    x = torch.rand(1, 3, 32, 32)
    model.r = 0
    base = count_flops(model, x)
    model.r = schedule
    return count_flops(model, x) / base


def test_max_useful_r_matches_the_caps():
    # 17 tokens, 1 protected, 2 blocks: r=8 empties the first block's budget, the second can take 4.
    assert tune.max_useful_r(17, 1, 2, "constant") == 8
    assert tome.utils.tokens_per_layer(17, [8, 8], 1)[-1] == tome.utils.tokens_per_layer(17, [99, 99], 1)[-1]
    assert tune.max_useful_r(17, 1, 2, "decreasing") == 4  # (4, -1) gives [8, 0]
    assert tune.max_useful_r(1, 1, 2, "constant") == 0


@pytest.mark.parametrize("kind", ["constant", "decreasing"])
def test_tune_flops_finds_the_smallest_r(kind):
    model = tome.apply_patch(tiny_model(), r=1)
    result = tune.tune_flops(model, 0.8, kind=kind)
    assert model.r == 1  # restored
    assert result.reached and result.kind == kind
    assert result.flops_ratio <= 0.8
    assert _ratio(model, tune.make_schedule(result.r - 1, kind)) > 0.8
    assert result.schedule == (result.r if kind == "constant" else (result.r, -1.0))


def test_tune_flops_unreachable_target():
    model = tome.apply_patch(tiny_model(), r=0)
    result = tune.tune_flops(model, 0.01)
    assert not result.reached and result.r == 8  # the most this model can merge


def test_tune_speedup_binary_search(monkeypatch):
    probed = []

    def fake_speedup(model, x, schedule, **kwargs):
        probed.append(schedule)
        return 1.0 + 0.2 * schedule  # monotone: r=5 is the first at >= 2.0

    monkeypatch.setattr(tune, "measure_speedup", fake_speedup)
    model = tome.apply_patch(tiny_model(), r=0)
    result = tune.tune_speedup(model, 2.0, batch_size=2)
    assert result.reached and result.r == 5 and result.speedup == pytest.approx(2.0)
    assert len(probed) <= 5  # binary search over r in [1, 8]
    missed = tune.tune_speedup(model, 9.0, batch_size=2)
    assert not missed.reached and missed.r == 8


def test_tune_speedup_measures_for_real():
    model = tome.apply_patch(tiny_model(), r=0)
    result = tune.tune_speedup(model, 1.01, batch_size=2, rounds=1, warmup=0)
    assert result.speedup > 0 and 0 <= result.r <= 8


def test_tune_command_flops_with_accuracy(image_folder, tmp_path, capsys):
    out = tmp_path / "tune.json"
    cli.main(["tune", *TINY_ARGS, "--max-flops-ratio", "0.8", "--runs", "1", "--min-time", "0", "--batch-size", "2",
              "--data", str(image_folder), "--workers", "0", "--json", str(out)])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "meets the target" in text and "measured speed-up" in text and "top-1 %" in text
    assert f"tome.apply_patch(model, r={report['r']})" in text
    assert report["reached"] and report["flops_ratio"] <= 0.8
    assert [r["label"] for r in report["accuracy"]["results"]] == ["0", str(report["r"])]


def test_tune_command_unreachable_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(tune, "measure_speedup", lambda *a, **k: 1.1)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", *TINY_ARGS, "--target-speedup", "3", "--batch-size", "2", "--schedule", "decreasing"])
    assert exit_info.value.code == 1
    assert "CANNOT meet" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-speedup", "0.5"], "0.5"),
        (["--max-flops-ratio", "1.5"], "1.5"),
        (["--target-speedup", "fast"], "'fast'"),
        (["--target-speedup", "2", "--max-flops-ratio", "0.5"], "not allowed with"),
        ([], "one of the arguments"),
        (["--max-flops-ratio", "0.5", "--schedule", "zigzag"], "'zigzag'"),
    ],
)
def test_tune_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", *TINY_ARGS, *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
