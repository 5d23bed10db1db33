"""``tome train``: train or fine-tune a timm Vision Transformer with token merging active.

The recipe is the usual ViT one (AdamW, linear warm-up then cosine decay, label
smoothing, gradient clipping, mixed precision where it pays) with a ToMe schedule
set on the model for every training forward, as in Bolya et al., "Token Merging:
Your ViT but Faster" (ICLR 2023, section 4.3: training with ToMe). Gradients flow
through the size-weighted averages of merged tokens; the matching itself is a
discrete choice and passes none.

Data is the generated task of :mod:`tome.data.synthetic` (``data="synthetic"``) or
any ImageFolder tree with ``train/`` and ``val/`` sub-directories. Run under
``torchrun --nproc-per-node N`` to train with DistributedDataParallel (gloo on
CPU, NCCL on GPU); the batch size is global, so the recipe does not change with N
(results agree up to floating-point rounding).

    from tome.tools.train import TrainConfig, train
    result = train(TrainConfig(train_size=9600, r=8, output_dir="outputs/quick"))

Trained models are written as ``<name>.safetensors`` plus ``<name>.json`` (the
architecture, ``pretrained_cfg`` and how it was trained) and read back with
:func:`load_model`.

The package reads in the order a run goes: :mod:`.config` (what defines a run),
:mod:`.data` (datasets, epoch batches), :mod:`.checkpointing` (the output directory and
``checkpoint.pt``), :mod:`.loop` (setup, epochs, validation, export) and :mod:`.cli`
(``tome train``). The model files themselves are :mod:`tome.tools.model_io`'s.
"""

from __future__ import annotations

from tome.tools._common import parse_schedule
from tome.tools.model_io import load_model, save_model, save_timm

# The "X as X" imports are private names the tests reach for, importable from the package as
# before it was split.
from .cli import _config_from_args as _config_from_args
from .cli import add_parser
from .config import CHECKPOINT_FORMAT, CHECKPOINT_NAME, MODEL_NAME, TrainConfig, TrainResult, config_to_command
from .data import _EpochBatchSampler as _EpochBatchSampler
from .data import build_datasets
from .loop import _checkpoint as _checkpoint
from .loop import _restore as _restore
from .loop import _setup as _setup
from .loop import build_model, evaluate, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "build_model",
    "build_datasets",
    "save_model",
    "save_timm",
    "load_model",
    "add_parser",
    "config_to_command",
    "parse_schedule",
    "CHECKPOINT_NAME",
    "CHECKPOINT_FORMAT",
    "MODEL_NAME",
]

