"""Patching and unpatching: class swaps that remember their parent.

Patching replaces ``module.__class__`` with a subclass that mixes in the ToMe
behaviour; the subclass records the class it replaced, so ``remove_patch``
restores it exactly. No parameter, buffer or submodule is added or renamed, so
``state_dict()`` keys are unchanged and checkpoints move freely between patched
and unpatched models.
"""

from __future__ import annotations

import builtins
import dis
import inspect
import types
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import torch
from torch import nn

from .._methods import TOME_RULE, LayerRule, MergeMethod, as_method
from .._schedule import RSchedule, check_r, parse_r
from ._shared import AttentionCall, BlockCall, ToMeForward, ToMeState, merge_block, run_blocks, sources_from_groups

if TYPE_CHECKING:
    from ._rope import RotaryPositions

F = TypeVar("F", bound=Callable[..., Any])

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

# Instance attributes the core adds; removed again by remove_patch (with each family's own,
# FamilySpec.instance_attrs).
_INSTANCE_ATTRS = (
    "_tome_info", "_tome_r", "_tome_block_r", "_tome_rule", "_tome_index", "_tome_protected", "_tome_prop_attn",
    "_tome_context", "_tome_feature", "_tome_family",
)

_CLASS_CACHE: Dict[Tuple[Tuple[type, ...], type], type] = {}


class ToMeInfo(dict):
    """``model._tome_info``: the settings and what the last forward left behind.

    Keys (compatible with the original release): ``"r"`` (the per-layer schedule
    of the last forward), ``"size"`` ((batch, tokens, 1) sizes), ``"source"``
    ((batch, tokens, original tokens) 0/1 map, only with ``trace_source``),
    ``"trace_source"``, ``"prop_attn"``, ``"class_token"``, ``"distill_token"``,
    ``"protected_tokens"``, ``"method"`` (the :class:`tome.MergeMethod`). The source map is built when read: internally every
    forward keeps one group index per original token.

    With several threads running one model, each forward's result is still its
    own; only this after-the-fact report is shared, and it describes whichever
    forward finished last.
    """

    _report: Optional[tuple] = None

    def record(self, state: ToMeState, x: torch.Tensor, schedule: List[int]) -> None:
        """Remember the final state of a forward whose output tokens are ``x``."""
        dict.__setitem__(self, "r", schedule)
        self._report = (state, x.shape[0], x.device, x.dtype)

    def _computed(self, key: str) -> Any:
        if self._report is None:
            return None
        state, batch, device, dtype = self._report
        if key == "size":
            if state.size is not None:
                return state.size
            return torch.ones(batch, state.num_tokens, 1, device=device)
        if not state.trace_source:
            return None
        groups = state.group_index(batch, device)
        return sources_from_groups(groups, state.num_tokens, dtype if dtype.is_floating_point else torch.float32)

    def __getitem__(self, key: str) -> Any:
        if key in ("size", "source"):
            return self._computed(key)
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in ("size", "source"):
            return self._computed(key)
        return dict.get(self, key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        if key in ("size", "source"):
            if value is None:
                self._report = None
                return
            raise KeyError(f"_tome_info[{key!r}] is filled in by the model's forward and cannot be set")
        if key in ("trace_source", "prop_attn"):
            value = bool(value)
        dict.__setitem__(self, key, value)

    def report(self) -> Optional["ForwardReport"]:
        """What the last forward did, or None before the first forward (see :func:`last_forward`)."""
        if self._report is None:
            return None
        return ForwardReport(r=list(dict.get(self, "r") or []), size=self._computed("size"),
                             source=self._computed("source"))

    def __deepcopy__(self, memo: dict) -> "ToMeInfo":
        copied = ToMeInfo(dict(self))
        return copied

    def __reduce__(self):  # pickling drops the per-forward report
        return (ToMeInfo, (dict(self),))


@dataclass(frozen=True)
class ForwardReport:
    """What a patched model's last forward did: :func:`tome.last_forward`.

    Args:
        r: Tokens each block removed, one entry per block (the schedule as it ran,
            each layer's r capped by its tokens).
        size: ``(batch, tokens, 1)``: how many original tokens (patches) each output
            token stands for (0 for padding).
        source: ``(batch, tokens, original tokens)`` 0/1 map of which original tokens
            each output token holds, with ``trace_source`` on; else None.
    """

    r: List[int]
    size: torch.Tensor
    source: Optional[torch.Tensor]

    @property
    def tokens(self) -> int:
        """Tokens the last block put out (prefix tokens included)."""
        return int(self.size.shape[1])


def last_forward(model: nn.Module) -> Optional[ForwardReport]:
    """What the last forward of a patched model did: per-layer r, sizes, sources.

    ``model._tome_info["size"]``, ``["source"]`` and ``["r"]`` hold the same. With
    several threads running one model, this describes whichever forward finished last.

    Args:
        model: A model patched by a family that merges tokens for good.

    Returns:
        A :class:`ForwardReport`, or None before the model's first forward.

    Raises:
        TypeError: for an unpatched model, or a diffusion denoiser (it unmerges inside
            every block, so its forward leaves no merged tokens to report).
    """
    info = model.__dict__.get("_tome_info") if isinstance(model, nn.Module) else None
    if not isinstance(info, ToMeInfo):
        state = "not patched" if info is None else "patched by a family that unmerges inside its blocks"
        raise TypeError(f"tome.last_forward needs a model whose blocks merge tokens; {type(model).__name__} is {state}")
    return info.report()


def original_class(module: nn.Module) -> type:
    """The module's class before any ToMe swap (its own class when unpatched)."""
    cls = type(module)
    return cls.__dict__.get("_tome_parent", cls)


# ----------------------------------------------------------------------------- settings


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


# ----------------------------------------------------------------------------- families


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


# ----------------------------------------------------------------------------- class swaps


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


class ToMeAttentionMixin:
    """Patched attention module: with ``tome=AttentionCall(bias)`` it adds the bias to
    its logits and reports the mean key; without it, it is the original module.

    A family whose attention reports every feature of :data:`ATTENTION_FEATURES`
    (through :meth:`AttentionCall.report`) lists them in ``_tome_features``, so the
    ablations that match on queries, values or concatenated keys, or rank tokens by
    the class token's attention, can run on it; the others report the mean key only.
    """

    _tome_features: Tuple[str, ...] = ("k",)
    _tome_feature: str = "k"  # what this module's block asks for (its LayerRule.attention_feature)

    def forward(self, *args: Any, tome: Optional[AttentionCall] = None, **kwargs: Any) -> Any:
        if tome is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        return self._tome_attention(args[0], tome)

    def _tome_attention(self, x: torch.Tensor, call: AttentionCall) -> Any:
        """Attention of ``x`` ``(batch, tokens, channels)`` with ``call.bias``; sets ``call.metric``."""
        raise NotImplementedError


_MASK_NAMES = ("attn_mask", "attention_mask", "causal_attention_mask", "is_causal")

def _families_with_features() -> str:
    """The registered families whose attention reports more than the keys, for an error message."""
    declared = [f"{spec.name} ({spec.attention_features})" for spec in registered() if spec.attention_features]
    return ", ".join(declared or ["none registered"]) + "; metric='x' and match='random_drop' work with every family"


def _check_features(model: nn.Module, method: MergeMethod, rules: Sequence[LayerRule],
                    attentions: Sequence[Sequence[nn.Module]]) -> None:
    """Raise ``ValueError`` if a rule needs a feature the model's attention cannot report."""
    for index, (rule, modules) in enumerate(zip(rules, attentions)):
        feature = rule.attention_feature
        if feature == "cls_attn" and model._tome_info["protected_tokens"] < 1:  # type: ignore[attr-defined]
            raise ValueError(
                f"method {method} ranks tokens by the class token's attention, but "
                f"{type(model).__name__} has no protected class token at index 0"
            )
        if feature == "k":
            continue
        missing = [m for m in modules if feature not in type(m)._tome_features]
        if not modules or missing:
            where = type(missing[0]).__name__ if missing else "no patched attention module"
            raise ValueError(
                f"method {method} needs the attention of block {index} to report {feature!r}, but "
                f"{type(model).__name__}'s attention ({where}) reports only the keys averaged over heads. "
                f"Supported: {_families_with_features()}"
            )


def _masked(args: tuple, kwargs: Dict[str, Any]) -> bool:
    """Whether a block call passes a mask (positionally, as the frameworks' blocks take it,
    or by name) or ``is_causal=True``."""
    return any(a is not None and a is not False for a in args) or any(
        kwargs.get(name) is not None and kwargs.get(name) is not False for name in _MASK_NAMES
    )


class ToMeBlockMixin:
    """Patched block: an attention branch, a merge, an MLP branch.

    Called by a patched model with ``tome=BlockCall(state, r)``. Called on its own
    (no ``tome``), it merges its own ``r`` from a fresh state (every token one
    patch), or is the original block when its r is 0 or a mask is passed.
    A family implements :meth:`_tome_attn_branch` and :meth:`_tome_mlp_branch`.
    """

    _tome_block_r: int = 0
    _tome_index: int = 0
    _tome_protected: int = 0
    _tome_prop_attn: bool = True
    _tome_rule: LayerRule = TOME_RULE  # this block's merge rule, from model.tome_method
    # Whether the original forward may run a block that merges nothing before any
    # merge happened (exact, and as fast as the original); its output must be a tensor.
    _tome_native_when_idle: bool = True

    def forward(
        self, x: torch.Tensor, *args: Any, tome: Union[BlockCall, ToMeForward, None] = None, **kwargs: Any
    ) -> Any:
        if isinstance(tome, ToMeForward):  # called by the framework's own loop
            call = tome.enter(self._tome_index, x, self._tome_block_r)
            out = self._tome_call(x, args, kwargs, call, tome.caller_mask is None)
            tome.leave(self._tome_index, call)
            return out
        if tome is None:
            if self._tome_block_r <= 0 or _masked(args, kwargs):
                return super().forward(x, *args, **kwargs)  # type: ignore[misc]
            tome = BlockCall(self._tome_start(x), self._tome_block_r)
        return self._tome_call(x, args, kwargs, tome)

    def _tome_call(
        self, x: torch.Tensor, args: tuple, kwargs: Dict[str, Any], call: BlockCall, masks_mask_nothing: bool = False
    ) -> Any:
        # torch.fx traces our own branches: it would treat a swapped torch.nn module inside the
        # block's own forward as code to trace, not as the leaf torch.nn modules are.
        native = self._tome_native_when_idle and not isinstance(x, torch.fx.Proxy)
        if call.r <= 0 and call.state.size is None and native:
            call.out = call.state  # nothing merged yet, nothing to merge: the block's own forward
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        # masks_mask_nothing: the caller passed no mask, so a mask the model built itself masks
        # nothing (transformers builds one of ones while torch.export traces it).
        if not masks_mask_nothing and _masked(args, kwargs):
            raise ValueError(
                "an attention mask (attention_mask / attn_mask / is_causal) cannot be combined with token "
                "merging: merged tokens no longer line up with the mask. Set model.r = 0 to use a mask."
            )
        attn_branch = self._tome_attn_branch_for(call.state, x, kwargs)
        x, call.out = merge_block(x, call.state, call.r, attn_branch, self._tome_mlp_branch, self._tome_rule)
        return x

    def _tome_attn_branch_for(
        self, state: ToMeState, x: torch.Tensor, kwargs: Dict[str, Any]
    ) -> Callable[[torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]:
        """The attention branch for a merging call with the block's keyword arguments ``kwargs``
        (a block whose attention takes more than ``x`` and the bias binds it here)."""
        return self._tome_attn_branch

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x, bias) -> (residual, metric)``: the whole attention residual branch."""
        raise NotImplementedError

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``x -> residual``: the whole MLP residual branch."""
        raise NotImplementedError

    def _tome_start(self, x: torch.Tensor) -> ToMeState:
        return ToMeState.start(x.shape[1], self._tome_protected, self._tome_prop_attn, False)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        tome = f"tome_r={self._tome_block_r}"
        return f"{base}, {tome}" if base else tome


def call_attention(
    attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor], *args: Any, **kwargs: Any
) -> Tuple[Any, torch.Tensor]:
    """Call a patched attention module through ``__call__`` (so its hooks fire), with the
    arguments the original block passes it (``*args``, ``**kwargs``) and the bias.

    Returns:
        The module's output and the metric it reported.
    """
    call = AttentionCall(bias, getattr(attn, "_tome_feature", "k"))
    out = attn(x, *args, tome=call, **kwargs)
    return out, call.metric  # type: ignore[return-value]


_NO_TAG = object()


class ToMeModelMixin:
    """Model-level ToMe settings (``model.r``, ``model._tome_info``) and the block loop."""

    _tome_r: RSchedule = 0

    def _tome_blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def _tome_full_tokens(self) -> Optional[int]:
        """Tokens entering the first block when nothing is merged, if fixed (else None)."""
        return None

    @property
    def r(self) -> RSchedule:
        """Tokens to merge away per layer: an int, a list, or ``(r, inflection)``."""
        return self._tome_r

    @r.setter
    def r(self, value: RSchedule) -> None:
        blocks = self._tome_blocks()
        schedule = parse_r(len(blocks), value)  # raises ValueError quoting a bad value
        object.__setattr__(self, "_tome_r", value)
        for block, block_r in zip(blocks, schedule):
            object.__setattr__(block, "_tome_block_r", block_r)

    @property
    def tome_method(self) -> MergeMethod:
        """The merge method every block follows: a :class:`tome.MergeMethod`; set it
        to a name (``"tome"``, ``"pitome"``, ``"tofu"``) or a ``MergeMethod``.

        Raises:
            ValueError: on assignment of an unknown name (the valid ones are listed).
        """
        return self._tome_info.get("method") or MergeMethod()

    @tome_method.setter
    def tome_method(self, value: Any) -> None:
        method = as_method(value)
        blocks = self._tome_blocks()
        rules = [method.rule(index, len(blocks)) for index in range(len(blocks))]
        attentions = [[m for m in block.modules() if isinstance(m, ToMeAttentionMixin)] for block in blocks]
        _check_features(self, method, rules, attentions)  # refuse before changing anything
        for block, rule, modules in zip(blocks, rules, attentions):
            object.__setattr__(block, "_tome_rule", rule)
            for module in modules:
                if module.__dict__.get("_tome_feature", "k") != rule.attention_feature:
                    object.__setattr__(module, "_tome_feature", rule.attention_feature)
        dict.__setitem__(self._tome_info, "method", method)

    @property
    def trace_source(self) -> bool:
        """Whether forwards track which original patches each token contains (see
        :func:`tome.last_forward`). Setting it re-patches with only this setting changed."""
        return self._tome_info["trace_source"]

    @trace_source.setter
    def trace_source(self, value: bool) -> None:
        configure(self, trace_source=value)

    @property
    def prop_attn(self) -> bool:
        """Whether proportional attention is on (``log(size)`` added to the attention logits).
        Setting it re-patches with only this setting changed; ``None`` takes the default rule
        (:func:`tome.patch.default_prop_attn`)."""
        return self._tome_info["prop_attn"]

    @prop_attn.setter
    def prop_attn(self, value: Optional[bool]) -> None:
        configure(self, prop_attn=value)

    def _tome_schedule(self) -> List[int]:
        return parse_r(len(self._tome_blocks()), self._tome_r)

    def _tome_begin(
        self, x: torch.Tensor, trace_source: Optional[bool] = None, padding: Optional[torch.Tensor] = None
    ) -> ToMeState:
        """The state entering the first block for tokens ``x`` ``(batch, tokens, channels)``.

        ``padding``: ``(batch, tokens, 1)`` float32, 1 for real tokens and 0 for padding
        (a key-padding mask, carried as token sizes: see ``ToMeState.padded``), or None.
        """
        info = self._tome_info
        trace = info["trace_source"] if trace_source is None else trace_source
        state = ToMeState.start(x.shape[1], info["protected_tokens"], info["prop_attn"], trace)
        if padding is None:
            return state
        if tuple(padding.shape) != (x.shape[0], x.shape[1], 1):
            raise ValueError(f"padding of shape {tuple(padding.shape)} does not cover the {x.shape[0]} x "
                             f"{x.shape[1]} tokens entering the first block")
        return replace(state, size=padding.to(device=x.device, dtype=torch.float32), padded=True)

    def _tome_run(
        self,
        x: torch.Tensor,
        grad_checkpointing: bool = False,
        *,
        stop_after: Optional[int] = None,
        trace_source: Optional[bool] = None,
        after_block: Optional[Callable[[int, torch.Tensor, ToMeState], None]] = None,
        padding: Optional[torch.Tensor] = None,
        positions: Optional[RotaryPositions] = None,
        block_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Tuple[torch.Tensor, ToMeState]:
        """Embedded tokens ``(batch, tokens, channels)`` through the blocks, merging on the schedule.

        Args:
            x: Tokens entering the first block.
            grad_checkpointing: Recompute blocks in backward.
            stop_after: Run blocks ``0 .. stop_after`` only.
            trace_source: Keep source groups even if ``trace_source`` is off.
            after_block: Passed to :func:`run_blocks`.
            padding: Key padding as token sizes (see :meth:`_tome_begin`).
            positions: The tokens' rotary positions, carried from the first block on when
                a block of the run merges or tokens are padded (:mod:`tome.patch._rope`).
            block_kwargs: Passed to every block, as the framework's own loop passes them.

        Returns:
            The tokens after the last block run and the final state, which is
            also recorded in ``model._tome_info``.
        """
        blocks = list(self._tome_blocks())
        schedule = parse_r(len(blocks), self._tome_r)
        if stop_after is not None:
            blocks = blocks[: stop_after + 1]
        state = self._tome_begin(x, trace_source, padding)
        if positions is not None and (state.padded or any(schedule[: len(blocks)])):
            state = positions.start(state, x)
        x, state, removed = run_blocks(blocks, x, state, schedule, grad_checkpointing, after_block, block_kwargs)
        if not isinstance(x, torch.fx.Proxy):  # a traced graph's runs do not report here
            self._tome_info.record(state, x, removed + [0] * (len(schedule) - len(removed)))
        return x, state

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script asks for this first. Scripting cannot follow the merge state, so
        # script the original model when nothing merges and refuse clearly otherwise.
        if any(self._tome_schedule()):
            raise NotImplementedError(
                "torch.jit.script cannot compile a model that merges tokens (r > 0); use torch.jit.trace "
                "or torch.export.export (they record the merge for a fixed input size), or set model.r = 0"
            )
        import copy

        return remove_patch(copy.deepcopy(self))  # type: ignore[arg-type]

    @staticmethod
    def _tome_tag(features: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """Attach the token sizes to the features they describe (for ``forward_head``)."""
        features._tome_size = size  # type: ignore[attr-defined]
        return features

    def _tome_sizes_of(self, features: torch.Tensor) -> Optional[torch.Tensor]:
        """The sizes of features returned by this model's ``forward_features``.

        Raises:
            ValueError: if the features carry no sizes and may be merged, so a
                size-weighted pool would be a guess.
        """
        size = getattr(features, "_tome_size", _NO_TAG)
        if size is not _NO_TAG:
            return size  # type: ignore[return-value]
        full = self._tome_full_tokens()
        if features.dim() == 3 and (features.shape[1] == full or (full is None and not any(self._tome_schedule()))):
            return None  # unmerged features: every token is one patch
        # A detached tensor shares the tagged one's memory but not its attributes; a lookup by shape
        # could hand it another forward's sizes, so the caller is told what works instead.
        raise ValueError(
            f"forward_head cannot weight these features ({tuple(features.shape)}) by token size: they are "
            "not the tensor this model's forward_features returned (sizes travel with that tensor only; "
            ".detach(), a copy, slice or cast loses them). Pass forward_features' output unchanged: "
            "forward_head(features); to drop gradients, run both under torch.no_grad() instead of "
            "calling .detach() in between, and detach forward_head's result; or call the model itself."
        )

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        info = self._tome_info
        family = self.__dict__.get("_tome_family")
        default, why = default_prop_attn(self, family if family in _REGISTRY else None)
        prop = f"prop_attn={info['prop_attn']}" + (f" ({why})" if why and info["prop_attn"] == default else "")
        tome = f"tome: r={self._tome_r!r}, {prop}, trace_source={info['trace_source']}"
        method = info.get("method")
        if method is not None and method.name != "tome":
            tome += f", method={method}"
        return f"{base}, {tome}" if base else tome


def _kept_settings(model: nn.Module, info: Any, trace_source: Optional[bool],
                   prop_attn: Optional[bool]) -> ToMeSettings:
    """The settings of a re-patch by a :func:`register_family` patch function: the model's
    current ones, with ``trace_source`` and ``prop_attn`` changed where given (not None);
    proportional attention on when nothing decided it yet."""
    current = _read_info(model, ToMeSettings) if isinstance(info, ToMeInfo) else ToMeSettings()
    settings = replace(current, **passed(trace_source=KEEP if trace_source is None else trace_source,
                                         prop_attn=KEEP if prop_attn is None else prop_attn))
    if settings.prop_attn is None:
        settings = replace(settings, prop_attn=True)
    return settings


def _swap_blocks(blocks: Sequence[nn.Module], block_mixin: Callable[[nn.Module], type],
                 attention: Optional[Callable[[nn.Module], Tuple[nn.Module, type]]],
                 protected_tokens: int, prop_attn: bool) -> None:
    """Swap the class of every block (and its attention module) and tell it its index and settings."""
    for index, block in enumerate(blocks):
        swap_class(block, block_mixin(block))
        object.__setattr__(block, "_tome_index", index)
        if attention is not None:
            attn, attn_mixin = attention(block)
            swap_class(attn, attn_mixin)
        object.__setattr__(block, "_tome_protected", protected_tokens)
        object.__setattr__(block, "_tome_prop_attn", prop_attn)


def patch_model(
    model: nn.Module,
    model_mixin: Union[type, Tuple[type, ...]],
    blocks: Sequence[nn.Module],
    block_mixin: Callable[[nn.Module], type],
    *,
    attention: Optional[Callable[[nn.Module], Tuple[nn.Module, type]]] = None,
    encoder: Optional[Tuple[nn.Module, type]] = None,
    protected_tokens: int,
    class_token: bool,
    distill_token: bool = False,
    settings: Optional[ToMeSettings] = None,
    trace_source: Optional[bool] = None,
    prop_attn: Optional[bool] = None,
) -> nn.Module:
    """Swap the classes of a model, its blocks and their attention modules; record the settings.

    Args:
        model: The model to patch in place.
        model_mixin: Mixin class (or classes) for the model.
        blocks: The transformer blocks, in order.
        block_mixin: Gives the mixin class for each block.
        attention: Gives ``(attention module, its mixin)`` for a block.
        encoder: ``(module, mixin)`` for a module between the model and its blocks
            that the model calls (so its hooks fire) to run the block loop.
        protected_tokens: Leading tokens that never merge.
        class_token, distill_token: Recorded for code written against the original release.
        settings: The family's settings, complete (``prop_attn`` decided): what a
            :class:`FamilySpec`'s ``patch`` is handed. ``r`` becomes ``model.r``, ``method``
            ``model.tome_method`` and every other one ``model._tome_info[name]``.
        trace_source, prop_attn: Instead of ``settings``, for patch functions registered
            with :func:`register_family`: these two change, everything else is kept.

    Re-patching keeps the model's ``_tome_info`` (and what its last forward left there).

    Raises:
        ValueError: if ``settings.r`` does not fit the blocks or the method cannot run
            on them (the model is then as it was, unless it was unpatched: see :func:`configure`).
    """
    info = model.__dict__.get("_tome_info")
    if settings is None:  # a register_family patch function: keep what it does not pass
        settings = _kept_settings(model, info, trace_source, prop_attn)
    parse_r(len(blocks), settings.r)  # a bad r raises before anything changes
    swap_class(model, model_mixin)
    if encoder is not None:
        swap_class(*encoder)
    _swap_blocks(blocks, block_mixin, attention, protected_tokens, bool(settings.prop_attn))
    if not isinstance(info, ToMeInfo):
        info = ToMeInfo(r=None, size=None, source=None, method=MergeMethod())
        object.__setattr__(model, "_tome_info", info)
    for key, value in (("class_token", bool(class_token)), ("distill_token", bool(distill_token)),
                       ("protected_tokens", int(protected_tokens))):
        dict.__setitem__(info, key, value)
    for option in fields(settings):
        if option.name not in ("r", "method"):
            dict.__setitem__(info, option.name, getattr(settings, option.name))
    model.r = settings.r  # type: ignore[attr-defined]
    model.tome_method = settings.method  # type: ignore[attr-defined]
    return model
