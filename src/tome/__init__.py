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
from typing import Any, Iterator, List, Optional, Union

from . import merge, patch, utils
from ._dense import unmerge_tokens
from ._methods import METHODS, MergeMethod
from ._schedule import RSchedule, parse_r
from .patch import KEEP, ForwardReport, last_forward, remove_patch
from .patch._shared import get_prop_attn_kernel, prop_attn_kernel, set_prop_attn_kernel

__version__ = "0.1.0"

__all__ = [
    "apply_patch",
    "remove_patch",
    "merging",
    "last_forward",
    "list_families",
    "ForwardReport",
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


def apply_patch(model: Any, r: RSchedule = KEEP, *, family: Optional[str] = None, **settings: Any) -> Any:
    """Patch ``model`` in place for token merging, detecting its family; on a patched
    model, change the settings given and keep the others.

    Args:
        model: A supported model (see :func:`list_families`), or a diffusers pipeline.
        r: Merge schedule: tokens removed per layer (int), a per-layer list, or
            ``(r, inflection)``; see :func:`tome.parse_r`. Each layer's r is capped
            at half of its non-protected tokens. 0 on a first patch.
        family: Force a family (``"timm"``, ``"mae"``, ...) instead of detecting it.
        **settings: Any other setting of the family, by name: for the families that
            merge tokens for good ``method``, ``trace_source``, ``prop_attn``
            (:class:`tome.patch.ToMeSettings`), plus ``rope_position`` and
            ``rope_metric`` for rotary ones (Eva, NaFlexViT, Hugging Face DINOv3); for
            diffusion, ``ratio``, ``mode``, ``max_downsample``, ... instead of ``r``
            (:class:`tome.patch.DiffusionSettings`). Settings not given keep their value
            (their default on a first patch). Each is also a property of the patched
            model (``model.prop_attn``, ``model.tome_method`` for ``method``,
            ``pipe.unet.ratio``).

    Returns:
        The same model, patched.

    Raises:
        TypeError: if the model is not supported (its class and the supported families are named).
        ValueError: naming a setting the family does not take (and the ones it does), an
            invalid value, or an unknown ``family``. Nothing is changed then.
    """
    return patch.configure(model, family=family, r=r, **settings)


def list_families() -> List[str]:
    """Names of the registered model families, in the order :func:`apply_patch` asks them."""
    return patch.list_families()


@contextlib.contextmanager
def merging(model: Any, r: RSchedule = KEEP, method: Union[str, MergeMethod, None] = None,
            **settings: Any) -> Iterator[Any]:
    """Run a patched model with other settings inside a ``with`` block, then restore
    every setting it changed (also if the block raised).

    ::

        with tome.merging(model, r=16):
            logits = model(images)      # merges 16 tokens per layer
        with tome.merging(pipe, ratio=0.3):
            image = pipe(prompt).images[0]

    The settings are the model's, so (as with ``model.r = ...``) other threads
    running the same model see them while the block runs.

    Args:
        model: A model patched by :func:`apply_patch` or a ``tome.patch`` function, or
            a patched diffusers pipeline (each of its denoisers is changed and restored).
        r: Schedule for the block (see :func:`tome.parse_r`).
        method: Merge method for the block; ``None`` keeps the model's.
        **settings: Any other setting of the model's family, as for :func:`apply_patch`.

    Yields:
        The model.

    Raises:
        TypeError: if ``model`` is not patched.
        ValueError: for a setting the family does not take or an invalid value (the
            model's settings are then unchanged).
    """
    if method is not None:
        settings["method"] = method
    settings = patch.passed(r=r, **settings)
    spec, parts = patch.patched_parts(model)
    spec.check_names(settings, "merging")
    saved = [(part, {name: getattr(spec.current(part), name) for name in settings}) for part in parts]
    # All or nothing; r and the method in place, as model.r = ... (tome.merging often wraps a timed loop).
    patch.configure(model, family=spec.name, caller="merging", in_place=True, **settings)
    try:
        yield model
    finally:
        for part, values in saved:
            if spec.current(part) is not None:  # unless the block removed the patch
                patch.configure(part, family=spec.name, in_place=True, **values)


def __getattr__(name: str) -> Any:
    # Drawing needs PIL and numpy: imported only when asked for, so `import tome` stays light.
    if name == "make_visualization":
        from .vis import make_visualization

        return make_visualization
    if name == "vis":  # the original release's module: `import tome; tome.vis.make_visualization`
        import importlib

        return importlib.import_module("tome.vis")
    raise AttributeError(f"module 'tome' has no attribute {name!r}")
