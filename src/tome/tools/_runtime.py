"""Where the tools run: devices, mixed precision, and torchrun's process group.

One place for what ``tome train``, ``tome eval``, ``tome bench`` and ``tome tune`` share:
turning a ``--device`` value into a ``torch.device`` (:func:`resolve_device` and
:func:`autocast` come from ``tome._benchmark``, below the tools), reading torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), starting and stopping the process group (gloo
on CPU, NCCL on CUDA), and the few collectives the tools use. In a single process every
collective is a no-op that returns its input.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from tome._benchmark import autocast, resolve_device

__all__ = [
    "AMP_CHOICES",
    "resolve_device",
    "process_device",
    "torchrun_env",
    "process_group",
    "world",
    "barrier",
    "all_sum",
    "all_max",
    "all_gather",
    "amp_dtype",
    "autocast",
]

DeviceArg = Union[int, str, torch.device, None]

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
"""Mixed-precision settings of ``tome train`` (see :func:`amp_dtype`)."""


# ----------------------------------------------------------------------------- devices


def process_device(device: DeviceArg) -> torch.device:
    """:func:`resolve_device` for this process, and made CUDA's current device.

    Under torchrun a CUDA device without an index is this process's GPU
    (``cuda:LOCAL_RANK``), so ``--device cuda`` gives every process its own.

    Raises:
        ValueError: as :func:`resolve_device`.
    """
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        _, world_size, local_rank = torchrun_env()
        if world_size > 1 and resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    return resolved


# ----------------------------------------------------------------------------- process group


def torchrun_env() -> Tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment; ``(0, 1, 0)`` outside it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Start torch.distributed under torchrun for the ``with`` block, and stop it afterwards.

    Nothing happens in a single process or when a group is already running (whoever
    started it stops it). Yields whether this call started the group.

    Args:
        device: This process's device: NCCL for CUDA, gloo otherwise.
    """
    started = False
    if torchrun_env()[1] > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    try:
        yield started
    finally:
        if started:
            dist.destroy_process_group()


def world() -> Tuple[int, int]:
    """``(rank, world size)`` of the running process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


def _all_reduce(values: List[float], device: torch.device, op: Any) -> List[float]:
    if world()[1] == 1:
        return list(values)
    # gloo reduces CPU tensors only; NCCL those on this process's GPU.
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=where)
    dist.all_reduce(tensor, op=op)
    return tensor.cpu().tolist()


def all_sum(values: List[float], device: torch.device) -> List[float]:
    """Element-wise sums of ``values`` over all processes (float64: counts below 2**53 stay exact).

    Args:
        values: The same number of values on every process.
        device: This process's device (where NCCL reduces).
    """
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def all_max(values: List[float], device: torch.device) -> List[float]:
    """Element-wise maxima of ``values`` over all processes (e.g. the slowest process's seconds)."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def all_gather(value: Any) -> List[Any]:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` in a single process."""
    size = world()[1]
    if size == 1:
        return [value]
    gathered: List[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


# ----------------------------------------------------------------------------- mixed precision


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of an ``amp`` setting on ``device``; None for full precision.

    ``"auto"`` is bf16 (fp16 where bf16 is unsupported) on CUDA and full precision
    elsewhere; ``"off"`` is full precision.

    Raises:
        ValueError: quoting an unknown setting, or ``"fp16"`` off CUDA.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "auto":
        if device.type != "cuda":
            return None
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (got {device}); use amp='bf16' on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16
