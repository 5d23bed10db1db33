"""Helpers with the names of the original release: ``parse_r`` and friends."""

from __future__ import annotations

from ._schedule import parse_r, schedule_for_total, tokens_per_layer

__all__ = ["parse_r", "schedule_for_total", "tokens_per_layer"]
