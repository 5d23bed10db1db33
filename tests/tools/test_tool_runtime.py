"""tome.tools._runtime: devices, mixed precision, torchrun's environment and process group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tome.tools import _runtime as runtime

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device(None) == torch.device("cpu")
    assert runtime.resolve_device(0) == torch.device("cpu")  # the original API's default
    assert runtime.resolve_device("cpu") == runtime.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda:1'"):
        runtime.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="'tpu9'"):
        runtime.resolve_device("tpu9")
    with pytest.raises(ValueError, match="True"):
        runtime.resolve_device(True)  # a bool is no CUDA index


def test_resolve_device_picks_cuda_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.resolve_device(None) == torch.device("cuda")
    assert runtime.resolve_device(1) == torch.device("cuda", 1)


def test_process_device_takes_the_local_rank_under_torchrun(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.process_device("cuda") == torch.device("cuda", 1)
    assert runtime.process_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert runtime.process_device("cpu") == torch.device("cpu")
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0)]


def test_process_device_in_one_process(no_torchrun, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert runtime.process_device("cuda") == torch.device("cuda")


def test_torchrun_env(no_torchrun, monkeypatch):
    assert runtime.torchrun_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.torchrun_env() == (3, 4, 1)


def test_one_process_needs_no_group(no_torchrun):
    with runtime.process_group(torch.device("cpu")) as started:
        assert not started and not dist.is_initialized()
        assert runtime.world() == (0, 1)
        runtime.barrier()
        assert runtime.all_sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
        assert runtime.all_max([3.0], torch.device("cpu")) == [3.0]
        assert runtime.all_gather(["a"]) == [["a"]]
    # Several processes: the torchrun test of `tome eval` (test_tool_evaluate.py) runs these for real.


def test_amp_dtype():
    cpu = torch.device("cpu")
    assert runtime.amp_dtype("auto", cpu) is None
    assert runtime.amp_dtype("off", cpu) is None
    assert runtime.amp_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        runtime.amp_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="'fp8'"):
        runtime.amp_dtype("fp8", cpu)


@pytest.mark.parametrize("dtype, expected", [(None, torch.float32), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_autocast(dtype, expected):
    x = torch.randn(4, 4)
    with runtime.autocast(torch.device("cpu"), dtype):
        assert (x @ x).dtype == expected
    assert (x @ x).dtype == torch.float32


def test_only_runtime_sets_up_devices_and_processes():
    """One mechanism: no other tool reads torchrun's environment or calls torch.distributed itself."""
    from pathlib import Path

    import tome.tools

    tools = Path(tome.tools.__file__).parent
    offenders = {
        path.name: needle
        for path in tools.glob("*.py") if path.name != "_runtime.py"
        for needle in ("torch.distributed", "WORLD_SIZE", "LOCAL_RANK", "torch.autocast(", "torch.cuda.set_device")
        if needle in path.read_text()
    }
    assert offenders == {}
