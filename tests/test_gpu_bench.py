"""benchmarks/gpu.py runs its every code path on the CPU (``--device cpu --quick``), so the
GPU script cannot rot between the sessions that have a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("tomesd")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_covers_every_section(tmp_path):
    import tome

    report = _load().main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path), "--name", "quick"])
    assert report["errors"] == [] and report["skipped"] == []
    assert tome.get_prop_attn_kernel() == "auto"  # every variant restored the setting

    saved = json.loads((tmp_path / "quick.json").read_text())
    assert saved["elapsed_s"] == pytest.approx(report["elapsed_s"])
    table = (tmp_path / "quick.md").read_text()

    attention = {(row["tokens"], row["variant"]): row for row in saved["attention"]}
    assert {variant for _, variant in attention} == {"mask", "channel", "no bias"}
    for row in saved["attention"]:
        assert row["channel_vs_mask_max_abs_diff"] < 1e-5 and row["sdpa"].startswith("flash-cpu")

    vit = {(row["batch"], row["variant"]): row for row in saved["vit"]}
    for batch in (1, 2):
        labels = {variant for b, variant in vit if b == batch}
        assert {"timm", "tome r=0", "tome r=8", "tome r=16", "tome r=(16,-1)", "tome r=16, mask kernel",
                "tome r=16, channel kernel", "tome r=16, prop_attn off", "published merge r=16"} == labels
        assert vit[batch, "tome r=0"]["max_abs_logit_diff_vs_timm"] == 0
        r16 = vit[batch, "tome r=16"]
        assert r16["max_abs_logit_diff_vs_timm"] > 1e-3 and r16["ceiling"] > 1.1
        for other in ("tome r=16, mask kernel", "tome r=16, channel kernel", "published merge r=16"):
            assert vit[batch, other]["max_abs_logit_diff_vs_tome_r16"] < 1e-4
        assert vit[batch, "tome r=16, prop_attn off"]["max_abs_logit_diff_vs_tome_r16"] > 1e-4
    assert "| tome r=16, channel kernel |" in table

    unet = {row["variant"] for row in saved["unet"]}
    assert {"unmerged", "tomesd 0.1.3 ratio=0.5", "tome tokens ratio=0.5", "tome kv ratio=0.5",
            "tome kv ratio=0.5, mask kernel"} == unet
    assert {row["batch"] for row in saved["unet"]} == {1, 2}
    flux = {row["variant"]: row for row in saved["flux"]}
    assert flux["tome kv ratio=0.5"]["max_abs_diff_vs_unmerged"] > 0
    assert flux["tome kv ratio=0.5, mask kernel"]["max_abs_diff_vs_unmerged"] == pytest.approx(
        flux["tome kv ratio=0.5"]["max_abs_diff_vs_unmerged"], abs=1e-4)

    compiled = {row["variant"]: row for row in saved["compile"]}
    assert set(compiled) == {"timm eager", "timm compiled", "tome r=16 eager", "tome r=16 compiled"}
    assert compiled["tome r=16 compiled"]["recompiles_on_r_switch"] == 0
    assert compiled["tome r=16 compiled"]["compiled_vs_eager_max_abs_diff"] < 1e-4
    assert "Vision-language prefill" in table and "### torch.compile" in table

    vlm = saved["vlm"]  # benchmarks/vlm_speed.py's groups (tests/test_vlm_speed.py checks their numbers)
    assert vlm["setup"]["dtype"] == "bf16" and [group["kind"] for group in vlm["prefill"]] == ["image", "video"]
    for group in vlm["prefill"]:
        assert {(row["method"], row["budget"]) for row in group["rows"]} == {("-", 1.0)} | {
            (m, b) for m in vlm["methods"] + [f"{p}+prop_attn" for p in ("pool", "tome")]
            for b in vlm["setup"]["budgets"]}
    assert len(vlm["generate"]["rows"]) == 1 + len(vlm["setup"]["budgets"])
    assert "### Prefill, one image" in table and "decode tokens/s" in table
