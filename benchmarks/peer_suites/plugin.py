"""pytest plugin: every ViT that timm's or transformers' own tests create runs patched by ToMe.

Loaded with ``-p plugin`` (``run.py`` does this) so that it wraps the model factories
before the peers' test modules import them. ``TOME_PEER_R`` sets r (an integer)
(``"none"``: leave models unpatched, the baseline run). Models ToMe does not support
stay unpatched and are listed in ``$TOME_PEER_LOG`` so the report can say which.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import tome

_SETTING = os.environ.get("TOME_PEER_R", "none")
_LOG = os.environ.get("TOME_PEER_LOG")


def _log(line: str) -> None:
    if _LOG:
        with open(_LOG, "a") as log:
            log.write(line + "\n")


def _patch(model: Any, what: str) -> Any:
    try:
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


if _SETTING != "none":
    for wrap in (_wrap_timm, _wrap_transformers):
        try:
            wrap()
        except ImportError:
            pass
