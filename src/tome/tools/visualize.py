"""Pictures of what ToMe merged: ``tome.make_visualization`` and ``tome visualize``.

Each merged group of patches is filled with its mean colour and outlined, as in
the figures of Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

import tome

from ._common import (
    SCHEDULE_HELP,
    Schedule,
    add_model_arguments,
    data_config_of,
    input_size_of,
    load_model_from_args,
    patch_size_of,
    prepare_output_file,
    schedule_label,
    schedules_arg,
)

__all__ = ["make_visualization", "render_merges", "merge_panels", "fit_image", "add_parser", "PANEL_GAP", "LABEL_HEIGHT", "MIN_PANEL"]

PANEL_GAP = 4  # pixels of white between panels
LABEL_HEIGHT = 22  # pixels of label strip above the panels
MIN_PANEL = 224  # small inputs are enlarged (nearest neighbour) to at least this many pixels

PatchSize = Union[int, Tuple[int, int]]


def _outline_colors(count: int, seed: int = 0) -> np.ndarray:
    """``(count, 3)`` random RGB colours in [0, 1); colour i does not depend on ``count``."""
    rng = random.Random(seed)
    return np.array([(rng.random(), rng.random(), rng.random()) for _ in range(count)], dtype=np.float64).reshape(-1, 3)


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
            ``model._tome_info["source"]`` after a forward with ``trace_source=True``.
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
    protected = int(class_token) if prefix_tokens is None else prefix_tokens
    if isinstance(protected, bool) or not isinstance(protected, int) or protected < 0:
        raise ValueError(f"prefix_tokens must be a non-negative integer, got {prefix_tokens!r}")
    patch_h, patch_w = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    if patch_h < 1 or patch_w < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    from tome.data import to_rgb

    pixels = np.asarray(to_rgb(img), dtype=np.float64) / 255.0
    height, width, _ = pixels.shape
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
    groups = groups_of.float().argmax(dim=0).cpu().numpy().reshape(grid_h, grid_w)

    # Nearest-neighbour upsampling of the patch grid to pixels.
    rows = np.minimum(np.arange(height) * grid_h // height, grid_h - 1)
    cols = np.minimum(np.arange(width) * grid_w // width, grid_w - 1)
    labels = groups[rows[:, None], cols[None, :]]

    count = int(labels.max()) + 1
    flat = labels.ravel()
    pixel_counts = np.bincount(flat, minlength=count).astype(np.float64)
    means = np.stack(
        [np.bincount(flat, weights=pixels[..., c].ravel(), minlength=count) for c in range(3)], axis=1
    ) / np.maximum(pixel_counts, 1)[:, None]

    # A pixel is on an outline if a 4-neighbour belongs to another token or it is on the border.
    edge = np.zeros((height, width), dtype=bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[0, :] = edge[-1, :] = True
    edge[:, 0] = edge[:, -1] = True

    drawn = np.where(edge[..., None], _outline_colors(count)[labels], means[labels])
    return Image.fromarray(np.clip(drawn * 255, 0, 255).astype(np.uint8))


def fit_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop ``image`` to the aspect ratio ``width:height`` and resize it (bicubic); 16-bit images are scaled to 8 bit."""
    from tome.data import to_rgb

    image = to_rgb(image)
    src_w, src_h = image.size
    target = width / height
    if src_w / src_h > target:
        crop_w = round(src_h * target)
        left = (src_w - crop_w) // 2
        image = image.crop((left, 0, left + crop_w, src_h))
    else:
        crop_h = round(src_w / target)
        top = (src_h - crop_h) // 2
        image = image.crop((0, top, src_w, top + crop_h))
    return image.resize((width, height), Image.BICUBIC)


def _to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((array - mean_t) / std_t).unsqueeze(0)


def _font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def merge_panels(
    image: Image.Image, model: nn.Module, schedules: Sequence[Schedule], *, prefix_tokens: Optional[int] = None,
    scale: int = 1,
) -> List[Tuple[str, Image.Image]]:
    """``(label, picture)`` for the input and for each merge setting.

    Args:
        image: Any RGB image; it is centre-cropped and resized to the model's input size.
        model: A timm-style ViT, patched or not (it is patched with ``trace_source``
            if needed; ``model.r`` and ``trace_source`` are restored afterwards).
        schedules: Merge settings to draw.
        prefix_tokens: Override the number of leading non-patch tokens.
        scale: Draw at this multiple of the input size (outlines stay one pixel wide).

    Returns:
        Pictures of ``scale`` times the model's input size.
    """
    if not hasattr(model, "_tome_info"):
        tome.apply_patch(model, trace_source=True)
    info = model._tome_info
    _, height, width = input_size_of(model)
    config = data_config_of(model)
    fitted = fit_image(image, height, width)
    shown = fit_image(image, height * scale, width * scale) if scale > 1 else fitted
    device = next(model.parameters()).device
    x = _to_tensor(fitted, config["mean"], config["std"]).to(device)
    protected = info["protected_tokens"] if prefix_tokens is None else prefix_tokens
    patch_h, patch_w = patch_size_of(model)
    previous_trace = info["trace_source"]
    panels = [("input", shown)]
    try:
        info["trace_source"] = True
        model.eval()
        with torch.inference_mode():
            for schedule in schedules:
                with tome.merging(model, schedule):
                    model(x)
                source = model._tome_info["source"]
                drawn = make_visualization(shown, source, (patch_h * scale, patch_w * scale), prefix_tokens=protected)
                panels.append((f"r={schedule_label(schedule)}: {source.shape[1]} tokens", drawn))
    finally:
        info["trace_source"] = previous_trace
    return panels


def render_merges(
    image: Image.Image, model: nn.Module, schedules: Sequence[Schedule], *, prefix_tokens: Optional[int] = None
) -> Image.Image:
    """The input and one visualisation per merge setting, side by side with labels.

    Panels are the model's input size times the smallest whole factor that makes
    them at least ``MIN_PANEL`` pixels; the result is
    ``(n * panel_w + (n - 1) * PANEL_GAP, panel_h + LABEL_HEIGHT)`` for ``n`` panels.

    Args:
        image: Any RGB image.
        model: A timm-style ViT (see :func:`merge_panels`).
        schedules: Merge settings, one panel each (after the input panel).
        prefix_tokens: Override the number of leading non-patch tokens.
    """
    _, height, width = input_size_of(model)
    scale = max(1, math.ceil(MIN_PANEL / max(width, height)))
    panels = merge_panels(image, model, schedules, prefix_tokens=prefix_tokens, scale=scale)
    panel_w, panel_h = width * scale, height * scale
    canvas = Image.new("RGB", (len(panels) * panel_w + (len(panels) - 1) * PANEL_GAP, panel_h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for index, (label, panel) in enumerate(panels):
        left = index * (panel_w + PANEL_GAP)
        canvas.paste(panel, (left, LABEL_HEIGHT))
        draw.text((left + 3, 3), label, fill="black", font=font)
    return canvas


def run_visualize(args: argparse.Namespace) -> Path:
    """``tome visualize``: draw the merges of one image for several r."""
    from tome.data import open_image

    path = Path(args.image)
    if path.is_dir():
        from tome.data import IMAGE_EXTENSIONS

        example = next((p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()), None)
        hint = f", e.g. {str(example)!r}" if example is not None else ""
        raise ValueError(f"{str(path)!r} is a directory; tome visualize draws one image: pass an image file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    output = prepare_output_file(args.output or Path("tome_outputs") / f"{path.stem}_merges.png", "--output")
    try:
        image = open_image(path)
    except OSError as error:
        raise ValueError(f"image {str(path)!r} cannot be read: {error}") from None
    loaded = load_model_from_args(args, default_to_demo=True)
    loaded.patch(trace_source=True)
    print(f"Model: {loaded.description}")
    canvas = render_merges(image, loaded.model, args.r)
    canvas.save(output)
    print(f"Wrote {output} ({canvas.width}x{canvas.height}; r = {', '.join(schedule_label(s) for s in args.r)})")
    return output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome visualize``."""
    parser = subparsers.add_parser(
        "visualize",
        help="draw which patches were merged, for several r side by side",
        description="Draw the tokens a ViT merged in an image: each group in its mean colour, outlined.",
    )
    parser.add_argument("image", help="an image file (any size; centre-cropped to the model's input)")
    add_model_arguments(parser, demo_default=True)
    parser.add_argument("-r", "--r", type=schedules_arg, default=schedules_arg("8,16"),
                        help=f"{SCHEDULE_HELP}; one panel each (default: 8,16)")
    parser.add_argument("-o", "--output", help="output PNG (default: tome_outputs/IMAGE_merges.png)")
    parser.set_defaults(func=run_visualize)
