"""A procedurally drawn sample picture for ``tome demo`` (no image file shipped).

A landscape with large flat regions (sky, hills, water) and a few small detailed
objects, the kind of scene where token merging visibly groups the background
and keeps the details apart.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["sample_image"]


def sample_image(size: int = 448, seed: int = 0) -> Image.Image:
    """A deterministic ``size`` x ``size`` RGB landscape.

    Args:
        size: Side in pixels.
        seed: Seed of the texture noise.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size!r}")
    rng = np.random.default_rng(seed)
    s = size / 448.0
    rows = np.linspace(0.0, 1.0, size)[:, None, None]
    # Sky: a vertical gradient from deep to pale blue.
    sky = (1 - rows) * np.array([70, 130, 210]) + rows * np.array([190, 220, 245])
    canvas = np.broadcast_to(sky, (size, size, 3)).copy()
    image = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(image)

    # Sun and a couple of clouds.
    draw.ellipse([330 * s, 40 * s, 400 * s, 110 * s], fill=(255, 214, 90))
    for cx, cy in ((90, 80), (200, 60)):
        for dx, dy, rad in ((-22, 4, 18), (0, -6, 24), (24, 4, 18)):
            x, y, r = (cx + dx) * s, (cy + dy) * s, rad * s
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(245, 247, 250))

    # Two ranges of hills.
    far = [(0, 250 * s)] + [(x, (215 + 25 * math.sin(x / (60 * s))) * s) for x in range(0, size + 1, 4)] + [(size, 250 * s)]
    draw.polygon(far + [(size, size), (0, size)], fill=(96, 140, 92))
    near = [(x, (280 + 18 * math.sin(x / (40 * s) + 1.3)) * s) for x in range(0, size + 1, 4)]
    draw.polygon(near + [(size, size), (0, size)], fill=(62, 112, 52))

    # A lake.
    draw.ellipse([40 * s, 330 * s, 260 * s, 410 * s], fill=(58, 110, 170))

    # A house with a red roof, door and window.
    draw.rectangle([300 * s, 250 * s, 390 * s, 320 * s], fill=(235, 225, 200))
    draw.polygon([(292 * s, 252 * s), (345 * s, 205 * s), (398 * s, 252 * s)], fill=(180, 40, 35))
    draw.rectangle([335 * s, 280 * s, 355 * s, 320 * s], fill=(110, 70, 40))
    draw.rectangle([308 * s, 265 * s, 328 * s, 285 * s], fill=(120, 170, 220))

    # A tree.
    draw.rectangle([262 * s, 290 * s, 272 * s, 330 * s], fill=(100, 65, 35))
    draw.ellipse([240 * s, 235 * s, 294 * s, 300 * s], fill=(40, 90, 40))

    # Mild texture so flat regions are not perfectly uniform.
    array = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 4.0, (size, size, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
