"""Models for the ``tome`` commands: ``--model``, ``--model-kwargs``, ``--pretrained``, ``--checkpoint``.

A model is named by a timm model name (random weights, timm's pretrained weights
or a checkpoint) or by the name of a shipped model (:mod:`tome.tools.demo_model`);
commands with a default take the shipped ``shapes-long``. What the tools need to
know about a model (its input size, patch size and preprocessing) is read here too.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

import tome

from ._common import parse_model_kwargs

__all__ = [
    "LoadedModel",
    "add_model_arguments",
    "data_config_of",
    "input_size_of",
    "load_model",
    "load_model_from_args",
    "patch_size_of",
]


@dataclass
class LoadedModel:
    """A model ready for the tools, with what is known about how to run it.

    Attributes:
        model: The model in eval mode (not yet patched).
        description: One line naming the architecture and its weights.
        default_r: The r the weights were trained for (known ToMe checkpoints), else None.
        prop_attn: Proportional attention setting to patch with; None for the family default.
        data_overrides: Preprocessing settings that replace the model's timm data config.
    """

    model: nn.Module
    description: str
    default_r: Optional[int] = None
    prop_attn: Optional[bool] = None
    data_overrides: Dict[str, Any] = field(default_factory=dict)

    def patch(self, trace_source: bool = False, method: Any = "tome") -> nn.Module:
        """Patch the model for token merging with the right settings (r starts at 0)."""
        return tome.apply_patch(self.model, r=0, trace_source=trace_source, prop_attn=self.prop_attn, method=method)


def load_model(
    name: Optional[str] = None,
    *,
    model_kwargs: Optional[Dict[str, Any]] = None,
    pretrained: bool = False,
    checkpoint: Optional[str] = None,
    default_to_demo: bool = False,
) -> LoadedModel:
    """Build a model by name, with weights from timm, a checkpoint, or none.

    Args:
        name: timm model name (``vit_base_patch16_224``) or the name of a shipped model
            (``"shapes-long"``, ``"shapes"``: see :data:`tome.tools.demo_model.SHIPPED_MODELS`);
            may be left out when ``checkpoint`` names a published ToMe checkpoint (its
            architecture is known) or when ``default_to_demo`` is set.
        model_kwargs: Extra keyword arguments for ``timm.create_model``.
        pretrained: Load timm's own pretrained weights (fails fast when offline).
        checkpoint: A known checkpoint name (``deit_S_r13``), a local file or a URL.
        default_to_demo: Without ``name``, use the default shipped model
            (:func:`tome.tools.demo_model.load_demo_model`: ``"shapes-long"``).

    Returns:
        The model in eval mode and what is known about it.

    Raises:
        ValueError: for an unknown model name, a checkpoint that contradicts ``name``,
            or a missing ``name``.
        ConnectionError: if pretrained weights are neither cached nor reachable.
    """
    from . import checkpoints
    from .demo_model import SHIPPED_MODELS

    model_kwargs = dict(model_kwargs or {})
    known = checkpoints.known_checkpoint(checkpoint) if checkpoint else None
    if known is not None:
        name, model_kwargs = _architecture_of(known, name, model_kwargs, checkpoint, pretrained)
    if name is None or name in SHIPPED_MODELS:
        loaded = _load_shipped(name, default_to_demo, model_kwargs, pretrained)
    else:
        loaded = _load_timm(name, model_kwargs, pretrained, with_checkpoint=checkpoint is not None)
    if checkpoint is not None:
        source = checkpoints.load_checkpoint(loaded.model, checkpoint)
        loaded.description = f"{name or 'demo model'} (weights: {source})"
        if known is not None:
            loaded.default_r = known.r
            loaded.prop_attn = known.prop_attn
            loaded.data_overrides = dict(known.data_config)
    loaded.model.eval()
    return loaded


def _architecture_of(known: Any, name: Optional[str], model_kwargs: Dict[str, Any], checkpoint: Optional[str],
                     pretrained: bool) -> Tuple[str, Dict[str, Any]]:
    """The timm name and arguments of a published ToMe checkpoint, checked against what was given."""
    if name is not None and name != known.architecture:
        raise ValueError(
            f"--checkpoint {checkpoint!r} is a {known.architecture} checkpoint but --model is {name!r}; "
            "leave --model out to use the checkpoint's architecture"
        )
    if pretrained:
        raise ValueError(f"--pretrained and --checkpoint {checkpoint!r} both give weights; pick one")
    return known.architecture, {**known.model_kwargs, **model_kwargs}


def _load_shipped(name: Optional[str], default_to_demo: bool, model_kwargs: Dict[str, Any],
                  pretrained: bool) -> LoadedModel:
    """A shipped model by name, or the default one when ``name`` is None and that is allowed."""
    from .demo_model import load_demo_model

    if name is None and not default_to_demo:
        raise ValueError("--model is required (a timm model name, e.g. vit_base_patch16_224)")
    if model_kwargs or pretrained:
        raise ValueError(f"--model-kwargs and --pretrained need a timm --model, not the shipped model {name!r}"
                         if name else "--model-kwargs and --pretrained need --model")
    model, description = load_demo_model() if name is None else load_demo_model(name)
    return LoadedModel(model, description)


def _load_timm(name: str, model_kwargs: Dict[str, Any], pretrained: bool, with_checkpoint: bool) -> LoadedModel:
    """``timm.create_model(name)`` with random weights (from a fixed seed) or timm's pretrained ones."""
    import timm

    from . import checkpoints

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        hint = f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ValueError(f"model {name!r} is not a timm model name{hint}")
    # Random weights are drawn from a fixed seed (reproducible runs, identical on every
    # torchrun process) without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            if pretrained:
                model = checkpoints.create_pretrained(name, **model_kwargs)
            else:
                model = timm.create_model(name, pretrained=False, **model_kwargs)
        except TypeError as error:
            raise ValueError(f"--model-kwargs {model_kwargs!r} do not fit {name}: {error}") from None
    weights = "timm pretrained weights" if pretrained else "checkpoint weights" if with_checkpoint else "random weights"
    return LoadedModel(model, f"{name} ({weights})")


def add_model_arguments(parser: argparse.ArgumentParser, *, model_required: bool = False, demo_default: bool = False) -> None:
    """``--model``, ``--model-kwargs``, ``--pretrained``, ``--checkpoint`` on a command."""
    default_help = "the shipped model shapes-long" if demo_default else None
    help_text = "timm model name, e.g. vit_base_patch16_224, or a shipped model: shapes-long, shapes"
    if default_help:
        help_text += f" (default: {default_help})"
    parser.add_argument("--model", required=model_required, help=help_text)
    parser.add_argument(
        "--model-kwargs",
        nargs="+",
        metavar="KEY=VALUE",
        help="extra timm.create_model arguments, e.g. img_size=384 global_pool=avg",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm's own pretrained weights (needs internet or a cache)")
    weights.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URL",
        help="weights from a .pth/.safetensors file, a URL, or a published ToMe checkpoint name "
        "(deit_S_r13, deit_T_r13, vit_B_16_r16, vit_L_16_r8, vit_H_14_r7)",
    )


def load_model_from_args(args: argparse.Namespace, *, default_to_demo: bool = False) -> LoadedModel:
    """:func:`load_model` with the values of :func:`add_model_arguments`."""
    return load_model(
        args.model,
        model_kwargs=parse_model_kwargs(args.model_kwargs),
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        default_to_demo=default_to_demo,
    )


def input_size_of(model: nn.Module) -> Tuple[int, int, int]:
    """``(channels, height, width)`` the model was built for.

    Reads the patch embedding (which knows ``img_size=`` overrides) before the
    pretrained config (which describes the original weights).
    """
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None:
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        proj = getattr(embed, "proj", None)
        channels = getattr(proj, "in_channels", 3)
        return int(channels), int(height), int(width)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}; it has no patch_embed.img_size")
    return tuple(int(v) for v in size)  # type: ignore[return-value]


def patch_size_of(model: nn.Module) -> Tuple[int, int]:
    """``(height, width)`` of one patch."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        raise ValueError(f"cannot tell the patch size of {type(model).__name__}; it has no patch_embed.patch_size")
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def data_config_of(model: nn.Module, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The model's timm data config (mean, std, crop), at the size the model was built for."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    config["input_size"] = input_size_of(model)
    config.update(overrides or {})
    return config
