"""``tome visualize``: pictures of what ToMe merged, one panel per merge setting.

Each panel is drawn by :func:`tome.vis.make_visualization` (each merged group of
patches filled with its mean colour and outlined, as in the figures of Bolya et al.,
"Token Merging: Your ViT but Faster", ICLR 2023).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

import tome
from tome.vis import make_visualization

from ._common import (
    SCHEDULE_HELP,
    Schedule,
    prepare_output_file,
    schedule_label,
    schedules_arg,
)
from ._models import add_model_arguments, data_config_of, input_size_of, load_model_from_args, patch_size_of

__all__ = ["make_visualization", "render_merges", "merge_panels", "fit_image", "add_parser", "PANEL_GAP", "LABEL_HEIGHT", "MIN_PANEL"]

PANEL_GAP = 4  # pixels of white between panels
LABEL_HEIGHT = 22  # pixels of label strip above the panels
MIN_PANEL = 224  # small inputs are enlarged (nearest neighbour) to at least this many pixels


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
                source = tome.last_forward(model).source
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
