"""How `tome demo` and `tome bench` time: a batch large enough for the matrix products to set
the time, one thread by default for the demo, and rounds whose order rotates."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import tome
import tome.tools.demo_model as demo_model
from tome.tools import demo
from tome.tools.benchmark import time_interleaved

from tools_helpers import tiny_model


@pytest.fixture
def tiny_demo_model(monkeypatch):
    monkeypatch.setattr(demo_model, "load_demo_model", lambda: (tiny_model(), "tiny stand-in model"))


def test_demo_defaults_time_a_compute_bound_batch_on_one_thread():
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo"])
    assert (args.batch_size, args.runs, args.threads) == (256, 7, 1)
    assert parser.parse_args(["demo", "--threads", "0"]).threads == 0  # torch's default


def test_demo_sets_its_threads_for_the_timings_and_restores_them(tiny_demo_model, tmp_path, capsys):
    before = torch.get_num_threads()
    seen = []
    original = demo.measure_schedules

    def measure(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    demo.measure_schedules = measure
    try:
        result = demo.run_demo(output_dir=str(tmp_path), batch_size=2, rounds=1, min_time=0, threads=2)
    finally:
        demo.measure_schedules = original
    assert seen == [2] and torch.get_num_threads() == before
    assert json.loads(result["json"].read_text())["threads"] == 2
    assert "2 CPU threads (--threads)" in capsys.readouterr().out


def test_rounds_rotate_which_setting_runs_first():
    model = tome.apply_patch(tiny_model())
    order = []
    model.register_forward_pre_hook(lambda module, args: order.append(module.r))
    time_interleaved(model, torch.rand(1, 3, 32, 32), [0, 2, 4], rounds=3, warmup=0)
    assert order == [0, 2, 4, 2, 4, 0, 4, 0, 2]
