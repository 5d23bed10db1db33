"""``tome data``: the generated shape task on disk (``export``) or as a picture (``preview``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import non_negative_int, positive_int, prepare_output_dir, prepare_output_file

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

    root = prepare_output_dir(args.directory, "directory")
    root = export_image_folder(root, train=args.train, val=args.val, seed=args.seed, image_size=args.image_size,
                               progress=not args.no_progress, overwrite=args.overwrite)
    kept = [f"{split}/" for split, count in (("train", args.train), ("val", args.val))
            if count == 0 and (root / split).exists()]
    print(f"wrote {args.train} train and {args.val} val images to {root} "
          "(ImageFolder layout, class directories 00_circle, 01_ring, ... in label order)"
          + (f"; kept the earlier {' and '.join(kept)}" if kept else ""))


def _preview(args: argparse.Namespace) -> None:
    path = prepare_output_file(args.output, "output")
    path = preview(path, rows=args.rows, split=args.split, seed=args.seed, image_size=args.image_size,
                   zoom=args.zoom)
    print(f"wrote {path}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tome data export`` and ``tome data preview``."""
    parser = subparsers.add_parser(
        "data", help="the generated shape-classification task (export, preview)",
        description="The generated 10-class shape task of tome.data, on disk (export) or as a picture (preview).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    export = actions.add_parser(
        "export", help="write train/ and val/ ImageFolder trees of PNGs",
        description="Write the generated task as PNGs: DIRECTORY/{train,val}/<NN_class>/<index>.png and "
        "DIRECTORY/dataset.json. Class directories are numbered in label order (00_circle, 01_ring, ...), so "
        "ImageFolder readers (tome eval, tome train, torchvision) give the shipped model's labels.",
    )
    export.add_argument("directory", help="output directory; must be empty, or an earlier export with --overwrite")
    export.add_argument("--train", type=non_negative_int, default=10_000, help="training images (default: %(default)s)")
    export.add_argument("--val", type=non_negative_int, default=2_000, help="validation images (default: %(default)s)")
    export.add_argument("--seed", type=int, default=0, help="seed of the task (default: %(default)s)")
    export.add_argument("--image-size", type=positive_int, default=64,
                        help="height and width in pixels, at least 16 (default: %(default)s)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in DIRECTORY (one whose dataset.json says so): the splits "
                        "written now and dataset.json; a split of count 0 and other files are kept")
    export.add_argument("--no-progress", action="store_true", help="no progress bar (it is off without a terminal)")
    export.set_defaults(func=_export)

    show = actions.add_parser("preview", help="save a grid of examples, one column per class",
                              description="Save a PNG grid of generated images: one column per class, in label order.")
    show.add_argument("output", help="PNG file to write")
    show.add_argument("--rows", type=positive_int, default=4, help="images per class (default: %(default)s)")
    show.add_argument("--split", choices=("train", "val"), default="train", help="which split (default: %(default)s)")
    show.add_argument("--seed", type=int, default=0, help="seed of the task (default: %(default)s)")
    show.add_argument("--image-size", type=positive_int, default=64,
                      help="size of each image in pixels, at least 16 (default: %(default)s)")
    show.add_argument("--zoom", type=positive_int, default=2, help="enlargement of the grid (default: %(default)s)")
    show.set_defaults(func=_preview)
