"""Weights for the tools: local files, URLs, published ToMe checkpoints, timm pretrained (offline)."""

from __future__ import annotations

import argparse
import time

import pytest
import timm
import torch

from tome import cli
from tome.tools import checkpoints
from tome.tools._models import load_model

from tools_helpers import TINY_ARGS, TINY_KWARGS, TINY_NAME, tiny_model


class NotAllowed:
    """A class that safe loading must refuse to build."""


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("layout", ["model", "state_dict", "bare", "ddp"])
def test_training_checkpoint_layouts(tmp_path, layout):
    reference = tiny_model()
    state = reference.state_dict()
    payload = {
        "model": {"model": state, "epoch": 3, "args": argparse.Namespace(lr=0.1, model=TINY_NAME)},
        "state_dict": {"state_dict": state},
        "bare": state,
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    loaded = load_model(TINY_NAME, model_kwargs=TINY_KWARGS, checkpoint=str(path))
    assert _same_weights(loaded.model, reference)
    assert "weights.pth" in loaded.description and loaded.default_r is None


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    reference = tiny_model()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    assert _same_weights(load_model(TINY_NAME, model_kwargs=TINY_KWARGS, checkpoint=str(path)).model, reference)


def test_unsafe_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_model().state_dict(), "extra": NotAllowed()}, path)
    with pytest.raises(ValueError, match="safe loading refuses"):
        checkpoints.read_state_dict(str(path))


def test_mismatched_checkpoint_is_explained(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(tiny_model(num_classes=7).state_dict(), path)
    with pytest.raises(ValueError, match="other.pth.*head"):
        load_model(TINY_NAME, model_kwargs=TINY_KWARGS, checkpoint=str(path))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="no state_dict"):
        checkpoints.read_state_dict(str(path))


def test_missing_file_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *TINY_ARGS, "--checkpoint", str(tmp_path / "absent.pth")])
    assert exit_info.value.code == 2
    assert "absent.pth" in capsys.readouterr().err


def test_known_checkpoints_registry():
    names = {"deit_S_r13": ("deit_small_patch16_224", 13), "deit_T_r13": ("deit_tiny_patch16_224", 13),
             "vit_B_16_r16": ("vit_base_patch16_224", 16), "vit_L_16_r8": ("vit_large_patch16_224", 8),
             "vit_H_14_r7": ("vit_huge_patch14_224", 7)}
    assert set(checkpoints.KNOWN_CHECKPOINTS) == set(names)
    for name, (arch, r) in names.items():
        known = checkpoints.known_checkpoint(name)
        assert (known.architecture, known.r, known.prop_attn) == (arch, r, True)
        assert known.url.startswith("https://dl.fbaipublicfiles.com/tome/") and known.url.endswith(f"_{name}.pth")
        assert timm.is_model(known.architecture)
    assert checkpoints.known_checkpoint("DEIT_S_R13").name == "deit_S_r13"
    assert checkpoints.known_checkpoint("mae_vit_b_r16").name == "vit_B_16_r16"
    assert checkpoints.known_checkpoint("nothing") is None


def test_known_checkpoint_by_name(tmp_path, monkeypatch):
    # A file with the published layout ({"model": state_dict, ...}) stands in for the download.
    reference = timm.create_model("deit_tiny_patch16_224")
    path = tmp_path / "f367470145_deit_T_r13.pth"
    torch.save({"model": reference.state_dict(), "epoch": 299, "args": argparse.Namespace(model="deit_tiny")}, path)
    seen = []
    monkeypatch.setattr(checkpoints, "_download", lambda url: seen.append(url) or str(path))
    loaded = load_model(checkpoint="deit_T_r13")
    assert seen == [checkpoints.KNOWN_CHECKPOINTS["deit_T_r13"].url]
    assert type(loaded.model).__name__ == "VisionTransformer" and loaded.model.embed_dim == 192
    assert _same_weights(loaded.model, reference)
    assert (loaded.default_r, loaded.prop_attn) == (13, True)
    assert loaded.data_overrides["mean"] == (0.485, 0.456, 0.406) and loaded.data_overrides["crop_pct"] == 0.875
    model = loaded.patch()
    assert model._tome_info["prop_attn"] is True


def test_known_mae_checkpoint_builds_average_pooling():
    known = checkpoints.KNOWN_CHECKPOINTS["vit_B_16_r16"]
    model = timm.create_model(known.architecture, **known.model_kwargs)
    keys = set(model.state_dict())
    # The MAE code base with global_pool=True: fc_norm instead of the final norm.
    assert "fc_norm.weight" in keys and "norm.weight" not in keys


def test_known_checkpoint_contradicting_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "vit_small_patch16_224", "--checkpoint", "deit_S_r13"])
    assert exit_info.value.code == 2
    assert "deit_small_patch16_224" in capsys.readouterr().err


def test_url_from_cache_without_network(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    reference = tiny_model()
    torch.save({"model": reference.state_dict()}, hub / "checkpoints" / "tiny_r4.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(checkpoints, "host_reachable", lambda *a, **k: pytest.fail("no network probe expected"))
    loaded = load_model(TINY_NAME, model_kwargs=TINY_KWARGS, checkpoint="https://example.com/models/tiny_r4.pth")
    assert _same_weights(loaded.model, reference)


def test_unreachable_url_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(checkpoints, "host_reachable", lambda *a, **k: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *TINY_ARGS, "--checkpoint", "https://example.com/models/tiny_r4.pth"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "example.com cannot be reached" in err and "tiny_r4.pth" in err


def test_pretrained_offline_fails_fast_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(checkpoints, "_cached_pretrained_file", lambda cfg: None)
    monkeypatch.setattr(checkpoints, "host_reachable", lambda *a, **k: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "vit_tiny_patch16_224", "--pretrained"])
    assert time.perf_counter() - start < 20
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "vit_tiny_patch16_224" in err and "cannot be reached" in err and "--checkpoint" in err


def test_pretrained_respects_hf_hub_offline(monkeypatch):
    monkeypatch.setattr(checkpoints, "_cached_pretrained_file", lambda cfg: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        checkpoints.create_pretrained("vit_tiny_patch16_224")


def test_pretrained_uses_cached_file_through_timm(tmp_path, monkeypatch):
    reference = tiny_model()
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    monkeypatch.setattr(checkpoints, "_cached_pretrained_file", lambda cfg: str(path))
    monkeypatch.setattr(checkpoints, "host_reachable", lambda *a, **k: pytest.fail("no network probe expected"))
    model = checkpoints.create_pretrained(TINY_NAME, **TINY_KWARGS)
    # timm re-initialises the head when num_classes differs from the pretrained 1000.
    got, want = model.state_dict(), reference.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("head."))


def test_host_probe_times_out_quickly(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    # A name that cannot resolve (.invalid is reserved).
    assert checkpoints.host_reachable("weights.invalid", timeout=2.0) is False
    assert time.perf_counter() - start < 5
