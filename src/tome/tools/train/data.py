"""The data of a ``tome train`` run: the generated task or an ImageFolder tree, unreadable
images skipped and named, and the batches of one epoch (the same for any number of processes)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

from tome.tools import _runtime as runtime

from .config import TrainConfig

__all__ = ["build_datasets"]

class _Resized:
    """Resize a PIL image to a square of ``size`` (bicubic) before :func:`tome.data.image_to_tensor`."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        from tome.data import image_to_tensor

        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BICUBIC)
        return image_to_tensor(image, self.mean, self.std)


def build_datasets(config: TrainConfig) -> Tuple[Dataset, Optional[Dataset], List[str]]:
    """``(train, val, class_names)`` for ``config.data``; ``val`` is None when there is none.

    Raises:
        ValueError: if ``config.data`` is neither ``"synthetic"`` nor a directory with ``train/``.
    """
    from tome import data as tdata

    if config.data == "synthetic":
        transform = _Resized(config.image_size, tdata.MEAN, tdata.STD)
        train_set = tdata.SyntheticShapes("train", config.train_size, config.data_seed, config.image_size, transform)
        val_set = (tdata.SyntheticShapes("val", config.val_size, config.data_seed, config.image_size, transform)
                   if config.val_size else None)
        return train_set, val_set, list(tdata.CLASSES)
    root = Path(config.data)
    if not (root / "train").is_dir():
        raise ValueError(f"data={config.data!r} must be 'synthetic' or a directory with train/ (and val/) inside")
    mean, std = _data_stats(root)
    transform = _Resized(config.image_size, mean, std)
    train_set = tdata.ImageFolder(root / "train", transform)
    val_set: Optional[Dataset] = None
    if (root / "val").is_dir():
        val_set = tdata.ImageFolder(root / "val", transform, classes=train_set.classes)
        if config.val_size and config.val_size < len(val_set):
            step = len(val_set) / config.val_size
            val_set = torch.utils.data.Subset(val_set, [int(i * step) for i in range(config.val_size)])
    return train_set, val_set, list(train_set.classes)


class _SkipUnreadable(Dataset):
    """Items ``(image, label, "")``, or ``(None, -1, name)`` for an image that cannot be read.

    As in ``tome eval``, one broken file is skipped and named rather than fatal;
    :func:`tome.tools.evaluate.collate_skipping` batches these items.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[Optional[torch.Tensor], int, str]:
        try:
            image, label = self.dataset[index]
        except Exception:  # any decoder failure: truncated, not an image, decompression bomb, ...
            return None, -1, _item_name(self.dataset, index)
        return image, label, ""


def _item_name(dataset: Any, index: int) -> str:
    """The file behind ``dataset[index]`` (through ``Subset``s), else ``"item <index>"``."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else f"item {index}"


_SHOWN_SKIPS = 5


def _warn_skipped(count: int, names: List[str], where: str) -> None:
    """One warning (first process) naming a few of the ``count`` unreadable images skipped in ``where``.

    ``count`` and ``names`` are over all processes.
    """
    if count and runtime.world()[0] == 0:
        warnings.warn(f"{count} unreadable image(s) skipped in {where}, e.g. {', '.join(names[:_SHOWN_SKIPS])}",
                      stacklevel=3)


def _data_stats(root: Path) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Normalisation of an ImageFolder export: from its ``dataset.json`` if any, else ImageNet's."""
    info = root / "dataset.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        if "mean" in meta and "std" in meta:
            return tuple(meta["mean"]), tuple(meta["std"])
    return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _EpochBatchSampler(Sampler[List[int]]):
    """This process's batches of one epoch, from step ``start`` on (a resumed epoch skips the done ones).

    Every process draws the same seeded permutation; step ``i`` uses global positions
    ``[i * batch_size, (i + 1) * batch_size)``, of which process ``rank`` takes its slice. So
    the images of a step do not depend on the number of processes. The incomplete last batch
    is dropped.
    """

    def __init__(self, num_items: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                 start: int = 0) -> None:
        self.num_items, self.batch_size, self.epoch, self.seed = num_items, batch_size, epoch, seed
        self.rank, self.world, self.start = rank, world, start

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.start

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        local = self.batch_size // self.world
        for step in range(self.start, self.num_items // self.batch_size):
            first = step * self.batch_size + self.rank * local
            yield order[first:first + local]
