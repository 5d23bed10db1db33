"""benchmarks/vlm_study.py: its ``--quick`` path on the shipped VLMs (offline, no accuracy
assertions), its paired statistics and its in-tower merge schedule."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vlm_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("vlm_study_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def test_paired_share_and_difference(study):
    reduced = [1, 0, 1, 1, 0, 0, 1, 0]
    full = [1, 1, 1, 0, 0, 1, 1, 0]
    out = study.paired(reduced, full)
    r, f = torch.tensor(reduced, dtype=torch.float64), torch.tensor(full, dtype=torch.float64)
    assert math.isclose(out["delta"], 100 * (4 - 5) / 8)
    assert math.isclose(out["delta_se"], 100 * float((r - f).std()) / math.sqrt(8))
    share = 4 / 5
    assert math.isclose(out["share"], 100 * share)
    # Delta method for a ratio of paired means: Var(r)/f^2 - 2 s Cov(r, f)/f^2 + s^2 Var(f)/f^2.
    var = (r.var() - 2 * share * torch.cov(torch.stack([r, f]))[0, 1] + share ** 2 * f.var()) / 8
    assert math.isclose(out["share_se"], 100 * math.sqrt(float(var)) / 0.625, rel_tol=1e-9)
    assert math.isnan(study.paired([1, 0], [0, 0])["share"])
    with pytest.raises(ValueError, match="as many"):
        study.paired([1], [1, 0])


@pytest.mark.parametrize("keep", [32, 16, 8, 4, 1])
def test_tower_schedule_reaches_the_budget(study, keep):
    schedule = study.tower_schedule(64, 4, keep)
    n = 64
    for r in schedule:
        assert 0 <= r <= n // 2  # ToMe removes at most half of a layer's tokens
        n -= r
    assert n == max(keep, 4)  # four halvings of 64 reach 4 at best


def test_quick_study_writes_its_tables(study, tmp_path, capsys):
    out = tmp_path / "study.md"
    out.write_text("# page\n<!-- results:begin -->\n<!-- results:end -->\ntail\n")
    json_path = tmp_path / "study.json"
    assert study.main(["--quick", "--methods", "pool,tower-tome", "--out", str(out), "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    assert text.startswith("# page\n") and text.endswith("tail\n")
    assert "| model | method | budget | tokens | accuracy % | share kept % ± SE | delta points ± SE |" in printed
    assert "| model | method | budget | count | exist | colour | spatial | read |" in printed
    # Qwen2.5-VL: 64 merged tokens at 224 px; the LLaVA model: 256 (patch 14 at 224 px).
    for row in ("| `vqa-qwen2_5_vl` | none | 100 % | 64 |", "| `vqa-qwen2_5_vl` | pool | 25% | 16 |",
                "| `vqa-llava` | none | 100 % | 256 |", "| `vqa-llava` | pool | 25% | 64 |",
                "| `vqa-llava` | tower-tome | 25% | 64 |"):
        assert row in printed
    assert "| `vqa-qwen2_5_vl` | tower-tome | 25% | no in-tower ToMe for Qwen2.5-VL" in printed
    assert "renumber - keep |\n|---|---|---|---|---|---|\n| `vqa-llava` | pool | 25% |" in printed
    # prop_attn: each model's merging method paired against its own row without, not in the main table
    prop = printed[printed.index("Proportional attention"):printed.index("Merged-token positions")]
    assert "| `vqa-qwen2_5_vl` | pool | 25% |" in prop and "| `vqa-llava` | pool | 25% |" in prop
    assert "tower-tome" not in prop
    assert printed.count("| `vqa-llava` | pool | 25% | 64 |") == 1
    # The video part: Qwen2.5-VL on 8-frame clips (4 x 64 tokens), with tome's temporal-rule ablation.
    video = printed[printed.index("Video: the same questions"):printed.index("Not measured")]
    assert "| `vqa-qwen2_5_vl` | none (8 frames) | 100 % | 256 |" in video
    assert "| `vqa-qwen2_5_vl` | pool | 25% | 64 |" in video and "tower-tome" not in video
    assert "| `vqa-llava` | – | – | – | – | the LLaVA-style model takes images only" in video
    results = json.loads(json_path.read_text())
    assert results["questions"] == 10 and results["budgets"] == [0.25]
    # Every row of the JSON is one question's hit per question, paired with the unreduced ones.
    for res in results["models"]:
        assert len(res["full"]["hits"]) == 10
        assert all(len(row["hits"]) == 10 for row in res["rows"] if "skipped" not in row)
        assert [row["method"] for row in res["rows"] if row.get("prop_attn")] == ["pool"]
    # --from-json redraws the same tables from the file (hits stored as "0110..." strings).
    assert study.main(["--from-json", "--json", str(json_path)]) == 0
    assert capsys.readouterr().out == printed
    assert "tome-spatial" not in __import__("tome").visual_tokens.METHODS  # registered for the study only


def test_video_part_reruns_alone_and_keeps_the_image_part(study, tmp_path, capsys):
    json_path = tmp_path / "study.json"
    with pytest.raises(SystemExit):  # nothing to take the image part from
        study.main(["--quick", "--parts", "video", "--json", str(json_path)])
    capsys.readouterr()
    assert study.main(["--quick", "--parts", "images", "--methods", "pool", "--json", str(json_path)]) == 0
    first = json.loads(json_path.read_text())
    assert all(res["video"] is None for res in first["models"])
    assert "Video: not measured" in capsys.readouterr().out
    assert study.main(["--quick", "--parts", "video", "--methods", "tome", "--video-frames", "4",
                       "--json", str(json_path)]) == 0
    printed = capsys.readouterr().out
    second = json.loads(json_path.read_text())
    for old, new in zip(first["models"], second["models"]):
        assert {k: v for k, v in old.items() if k != "video"} == {k: v for k, v in new.items() if k != "video"}
    qwen = second["models"][0]["video"]
    assert qwen["frames"] == 4 and qwen["visual_tokens"] == 128
    assert [(r["method"], r["tokens"]) for r in qwen["rows"]] == [("tome", 32), ("tome-spatial", 32)]
    assert len(qwen["full"]["hits"]) == 10
    assert "| `vqa-qwen2_5_vl` | tome-spatial | 25% | 32 |" in printed


def test_unreduced_hits_match_the_training_validation(study):
    from tome.data import vqa
    from tome.tools.vlm_train import evaluate
    from tome.vlm_models import SHIPPED_VLMS

    model, processor, arch = study.load(SHIPPED_VLMS["vqa-llava"])
    samples = [vqa.make_sample(i, "val", seed=0) for i in range(20)]
    hits = study.hits(model, processor, arch, samples, batch_size=7)
    assert math.isclose(sum(hits) / 20, evaluate(model, processor, arch, samples)["overall"])
