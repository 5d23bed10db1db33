"""benchmarks/vlm_speed.py runs its every group on tiny widths (``--quick``) and writes its tables,
so the speed benchmark of visual-token reduction cannot rot. No timing is asserted: what is
checked is what the numbers stand on (sequence lengths, KV-cache bytes, the FLOP ceiling)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vlm_speed.py"


def _load():
    spec = importlib.util.spec_from_file_location("vlm_speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_group(tmp_path):
    bench = _load()
    report = bench.main(["--quick", "--threads", "1", "--prop-attn", "--out", str(tmp_path), "--name", "quick"])
    saved = json.loads((tmp_path / "quick.json").read_text())
    table = (tmp_path / "quick.md").read_text()
    setup = bench.PRESETS["quick"]
    text = setup.text
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    kv_per_token = 2 * setup.lm_layers * text["num_key_value_heads"] * head_dim * 2  # keys and values, bf16

    assert set(saved["methods"]) | set(saved["tower_methods"]) | set(saved["not_wired"]) == set(bench.METHODS)
    # every method runs: FastV at K = 1 of the 2 layers, VisionZip in the pixels-in rows
    assert {"random", "pool", "tome", "divprune", "cdpruner", "fastv"} <= set(saved["methods"])
    assert saved["tower_methods"] == ["visionzip"] and not saved["not_wired"]
    for group, tokens in zip(saved["prefill"], (64, 32)):  # 224 px image: 8 x 8 merged; 4 frames of 112 px: 2 x 4 x 4
        assert group["tokens"] == tokens and group["tower_s"] > 0
        rows = {(row["method"], row["budget"]): row for row in group["rows"]}
        prop = {(f"{m}+prop_attn", b) for m in bench.PROP_METHODS for b in setup.budgets}
        assert set(rows) == {("-", 1.0)} | {(m, b) for m in saved["methods"] for b in setup.budgets} | prop
        full = rows["-", 1.0]
        assert full["sequence"] == group["sequence"] and full["ceiling"] == 1.0
        for (method, budget), row in rows.items():
            assert row["kv_bytes"] == kv_per_token * row["sequence"]  # read from the cache after prefill
            assert len(row["times_s"]) == setup.rounds
            # the decoder layers' span is inside each prefill it was timed in, and not empty
            assert len(row["layers_times_s"]) == setup.rounds
            assert all(0 < inner < outer for inner, outer in zip(row["layers_times_s"], row["times_s"]))
            if method != "-":
                assert row["visual_tokens"] <= bench.vt.resolve_budget(budget, tokens)
                if method.endswith("+prop_attn"):  # the same tokens as without, through the additive mask
                    assert row["sequence"] == rows[method.split("+")[0], budget]["sequence"]
                if method in ("random", "divprune", "cdpruner"):  # selections pass exactly the budget on
                    assert row["visual_tokens"] == bench.vt.resolve_budget(budget, tokens)
                assert row["sequence"] == group["sequence"] - tokens + row["visual_tokens"]
                shorter = group["sequence"] / row["sequence"]  # linear terms alone; the quadratic term adds
                assert shorter <= row["ceiling"] <= shorter**2
                assert row["selection_s"] > 0 and 0 < row["selection_share"] < 1
                assert 1 < row["ceiling_here"] < row["ceiling_3b_depth"] < row["ceiling"]
    for group, tokens in zip(saved["pixels"], (64, 32)):
        rows = {(row["method"], row["budget"]): row for row in group["rows"]}
        assert set(rows) == {("-", 1.0)} | {(m, b) for m in (bench.DEFAULT_METHOD, "visionzip") for b in setup.budgets}
        for (method, budget), row in rows.items():
            assert len(row["times_s"]) == setup.rounds
            assert row["sequence"] == group["sequence"] - tokens + row["visual_tokens"]
            if method != "-":
                assert row["visual_tokens"] == bench.vt.resolve_budget(budget, tokens)
                assert row["selection_s"] > 0 and 0 < row["selection_share"] < 1
    decode = {row["budget"]: row for row in saved["generate"]["rows"]}
    assert set(decode) == {1.0, *setup.budgets}
    for budget, row in decode.items():
        image = {r["budget"]: r for r in saved["prefill"][0]["rows"] if r["method"] in ("-", bench.DEFAULT_METHOD)}
        assert row["cache_tokens"] == image[budget]["sequence"]  # the same reduction, through generate
        assert row["kv_bytes"] == kv_per_token * row["cache_tokens"] and row["decode_tokens_per_s"] > 0
    assert report["machine"]["load_average"] and "load average" in table
    assert "### Prefill, one image" in table and "### Prefill, one video" in table and "decode tokens/s" in table
    assert "| tome | 11% |" in table and "layers speed-up (of ceiling)" in table
    assert "### Prefill with the pixels in, one image" in table and "| visionzip | 11% |" in table


@pytest.mark.parametrize("method, module, name", [("visionzip", "_vlm_attention", "_qwen_scores"),
                                                  ("fastv", "_vlm", "_fastv_row")])
def test_selection_timer_counts_the_scores_a_method_ranks_by(monkeypatch, method, module, name):
    """The selection share of VisionZip and FastV includes what they rank by (the tower's
    attention, the probe of the first layers): the timer wraps those functions, and the
    integration reaches them through their module, so the wrapped one is what runs."""
    import torch

    from tome.patch import _vlm, _vlm_attention

    bench = _load()
    target = {"_vlm": _vlm, "_vlm_attention": _vlm_attention}[module]
    calls = []
    original = getattr(target, name)

    def slow(*args, **kwargs):  # 50 ms the timer must see
        calls.append(1)
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, slow)
    setup = bench.PRESETS["quick"]
    device = torch.device("cpu")
    model = bench.build_model(setup, device)
    inputs = bench.make_inputs(model, setup, "image", device)
    timer = bench.SelectionTimer(device)
    with bench.reduction_context(model, method, 0.25)(), timer.active(), torch.inference_mode():
        scored = timer.seconds
        model(**inputs, logits_to_keep=1)
        inside = timer.seconds
    assert calls == [1] and scored == 0 and inside >= 0.05
    # outside the timer, the module holds the function it held before
    assert getattr(target, name) is slow


def test_ceiling_formula_counts_what_the_layer_computes():
    """The linear terms of ``lm_layer_flops`` equal what torch's FLOP counter counts for one
    decoder layer's projections and MLP (attention itself is counted by the formula's causal term)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    bench = _load()
    text = bench.PRESETS["quick"].text
    config = Qwen2Config(**{k: v for k, v in text.items() if k != "rope_parameters"})
    n, d = 37, text["hidden_size"]
    head_dim = d // text["num_attention_heads"]
    q = torch.nn.Linear(d, d)
    k = torch.nn.Linear(d, text["num_key_value_heads"] * head_dim)
    x = torch.randn(n, d)
    with FlopCounterMode(display=False) as counter:
        q(x), q(x), k(x), k(x), Qwen2MLP(config)(x)  # q and o, k and v, the gated MLP
    attention = 2 * n * (n + 1) * d
    assert bench.lm_layer_flops(n, text) == counter.get_total_flops() + attention
