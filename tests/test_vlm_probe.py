"""benchmarks/vlm_probe.py: the linear probe itself, and one small run on a shipped VLM (offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vlm_probe.py"


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("vlm_probe_benchmark", SCRIPT)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_the_probe_finds_a_linear_label_and_not_a_random_one(module):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 16, 8))
    linear = (features[..., 0] > 0).astype(np.int64) + 2 * (features[..., 1] > 0)  # 4 classes, read off 2 axes
    every = np.ones(linear.shape, dtype=bool)
    assert module.probe(features, linear, every, train=40) > 0.9
    noise = rng.integers(0, 4, size=linear.shape)
    assert module.probe(features, noise, every, train=40) < 0.4
    # Only the given cells are fitted and scored: a label defined on half the cells only.
    half = every.copy()
    half[:, 8:] = False
    assert module.probe(features, np.where(half, linear, -7), half, train=40) > 0.9


def test_a_shipped_model_gives_a_row_of_accuracies(module):
    row = module.study("vqa-llava", images=10)
    assert row["grid"] == 16 and all(0 <= row[k] <= 1 for k in module.LABELS)
    assert "| `vqa-llava` | 16 x 16 |" in module.table([row]) and "| chance | | 12.5 | 12.5 |" in module.table([row])
