"""Models for the ``tome`` commands: ``--model``, ``--model-kwargs``, ``--pretrained``, ``--checkpoint``.

``--model`` takes (:data:`MODEL_FORMS`):

- a timm model name (random weights, timm's pretrained weights or a checkpoint);
- the name of a shipped model (:mod:`tome.tools.demo_model`); commands with a
  default take the shipped ``shapes-long``;
- ``hf:<id or folder>``: a Hugging Face transformers model, a hub id (from the local
  cache, or downloaded) or a folder written by ``save_pretrained`` (offline), read with
  the ``AutoModelFor...Classification`` class its config names, else ``AutoModel``;
- ``diffusers:<folder>``: a diffusers denoiser or pipeline saved with
  ``save_pretrained`` (``tome bench`` only; see :mod:`tome.tools._denoisers`).

What the tools need to know about a model (its input size, patch size,
preprocessing and class names) is read here too.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import tome

from ._common import parse_model_kwargs

__all__ = [
    "MODEL_FORMS",
    "LoadedModel",
    "model_form",
    "add_model_arguments",
    "data_config_of",
    "input_size_of",
    "label_names_of",
    "num_classes_of",
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
        form: How ``--model`` named it: ``"timm"``, ``"shipped"``, ``"hf"`` or ``"diffusers"``.
        classifier: Whether it outputs class logits (None: not known, e.g. a timm model).
    """

    model: nn.Module
    description: str
    default_r: Optional[int] = None
    prop_attn: Optional[bool] = None
    data_overrides: Dict[str, Any] = field(default_factory=dict)
    form: str = "timm"
    classifier: Optional[bool] = None

    def patch(self, trace_source: bool = False, method: Any = "tome") -> nn.Module:
        """Patch the model for token merging with the right settings (r starts at 0).

        A diffusers denoiser is patched with ``ratio=0`` (its merge setting is a ratio, not r).
        """
        if self.form == "diffusers":
            return tome.apply_patch(self.model, ratio=0.0)
        return tome.apply_patch(self.model, r=0, trace_source=trace_source, prop_attn=self.prop_attn, method=method)


MODEL_FORMS = (
    "a timm model name (e.g. vit_base_patch16_224), a shipped model (shapes-long, shapes), "
    "hf:<Hugging Face model id or local folder> (e.g. hf:google/vit-base-patch16-224 or hf:./my-vit) "
    "or diffusers:<local folder of a diffusers denoiser or pipeline> (e.g. diffusers:./sd-unet)"
)
"""The forms ``--model`` takes, quoted in every error about it."""

_FORMS = ("timm", "shipped", "hf", "diffusers")
_PREFIXES = {"hf:": "hf", "diffusers:": "diffusers"}


def model_form(name: Optional[str]) -> str:
    """Which form of :data:`MODEL_FORMS` ``name`` is: ``"timm"``, ``"shipped"``, ``"hf"`` or ``"diffusers"``.

    None (no ``--model``) is the default shipped model. Whether a timm name exists is
    checked when it is loaded.

    Raises:
        ValueError: naming ``name`` and the valid forms, for an empty reference
            (``hf:``) or another ``prefix:`` form.
    """
    from .demo_model import SHIPPED_MODELS

    if name is None or name in SHIPPED_MODELS:
        return "shipped"
    for prefix, form in _PREFIXES.items():
        if name.startswith(prefix):
            if not name[len(prefix):].strip():
                raise ValueError(f"--model {name!r} names no model after {prefix!r}; --model takes {MODEL_FORMS}")
            return form
    prefix = re.match(r"([A-Za-z][\w.-]*):(?!//)", name)
    if prefix is not None and not re.match(r"[A-Za-z]:[\\/]", name):  # not a Windows drive
        raise ValueError(f"--model {name!r}: {prefix.group(1)!r} is not a model form; --model takes {MODEL_FORMS}")
    return "timm"


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
        name: One of :data:`MODEL_FORMS`: a timm model name (``vit_base_patch16_224``), the
            name of a shipped model (``"shapes-long"``, ``"shapes"``: see
            :data:`tome.tools.demo_model.SHIPPED_MODELS`), ``"hf:<id or folder>"`` or
            ``"diffusers:<folder>"``; may be left out when ``checkpoint`` names a published
            ToMe checkpoint (its architecture is known) or when ``default_to_demo`` is set.
        model_kwargs: Extra keyword arguments for ``timm.create_model`` (for ``hf:``, for
            ``from_pretrained``).
        pretrained: Load timm's own pretrained weights (fails fast when offline).
        checkpoint: A known checkpoint name (``deit_S_r13``), a local file or a URL.
        default_to_demo: Without ``name``, use the default shipped model
            (:func:`tome.tools.demo_model.load_demo_model`: ``"shapes-long"``).

    Returns:
        The model in eval mode and what is known about it.

    Raises:
        ValueError: for a name of none of the forms (the forms are named), a checkpoint that
            contradicts ``name``, or a missing ``name``.
        FileNotFoundError: for an ``hf:`` or ``diffusers:`` folder that does not exist.
        ConnectionError: if pretrained weights or a hub model are neither cached nor reachable.
    """
    from . import checkpoints

    model_kwargs = dict(model_kwargs or {})
    known = checkpoints.known_checkpoint(checkpoint) if checkpoint else None
    if known is not None:
        name, model_kwargs = _architecture_of(known, name, model_kwargs, checkpoint, pretrained)
    form = model_form(name)
    if form in ("hf", "diffusers"):
        return _load_saved(name, form, model_kwargs, pretrained or checkpoint is not None)  # type: ignore[arg-type]
    if form == "shipped":
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


def _load_saved(name: str, form: str, model_kwargs: Dict[str, Any], other_weights: bool) -> LoadedModel:
    """An ``hf:`` or ``diffusers:`` model, which brings its weights."""
    if other_weights:
        raise ValueError(f"--model {name!r} brings its own weights; --pretrained and --checkpoint are for timm models")
    if form == "diffusers":
        if model_kwargs:
            raise ValueError(f"--model-kwargs are for timm and hf: models, not {name!r}")
        from ._denoisers import load_denoiser

        model, description = load_denoiser(name[len("diffusers:"):])
        return LoadedModel(model, description, form="diffusers", classifier=False)
    return _load_hf(name[len("hf:"):], model_kwargs)


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
    return LoadedModel(model, description, form="shipped", classifier=True)


def _load_timm(name: str, model_kwargs: Dict[str, Any], pretrained: bool, with_checkpoint: bool) -> LoadedModel:
    """``timm.create_model(name)`` with random weights (from a fixed seed) or timm's pretrained ones."""
    import timm

    from . import checkpoints

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        hint = f" (similar timm names: {', '.join(close)})" if close else " (see timm.list_models())"
        raise ValueError(f"model {name!r} is not a timm model name{hint}; --model takes {MODEL_FORMS}")
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


def _load_hf(reference: str, from_pretrained_kwargs: Dict[str, Any]) -> LoadedModel:
    """``hf:<id or folder>``: the model with the ``AutoModelFor...Classification`` class its config names, else
    ``AutoModel`` (a base model or a vision tower)."""
    import transformers

    source, local_only = _hf_source(reference)
    config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    task = next((task for task in _HF_CLASSIFIERS if architecture.endswith(task) or f"{task}With" in architecture), None)
    auto = getattr(transformers, _HF_CLASSIFIERS[task]) if task else transformers.AutoModel
    try:
        model = auto.from_pretrained(source, local_files_only=local_only, **from_pretrained_kwargs)
    except TypeError as error:
        raise ValueError(f"--model-kwargs {from_pretrained_kwargs!r} do not fit hf:{reference}: {error}") from None
    loaded = LoadedModel(model.eval(), f"hf:{reference} ({type(model).__name__}, {auto.__name__})", form="hf",
                         classifier=task is not None)
    loaded.data_overrides = _hf_preprocessing(source, local_only, model)
    return loaded


# Task suffix of a saved architecture name -> the auto class that reads it with its head.
_HF_CLASSIFIERS = {
    "ForImageClassification": "AutoModelForImageClassification",
    "ForVideoClassification": "AutoModelForVideoClassification",
    "ForAudioClassification": "AutoModelForAudioClassification",
}


def _hf_source(reference: str) -> Tuple[str, bool]:
    """``(what from_pretrained reads, local files only)`` for an ``hf:`` reference.

    A folder is read offline. A hub id is read from the local cache when its
    ``config.json`` is there, else downloaded after a quick probe of the hub.

    Raises:
        FileNotFoundError: for a path that is a file, or a path-like reference that does not exist.
        ConnectionError: for a hub id that is not cached when the hub cannot be reached.
    """
    from . import checkpoints

    path = Path(reference).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise FileNotFoundError(f"--model hf:{reference}: {reference!r} is a file; give the folder save_pretrained wrote")
    if reference.startswith((".", "/", "~")) or os.path.isabs(reference) or reference.count("/") > 1:
        raise FileNotFoundError(f"--model hf:{reference}: the folder {reference!r} does not exist")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(reference, "config.json")
    except Exception:  # an id the hub library rejects: say so below, when it is not found
        cached = None
    if isinstance(cached, str):
        return reference, True
    what = f"--model hf:{reference}: {reference!r} is neither a local folder nor a model in the Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError(f"{what}, and HF_HUB_OFFLINE is set")
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    if not checkpoints.host_reachable(host):
        raise ConnectionError(f"{what}, and {host} cannot be reached (no internet connection?); save the model "
                              "with save_pretrained on a connected machine and pass hf:FOLDER")
    return reference, False


def _hf_preprocessing(source: str, local_only: bool, model: nn.Module) -> Dict[str, Any]:
    """timm data-config entries (mean, std, crop) from the model's image processor, if it has one."""
    if getattr(model, "main_input_name", "") != "pixel_values":
        return {}
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError, ImportError):
        return {}  # none saved: timm's defaults (ImageNet mean and std)
    overrides: Dict[str, Any] = {}
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is not None and std is not None:
        overrides.update(mean=tuple(mean), std=tuple(std))
    size, crop = getattr(processor, "size", None) or {}, getattr(processor, "crop_size", None) or {}
    short = size.get("shortest_edge") or size.get("height")
    if getattr(processor, "do_center_crop", False) and short and crop.get("height"):
        overrides["crop_pct"] = crop["height"] / short
    else:
        overrides["crop_pct"] = 1.0
    overrides["interpolation"] = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(getattr(processor, "resample", 3)), "bicubic")
    return overrides


def add_model_arguments(parser: argparse.ArgumentParser, *, model_required: bool = False, demo_default: bool = False,
                        diffusers: bool = False) -> None:
    """``--model``, ``--model-kwargs``, ``--pretrained``, ``--checkpoint`` on a command.

    Args:
        parser: The command's parser.
        model_required: ``--model`` must be given.
        demo_default: Without ``--model`` the shipped ``shapes-long`` is used.
        diffusers: The command takes ``diffusers:<folder>`` models too.
    """
    forms = "a timm model name (vit_base_patch16_224), a shipped model (shapes-long, shapes), hf:<id or folder>"
    forms += ", diffusers:<folder>" if diffusers else ""
    help_text = forms + (" (default: the shipped model shapes-long)" if demo_default else "")
    parser.add_argument("--model", required=model_required, help=help_text)
    parser.add_argument(
        "--model-kwargs",
        nargs="+",
        metavar="KEY=VALUE",
        help="extra timm.create_model arguments, e.g. img_size=384 global_pool=avg (for hf: models, "
        "from_pretrained arguments, e.g. attn_implementation=eager)",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm's own pretrained weights (needs internet or a cache)")
    weights.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URL",
        help="weights from a .pth/.safetensors file, a URL, or a published ToMe checkpoint name "
        "(deit_S_r13, deit_T_r13, vit_B_16_r16, vit_L_16_r8, vit_H_14_r7)",
    )


def load_model_from_args(args: argparse.Namespace, *, default_to_demo: bool = False,
                         forms: Sequence[str] = ("timm", "shipped", "hf")) -> LoadedModel:
    """:func:`load_model` with the values of :func:`add_model_arguments`.

    Args:
        args: The parsed command line (``args.command`` names the command in errors).
        default_to_demo: Without ``--model``, the default shipped model.
        forms: The forms of ``--model`` this command takes (see :func:`model_form`).

    Raises:
        ValueError: for a model of a form the command does not take (what it takes, and
            where that form is taken, are named), and as :func:`load_model`.
    """
    form = model_form(args.model)
    if form not in forms:
        command = getattr(args, "command", None) or "this command"
        taken = ", ".join(f for f in _FORMS if f in forms)
        where = (" Diffusion denoisers are measured by tome bench --model diffusers:FOLDER --ratio 0.5."
                 if form == "diffusers" else "")
        raise ValueError(f"tome {command} does not take {form} models such as --model {args.model!r}; it takes "
                         f"these forms of --model: {taken}.{where}")
    return load_model(
        args.model,
        model_kwargs=parse_model_kwargs(args.model_kwargs),
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        default_to_demo=default_to_demo,
    )


def _hf_config(model: nn.Module) -> Any:
    """The Hugging Face config that describes the model's input (the vision config of a multi-modal one)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return getattr(config, "vision_config", None) or config


def _pair(value: Any) -> Tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def input_size_of(model: nn.Module) -> Tuple[int, ...]:
    """The shape of one input sample the model was built for: ``(channels, height, width)`` for images.

    Reads a timm patch embedding (which knows ``img_size=`` overrides) before the
    pretrained config (which describes the original weights); for a Hugging Face model,
    its config: ``(frames, channels, height, width)`` for video models,
    ``(frames, mel bins)`` for audio spectrogram models.

    Raises:
        ValueError: naming the model's class when its input size cannot be told.
    """
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None:
        height, width = _pair(img_size)
        proj = getattr(embed, "proj", None)
        channels = getattr(proj, "in_channels", 3)
        return int(channels), height, width
    config = _hf_config(model)
    if config is not None:
        return _hf_input_size(model, config)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    if size is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}; it has no patch_embed.img_size")
    return tuple(int(v) for v in size)


def _hf_input_size(model: nn.Module, config: Any) -> Tuple[int, ...]:
    if getattr(model, "main_input_name", "pixel_values") == "input_values" and hasattr(config, "num_mel_bins"):
        return int(config.max_length), int(config.num_mel_bins)
    if getattr(config, "image_size", None) is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}: its config has no image_size")
    height, width = _pair(config.image_size)
    channels = int(getattr(config, "num_channels", 3))
    frames = getattr(config, "num_frames", None)
    return (int(frames), channels, height, width) if frames else (channels, height, width)


def patch_size_of(model: nn.Module) -> Tuple[int, int]:
    """``(height, width)`` of one patch.

    Raises:
        ValueError: naming the model's class when it has no patch size.
    """
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        config = _hf_config(model)
        size = getattr(config, "patch_size", None) if config is not None else None
    if size is None:
        raise ValueError(f"cannot tell the patch size of {type(model).__name__}; it has no patch_embed.patch_size")
    return _pair(size)


def data_config_of(model: nn.Module, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The model's timm data config (mean, std, crop), at the size the model was built for.

    Raises:
        ValueError: for a model whose input is not one image (video, audio).
    """
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    size = input_size_of(model)
    if len(size) != 3:
        raise ValueError(f"{type(model).__name__} does not take one image (its input is {size}); images are needed here")
    config["input_size"] = size
    config.update(overrides or {})
    return config


def label_names_of(model: nn.Module) -> List[str]:
    """The model's class names in label order; [] when it does not name them.

    timm models from ``tome train`` (and the shipped ones) keep them in
    ``pretrained_cfg["label_names"]``, Hugging Face models in ``config.id2label``
    (its placeholder names ``LABEL_0``, ``LABEL_1``... name nothing).
    """
    names = list((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or ())
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) if not names else None
    if id2label:
        names = [str(id2label[i]) for i in sorted(id2label)]
        if all(re.fullmatch(r"LABEL_\d+", name) for name in names):
            names = []
    return names


def num_classes_of(model: nn.Module) -> Optional[int]:
    """Number of classes the model predicts (timm ``num_classes``, Hugging Face ``config.num_labels``), or None."""
    count = getattr(model, "num_classes", None)
    if count is None and hasattr(getattr(model, "config", None), "num_labels"):
        count = model.config.num_labels
    return count
