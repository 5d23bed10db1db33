"""The files ``tome train`` writes and the tools read: ``<name>.safetensors`` plus ``<name>.json``.

:func:`save_model` writes a timm ViT's weights with a JSON description (architecture,
constructor arguments, ``pretrained_cfg`` and how it was trained); :func:`load_model`
builds the model again from the description and loads the weights (safetensors: no
code runs). :func:`save_timm` writes timm's own format as well, which plain timm loads.
The shipped models (:mod:`tome.tools.demo_model`) are such files. This module sits
below both ``tome train`` and the tools that load models, so neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .checkpoints import load_safetensors

__all__ = ["MODEL_FORMAT", "create_timm_model", "train_spec", "save_model", "load_model", "save_timm"]

MODEL_FORMAT = "tome-model/1"


def create_timm_model(architecture: str, model_kwargs: Dict[str, Any], image_size: int, num_classes: int,
            class_names: Sequence[str], mean: Sequence[float], std: Sequence[float], drop_path: float = 0.0) -> nn.Module:
    """A timm model with random weights whose ``pretrained_cfg`` describes these weights, not timm's.

    Args:
        architecture: timm model name.
        model_kwargs: Extra ``timm.create_model`` arguments.
        image_size: Input height and width in pixels.
        num_classes: Classifier outputs.
        class_names: Label names, in label order (may be empty).
        mean, std: Input normalisation.
        drop_path: Stochastic depth rate.

    Raises:
        ValueError: if timm does not know ``architecture`` or rejects ``model_kwargs``.
    """
    import timm

    if not timm.is_model(architecture):
        raise ValueError(f"model={architecture!r} is not a timm model name (see timm.list_models())")
    # The overlay replaces the named weights' metadata: these weights are not those.
    overlay = {
        "input_size": (3, image_size, image_size),
        "fixed_input_size": True,
        "mean": tuple(mean),
        "std": tuple(std),
        "num_classes": num_classes,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "url": "",
        "hf_hub_id": "",
        "tag": "",
        "custom_load": False,
    }
    if class_names:
        overlay["label_names"] = list(class_names)
    try:
        return timm.create_model(architecture, pretrained=False, num_classes=num_classes, img_size=image_size,
                                 drop_path_rate=drop_path, pretrained_cfg_overlay=overlay, **model_kwargs)
    except TypeError as error:
        raise ValueError(f"timm rejected model_kwargs={model_kwargs!r} for {architecture!r}: {error}") from error


def train_spec(architecture: str, model_kwargs: Dict[str, Any], image_size: int, num_classes: int) -> Dict[str, Any]:
    """What :func:`save_model` records of a model's construction (kept on it as ``_tome_train_spec``)."""
    return {"architecture": architecture, "model_kwargs": dict(model_kwargs), "image_size": image_size,
            "num_classes": num_classes}


def save_model(model: nn.Module, path: Union[str, Path], metadata: Optional[Dict[str, Any]] = None,
               dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` as ``path`` (``.safetensors``) plus a JSON description next to it.

    The JSON records the timm architecture and constructor arguments, the
    ``pretrained_cfg`` (input size, normalisation, class names) and ``metadata``.

    Args:
        model: A timm ViT built by :func:`build_model` (patched or not).
        path: Target ``.safetensors`` file; the JSON is ``path`` with suffix ``.json``.
        metadata: Extra JSON-serialisable information (how it was trained, accuracy...).
        dtype: Store floating-point tensors in this dtype (e.g. ``torch.float16`` to halve the size).

    Returns:
        The ``.safetensors`` path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model path must end in .safetensors, got {str(path)!r}")
    spec = getattr(model, "_tome_train_spec", None)
    if spec is None:
        raise ValueError("save_model needs a model made by tome.tools.train.build_model or load_model")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    save_file(state, str(path), metadata={"format": MODEL_FORMAT})
    cfg = model.pretrained_cfg
    description = {
        "format": MODEL_FORMAT,
        "architecture": spec["architecture"],
        "model_kwargs": spec["model_kwargs"],
        "image_size": spec["image_size"],
        "num_classes": spec["num_classes"],
        "pretrained_cfg": {
            "input_size": list(cfg["input_size"]),
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
            "label_names": list(cfg.get("label_names", [])),
        },
        **(metadata or {}),
    }
    path.with_suffix(".json").write_text(json.dumps(description, indent=2) + "\n")
    return path


def load_model(path: Union[str, Path]) -> Tuple[nn.Module, Dict[str, Any]]:
    """Read a model written by :func:`save_model`; returns ``(model in eval mode, its JSON description)``.

    Weights come back as float32 whatever dtype they were stored in.

    Args:
        path: The ``.safetensors`` file or its ``.json``.

    Raises:
        FileNotFoundError: if either file is missing.
        ValueError: if the JSON is not a tome model description.
    """
    path = Path(path)
    weights, description_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for required in (weights, description_path):
        if not required.is_file():
            raise FileNotFoundError(f"model file {str(required)!r} does not exist")
    try:
        description = json.loads(description_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(description_path)!r} is not a {MODEL_FORMAT} JSON description: {error}") from None
    if not isinstance(description, dict) or description.get("format") != MODEL_FORMAT:
        raise ValueError(f"{str(description_path)!r} is not a {MODEL_FORMAT} description")
    state = {name: tensor.float() if tensor.is_floating_point() else tensor
             for name, tensor in load_safetensors(weights).items()}
    missing = [key for key in ("architecture", "model_kwargs", "image_size", "num_classes", "pretrained_cfg")
               if key not in description]
    if missing:
        raise ValueError(f"{str(description_path)!r} lacks {missing}; save_model writes them")
    cfg = description["pretrained_cfg"]
    model = create_timm_model(description["architecture"], dict(description["model_kwargs"]), description["image_size"],
                    description["num_classes"], cfg.get("label_names", ()), cfg["mean"], cfg["std"])
    model.load_state_dict(state)
    model._tome_train_spec = train_spec(description["architecture"], description["model_kwargs"],
                                   description["image_size"], description["num_classes"])
    return model.eval(), description


def save_timm(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``model`` in timm's own format: plain timm loads it with
    ``timm.create_model("local-dir:" + directory, pretrained=True)`` (no ``tome`` needed).

    The directory holds ``model.safetensors`` and timm's ``config.json`` (architecture,
    constructor arguments, input size, normalisation and class names).

    Args:
        model: A timm ViT built by :func:`build_model` (patched or not: patching
            changes no weight).
        directory: The folder to write (created if missing).

    Returns:
        ``directory``.

    Raises:
        ValueError: if ``model`` was not made by :func:`build_model` or :func:`load_model`.
    """
    from timm.models import save_for_hf

    spec = getattr(model, "_tome_train_spec", None)
    if spec is None:
        raise ValueError("save_timm needs a model made by tome.tools.train.build_model or load_model")
    model_args = {**spec["model_kwargs"], "img_size": spec["image_size"], "num_classes": spec["num_classes"]}
    save_for_hf(model, str(directory), model_args=model_args, safe_serialization=True)
    return Path(directory)
