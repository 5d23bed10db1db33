"""pytest plugin: every model timm's, transformers' or diffusers' own tests create runs patched by ToMe.

Loaded with ``-p plugin`` (``run.py`` does this) so that it wraps the model factories
before the peers' test modules import them. ``TOME_PEER_R`` sets r (an integer) for
timm and transformers and the ratio (a float) for diffusers denoisers (``"none"``:
leave models unpatched, the baseline run). Models ToMe does not support stay
unpatched and are listed in ``$TOME_PEER_LOG`` so the report can say which.

For diffusers (``TOME_PEER_DIFFUSERS=1``) it also:

- lifts the accelerator gates (``require_accelerator``, ``require_torch_accelerator``,
  ``require_torch_cuda``: a ``skipif`` evaluated as ``torch_device == "cpu"``), so the
  compile, offload and memory tests run on the CPU. A lifted test that then fails
  because the machine has no CUDA (an error naming CUDA or its streams) is reported
  as skipped with that reason, in every setting alike: it truly needs an accelerator.
- records, per test, the query and key lengths of every ``scaled_dot_product_attention``
  call (outside ``torch.compile`` tests) and how many "nothing merged" warnings ToMe
  raised, one JSON line per test in ``$TOME_PEER_LOG.jsonl``. ``run.py`` compares the
  lengths with the ratio-0 run: a test whose attention calls all kept their length
  merged nothing.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import threading
from typing import Any, List, Set, Tuple

import pytest
import torch
from torch.overrides import TorchFunctionMode

import tome

_SETTING = os.environ.get("TOME_PEER_R", "none")
_LOG = os.environ.get("TOME_PEER_LOG")
_DIFFUSERS = os.environ.get("TOME_PEER_DIFFUSERS") == "1"


def _log(line: str) -> None:
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(line + "\n")


def _patch(model: Any, what: str, ratio: bool = False) -> Any:
    try:
        if ratio:
            tome.apply_patch(model, ratio=float(_SETTING))
        else:
            tome.apply_patch(model, r=int(_SETTING))
    except TypeError as error:  # not a model ToMe can patch: it runs as it is
        _log(f"unpatched\t{what}\t{str(error).splitlines()[0]}")
    else:
        _log(f"patched\t{what}")
    return model


def _wrap_timm() -> None:
    import timm
    import timm.models

    create = timm.create_model

    @functools.wraps(create)
    def create_patched(model_name: str, *args: Any, **kwargs: Any) -> Any:
        model = create(model_name, *args, **kwargs)
        if kwargs.get("features_only"):  # a feature wrapper: patch the ViT inside it
            inner = getattr(model, "model", None)
            if inner is not None:
                _patch(inner, f"timm {model_name} (features_only)")
            return model
        return _patch(model, f"timm {model_name}")

    timm.create_model = timm.models.create_model = create_patched


def _outermost(model: Any) -> bool:
    """Whether no other model's ``__init__`` is running further up (so ``model`` is not a submodel)."""
    from transformers import PreTrainedModel

    for frame in inspect.stack()[2:]:
        other = frame.frame.f_locals.get("self")
        if frame.function == "__init__" and isinstance(other, PreTrainedModel) and other is not model:
            return False
    return True


def _wrap_transformers() -> None:
    from transformers import PreTrainedModel

    post_init = PreTrainedModel.post_init

    @functools.wraps(post_init)
    def post_init_patched(self: Any) -> None:
        post_init(self)
        if _outermost(self):
            _patch(self, f"transformers {type(self).__name__}")

    PreTrainedModel.post_init = post_init_patched


# Denoisers diffusers' tests build (UNets are not rows of the block registry: the
# Transformer2DModels inside them are); a model built inside another one is patched with it.
_DENOISERS = ("UNet2DConditionModel", "UNet3DConditionModel", "UNetSpatioTemporalConditionModel",
              "UNetMotionModel", "ControlNetModel")
_BUILDING = threading.local()


def _wrap_diffusers() -> None:
    import diffusers

    from tome.patch import _diffusion_blocks
    from tome.patch._swap import is_patched

    for name in dict.fromkeys(_DENOISERS + _diffusion_blocks.supported_models()):
        cls = getattr(diffusers, name, None)
        if cls is None or "__init__" not in cls.__dict__:
            continue
        init = cls.__dict__["__init__"]

        @functools.wraps(init)
        def init_patched(self: Any, *args: Any, _init: Any = init, **kwargs: Any) -> None:
            _BUILDING.depth = getattr(_BUILDING, "depth", 0) + 1
            try:
                _init(self, *args, **kwargs)
            finally:
                _BUILDING.depth -= 1
            if _BUILDING.depth == 0 and not is_patched(self):
                _patch(self, f"diffusers {type(self).__name__}", ratio=True)

        cls.__init__ = init_patched


if _SETTING != "none":
    for wrap in (_wrap_diffusers,) if _DIFFUSERS else (_wrap_timm, _wrap_transformers):
        try:
            wrap()
        except ImportError:
            pass


# --- diffusers: accelerator gates lifted, attention lengths recorded ------------------------

_GATES = ("test requires a hardware accelerator", "test requires accelerator+PyTorch", "test requires PyTorch+CUDA")
_NEEDS_CUDA = re.compile(r"CUDA|cuda|NVIDIA driver|[Ss]tream")
_LIFTED: Set[str] = set()  # node ids of the tests and classes whose gate was lifted


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    if not _DIFFUSERS:
        return
    for item in items:
        for node in item.listchain():
            gates = [m for m in node.own_markers if m.name == "skipif" and m.kwargs.get("reason") in _GATES]
            if gates:
                _LIFTED.add(node.nodeid)
                node.own_markers[:] = [m for m in node.own_markers if m not in gates]
        if any(node.nodeid in _LIFTED for node in item.listchain()):
            _LIFTED.add(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    outcome = yield
    report = outcome.get_result()
    if item.nodeid in _LIFTED and report.failed and call.excinfo is not None:
        message = str(call.excinfo.value).splitlines()[0] if str(call.excinfo.value) else call.excinfo.typename
        if _NEEDS_CUDA.search(f"{call.excinfo.typename}: {call.excinfo.value}"):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"needs an accelerator (gate lifted): {message}")
            _log(f"lifted-skip\t{item.nodeid}\t{message[:200]}")


class _AttentionLengths(TorchFunctionMode):
    """``(query length, key length)`` of every ``scaled_dot_product_attention`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Tuple[int, int]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query = kwargs["query"] if "query" in kwargs else args[0]
            key = kwargs["key"] if "key" in kwargs else args[1]
            self.calls.append((int(query.shape[-2]), int(key.shape[-2])))
        return func(*args, **kwargs)


def pytest_warning_recorded(warning_message: Any, when: str, nodeid: str, location: Any) -> None:
    # called after the test's report, once per warning ToMe raised in it (once per place: the
    # runner reads "warned or not", not how many calls merged nothing)
    if _DIFFUSERS and _LOG and "nothing merged" in str(warning_message.message):
        with open(_LOG + ".jsonl", "a") as log:
            log.write(json.dumps({"test": nodeid, "nothing_merged": 1}) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    if not _DIFFUSERS or not _LOG or item.get_closest_marker("compile") is not None:
        yield
        return
    spy = _AttentionLengths()
    with spy:
        yield
    with open(_LOG + ".jsonl", "a") as log:
        log.write(json.dumps({"test": item.nodeid, "attention": spy.calls}) + "\n")
