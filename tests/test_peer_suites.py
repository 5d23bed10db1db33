"""The peer-suite runner's own pieces (benchmarks/peer_suites): the diffusers plugin's lifted
accelerator gates and merge records, and the runner's "merged nothing" report. Nothing is
downloaded: the plugin runs on a small generated test file."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_suites"

PEER_TESTS = '''
import pytest
import torch
from diffusers import FluxTransformer2DModel

gate = pytest.mark.skipif(True, reason="test requires a hardware accelerator")


@gate
class TestGated:
    def test_runs_on_cpu(self):
        assert torch.ones(1).device.type == "cpu"

    def test_needs_cuda(self):
        torch.cuda.Stream()  # no CUDA here: the gate was right


@pytest.mark.skipif(True, reason="test requires a GPU with at least 24 GB memory")
def test_kept_gate():
    pass


def test_flux_with_random_ids():
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, generator=gen), encoder_hidden_states=torch.randn(1, 3, 16),
                  pooled_projections=torch.randn(1, 16), timestep=torch.ones(1), txt_ids=torch.zeros(3, 3))
    with torch.no_grad():
        model(**inputs, img_ids=ids.reshape(-1, 3))  # the pipelines' grid
        model(**inputs, img_ids=torch.randn(16, 3, generator=gen))  # as diffusers' own tests pass
'''


def _load_runner():
    spec = importlib.util.spec_from_file_location("peer_suites_run", HERE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_plugin(tmp_path: Path, setting: str) -> tuple:
    (tmp_path / "test_peer.py").write_text(PEER_TESTS)
    (tmp_path / "tome_peer_plugin.py").write_text((HERE / "plugin.py").read_text())
    log, xml = tmp_path / f"{setting}.log", tmp_path / f"{setting}.xml"
    env = {**os.environ, "TOME_PEER_R": setting, "TOME_PEER_LOG": str(log), "TOME_PEER_DIFFUSERS": "1",
           "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tome_peer_plugin", "-q",
                    f"--junitxml={xml}", "test_peer.py"], cwd=tmp_path, env=env, capture_output=True, check=False)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcomes[case.get("name")] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    lines = [json.loads(line) for line in Path(f"{log}.jsonl").read_text().splitlines()]
    return outcomes, lines, log.read_text() if log.exists() else ""


def test_diffusers_plugin_lifts_accelerator_gates_and_records_what_merged(tmp_path):
    outcomes, lines, log = _run_plugin(tmp_path, "0.5")
    # lifted: a test that runs on the CPU runs; one that needs CUDA is counted as skipped, not failed
    assert outcomes == {"test_runs_on_cpu": "passed", "test_needs_cuda": "skipped", "test_kept_gate": "skipped",
                        "test_flux_with_random_ids": "passed"}
    assert "patched\tdiffusers FluxTransformer2DModel" in log and "lifted-skip\ttest_peer.py::TestGated::test_needs_cuda" in log
    flux = "test_peer.py::test_flux_with_random_ids"
    assert {"test": flux, "nothing_merged": 1} in lines  # the call with random ids warned
    calls = next(entry["attention"] for entry in lines if entry["test"] == flux and "attention" in entry)
    # two joint attention calls per forward over 3 text + 16 image tokens: the grid call's keys merged
    assert calls == [[19, 11], [19, 11], [19, 19], [19, 19]]
    baseline = tmp_path / "0.log.jsonl"  # what ratio 0 records for the same test
    baseline.write_text(json.dumps({"test": flux, "attention": [[19, 19]] * 4}))
    report = _load_runner().attention_report(tmp_path / "0.5.log.jsonl", baseline)
    assert report["test_peer::test_flux_with_random_ids"] == {"ran": 1, "warned": 1, "same": 0}  # as JUnit names it
    assert report["test_peer.TestGated::test_runs_on_cpu"] == {"ran": 0, "warned": 0, "same": 0}
    baseline.write_text(json.dumps({"test": flux, "attention": calls}))  # had nothing merged, the report says so
    report = _load_runner().attention_report(tmp_path / "0.5.log.jsonl", baseline)
    assert report["test_peer::test_flux_with_random_ids"]["same"] == 1


def test_attention_report_flags_a_test_whose_attention_kept_every_length(tmp_path):
    run = _load_runner()
    base, now = tmp_path / "0.jsonl", tmp_path / "0.5.jsonl"
    base.write_text("\n".join(json.dumps(e) for e in [
        {"test": "t/a.py::A::a", "attention": [[16, 16], [16, 19]]}, {"test": "t/a.py::A::b", "attention": [[16, 16]]},
        {"test": "t/a.py::c", "attention": []}]))
    now.write_text("\n".join(json.dumps(e) for e in [
        {"test": "t/a.py::A::a", "attention": [[16, 8], [16, 11]]}, {"test": "t/a.py::A::b", "attention": [[16, 16]]},
        {"test": "t/a.py::A::b", "nothing_merged": 1}, {"test": "t/a.py::A::b", "nothing_merged": 1},
        {"test": "t/a.py::c", "attention": []}]))
    assert run.attention_report(now, base) == {
        "t.a.A::a": {"ran": 1, "warned": 0, "same": 0},
        "t.a.A::b": {"ran": 1, "warned": 2, "same": 1},
        "t.a::c": {"ran": 0, "warned": 0, "same": 0},
    }
    assert run._is_setting("0.5", ratio=True) and not run._is_setting("1.5", ratio=True)
    assert run._is_setting("4", ratio=False) and not run._is_setting("0.5", ratio=False)
