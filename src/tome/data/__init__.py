"""Data for reproducible ToMe experiments without downloads.

- :class:`SyntheticShapes`: a procedurally generated 10-class shape task (deterministic
  from a seed), see :mod:`tome.data.synthetic`.
- :func:`export_image_folder`: write it to disk (``tome data export DIR``).
- :class:`ImageFolder`: read any ``root/<class>/<image>`` tree (no torchvision needed).
"""

from .folder import IMAGE_EXTENSIONS, ImageFolder
from .synthetic import CLASSES, MEAN, SPLITS, STD, SyntheticShapes, export_image_folder, image_to_tensor, render

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "SPLITS",
    "SyntheticShapes",
    "ImageFolder",
    "IMAGE_EXTENSIONS",
    "render",
    "image_to_tensor",
    "export_image_folder",
]
