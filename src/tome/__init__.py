"""Token Merging (ToMe): make pretrained Vision Transformers faster without retraining.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv 2210.09461).

    import timm, tome
    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    tome.apply_patch(model, r=16)      # or: tome.patch.timm(model); model.r = 16
    ...
    tome.remove_patch(model)           # back to the exact original model
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Union

from torch import nn

from . import merge, patch, utils
from ._dense import unmerge_tokens
from ._methods import METHODS, MergeMethod, as_method
from ._schedule import RSchedule, parse_r
from .patch import remove_patch
from .patch._shared import get_prop_attn_kernel, prop_attn_kernel, set_prop_attn_kernel

__version__ = "0.1.0"

__all__ = [
    "apply_patch",
    "remove_patch",
    "merging",
    "set_prop_attn_kernel",
    "get_prop_attn_kernel",
    "prop_attn_kernel",
    "MergeMethod",
    "METHODS",
    "parse_r",
    "unmerge_tokens",
    "make_visualization",
    "merge",
    "patch",
    "utils",
    "__version__",
]


def apply_patch(
    model: nn.Module,
    r: RSchedule = 0,
    *,
    family: Optional[str] = None,
    trace_source: bool = False,
    prop_attn: Optional[bool] = None,
    method: Union[str, MergeMethod] = "tome",
    **options: Any,
) -> nn.Module:
    """Patch ``model`` in place for token merging, detecting its family.

    Patching twice is harmless: the second call only updates the settings.

    Args:
        model: A supported Vision Transformer (see ``tome.patch.FAMILIES``).
        r: Merge schedule: tokens removed per layer (int), a per-layer list, or
            ``(r, inflection)``; see :func:`tome.parse_r`. Each layer's r is capped
            at half of its non-protected tokens.
        family: Force a family (``"timm"``, ``"mae"``, ...) instead of detecting it.
        trace_source: Track which original patches each token contains
            (``model._tome_info["source"]`` after a forward).
        prop_attn: Proportional attention; ``None`` uses the family's default
            (on for supervised models, off for MAE).
        method: Merge rule of every block: ``"tome"`` (default; bipartite soft
            matching, size-weighted average), ``"pitome"`` (energy-protected
            matching, NeurIPS 2024) or ``"tofu"`` (pruning early, norm-preserving
            MLERP merging later, WACV 2024), or a :class:`tome.MergeMethod` with
            options. Also ``model.tome_method`` on a patched model; see docs/methods.md.
        **options: Options of families that do not use ``r``: for a diffusers
            pipeline or model, those of :func:`tome.patch.diffusers`
            (``ratio``, ``max_downsample``, ``mode``, ...).

    Returns:
        The same model, patched, with ``model.r = r``.

    Raises:
        TypeError: if the model is not supported (its class and the supported families are named).
        ValueError: if ``r``, ``method`` or ``family`` is invalid.
    """
    method = as_method(method)  # a bad name raises before anything is patched
    registered = patch.families()
    if family is None:
        family = patch.family_of(model)
    elif family not in registered:
        raise ValueError(f"family={family!r} is unknown; expected one of {list(registered)}")
    patch_fn = registered[family][1]
    if family == "diffusers":
        if r != 0 or trace_source or prop_attn is not None or method.name != "tome":
            raise ValueError(
                "diffusion models merge a fraction of each level's tokens: pass ratio=... (and the other options "
                "of tome.patch.diffusers), not r, trace_source, prop_attn or method"
            )
        return patch_fn(model, **options)
    if options:
        raise TypeError(f"apply_patch() got options the {family} family does not take: {sorted(options)}")
    options: dict[str, Any] = {"trace_source": trace_source}
    if prop_attn is not None:
        options["prop_attn"] = prop_attn
    was_patched = patch.is_patched(model)
    patch_fn(model, **options)
    try:
        model.r = r  # type: ignore[attr-defined]  (checked against the depth)
        model.tome_method = method  # type: ignore[attr-defined]
    except ValueError:
        if not was_patched:  # a bad r leaves the model as it was
            remove_patch(model)
        raise
    return model


@contextlib.contextmanager
def merging(
    model: nn.Module, r: RSchedule, method: Union[str, MergeMethod, None] = None
) -> Iterator[nn.Module]:
    """Run a patched model with schedule ``r`` inside a ``with`` block, then restore its old ``r``
    (and its old ``tome_method`` when ``method`` is given).

    ::

        with tome.merging(model, r=16):
            logits = model(images)      # merges 16 tokens per layer
        # model.r is back to what it was, also if the block raised

    Changing ``r`` is a setting on the model, so (as with ``model.r = ...``) other
    threads running the same model see it while the block runs.

    Args:
        model: A model patched by :func:`apply_patch` or a ``tome.patch`` function.
        r: Schedule for the block: int, per-layer list, or ``(r, inflection)``
            (see :func:`tome.parse_r`).
        method: Merge method for the block (``"tome"``, ``"pitome"``, ``"tofu"`` or a
            :class:`tome.MergeMethod`); ``None`` keeps the model's.

    Yields:
        The model.

    Raises:
        TypeError: if ``model`` is not patched.
        ValueError: if ``r`` or ``method`` is invalid (the model's settings are then unchanged).
    """
    if not patch.is_patched(model) or not hasattr(model, "_tome_r"):
        raise TypeError(
            f"tome.merging needs a patched model, got an unpatched {type(model).__name__}; "
            "call tome.apply_patch(model) first"
        )
    new_method = None if method is None else as_method(method)
    previous = model.r  # type: ignore[attr-defined]
    previous_method = model.tome_method if new_method is not None else None  # type: ignore[attr-defined]
    model.r = r  # type: ignore[attr-defined]
    try:
        if new_method is not None:
            model.tome_method = new_method  # type: ignore[attr-defined]
        yield model
    finally:
        model.r = previous  # type: ignore[attr-defined]
        if previous_method is not None:
            model.tome_method = previous_method  # type: ignore[attr-defined]


def __getattr__(name: str) -> Any:
    # Drawing needs PIL and numpy: imported only when asked for, so `import tome` stays light.
    if name == "make_visualization":
        from .vis import make_visualization

        return make_visualization
    if name == "vis":  # the original release's module: `import tome; tome.vis.make_visualization`
        import importlib

        return importlib.import_module("tome.vis")
    raise AttributeError(f"module 'tome' has no attribute {name!r}")
