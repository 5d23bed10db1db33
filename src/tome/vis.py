"""``tome.vis.make_visualization``, where the original release kept it."""

from __future__ import annotations

from .tools.visualize import make_visualization

__all__ = ["make_visualization"]
