"""benchmarks/vlm_fastv_modes.py on a shipped VLM (offline, a few questions, no accuracy assertions)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vlm_fastv_modes.py"


def test_rows_pair_each_mode_with_the_unreduced_model_and_count_the_layers():
    spec = importlib.util.spec_from_file_location("vlm_fastv_modes_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from tome.data import vqa

    samples = [vqa.make_sample(i, "val", seed=0, image_size=224) for i in range(4)]
    rows = module.study("vqa-llava", samples, [0.25], settings=[("select", 1), ("drop", 1)])
    assert [(r["mode"], r["cost"]) for r in rows] == [("select", "1 F + 3 S"), ("drop", "1 F + 2 S")]
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["full_accuracy"] <= 1 for r in rows)
    assert "| `vqa-llava` | 25% | drop | 1 | 1 F + 2 S |" in module.table(rows)
