"""A procedurally generated shape-classification task that needs no download.

Every image shows one object from :data:`CLASSES` (plain shapes, glyphs and composed
figures) at a random position, scale, aspect, rotation and colour, drawn over a
cluttered, textured background (stripes, checkers or smooth noise, plus small dots
and line fragments). The background is made of many near-identical patches, which is
what ToMe merges cheaply; the label lives in a handful of foreground patches, so a
classifier has to find them (attention) and read their shape, not their colour.

An image is a pure function of ``(seed, split, index)``: the same arguments give the
same pixels on every run (up to rare off-by-one rounding across platforms), and the
train and validation splits never share an image. The label of image ``index`` is
``index % len(CLASSES)``, so any run of consecutive indices is balanced.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "SPLITS",
    "SyntheticShapes",
    "render",
    "image_to_tensor",
    "export_image_folder",
    "class_directory",
]

CLASSES: Tuple[str, ...] = (
    "circle",
    "ring",
    "square",
    "triangle",
    "star",
    "cross",
    "crescent",
    "arrow",
    "dumbbell",
    "bullseye",
)
"""Class names, in label order."""

MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel mean used to normalise images (``(x - MEAN) / STD``)."""
STD: Tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Per-channel standard deviation used to normalise images."""

SPLITS: Dict[str, int] = {"train": 0, "val": 1}
"""Split names and the stream number each one draws its randomness from."""

# How hard the task is; changing any of these changes every image.
_STYLE = {
    "background_value": (0.1, 0.5),  # HSV value (brightness) of the background colours
    "background_contrast": 0.2,  # largest per-channel step between the two background colours
    "clutter": (4, 10),  # number of dots and strokes, [low, high)
    "radius": (0.18, 0.34),  # object radius as a fraction of the image size
    "object_value": (0.75, 1.0),  # HSV value of the object colour: objects are brighter than backgrounds
    "object_contrast": 0.4,  # least RGB distance between the object and both background colours
}

# Objects are drawn on a grid this many times finer than the image, then averaged:
# anti-aliased edges, so shape and not staircase artefacts tells the classes apart.
_SUPERSAMPLE = 2


def _regular_star(u: np.ndarray, v: np.ndarray, points: int, outer: float, inner: float) -> np.ndarray:
    """Inside test for a star with ``points`` tips (a regular polygon when ``inner`` is its apothem)."""
    sector = 2.0 * math.pi / points
    angle = np.mod(np.arctan2(v, u), sector)
    angle = np.minimum(angle, sector - angle)  # fold onto one mirror-symmetric half sector
    radius = np.hypot(u, v)
    # The boundary there is the segment from the tip (outer, 0) to the notch (inner, sector / 2).
    tip = np.array([outer, 0.0])
    notch = np.array([inner * math.cos(sector / 2), inner * math.sin(sector / 2)])
    edge = notch - tip
    cross_tip = tip[0] * edge[1] - tip[1] * edge[0]
    cross_dir = np.cos(angle) * edge[1] - np.sin(angle) * edge[0]
    boundary = cross_tip / np.where(np.abs(cross_dir) < 1e-9, 1e-9, cross_dir)
    return radius < boundary


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, radius: float) -> np.ndarray:
    return _regular_star(u, v, sides, radius, radius * math.cos(math.pi / sides))


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of class ``label`` in object coordinates (the object fits the unit disc)."""
    r = np.hypot(u, v)
    name = CLASSES[label]
    if name == "circle":
        return r < 0.9
    if name == "ring":
        return (r > 0.56) & (r < 0.95)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.7
    if name == "triangle":
        return _polygon(u, v, 3, 1.0)
    if name == "star":
        return _regular_star(u, v, 5, 1.0, 0.42)
    if name == "cross":
        return ((np.abs(u) < 0.27) & (np.abs(v) < 0.92)) | ((np.abs(v) < 0.27) & (np.abs(u) < 0.92))
    if name == "crescent":
        return (r < 0.92) & ((u - 0.42) ** 2 + v**2 > 0.72**2)
    if name == "arrow":
        shaft = (np.abs(v) < 0.17) & (u > -0.92) & (u < 0.15)
        head = (u >= 0.1) & (u < 0.92) & (np.abs(v) < 0.62 * (0.92 - u) / 0.82)
        return shaft | head
    if name == "dumbbell":
        discs = ((u - 0.52) ** 2 + v**2 < 0.4**2) | ((u + 0.52) ** 2 + v**2 < 0.4**2)
        return discs | ((np.abs(v) < 0.1) & (np.abs(u) < 0.55))
    if name == "bullseye":
        return (r < 0.3) | ((r > 0.6) & (r < 0.93))
    raise AssertionError(name)


def _coverage(size: int, mask_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], center: np.ndarray,
              radius: float, angle: float, aspect: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], shape (size, size), of a shape placed in the image.

    ``mask_fn`` must be empty outside the disc ``u**2 + v**2 <= 1.5**2``: only the pixels of
    that disc's bounding box are evaluated (the same values as a whole-image evaluation, faster).
    """
    reach = 1.5 * radius * max(aspect, 1.0 / aspect) + 1.0
    x0, x1 = (int(np.clip(math.floor(center[0] + side * reach), 0, size)) for side in (-1, 1))
    y0, y1 = (int(np.clip(math.floor(center[1] + side * reach), 0, size)) for side in (-1, 1))
    x1, y1 = min(x1 + 1, size), min(y1 + 1, size)
    cover = np.zeros((size, size), dtype=np.float32)
    if x0 >= x1 or y0 >= y1:
        return cover
    xs = (np.arange(x0 * _SUPERSAMPLE, x1 * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    ys = (np.arange(y0 * _SUPERSAMPLE, y1 * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    dx = xs[None, :] - center[0]
    dy = ys[:, None] - center[1]
    cos, sin = math.cos(angle), math.sin(angle)
    u = (cos * dx + sin * dy) / (radius * aspect)
    v = (-sin * dx + cos * dy) / (radius / aspect)
    mask = mask_fn(u, v).astype(np.float32)
    cover[y0:y1, x0:x1] = mask.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
    return cover


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Values in [0, 1] interpolated bicubically from a coarse random grid."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(image), 0.0, 1.0)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A background pattern in [0, 1], shape (size, size)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    across = -xs * math.sin(theta) + ys * math.cos(theta)
    kind = rng.integers(3)
    if kind == 0:  # stripes
        period = rng.uniform(5.0, 14.0)
        pattern = 0.5 + 0.5 * np.sin(2 * math.pi * along / period + rng.uniform(0, 2 * math.pi))
    elif kind == 1:  # checkers
        cell = rng.uniform(4.0, 12.0)
        pattern = (np.floor(along / cell) + np.floor(across / cell)) % 2
    else:  # blotches
        pattern = _smooth_noise(rng, size, int(rng.integers(3, 8)))
    # Slow brightness drift over the whole image, so no two background patches are identical.
    drift = _smooth_noise(rng, size, 3)
    return (0.7 * pattern + 0.3 * drift).astype(np.float32)


def _colour(rng: np.random.Generator, value: Tuple[float, float], saturation: Tuple[float, float]) -> np.ndarray:
    """A random RGB colour in [0, 1] with HSV value and saturation drawn from the given ranges."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, dtype=np.float32)


def _colour_far_from(rng: np.random.Generator, others: np.ndarray, min_distance: float) -> np.ndarray:
    """A bright object colour at least ``min_distance`` (RGB) from every row of ``others``, if one is found."""
    best, best_distance = None, -1.0
    for _ in range(32):
        colour = _colour(rng, _STYLE["object_value"], (0.3, 1.0))
        distance = float(np.min(np.linalg.norm(others - colour, axis=1)))
        if distance >= min_distance:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best  # type: ignore[return-value]


def render(index: int, split: str = "train", seed: int = 0, image_size: int = 64) -> Tuple[np.ndarray, int]:
    """Draw one image of the task.

    Args:
        index: Image number within the split (any non-negative int).
        split: ``"train"`` or ``"val"``; each split is an independent stream.
        seed: Seed of the whole task; another seed gives another dataset.
        image_size: Height and width in pixels (at least 16).

    Returns:
        ``(image, label)``: a uint8 array of shape ``(image_size, image_size, 3)`` and
        ``index % len(CLASSES)``.

    Raises:
        ValueError: for a negative index, an unknown split or a too small image.
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    index, size = int(index), int(image_size)
    label = index % len(CLASSES)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, SPLITS[split], index])
    image, base, second = _background(rng, size)

    # The object: brighter than the background and far from both its colours.
    colour = _colour_far_from(rng, np.stack([base, second]), _STYLE["object_contrast"])
    radius = rng.uniform(*_STYLE["radius"]) * size
    margin = radius + 1.0
    center = rng.uniform(margin, size - margin, 2)
    image = _paint_shape(image, label, center, radius, rng.uniform(0, 2 * math.pi), rng.uniform(0.88, 1.12),
                         colour, rng.uniform(0, 2 * math.pi))
    return _finish(rng, image), label


def _background(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cluttered, textured background, float RGB in [0, 1] of shape (size, size, 3), and its two colours."""
    # Two low-contrast colours mixed by a texture, plus sensor noise.
    base = _colour(rng, _STYLE["background_value"], (0.0, 0.7))
    step = _STYLE["background_contrast"]
    second = np.clip(base + rng.uniform(-step, step, 3), 0, 1).astype(np.float32)
    t = _texture(rng, size)[..., None]
    image = base * (1 - t) + second * t

    # Clutter: dots and short strokes, smaller and thinner than any object.
    for _ in range(int(rng.integers(*_STYLE["clutter"]))):
        colour = rng.random(3).astype(np.float32)
        center = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            dot = rng.uniform(1.0, 2.5)
            cover = _coverage(size, lambda u, v: u**2 + v**2 < 1.0, center, dot, 0.0, 1.0)
        else:
            length, width = rng.uniform(3.0, 7.0), rng.uniform(0.5, 1.0)
            cover = _coverage(size, lambda u, v: (np.abs(u) < 1.0) & (np.abs(v) < width / length),
                              center, length, rng.uniform(0, 2 * math.pi), 1.0)
        image = image * (1 - cover[..., None]) + colour * cover[..., None]
    return image, base, second


def _paint_shape(image: np.ndarray, label: int, center: np.ndarray, radius: float, angle: float, aspect: float,
                 colour: np.ndarray, light: float) -> np.ndarray:
    """``image`` (float RGB, (size, size, 3)) with shape ``CLASSES[label]`` painted over it, lightly shaded."""
    size = image.shape[0]
    cover = _coverage(size, lambda u, v: _shape_mask(label, u, v), center, radius, angle, aspect)
    # A mild shading gradient across the object, so its pixels are not one flat colour.
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    shade = 1.0 + 0.15 * ((xs - center[0]) * math.cos(light) + (ys - center[1]) * math.sin(light)) / radius
    fill = np.clip(colour * shade[..., None], 0, 1)
    return image * (1 - cover[..., None]) + fill * cover[..., None]


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Sensor noise, then 8-bit quantisation of a float RGB image."""
    image = image + rng.normal(0, 0.02, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def image_to_tensor(image: Image.Image, mean: Tuple[float, ...] = MEAN, std: Tuple[float, ...] = STD) -> torch.Tensor:
    """A PIL image as a normalised float tensor of shape ``(3, height, width)``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


class SyntheticShapes(Dataset):
    """The generated task as a map-style dataset; images are drawn on the fly.

    Args:
        split: ``"train"`` or ``"val"``.
        length: Number of images in this split.
        seed: Seed of the task (see :func:`render`).
        image_size: Height and width in pixels.
        transform: Applied to the ``PIL.Image`` of each item; defaults to
            :func:`image_to_tensor` (normalised ``(3, H, W)`` float tensor).

    Raises:
        ValueError: for an unknown split, a non-positive length or a bad image size.

    Example:
        >>> dataset = SyntheticShapes("val", length=100)
        >>> image, label = dataset[3]        # image: (3, 64, 64) float tensor, label: 3
    """

    classes: Tuple[str, ...] = CLASSES

    def __init__(self, split: str = "train", length: int = 50_000, seed: int = 0, image_size: int = 64,
                 transform: Optional[Callable[[Image.Image], Any]] = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        self.split, self.length, self.seed, self.image_size = split, length, int(seed), image_size
        self.transform = transform if transform is not None else image_to_tensor
        self.targets = [i % len(CLASSES) for i in range(length)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        array, label = render(index, self.split, self.seed, self.image_size)
        return self.transform(Image.fromarray(array)), label

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, length={self.length}, seed={self.seed}, "
                f"image_size={self.image_size})")


def class_directory(label: int) -> str:
    """Directory name of class ``label`` in an export: ``00_circle``, ``01_ring``, ...

    The number keeps :data:`CLASSES` order under the alphabetical sort of ImageFolder
    readers (torchvision's, :class:`tome.data.ImageFolder`), so label ``i`` of a model
    trained on :class:`SyntheticShapes` is directory ``i`` of the export.
    """
    width = max(2, len(str(len(CLASSES) - 1)))
    return f"{label:0{width}d}_{CLASSES[label]}"


_EXPORT_TASK = "tome synthetic shapes"  # what dataset.json's "task" says in every export


def _earlier_export(root: Path) -> Dict[str, Any]:
    """The ``dataset.json`` of the earlier export in ``root``.

    Raises:
        ValueError: naming ``root`` when it is not a tome export (no readable ``dataset.json``
            that says so): ``overwrite`` must not delete anything there.
    """
    info_path, info = root / "dataset.json", None
    if not info_path.is_file():
        why = "it has no dataset.json"
    else:
        try:
            info = json.loads(info_path.read_text())
            why = "its dataset.json describes something else"
        except (OSError, UnicodeDecodeError, ValueError) as error:
            why = f"its dataset.json cannot be read: {error}"
    if not isinstance(info, dict) or info.get("task") != _EXPORT_TASK:
        raise ValueError(f"export directory {str(root)!r} is not empty and is not an earlier tome data export ({why}); "
                         "overwrite=True (--overwrite) replaces only such an export: pick an empty directory")
    return info


def _check_export_arguments(train: int, val: int, image_size: int) -> None:
    """The counts and image size of :func:`export_image_folder`; ``ValueError`` naming a bad one."""
    for name, count in (("train", train), ("val", val)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be a non-negative int, got {count!r}")
    if train + val == 0:
        raise ValueError("nothing to export: train and val are both 0")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")


def _replace_earlier_export(root: Path, train: int, val: int, seed: int, image_size: int) -> Dict[str, int]:
    """Make way for an export into ``root``, which holds an earlier one (``overwrite``).

    A split of count 0 stays when it can go on being described by the new ``dataset.json``
    (same seed and image size, a complete earlier export); every split of count > 0 is deleted.

    Returns:
        The image count of each split after the export: the new counts, the earlier ones for kept splits.

    Raises:
        ValueError: when ``root`` is not an earlier export, or a kept split cannot be kept.
    """
    import shutil

    earlier = _earlier_export(root)
    counts = {"train": train, "val": val}
    for split, count in counts.items():
        if count == 0 and (root / split).exists():  # kept: dataset.json goes on describing it
            if earlier.get("complete") is False:
                raise ValueError(f"{split}=0 would keep {str(root / split)!r} of an earlier export that was "
                                 f"interrupted; pass a {split} count to write that split again too")
            if (earlier.get("seed"), earlier.get("image_size")) != (seed, image_size):
                raise ValueError(
                    f"{split}=0 keeps {str(root / split)!r} of the earlier export (seed={earlier.get('seed')!r}, "
                    f"image_size={earlier.get('image_size')!r}), but this export uses seed={seed!r}, "
                    f"image_size={image_size!r}; pass the earlier seed and image size, or a {split} count "
                    "to write that split again too")
            counts[split] = int(earlier.get(split, 0))
    for split, count in (("train", train), ("val", val)):
        path = root / split
        if count == 0:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return counts


def _write_split(directory: Path, split: str, count: int, seed: int, image_size: int, width: int, bar: Any) -> None:
    """Render images ``0 .. count - 1`` of ``split`` as ``directory/<NN_class>/<index>.png``."""
    for label in range(len(CLASSES)):
        (directory / class_directory(label)).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        array, label = render(index, split, seed, image_size)
        Image.fromarray(array).save(directory / class_directory(label) / f"{index:0{width}d}.png")
        bar.update()


def export_image_folder(root: str | Path, train: int, val: int, seed: int = 0, image_size: int = 64,
                        progress: bool = True, overwrite: bool = False) -> Path:
    """Write the task to disk as an ImageFolder: ``root/{train,val}/<NN_class>/<index>.png``.

    Class directories are numbered in label order (:func:`class_directory`:
    ``00_circle``, ``01_ring``, ...), so readers that sort directories by name give
    the labels of :data:`CLASSES`. PNG is lossless, so training on the export sees
    exactly the pixels that :class:`SyntheticShapes` generates. A ``dataset.json``
    next to the splits records the arguments and the class names.

    Args:
        root: Output directory (created). It must be empty, unless ``overwrite``.
        train: Number of training images (0 to skip the split).
        val: Number of validation images (0 to skip the split).
        seed: Seed of the task.
        image_size: Height and width in pixels.
        progress: Show a tqdm progress bar (on a terminal only).
        overwrite: Replace an earlier export in ``root`` (a directory whose ``dataset.json``
            says it is one): the splits written now (count > 0) are deleted first and
            ``dataset.json`` is rewritten; a split of count 0 and anything else in ``root``
            stay as they are.

    Returns:
        ``root`` as a ``Path``.

    Raises:
        ValueError: for negative counts, no images at all, a bad image size, a non-empty
            ``root`` without ``overwrite`` or that is not an earlier export, or a kept split
            made with another seed or image size (``dataset.json`` could not describe both).
    """
    from tqdm import tqdm

    _check_export_arguments(train, val, image_size)
    root = Path(root)
    counts = {"train": train, "val": val}
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ValueError(f"export directory {str(root)!r} is not empty; pick an empty one or pass "
                             "overwrite=True (--overwrite) to replace an earlier export there")
        counts = _replace_earlier_export(root, train, val, seed, image_size)
    root.mkdir(parents=True, exist_ok=True)
    info = {"task": _EXPORT_TASK, "seed": seed, "image_size": image_size, **counts,
            "classes": list(CLASSES), "class_directories": [class_directory(i) for i in range(len(CLASSES))],
            "mean": list(MEAN), "std": list(STD)}
    # Written first (marked incomplete), so an interrupted export is still known as one and
    # overwrite=True may replace it.
    (root / "dataset.json").write_text(json.dumps({**info, "complete": False}, indent=2) + "\n")
    width = max(6, len(str(max(train, val))))
    with tqdm(total=train + val, desc=f"export {root}", disable=None if progress else True, unit="img") as bar:
        for split, count in (("train", train), ("val", val)):
            if count == 0:
                continue
            _write_split(root / split, split, count, seed, image_size, width, bar)
    (root / "dataset.json").write_text(json.dumps({**info, "complete": True}, indent=2) + "\n")
    return root
