"""benchmarks/vlm_speed.py runs its every group on tiny widths (``--quick``) and writes its tables,
so the speed benchmark of visual-token reduction cannot rot. No timing is asserted: what is
checked is what the numbers stand on (sequence lengths, KV-cache bytes, the FLOP ceiling)."""

from __future__ import annotations

import importlib.util
import json
import sys
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

    assert set(saved["methods"]) | set(saved["not_wired"]) == set(bench.METHODS)
    assert {"random", "pool", "tome", "divprune", "cdpruner"} <= set(saved["methods"])
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
    decode = {row["budget"]: row for row in saved["generate"]["rows"]}
    assert set(decode) == {1.0, *setup.budgets}
    for budget, row in decode.items():
        image = {r["budget"]: r for r in saved["prefill"][0]["rows"] if r["method"] in ("-", bench.DEFAULT_METHOD)}
        assert row["cache_tokens"] == image[budget]["sequence"]  # the same reduction, through generate
        assert row["kv_bytes"] == kv_per_token * row["cache_tokens"] and row["decode_tokens_per_s"] > 0
    assert report["machine"]["load_average"] and "load average" in table
    assert "### Prefill, one image" in table and "### Prefill, one video" in table and "decode tokens/s" in table
    assert "| tome | 11% |" in table and "layers speed-up (of ceiling)" in table


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
