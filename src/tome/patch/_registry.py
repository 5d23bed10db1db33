"""The registry of model families and the one path every setting takes.

A family is one :class:`FamilySpec` (its detector, patch function, typed settings and
tiny examples), registered with :func:`register` as timm registers models.
:func:`configure` patches a model or changes its settings, all or nothing;
:func:`remove_patch` undoes every patch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import nn

from .._methods import MergeMethod, as_method
from .._schedule import RSchedule, check_r
from ._swap import _set_class, is_patched

F = TypeVar("F", bound=Callable[..., Any])


# Instance attributes the core adds; removed again by remove_patch (with each family's own,
# FamilySpec.instance_attrs).
_INSTANCE_ATTRS = (
    "_tome_info", "_tome_r", "_tome_block_r", "_tome_rule", "_tome_index", "_tome_protected", "_tome_prop_attn",
    "_tome_context", "_tome_feature", "_tome_family",
)


class _Keep:
    """The default of every option of a patch function: leave the setting as it is
    (a first patch takes the option's default)."""

    _instance: Optional["_Keep"] = None

    def __new__(cls) -> "_Keep":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "KEEP"

    def __reduce__(self) -> tuple:
        return (_Keep, ())


KEEP: Any = _Keep()


def passed(**options: Any) -> Dict[str, Any]:
    """The options that were given (not :data:`KEEP`)."""
    return {name: value for name, value in options.items() if value is not KEEP}


def check_flag(name: str, value: Any, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is True or False (or None when ``optional``)."""
    if not (isinstance(value, bool) or (optional and value is None)):
        expected = "True, False or None" if optional else "True or False"
        raise ValueError(f"{name}={value!r} must be {expected}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


@dataclass
class ToMeSettings:
    """The settings of every family whose blocks merge tokens for good (all but diffusion).

    Each is an argument of :func:`tome.apply_patch`, of the family's patch function
    (``tome.patch.timm(model, ...)``) and of :func:`tome.merging`, and a property of the
    patched model: ``model.r``, ``model.tome_method`` (for ``method``),
    ``model.trace_source``, ``model.prop_attn``. Patching a patched model again
    changes only the settings passed. A family with options of its own subclasses
    this (see ``RopeSettings`` in ``tome/patch/_eva.py``).

    Args:
        r: Tokens removed per layer: an int, a per-layer list (padded with zeros) or
            ``(r, inflection)`` with inflection in [-1, 1]; see :func:`tome.parse_r`.
            Each layer caps its r at half of its non-protected tokens.
        method: The merge rule of every block: ``"tome"`` (bipartite soft matching,
            size-weighted average), ``"pitome"``, ``"tofu"``, or a
            :class:`tome.MergeMethod` with options (docs/methods.md).
        trace_source: Track which original patches each token contains
            (:func:`tome.last_forward` ``.source`` after a forward).
        prop_attn: Proportional attention: ``log(size)`` added to the attention logits,
            so a merged token counts as the patches it holds (ToMe, Sec. 3). ``None``
            takes the default rule, :func:`default_prop_attn`: on, off for MAE weights.
    """

    r: RSchedule = field(default=0, metadata={"example": (2, -1.0)})
    method: Union[str, MergeMethod] = field(default="tome", metadata={"example": "pitome"})
    trace_source: bool = False
    prop_attn: Optional[bool] = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting (the depth is checked at patch time)."""
        check_r(self.r)
        as_method(self.method)
        check_flag("trace_source", self.trace_source)
        check_flag("prop_attn", self.prop_attn, optional=True)


@dataclass(frozen=True)
class Example:
    """A tiny model of a family, built from a config with random weights, and its inputs:
    what the conformance suite (``tests/patch/test_conformance.py``) checks the family on.

    Args:
        name: Names the example in test ids.
        build: ``() -> model``: a small randomly initialised model in eval mode
            (the suite re-draws its weights at a trained-like scale). Imports what it needs.
        inputs: ``(batch, seed) -> inputs``: a tensor (called as ``model(x)``) or a dict of
            keyword arguments (``model(**inputs)``).
        merging: Settings under which the model merges (``{"r": 2}``).
        output: ``model output -> tensor`` the user reads (None: the tensor, else ``logits``,
            ``image_embeds``, ``pooler_output``, ``last_hidden_state`` or ``sample``).
        requires: Modules the example needs; the suite skips it where one is missing.
        exports: Whether the export tests export it (None: the family's ``exports``): False
            for a model that does not export, or one whose export another example covers.
        fullgraph: Whether ``torch.compile(fullgraph=True)`` compiles it without a graph break.
        idle_atol: How far outputs may move with nothing merged; 0 is bit for bit.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Any]
    merging: Mapping[str, Any] = field(default_factory=lambda: {"r": 2})
    output: Optional[Callable[[Any], torch.Tensor]] = None
    requires: Tuple[str, ...] = ()
    exports: Optional[bool] = None
    fullgraph: bool = True
    idle_atol: float = 0.0


def example_images(batch: int, seed: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """``(batch, 3, height, width)`` random images drawn from ``seed``: the inputs of most examples."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _no_examples() -> Sequence[Example]:
    return ()


def _one_part(obj: Any) -> List[nn.Module]:
    return [obj]


def _read_info(model: nn.Module, settings: type) -> Any:
    """The current settings of a model patched through :func:`patch_model`: ``r`` is
    ``model._tome_r``, the method ``_tome_info["method"]``, every other one ``_tome_info[name]``."""
    info = model.__dict__["_tome_info"]
    values: Dict[str, Any] = {}
    for option in fields(settings):
        if option.name == "r":
            values["r"] = model.__dict__.get("_tome_r", 0)
        elif option.name == "method":
            values["method"] = info.get("method") or MergeMethod()
        else:
            values[option.name] = info.get(option.name, option.default)
    return settings(**values)


@dataclass(frozen=True)
class FamilySpec:
    """A model family: everything ``tome`` needs to patch it, in one declaration.

    Registered with :func:`register`, as timm registers models: ``tome.apply_patch``
    asks the detectors in priority order, ``tome.patch.FAMILIES`` and
    :func:`tome.list_families` list it, every setting of ``settings`` becomes an
    argument of ``tome.apply_patch`` and ``tome.merging``, and the conformance suite
    runs on its ``examples``.

    Args:
        name: The family's name (``tome.apply_patch(model, family=name)``).
        detector: ``model -> bool``; looks at class names and modules only, so no
            optional library is imported to answer "is this one of yours?".
        patch: ``(model, settings) -> model``: swap the classes of a checked model (or
            update a patched one) for the complete, validated ``settings``; raise
            ``TypeError`` naming what cannot run exactly before changing anything.
        settings: The options, a dataclass with ``validate()`` (:class:`ToMeSettings`
            or a subclass for families that merge tokens for good).
        priority: Lower is asked first (a more specific family before its base).
        prop_attn_default: The family's proportional-attention default (see
            :func:`default_prop_attn`), and ``prop_attn_reason`` why, when off.
        instance_attrs: Instance attributes the family adds to modules beyond the
            core's; :func:`remove_patch` removes them.
        exports: Whether ``tome.export`` exports its models.
        traceable: Whether ``torch.fx.symbolic_trace`` and ``torch.jit.trace`` follow the merge.
        attention_features: Where the family's attention reports more than the keys averaged
            over heads (queries, values, the class token's attention: what ablation methods
            match on), e.g. ``"timm Attention"``; empty when it does not. An error for a
            method that needs them names the families that declare it.
        no_merging: Settings under which nothing merges (the unpatched outputs).
        examples: ``() -> [Example]``: its tiny models, for the conformance suite.
        parts: ``obj -> [module]``: the modules a patch applies to, each with its own
            settings (a diffusers pipeline: its denoisers); default ``[obj]``.
        read: ``module -> settings`` of a part this family patched; default: from
            ``_tome_r`` and ``_tome_info``, as :func:`patch_model` records them.
    """

    name: str
    detector: Callable[[Any], bool]
    patch: Callable[[Any, Any], Any]
    settings: type = ToMeSettings
    priority: int = 100
    prop_attn_default: bool = True
    prop_attn_reason: str = ""
    instance_attrs: Tuple[str, ...] = ()
    exports: bool = False
    traceable: bool = False
    attention_features: str = ""
    no_merging: Mapping[str, Any] = field(default_factory=lambda: {"r": 0})
    examples: Callable[[], Sequence[Example]] = _no_examples
    parts: Callable[[Any], List[nn.Module]] = _one_part
    read: Optional[Callable[[nn.Module], Any]] = None

    def option_names(self) -> List[str]:
        """The names of the family's options, in declaration order."""
        return [option.name for option in fields(self.settings)]

    def check_names(self, options: Mapping[str, Any], caller: str = "apply_patch") -> None:
        """Raise ``ValueError`` naming the options the family does not take, and the ones it does."""
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise ValueError(
                f"{caller}() got {'options' if len(unknown) > 1 else 'an option'} the {self.name} family does not "
                f"take: {', '.join(unknown)}; its options are {', '.join(self.option_names())}"
            )

    def current(self, part: nn.Module) -> Any:
        """The settings of ``part`` if this family patched it, else None."""
        if not isinstance(part, nn.Module) or part.__dict__.get("_tome_family") != self.name:
            return None
        return self.read(part) if self.read is not None else _read_info(part, self.settings)

    def apply(self, model: Any, **options: Any) -> Any:
        """``tome.apply_patch(model, family=self.name, **options)``."""
        return configure(model, family=self.name, **options)


_REGISTRY: Dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Register a family (replacing one of the same name); returns ``spec``.

    Raises:
        TypeError: if ``spec.settings`` is not a dataclass with a ``validate`` method.
    """
    if not (is_dataclass(spec.settings) and callable(getattr(spec.settings, "validate", None))):
        raise TypeError(f"the settings of family {spec.name!r} must be a dataclass with validate(), "
                        f"got {spec.settings!r}")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> List[FamilySpec]:
    """The registered families, in the order their detectors are asked."""
    return sorted(_REGISTRY.values(), key=lambda spec: spec.priority)


def family_spec(name: str) -> FamilySpec:
    """The registered family called ``name``.

    Raises:
        ValueError: for an unknown name (the registered ones are listed).
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"family={name!r} is unknown; expected one of {list_families()}")
    return spec


def detect(model: Any) -> Optional[FamilySpec]:
    """The first family (by priority) whose detector recognises ``model``, or None."""
    return next((spec for spec in registered() if spec.detector(model)), None)


def list_families() -> List[str]:
    """Names of the registered families, in the order ``tome.apply_patch`` asks them."""
    return [spec.name for spec in registered()]


def families() -> Dict[str, Tuple[Callable[[Any], bool], Callable[..., Any]]]:
    """Registered families in the order they are asked: ``name -> (detector, patch function)``."""
    return {spec.name: (spec.detector, spec.apply) for spec in registered()}


def supported_families() -> str:
    """Comma-separated names of the families ``tome.apply_patch`` knows, for error messages."""
    return ", ".join(list_families())


def register_family(name: str, detector: Callable[[nn.Module], bool], priority: int = 100) -> Callable[[F], F]:
    """Decorator registering a patch function ``fn(model, trace_source, prop_attn)`` as a
    family with the settings of :class:`ToMeSettings` (a thin wrapper over :func:`register`).

    ``fn`` swaps the classes (usually through :func:`patch_model`); ``r`` and the
    method are set on the model after it. New families declare a :class:`FamilySpec`.
    """

    def decorate(patch_fn: F) -> F:
        def patch(model: nn.Module, settings: ToMeSettings) -> nn.Module:
            patch_fn(model, trace_source=settings.trace_source, prop_attn=settings.prop_attn)
            model.r = settings.r  # type: ignore[attr-defined]
            model.tome_method = settings.method  # type: ignore[attr-defined]
            return model

        register(FamilySpec(name=name, detector=detector, patch=patch, priority=priority))
        return patch_fn

    return decorate


def default_prop_attn(model: Any, family: Optional[str] = None) -> Tuple[bool, str]:
    """The proportional-attention default, one rule for every family: ``(on, why)``.

    On: a model trained without merging sees a merged token as one token unless its
    key counts once per patch it holds, so ``log(size)`` is added to the logits
    (ToMe, Sec. 3). Off where a family declares ``prop_attn_default=False`` (MAE:
    its weights were fine-tuned with average pooling and are better without it),
    both for a model patched as that family and for one that family recognises
    (``tome.patch.timm`` on timm's ``.mae`` weights).
    """
    specs = ([family_spec(family)] if family is not None else []) + [detect(model)]
    for spec in specs:
        if spec is not None and not spec.prop_attn_default:
            return False, spec.prop_attn_reason
    return True, ""


def _resolved(spec: FamilySpec, part: nn.Module, settings: Any) -> Any:
    """``settings`` with ``prop_attn=None`` replaced by the default rule's value."""
    if getattr(settings, "prop_attn", False) is None:
        settings = replace(settings, prop_attn=default_prop_attn(part, spec.name)[0])
    return settings


def _spec_for(obj: Any, family: Optional[str]) -> FamilySpec:
    if family is not None:
        return family_spec(family)
    recorded = obj.__dict__.get("_tome_family") if isinstance(obj, nn.Module) else None
    spec = family_spec(recorded) if recorded in _REGISTRY else detect(obj)
    if spec is None:
        raise TypeError(
            f"{type(obj).__name__} ({type(obj).__module__}) is not a model ToMe can patch. "
            f"Supported families: {supported_families()}"
        )
    return spec


def configure(
    obj: Any, family: Optional[str] = None, caller: str = "apply_patch", in_place: bool = False, **options: Any
) -> Any:
    """Patch ``obj`` for token merging, or change the settings of a patched one: the one
    path every setting takes (``tome.apply_patch``, the ``tome.patch`` functions, the
    model's setting properties and ``tome.merging`` all come here).

    Options that are not given (or are :data:`KEEP`) keep their current value, or
    their default on a first patch. All or nothing: when a part refuses, the parts
    already changed are put back as they were.

    Args:
        obj: A model, or an object the family patches in parts (a diffusers pipeline).
        family: Force a family instead of the one that patched ``obj`` or detects it.
        caller: Named in the error for an unknown option.
        in_place: Change only ``r`` and ``method`` of a patched model, through its setters,
            without patching it again (``tome.merging``: as fast as ``model.r = ...``).
        **options: Settings of the family (its ``settings`` dataclass's fields).

    Returns:
        ``obj``.

    Raises:
        TypeError: if no family recognises ``obj`` or it holds parts ToMe cannot run.
        ValueError: naming an option the family does not take (and the ones it does),
            or an invalid value.
    """
    spec = _spec_for(obj, family)
    options = passed(**options)
    spec.check_names(options, caller)
    done: List[Tuple[nn.Module, Any, bool]] = []
    try:
        for part in spec.parts(obj):
            before = spec.current(part)
            done.append((part, before, is_patched(part)))
            if in_place and isinstance(before, ToMeSettings) and options.keys() <= {"r", "method"}:
                for name, value in options.items():
                    setattr(part, "tome_method" if name == "method" else name, value)
                continue
            base = before if before is not None else spec.settings()
            settings = _resolved(spec, part, replace(base, **options))
            settings.validate()
            spec.patch(part, settings)
            part.__dict__["_tome_family"] = spec.name
    except BaseException:
        for part, before, was_patched in reversed(done):
            if not was_patched:
                remove_patch(part)
            elif before is not None:
                spec.patch(part, before)
        raise
    return obj


def patched_parts(obj: Any, caller: str = "tome.merging") -> Tuple[FamilySpec, List[nn.Module]]:
    """The family that patched ``obj`` and the parts it patched (``[obj]`` for a model).

    Raises:
        TypeError: if ``obj`` (or one of its parts) is not patched.
    """
    try:
        spec: Optional[FamilySpec] = _spec_for(obj, None)
        parts = spec.parts(obj)  # type: ignore[union-attr]
    except TypeError:
        spec, parts = None, []
    if spec is None or not parts or any(spec.current(part) is None for part in parts):
        raise TypeError(
            f"{caller} needs a patched model, got an unpatched {type(obj).__name__}; call tome.apply_patch(model) first"
        )
    return spec, parts


def setting(name: str, doc: str) -> property:
    """A property reading and setting one option of the family that patched the model;
    setting it goes through :func:`configure`, so it is checked as the argument is."""

    def get(self: nn.Module) -> Any:
        return getattr(_spec_for(self, None).current(self), name)

    def set_(self: nn.Module, value: Any) -> None:
        configure(self, caller=f"{type(self).__name__}.{name} =", **{name: value})

    return property(get, set_, doc=doc)


def remove_patch(model: Any) -> Any:
    """Undo any ToMe patch in place: original classes back, ToMe attributes gone.

    Outputs are then bit-identical to a model that was never patched. Hooks that
    accelerate or diffusers added to its modules (before or after patching) keep
    working and call the original forward again. Calling it on an unpatched model
    does nothing.

    Args:
        model: A model patched by any ``tome.patch`` function, or a diffusers
            pipeline (every module among its components is restored).

    Returns:
        The same model, for chaining.
    """
    if not isinstance(model, nn.Module):
        components = getattr(model, "components", None)
        if not isinstance(components, dict):
            raise TypeError(f"remove_patch expects a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
        for component in components.values():
            if isinstance(component, nn.Module):
                remove_patch(component)
        return model
    attrs = set(_INSTANCE_ATTRS).union(*(spec.instance_attrs for spec in _REGISTRY.values()))
    for module in model.modules():
        while is_patched(module):
            _set_class(module, type(module).__dict__["_tome_parent"])
        for attr in attrs:
            module.__dict__.pop(attr, None)
    return model
