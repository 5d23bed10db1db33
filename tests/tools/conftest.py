"""Fixtures for the tools tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools_helpers import write_image_folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """2 classes x 3 readable images, and 1 unreadable one."""
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    """A 60x50 PNG to visualise."""
    from tome.tools.sample_image import sample_image

    path = tmp_path / "picture.png"
    sample_image(64).resize((60, 50)).save(path)
    return path
