"""Helpers with the names of the original release: ``parse_r`` and friends, and ``benchmark``."""

from __future__ import annotations

from ._benchmark import benchmark
from ._schedule import parse_r, schedule_for_total, tokens_per_layer

__all__ = ["parse_r", "schedule_for_total", "tokens_per_layer", "benchmark"]
