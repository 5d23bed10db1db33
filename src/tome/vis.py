"""Pictures of what ToMe merged: ``tome.vis.make_visualization``, where the original release kept it.

Each merged group of patches is filled with its mean colour and outlined, as in
the figures of Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023).
``tome visualize`` (``tome.tools.visualize``) draws these panels for a model and image.
"""

from __future__ import annotations

import random
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = ["make_visualization"]

PatchSize = Union[int, Tuple[int, int]]


def make_visualization(
    img: Image.Image,
    source: torch.Tensor,
    patch_size: PatchSize = 16,
    class_token: bool = True,
    *,
    prefix_tokens: Optional[int] = None,
) -> Image.Image:
    """Draw which patches ended up in the same token.

    Every token's patches are painted in their mean colour in ``img`` and the
    token's region is outlined in a colour of its own.

    Args:
        img: The image the model saw, ``patch_size`` times the patch grid in size
            (e.g. 224 x 224 for a /16 model with 14 x 14 patches).
        source: ``(1, tokens, original tokens)`` or ``(tokens, original tokens)``
            0/1 map of which original tokens each token holds:
            ``tome.last_forward(model).source`` (or ``model._tome_info["source"]``) after a
            forward with ``trace_source=True``.
        patch_size: Patch side in pixels, or ``(height, width)``.
        class_token: Whether the first original token is a class token (not a patch).
        prefix_tokens: Number of leading non-patch tokens (class, distillation,
            register tokens); overrides ``class_token``. ``model._tome_info["protected_tokens"]``
            gives it for a patched model.

    Returns:
        An RGB image the size of ``img``.

    Raises:
        ValueError: if ``source`` does not match the image's patch grid.
    """
    from .data import to_rgb

    protected = int(class_token) if prefix_tokens is None else prefix_tokens
    if isinstance(protected, bool) or not isinstance(protected, int) or protected < 0:
        raise ValueError(f"prefix_tokens must be a non-negative integer, got {prefix_tokens!r}")
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if patch_h < 1 or patch_w < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    pixels = np.asarray(to_rgb(img), dtype=np.float64) / 255.0
    height, width, _ = pixels.shape
    groups = _patch_groups(source, protected, (height, width), (patch_h, patch_w))
    labels = _upsample(groups, height, width)
    count = int(labels.max()) + 1
    drawn = np.where(_outlines(labels)[..., None], _outline_colors(count)[labels], _mean_colors(pixels, labels, count)[labels])
    return Image.fromarray(np.clip(drawn * 255, 0, 255).astype(np.uint8))


def _patch_groups(source: torch.Tensor, protected: int, image_size: Tuple[int, int],
                  patch: Tuple[int, int]) -> np.ndarray:
    """``(grid height, grid width)`` index of the token holding each patch.

    Raises:
        ValueError: if ``source`` is not one image's map or does not fit the patch grid.
    """
    (height, width), (patch_h, patch_w) = image_size, patch
    grid_h, grid_w = height // patch_h, width // patch_w
    groups_of = source.detach()
    if groups_of.dim() == 3:
        if groups_of.shape[0] != 1:
            raise ValueError(
                f"source holds a batch of {groups_of.shape[0]} images; pass one, e.g. source[i:i + 1]"
            )
        groups_of = groups_of[0]
    if groups_of.dim() != 2:
        raise ValueError(f"source must be (1, tokens, original tokens), got shape {tuple(source.shape)}")
    groups_of = groups_of[:, protected:]
    if groups_of.shape[1] != grid_h * grid_w or grid_h == 0 or grid_w == 0:
        raise ValueError(
            f"source has {groups_of.shape[1]} patch columns after {protected} prefix token(s), but a "
            f"{width}x{height} image with {patch_w}x{patch_h} patches has a {grid_w}x{grid_h} grid "
            f"({grid_w * grid_h} patches); pass the image at the model's input size"
        )
    # The token holding each patch; prefix-token rows hold no patch, so they never win.
    return groups_of.float().argmax(dim=0).cpu().numpy().reshape(grid_h, grid_w)


def _upsample(groups: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of the patch grid to ``(height, width)`` pixels."""
    grid_h, grid_w = groups.shape
    rows = np.minimum(np.arange(height) * grid_h // height, grid_h - 1)
    cols = np.minimum(np.arange(width) * grid_w // width, grid_w - 1)
    return groups[rows[:, None], cols[None, :]]


def _mean_colors(pixels: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """``(count, 3)`` mean RGB of each token's pixels."""
    flat = labels.ravel()
    pixel_counts = np.bincount(flat, minlength=count).astype(np.float64)
    sums = np.stack([np.bincount(flat, weights=pixels[..., c].ravel(), minlength=count) for c in range(3)], axis=1)
    return sums / np.maximum(pixel_counts, 1)[:, None]


def _outlines(labels: np.ndarray) -> np.ndarray:
    """Pixels on an outline: a 4-neighbour belongs to another token, or the pixel is on the border."""
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[0, :] = edge[-1, :] = True
    edge[:, 0] = edge[:, -1] = True
    return edge


def _outline_colors(count: int, seed: int = 0) -> np.ndarray:
    """``(count, 3)`` random RGB colours in [0, 1); colour i does not depend on ``count``."""
    rng = random.Random(seed)
    return np.array([(rng.random(), rng.random(), rng.random()) for _ in range(count)], dtype=np.float64).reshape(-1, 3)
