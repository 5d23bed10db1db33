"""A minimal ImageFolder reader (``root/<class>/<image>``) that needs no torchvision."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .synthetic import image_to_tensor

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS", "CLASS_PREFIX", "class_name", "class_names", "open_image", "to_rgb"]

IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
"""File endings read as images (case-insensitive)."""

CLASS_PREFIX = re.compile(r"(\d+)_(.+)")
"""A class directory named ``<number>_<name>`` (``00_circle``): the number fixes the sort order, the name is the class."""


def class_name(directory: str) -> str:
    """The class a directory holds: ``"00_circle"`` -> ``"circle"``; other names are kept as they are."""
    match = CLASS_PREFIX.fullmatch(directory)
    return match.group(2) if match else directory


def class_names(directories: Sequence[str]) -> List[str]:
    """Class names of sorted class directories: prefixes are dropped when every directory has one."""
    if directories and all(CLASS_PREFIX.fullmatch(name) for name in directories):
        return [class_name(name) for name in directories]
    return list(directories)


def open_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB, whatever its mode.

    16-bit images (PNG mode ``I;16`` / ``I``) are scaled to 8 bit, not clipped (PIL's own
    ``convert("RGB")`` clips them, which turns almost every pixel white); float images
    (mode ``F``) are read as values in [0, 1] when they fit there, else in [0, 255].

    Raises:
        OSError: if the file cannot be read as an image.
    """
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB (see :func:`open_image` for 16-bit and float images)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # PNG and TIFF keep 16-bit samples in these modes; 65535 -> 255.
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


class ImageFolder(Dataset):
    """Images sorted into one sub-directory per class, labels in sorted directory order.

    Same layout and label order as ``torchvision.datasets.ImageFolder``. Directories
    named ``<number>_<name>`` (as ``tome data export`` writes them: ``00_circle``,
    ``01_ring``, ...) keep the order of their zero-padded number and name the class
    ``<name>``; this holds when every class directory has such a prefix.

    Args:
        root: Directory with one sub-directory per class.
        transform: Applied to each ``PIL.Image`` (8-bit RGB, see :func:`open_image`);
            defaults to :func:`tome.data.image_to_tensor`.
        classes: Expected class names in label order; when given, ``root`` must have
            exactly these classes (so train and val splits agree on labels).

    Attributes:
        classes: Class names in label order (prefixes dropped).
        folders: The class directories' own names, in the same order.

    Raises:
        FileNotFoundError: if ``root`` is not a directory.
        ValueError: if it holds no class directories or no images, or its classes
            differ from ``classes``.
    """

    def __init__(self, root: str | Path, transform: Optional[Callable[[Image.Image], Any]] = None,
                 classes: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} is not a directory")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"image folder {str(self.root)!r} has no class sub-directories")
        found = class_names(folders)
        if classes is not None and list(classes) != found:
            raise ValueError(f"image folder {str(self.root)!r} has classes {found}, expected {list(classes)}")
        self.classes: List[str] = found
        self.folders: List[str] = folders
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(folders):
            for path in sorted((self.root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                    self.samples.append((path, label))
        if not self.samples:
            raise ValueError(f"image folder {str(self.root)!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.targets = [label for _, label in self.samples]
        self.transform = transform if transform is not None else image_to_tensor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, label = self.samples[index]
        return self.transform(open_image(path)), label

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self.samples)} images, {len(self.classes)} classes)"
