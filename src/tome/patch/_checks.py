"""Support checks the families share, run at patch time.

A family recognises its models by class name and module (so no optional library is
imported to answer "is this one of yours?") and refuses, before changing anything,
what it cannot run exactly: a ``TypeError`` that names the class and what is
supported. The refusals several families make in the same words live here.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from ._lifecycle import original_class, supported_families

__all__ = [
    "check_attention_pool",
    "check_class",
    "check_family",
    "check_own_methods",
    "has_class",
    "refuse_position_augmentation",
]


def _defined_in(cls: type, module: str) -> bool:
    return cls.__module__ == module or cls.__module__.startswith(module + ".")


def has_class(obj: object, name: str, module: str) -> bool:
    """Whether ``type(obj)`` is, or derives from, a class called ``name`` defined in ``module``
    (or a submodule of it). Reads names only: the library is not imported."""
    return any(cls.__name__ == name and _defined_in(cls, module) for cls in type(obj).__mro__)


def check_class(module: nn.Module, where: str, expected: Sequence[str], library: str, layout: str = "") -> None:
    """Raise ``TypeError`` unless ``module``'s class (before any ToMe swap) is one of the classes
    named ``expected`` defined in ``library`` (a module or package).

    Args:
        module: A part of the model (its runner, a block, an attention module).
        where: Its path in the model, for the message.
        expected: The class names ToMe runs exactly.
        library: Where those classes are defined, e.g. ``"transformers"``.
        layout: Appended to the message (which version's layout is supported).
    """
    own = original_class(module)
    if own.__name__ not in expected or not _defined_in(own, library):
        raise TypeError(f"{where} is a {own.__name__} ({own.__module__}); ToMe expects {' or '.join(expected)}{layout}")


def check_family(model: nn.Module, family: str, detector: Callable[[nn.Module], bool], expected: str) -> None:
    """Raise ``TypeError`` unless ``detector(model)``: ``tome.patch.<family>`` expects ``expected``.

    The message names the model's class and module and the supported families.
    """
    if not detector(model):
        raise TypeError(
            f"tome.patch.{family} expects {expected}, got {type(model).__name__} ({type(model).__module__}). "
            f"Supported families: {supported_families()}"
        )


def check_own_methods(model: nn.Module, base: type, methods: Sequence[str], hint: str = "") -> None:
    """Raise ``TypeError`` if the model's class overrides one of ``base``'s ``methods``.

    ToMe runs the library's own code for these methods with merging, so it cannot
    know what an override does.

    Args:
        model: The model (its class before any ToMe swap is checked).
        base: The library class whose methods ToMe reruns.
        methods: The method names the class must inherit unchanged.
        hint: A sentence appended to the message (what is supported instead).
    """
    own = original_class(model)
    library = base.__module__.split(".")[0]
    for method in methods:
        if getattr(own, method) is not getattr(base, method):
            raise TypeError(
                f"{own.__name__} overrides {base.__name__}.{method} (defined in {own.__module__}); ToMe runs "
                f"{library}'s own {method} with merging and cannot know what the override does.{hint}"
            )


def check_attention_pool(model: nn.Module) -> None:
    """Raise ``TypeError`` unless a timm model's ``attn_pool`` is None or an ``AttentionPoolLatent``
    without position embedding (``global_pool="map"``), the pool ToMe weights by token size."""
    pool = model.attn_pool
    if pool is None:
        return
    has_pos_embed = getattr(pool, "pos_embed", None) is not None
    if type(pool).__name__ != "AttentionPoolLatent" or has_pos_embed:
        raise TypeError(
            f"attention pooling {type(pool).__name__} (with position embedding: {has_pos_embed}) is not "
            "supported; supported: AttentionPoolLatent without pos_embed ('map')"
        )


def refuse_position_augmentation(model: nn.Module) -> None:
    """Raise ``ValueError`` while a timm model trains with patch dropout or rotary coordinate
    augmentation: the tokens entering the blocks are then not the patch grid whose positions
    merged tokens carry."""
    rope_augmented = getattr(model.rope, "aug_active", False)
    if model.training and (model.patch_drop is not None or rope_augmented):
        raise ValueError(
            "token merging (r > 0) cannot follow patch dropout or rotary coordinate augmentation "
            f"(patch_drop={model.patch_drop}, rope augmentation={rope_augmented}) "
            "while training; call model.eval() or set model.r = 0"
        )
