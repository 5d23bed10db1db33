"""Patching and unpatching: the façade of the patching core.

The core lives in four modules, one concern each:

- :mod:`._registry`: model families (:class:`FamilySpec`, :func:`register`), their
  settings (:class:`ToMeSettings`, :data:`KEEP`), the one path every setting takes
  (:func:`configure`) and exact undo (:func:`remove_patch`);
- :mod:`._swap`: class swaps that remember their parent (:func:`swap_class`,
  :func:`original_class`), pickle as the parent plus the mixins, and keep hooks working;
- :mod:`._mixins`: the model, block and attention mixins every family builds on, and
  :func:`patch_model`;
- :mod:`._info`: ``model._tome_info`` and the report of the last forward
  (:func:`last_forward`).

Patching replaces ``module.__class__`` with a subclass that mixes in the ToMe
behaviour; the subclass records the class it replaced, so ``remove_patch``
restores it exactly. No parameter, buffer or submodule is added or renamed, so
``state_dict()`` keys are unchanged and checkpoints move freely between patched
and unpatched models.

Every name this module defined before the split is still importable from it
(``from ._lifecycle import X``), private ones included: family modules use them, and
pickles written before the split name ``tome.patch._lifecycle._rebuild_swapped``.
"""

from __future__ import annotations

from ._info import (  # noqa: F401
    ForwardReport,
    ToMeInfo,
    last_forward,
)
from ._mixins import (  # noqa: F401
    _MASK_NAMES,
    _NO_TAG,
    ToMeAttentionMixin,
    ToMeBlockMixin,
    ToMeModelMixin,
    _check_features,
    _families_with_features,
    _kept_settings,
    _masked,
    _swap_blocks,
    call_attention,
    patch_model,
)
from ._registry import (  # noqa: F401
    _INSTANCE_ATTRS,
    _REGISTRY,
    KEEP,
    Example,
    FamilySpec,
    ToMeSettings,
    _Keep,
    _no_examples,
    _one_part,
    _read_info,
    _resolved,
    _spec_for,
    check_choice,
    check_flag,
    configure,
    default_prop_attn,
    detect,
    example_images,
    families,
    family_spec,
    list_families,
    passed,
    patched_parts,
    register,
    register_family,
    registered,
    remove_patch,
    setting,
    supported_families,
)
from ._swap import (  # noqa: F401
    _CLASS_CACHE,
    F,
    _bound_forwards,
    _class_forward,
    _rebuild_swapped,
    _reduce_swapped,
    _runtime_class,
    _set_class,
    in_parent_module,
    is_patched,
    original_class,
    swap_class,
    with_parent_signature,
)

__all__ = [
    "KEEP",
    "Example",
    "FamilySpec",
    "ForwardReport",
    "ToMeSettings",
    "configure",
    "default_prop_attn",
    "detect",
    "example_images",
    "family_spec",
    "last_forward",
    "list_families",
    "register",
    "passed",
    "patched_parts",
    "registered",
    "setting",
    "ToMeInfo",
    "ToMeModelMixin",
    "ToMeBlockMixin",
    "ToMeAttentionMixin",
    "call_attention",
    "families",
    "in_parent_module",
    "with_parent_signature",
    "register_family",
    "swap_class",
    "is_patched",
    "original_class",
    "supported_families",
    "remove_patch",
    "patch_model",
]
