"""``tome data``: the generated shape task on disk (``export``) or as a picture (``preview``)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "preview"]


def preview(path: str | Path, rows: int = 4, split: str = "train", seed: int = 0, image_size: int = 64,
            zoom: int = 2) -> Path:
    """Save a grid of generated images, one column per class, to ``path`` (PNG).

    Args:
        path: Output image file.
        rows: Images per class.
        split: ``"train"`` or ``"val"``.
        seed: Seed of the task.
        image_size: Size of each generated image.
        zoom: Nearest-neighbour enlargement of the grid.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: for non-positive ``rows`` or ``zoom``.
    """
    import numpy as np
    from PIL import Image

    from tome.data import CLASSES, render

    if rows < 1 or zoom < 1:
        raise ValueError(f"rows and zoom must be positive, got rows={rows!r}, zoom={zoom!r}")
    count = len(CLASSES)
    images = [render(i, split, seed, image_size)[0] for i in range(rows * count)]
    grid = np.concatenate([np.concatenate(images[r * count:(r + 1) * count], axis=1) for r in range(rows)], axis=0)
    picture = Image.fromarray(grid)
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def _export(args: argparse.Namespace) -> None:
    from tome.data import export_image_folder

    root = export_image_folder(args.directory, train=args.train, val=args.val, seed=args.seed,
                               image_size=args.image_size, progress=not args.no_progress)
    print(f"wrote {args.train} train and {args.val} val images to {root} (ImageFolder layout)")


def _preview(args: argparse.Namespace) -> None:
    path = preview(args.output, rows=args.rows, split=args.split, seed=args.seed, image_size=args.image_size)
    print(f"wrote {path}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome data export`` and ``tome data preview``."""
    parser = subparsers.add_parser("data", help="the generated shape-classification task (export, preview)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    export = actions.add_parser("export", help="write train/ and val/ ImageFolder trees of PNGs")
    export.add_argument("directory", help="output directory")
    export.add_argument("--train", type=int, default=10_000, help="training images (default: %(default)s)")
    export.add_argument("--val", type=int, default=2_000, help="validation images (default: %(default)s)")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--image-size", type=int, default=64)
    export.add_argument("--no-progress", action="store_true")
    export.set_defaults(func=_export)

    show = actions.add_parser("preview", help="save a grid of examples, one column per class")
    show.add_argument("output", help="PNG file to write")
    show.add_argument("--rows", type=int, default=4)
    show.add_argument("--split", choices=("train", "val"), default="train")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--image-size", type=int, default=64)
    show.set_defaults(func=_preview)
