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
    cli.main(["bench", *TINY_ARGS, "-r", "0,2,4", "--batch-size", "2", "--runs", "2", "--warmup", "1", "--min-time", "0",
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
    cli.main(["bench", *TINY_ARGS, "-r", "0,2", "--batch-size", "2", "--runs", "1", "--warmup", "0", "--min-time", "0",
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


def _slowed(model, seconds: float):
    """Make every forward of ``model`` take at least ``seconds``; returns the list of forward calls."""
    import time

    calls = []

    def hook(module, args):
        calls.append(1)
        time.sleep(seconds)

    model.register_forward_pre_hook(hook)
    return calls


def test_benchmark_throughput_matches_the_forward_time():
    model = tome.apply_patch(tiny_model(), r=0)
    _slowed(model, 0.02)
    throughput = tome.utils.benchmark(model, device="cpu", input_size=(3, 32, 32), batch_size=2, runs=4,
                                      throw_out=0.25)
    assert 10 < throughput <= 100  # 2 images per forward of a little over 0.02 s


def test_time_interleaved_repeats_forwards_for_min_time():
    import time

    model = tome.apply_patch(tiny_model(), r=1)
    calls = _slowed(model, 0.005)
    start = time.perf_counter()
    times = time_interleaved(model, torch.rand(1, 3, 32, 32), [0, 2], rounds=2, warmup=0, min_time=0.2)
    elapsed = time.perf_counter() - start
    assert [len(t) for t in times] == [2, 2]
    assert elapsed >= 2 * 2 * 0.2  # every one of the 2 x 2 timings covers min_time
    assert len(calls) > 2 * 2 * 2  # by repeating the forward
    assert all(t < 0.1 for setting in times for t in setting)  # reported per forward, not per timing
    assert model.r == 1  # restored
    with pytest.raises(ValueError, match="-1"):
        time_interleaved(model, torch.rand(1, 3, 32, 32), [0], min_time=-1)


def test_speedup_is_the_median_of_per_round_ratios():
    from tome.tools.benchmark import speedup_stats

    base = [1.0, 2.0, 1.0]  # the machine slowed down in round 2, for every setting alike
    merged = [0.5, 1.0, 0.4]
    assert speedup_stats([base, merged]) == [(1.0, 1.0, 1.0), (2.0, 2.0, 2.5)]


def test_speedup_above_the_flop_ceiling_is_flagged_noisy(monkeypatch, capsys):
    import tome.tools.benchmark as benchmark

    def fake_times(model, x, schedules, **kwargs):
        # r=1 and r=2 keep over 85% of the FLOPs; r=2 "runs" 10x faster: impossible, so the machine is to blame.
        return [[1.0, 1.0, 1.0], [0.95, 0.95, 0.95], [0.1, 0.1, 0.1]]

    monkeypatch.setattr(benchmark, "time_interleaved", fake_times)
    rows = measure_schedules(tome.apply_patch(tiny_model()), [0, 1, 2], batch_size=2, device=torch.device("cpu"))
    assert [row["noisy"] for row in rows] == [False, False, True]
    assert rows[2]["speedup"] == pytest.approx(10.0) and rows[2]["flops_ratio"] > 0.5
    assert rows[1]["speedup_low"] == rows[1]["speedup_high"] == pytest.approx(1 / 0.95)
    benchmark.print_rows(rows)
    out = capsys.readouterr().out
    assert "10.00x noisy" in out and "noisy (r = 2)" in out and "1.05-1.05x" in out


def test_bench_checks_output_paths_before_measuring(tmp_path, capsys, monkeypatch):
    import tome.tools.benchmark as benchmark

    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    monkeypatch.setattr(benchmark, "measure_schedules", lambda *a, **k: pytest.fail("measured before the check"))
    for option in ("--json", "--plot"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", *TINY_ARGS, option, str(blocker / "out.file")])
        assert exit_info.value.code == 2
        assert f"{option} '{blocker}/out.file'" in capsys.readouterr().err


def test_bench_progress_stays_off_the_table_without_a_terminal(capsys):
    cli.main(["bench", *TINY_ARGS, "-r", "0,2", "--batch-size", "2", "--runs", "2", "--warmup", "0",
              "--min-time", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "timing" not in captured.out + captured.err and "\r" not in captured.out
    header = next(line for line in captured.out.splitlines() if "tokens left" in line)
    assert header.split()[0] == "r"
