"""Class swaps that remember their parent.

Patching replaces ``module.__class__`` with a subclass that mixes in the ToMe
behaviour; the subclass records the class it replaced (so undo is exact), pickles as
that class plus the mixins, and hooks that accelerate or diffusers added keep calling
the module's current forward. No parameter, buffer or submodule is added or renamed.
"""

from __future__ import annotations

import builtins
import dis
import inspect
import types
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union

from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


_CLASS_CACHE: Dict[Tuple[Tuple[type, ...], type], type] = {}


def original_class(module: nn.Module) -> type:
    """The module's class before any ToMe swap (its own class when unpatched)."""
    cls = type(module)
    return cls.__dict__.get("_tome_parent", cls)


def is_patched(module: nn.Module) -> bool:
    """Whether ``module``'s class is a ToMe swap."""
    return "_tome_parent" in type(module).__dict__


def in_parent_module(fn: F) -> F:
    """Mark a model's ``forward`` to run with the module globals of the forward it replaces.

    ``torch.fx`` treats a framework's do-not-trace functions as leaves only where it
    finds them: among the globals of the root ``forward`` (timm hands its
    ``register_notrace_function`` list to the tracer as ``autowrap_functions``, e.g.
    ``resample_abs_pos_embed`` for ``dynamic_img_size`` models). A patched forward
    defined here would hide them; the swapped class gets a copy of ``fn`` whose
    globals are the parent forward's, so tracing sees what it saw unpatched. ``fn``
    must therefore only delegate: it may read builtins and ``self``, no module names.

    Raises:
        TypeError: if ``fn`` reads a global name that is not a builtin.
    """
    names = {op.argval for op in dis.get_instructions(fn) if op.opname == "LOAD_GLOBAL"}
    foreign = sorted(name for name in names if not hasattr(builtins, name))
    if foreign:
        raise TypeError(f"{fn.__qualname__} runs in another module and may not read module names {foreign}")
    fn._tome_in_parent_module = True  # type: ignore[attr-defined]
    return fn


def with_parent_signature(fn: F) -> F:
    """Mark a model's delegating ``forward(*args, tome=None, **kwargs)`` to report the signature
    of the forward it replaces.

    ``inspect.signature(model.forward)`` is how frameworks read what a model takes:
    transformers' ``Trainer`` keeps only the dataset columns named there, and its
    tests ask whether ``output_attentions`` is accepted. The swapped class gets a copy
    of ``fn`` whose ``__signature__`` is the parent's.
    """
    fn._tome_parent_signature = True  # type: ignore[attr-defined]
    return fn


def _class_forward(cls: type, parent: type) -> Optional[Callable[..., Any]]:
    """``cls.forward`` adjusted to its parent, as marked by :func:`in_parent_module` and
    :func:`with_parent_signature`; None when unmarked."""
    fn = getattr(cls, "forward", None)
    parent_forward = getattr(parent, "forward", None)
    rehome = getattr(fn, "_tome_in_parent_module", False) and hasattr(parent_forward, "__globals__")
    resign = getattr(fn, "_tome_parent_signature", False) and callable(parent_forward)
    if not (rehome or resign):
        return None
    moved = types.FunctionType(fn.__code__, parent_forward.__globals__ if rehome else fn.__globals__,  # type: ignore[union-attr]
                               fn.__name__, fn.__defaults__, fn.__closure__)  # type: ignore[union-attr]
    moved.__kwdefaults__ = fn.__kwdefaults__  # type: ignore[union-attr]
    moved.__qualname__, moved.__doc__, moved.__annotations__ = fn.__qualname__, fn.__doc__, dict(fn.__annotations__)  # type: ignore[union-attr]
    if resign:
        moved.__signature__ = inspect.signature(parent_forward)  # type: ignore[attr-defined, arg-type]
    return moved


def _runtime_class(mixins: Tuple[type, ...], parent: type) -> type:
    key = (mixins, parent)
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        namespace = {"_tome_parent": parent, "_tome_mixins": mixins, "__reduce_ex__": _reduce_swapped}
        if any(getattr(mixin, "_tome_keep_name", False) for mixin in mixins):
            # Frameworks that look classes up by name and module (transformers' pipelines,
            # custom-code checks, checkpoint conversions) keep recognising the model.
            namespace.update(__module__=parent.__module__, __qualname__=parent.__qualname__)
            name = parent.__name__
        else:
            name = f"ToMe{parent.__name__}"
        cls = type(name, mixins + (parent,), namespace)
        forward = _class_forward(cls, parent)
        if forward is not None:
            cls.forward = forward
        _CLASS_CACHE[key] = cls
    return cls


def _reduce_swapped(self: nn.Module, protocol: int) -> tuple:
    # Runtime classes cannot be found by name, so pickle (and deepcopy) record the
    # original class and the mixins, both importable, and rebuild the swap on load.
    cls = type(self)
    return (_rebuild_swapped, (cls.__dict__["_tome_parent"], cls.__dict__["_tome_mixins"]), self.__getstate__())


def _rebuild_swapped(parent: type, mixins: Tuple[type, ...]) -> nn.Module:
    module = parent.__new__(parent)
    module.__class__ = _runtime_class(tuple(mixins), parent)
    return module


def _bound_forwards(module: nn.Module) -> List[Tuple[Any, str]]:
    """``(holder, attribute)`` of every place a hook library keeps ``module``'s own forward.

    A hook added to a module replaces its ``forward`` by an instance attribute and keeps
    the forward it replaced, bound to the module's class at that time, to call it from
    the hook: accelerate in ``module._old_forward`` (``add_hook_to_module``, used by
    ``cpu_offload_with_hook``, ``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``
    and ``dispatch_model``), diffusers in the first link of its hook registry
    (``module._diffusers_hook``: group offloading, caches, layerwise casting). A hook
    removed again leaves that bound forward in ``module.forward``.
    """
    holders: List[Tuple[Any, str]] = [(module, "_old_forward"), (module, "forward")]
    registry = module.__dict__.get("_diffusers_hook")
    for ref in getattr(registry, "_fn_refs", None) or ():
        holders += [(ref, "forward"), (ref, "original_forward")]
    return holders


def _set_class(module: nn.Module, cls: type) -> None:
    """``module.__class__ = cls``, with every forward a hook kept for ``module`` following it.

    Without this, a hook added before patching keeps calling the forward of the class the
    module had then, so a patched model would run unpatched while saying it merges (and
    after ``remove_patch`` a hook added while patched would call a mixin's forward on the
    restored class). Only forwards bound to this very module and equal to its class's
    ``forward`` are rebound; any other wrapper is left alone.
    """
    old = getattr(type(module), "forward", None)
    module.__class__ = cls
    new = getattr(cls, "forward", None)
    if old is None or new is None or old is new:
        return
    for holder, name in _bound_forwards(module):
        bound = (holder.__dict__ if isinstance(holder, nn.Module) else vars(holder)).get(name)
        if isinstance(bound, types.MethodType) and bound.__self__ is module and bound.__func__ is old:
            object.__setattr__(holder, name, types.MethodType(new, module))


def swap_class(module: nn.Module, mixins: Union[type, Tuple[type, ...]]) -> None:
    """Give ``module`` the class ``(*mixins, original class)``; no-op if it has that class already.

    A module patched with other mixins (a re-patch that changes, say, the attention
    class an option selects) gets its original class back first.

    The new class records its parent (for :func:`remove_patch`) and pickles as
    the parent plus the mixins, so patched models survive ``torch.save(model)``,
    ``copy.deepcopy`` and multiprocessing. Hooks added to the module before
    (accelerate's offloading and ``device_map`` dispatch, diffusers' hook registry)
    call the new class's forward from then on.
    """
    mixins = mixins if isinstance(mixins, tuple) else (mixins,)
    if is_patched(module):
        if type(module).__dict__["_tome_mixins"] == mixins:
            return
        _set_class(module, original_class(module))
    _set_class(module, _runtime_class(mixins, type(module)))
