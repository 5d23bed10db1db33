"""Helpers with the names of the original release: ``parse_r`` and friends."""

from __future__ import annotations

from ._schedule import parse_r, schedule_for_total, tokens_per_layer

__all__ = ["parse_r", "schedule_for_total", "tokens_per_layer", "benchmark"]


def __getattr__(name: str):
    # The tools layer is imported only when asked for (tome.utils.benchmark).
    if name == "benchmark":
        from .tools.benchmark import benchmark

        return benchmark
    raise AttributeError(f"module 'tome.utils' has no attribute {name!r}")
