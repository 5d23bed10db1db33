"""tome.utils.benchmark and `tome bench`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import tome
from tome import cli
from tome.tools.benchmark import count_flops, measure_schedules, resolve_device, time_interleaved

from tools_helpers import TINY_ARGS, tiny_model


def test_benchmark_original_signature_on_cpu():
    model = tome.apply_patch(tiny_model(), r=2)
    throughput = tome.utils.benchmark(model, device="cpu", input_size=(3, 32, 32), batch_size=2, runs=3,
                                      throw_out=0.34)
    assert throughput > 0


def test_benchmark_integer_device_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(0) == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="'tpu9'"):
        resolve_device("tpu9")


@pytest.mark.parametrize("kwargs, bad", [({"runs": 0}, "0"), ({"throw_out": 1.0}, "1.0"), ({"batch_size": 0}, "0")])
def test_benchmark_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        tome.utils.benchmark(tiny_model(), device="cpu", input_size=(3, 32, 32), **kwargs)


def test_flops_are_counted_not_formula():
    model = tiny_model()
    x = torch.rand(1, 3, 32, 32)
    plain = count_flops(model, x)
    tome.apply_patch(model, r=0)
    assert count_flops(model, x) == plain  # r=0 runs the same operations
    model.r = 4
    assert count_flops(model, x) < plain
    assert plain > 0


def test_measure_schedules_rows():
    model = tome.apply_patch(tiny_model(), r=1)
    rows = measure_schedules(model, [2, 4, (3, -1.0)], batch_size=2, device=torch.device("cpu"), rounds=2, warmup=1)
    assert [row["label"] for row in rows] == ["0", "2", "4", "3:-1"]  # r=0 added as the baseline
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[0]["flops_ratio"] == pytest.approx(1.0)
    tokens = [row["tokens_left"] for row in rows]
    assert tokens[:3] == [17, 13, 9]  # 16 patches + class token, 2 blocks
    assert tokens[3] == 17 - 6 - 0  # (3, -1.0) on 2 blocks is [6, 0]
    assert rows[3]["schedule"] == [6, 0]
    assert rows[2]["gflops"] < rows[1]["gflops"] < rows[0]["gflops"]
    assert all(row["images_per_s"] > 0 and row["peak_memory_mib"] is None for row in rows)
    assert model.r == 1  # restored


def test_time_interleaved_needs_a_patched_model():
    with pytest.raises(TypeError, match="apply_patch"):
        time_interleaved(tiny_model(), torch.rand(1, 3, 32, 32), [0, 2])


def test_bench_command_writes_json_and_plot(tmp_path, capsys):
    json_path, png_path = tmp_path / "out" / "bench.json", tmp_path / "bench.png"
    cli.main(["bench", *TINY_ARGS, "-r", "0,2,4", "--batch-size", "2", "--runs", "2", "--warmup", "1",
              "--device", "cpu", "--json", str(json_path), "--plot", str(png_path)])
    out = capsys.readouterr().out
    assert "tokens left" in out and "GFLOPs" in out and "speed-up" in out
    report = json.loads(json_path.read_text())
    assert [row["r"] for row in report["results"]] == [0, 2, 4]
    assert report["batch_size"] == 2 and report["input_size"] == [3, 32, 32] and report["dtype"] == "fp32"
    assert report["results"][2]["tokens_left"] == 9
    with Image.open(png_path) as image:
        assert image.size == (1000, 400)


def test_bench_bf16_autocast_runs(capsys):
    cli.main(["bench", *TINY_ARGS, "-r", "0,2", "--batch-size", "2", "--runs", "1", "--warmup", "0",
              "--device", "cpu", "--dtype", "bf16"])
    assert "bf16" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, bad",
    [
        (["-r", "0,8x"], "'8x'"),
        (["-r", "0,-3"], "'-3'"),
        (["-r", "16:2"], "'16:2'"),
        (["-r", "4,4"], "repeats 4"),
        (["--batch-size", "0"], "'0'"),
        (["--dtype", "fp8"], "'fp8'"),
        (["--device", "tpu9"], "'tpu9'"),
    ],
)
def test_bench_bad_arguments_are_named(args, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *TINY_ARGS, *args])
    assert exit_info.value.code == 2
    assert bad in capsys.readouterr().err
