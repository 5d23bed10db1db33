"""``--method`` on ``tome eval``, ``tome bench`` and ``tome tune``."""

from __future__ import annotations

import json

import pytest

from tome import cli
from tome.tools._common import expand_settings, parse_methods

from tools_helpers import TINY_ARGS


def test_parse_methods_and_settings():
    assert parse_methods("all") == ["tome", "pitome", "tofu"]
    assert parse_methods("pitome, tofu") == ["pitome", "tofu"]
    with pytest.raises(ValueError, match=r"'tofuu' is not a merge method; expected one of \['tome', 'pitome', 'tofu'\]"):
        parse_methods("tome,tofuu")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("tome,tome")
    assert expand_settings([0, 4, (2, -1.0)], ["tome", "tofu"]) == (
        [0, 4, 4, (2, -1.0), (2, -1.0)], [None, "tome", "tofu", "tome", "tofu"])


def test_eval_command_one_row_per_method(image_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    cli.main(["eval", *TINY_ARGS, "--data", str(image_folder), "-r", "0,3", "--method", "all", "--workers", "0",
              "--batch-size", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert "method" in text and "pitome" in text and "tofu" in text
    results = json.loads(out.read_text())["results"]
    assert [(r["label"], r["method"]) for r in results] == [("0", None), ("3", "tome"), ("3", "pitome"),
                                                           ("3", "tofu")]


def test_bench_command_one_row_per_method(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cli.main(["bench", *TINY_ARGS, "-r", "0,3", "--method", "tome,pitome", "--runs", "1", "--min-time", "0",
              "--warmup", "0", "--batch-size", "2", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["label"], r["method"]) for r in rows] == [("0", None), ("3", "tome"), ("3", "pitome")]
    assert rows[1]["tokens_left"] == rows[2]["tokens_left"]  # same schedule, same token count
    assert "pitome" in capsys.readouterr().out


def test_tune_command_picks_a_method(image_folder, tmp_path, capsys):
    out = tmp_path / "tune.json"
    cli.main(["tune", *TINY_ARGS, "--max-flops-ratio", "0.8", "--method", "all", "--runs", "1", "--min-time", "0",
              "--batch-size", "2", "--data", str(image_folder), "--workers", "0", "--json", str(out)])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["method"] in ("tome", "pitome", "tofu") and f"with method {report['method']}" in text
    assert [m["method"] for m in report["methods"]] == ["tome", "pitome", "tofu"]
    assert [r["method"] for r in report["accuracy"]["results"]] == [None, "tome", "pitome", "tofu"]


def test_tune_several_methods_need_data(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", *TINY_ARGS, "--max-flops-ratio", "0.8", "--method", "tome,tofu"])
    assert exit_info.value.code == 2
    assert "needs --data" in capsys.readouterr().err
