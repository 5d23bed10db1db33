"""A minimal ImageFolder reader (``root/<class>/<image>``) that needs no torchvision."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset

from .synthetic import image_to_tensor

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
"""File endings read as images (case-insensitive)."""


class ImageFolder(Dataset):
    """Images sorted into one sub-directory per class, labels in sorted class order.

    Same layout and label order as ``torchvision.datasets.ImageFolder``.

    Args:
        root: Directory with one sub-directory per class.
        transform: Applied to each ``PIL.Image`` (converted to RGB); defaults to
            :func:`tome.data.image_to_tensor`.
        classes: Expected class names in label order; when given, ``root`` must have
            exactly these sub-directories (so train and val splits agree on labels).

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
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise ValueError(f"image folder {str(self.root)!r} has no class sub-directories")
        if classes is not None and list(classes) != found:
            raise ValueError(f"image folder {str(self.root)!r} has classes {found}, expected {list(classes)}")
        self.classes: List[str] = found
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(found):
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
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self.samples)} images, {len(self.classes)} classes)"
