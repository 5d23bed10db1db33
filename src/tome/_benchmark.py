"""Timing a model: the core that ``tome.utils.benchmark`` and the ``tome bench`` tools share.

Devices and mixed precision are resolved here once; a timing waits for queued CUDA
work before reading the clock, so wall-clock times are honest. This module sits
below the tools: it knows nothing about merge schedules.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["benchmark", "resolve_device", "autocast", "synchronize", "time_calls"]

DeviceArg = Union[int, str, torch.device, None]


def resolve_device(device: DeviceArg) -> torch.device:
    """Turn ``0`` / ``"cuda"`` / ``"cpu"`` / None into a device, falling back to CPU.

    An integer means a CUDA index when CUDA is available (the original API
    defaulted to ``device=0``), else the CPU. None picks CUDA when available.

    Raises:
        ValueError: quoting a string that is no device, or CUDA asked for without CUDA.
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


@contextlib.contextmanager
def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Mixed precision in ``dtype`` (weights stay fp32, as in the original benchmark).

    None or ``torch.float32`` runs in full precision.
    """
    if dtype is None or dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[], Any], device: torch.device, count: int = 1) -> float:
    """Wall-clock seconds of ``count`` calls of ``call``, queued CUDA work included.

    Args:
        call: One forward (or any work on ``device``), called without arguments.
        device: Where the work runs (waited for before and after).
        count: Calls in a row.
    """
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        call()
    synchronize(device)
    return time.perf_counter() - start


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
    """Images per second of ``model`` on random input (the original release's ``tome.utils.benchmark``).

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

    Raises:
        ValueError: for ``runs`` < 1, ``throw_out`` outside [0, 1), ``batch_size`` < 1 or a bad device.
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
    with torch.inference_mode(), autocast(dev, dtype if use_fp16 else torch.float32):
        for i in range(runs):
            seconds = time_calls(lambda: model(x), dev)
            if i >= warmup:
                elapsed += seconds
    throughput = (runs - warmup) * batch_size / elapsed
    if verbose:
        print(f"Throughput: {throughput:.2f} im/s")
    return throughput
