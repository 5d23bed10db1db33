"""Throughput measurement compatible with the original release's ``tome.utils.benchmark``."""

from __future__ import annotations

import time
from typing import Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["benchmark", "resolve_device"]


def resolve_device(device: Union[int, str, torch.device, None]) -> torch.device:
    """Turn ``0`` / ``"cuda"`` / ``"cpu"`` / None into a device, falling back to CPU.

    An integer means a CUDA index when CUDA is available (the original API
    defaulted to ``device=0``), else the CPU.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cuda", device) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 0)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA, which is not available on this machine")
    return resolved


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(
    model: nn.Module,
    device: Union[int, str, torch.device] = 0,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 64,
    runs: int = 40,
    throw_out: float = 0.25,
    use_fp16: bool = False,
    verbose: bool = False,
) -> float:
    """Images per second of ``model`` on random input.

    Args:
        model: Any image model; it is put in eval mode and moved to ``device``.
        device: CUDA index, device string or ``torch.device`` (CPU when CUDA is absent).
        input_size: ``(channels, height, width)`` of one image.
        batch_size: Images per forward.
        runs: Forwards in all.
        throw_out: Fraction of the runs, at the start, treated as warm-up and not timed.
        use_fp16: Run under fp16 autocast (bf16 on CPU, where fp16 matmuls are slow).
        verbose: Print the result.

    Returns:
        Throughput in images per second over the timed runs.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs!r}")
    if not 0 <= throw_out < 1:
        raise ValueError(f"throw_out must lie in [0, 1), got {throw_out!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    dev = resolve_device(device)
    model = model.eval().to(dev)
    x = torch.rand(batch_size, *input_size, device=dev)
    warmup = min(int(runs * throw_out), runs - 1)
    dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    elapsed = 0.0
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=use_fp16):
        for i in range(runs):
            _synchronize(dev)
            start = time.perf_counter()
            model(x)
            _synchronize(dev)
            if i >= warmup:
                elapsed += time.perf_counter() - start
    throughput = (runs - warmup) * batch_size / elapsed
    if verbose:
        print(f"Throughput: {throughput:.2f} im/s")
    return throughput


def median_throughput(times: Sequence[float], batch_size: int) -> Tuple[float, float]:
    """(median images/s, median seconds per batch) from per-batch times."""
    ordered = sorted(times)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    return batch_size / median, median
