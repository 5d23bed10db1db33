"""Data for reproducible ToMe experiments without downloads.

- :class:`SyntheticShapes`: a procedurally generated 10-class shape task (deterministic
  from a seed), see :mod:`tome.data.synthetic`.
- :func:`export_image_folder`: write it to disk (``tome data export DIR``).
- :class:`ImageFolder`: read any ``root/<class>/<image>`` tree (no torchvision needed).
- :func:`open_image`: read any image file as 8-bit RGB (16-bit PNGs scaled, not clipped).
"""

from .folder import IMAGE_EXTENSIONS, ImageFolder, class_name, class_names, open_image, to_rgb
from .synthetic import (
    CLASSES,
    MEAN,
    SPLITS,
    STD,
    SyntheticShapes,
    class_directory,
    export_image_folder,
    image_to_tensor,
    render,
)

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "SPLITS",
    "SyntheticShapes",
    "ImageFolder",
    "IMAGE_EXTENSIONS",
    "open_image",
    "to_rgb",
    "class_name",
    "class_names",
    "render",
    "image_to_tensor",
    "export_image_folder",
    "class_directory",
]
