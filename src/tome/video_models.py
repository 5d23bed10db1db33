"""A small class-conditional video diffusion transformer for the generated clips (:mod:`tome.data.clips`).

The denoiser is a real diffusers ``WanTransformer3DModel`` (Wan 2.1's architecture: 3-D
rotary positions, self-attention over the ``frames x height x width`` patch grid,
cross-attention to the text tokens, AdaLN from the timestep) built from a config at tiny
width. It works in pixel space (3 channels in and out, no VAE). The class enters through
the text input: :class:`ClassConditionedWan` keeps a learned table that turns a class index
into a few ``encoder_hidden_states`` tokens; index ``len(CLASSES)`` is the "no class" entry
used for classifier-free guidance (Ho & Salimans, 2022). Because the transformer stays a
``WanTransformer3DModel``, ``tome.apply_patch(model.transformer, ...)`` applies to it as to
the published checkpoints.

Training is rectified flow / flow matching (Lipman et al., 2023; Esser et al., 2024, SD3):
``x_s = (1 - s) x_0 + s noise`` and the model's output is the velocity ``noise - x_0``;
sampling uses diffusers' ``FlowMatchEulerDiscreteScheduler``. The transformer itself
predicts the clean clip ``x_0`` and the velocity is ``(x_s - x_0) / s``, as JiT does (Li & He,
2025, "Back to Basics: Let Denoising Generative Models Denoise"): in pixel space a patch
(6 x 6 x 3 = 108 values here) is nearly as wide as the model (128 channels), and a network
that must output the noise of every pixel learns far more slowly than one that outputs the
clean image, which lies near a low-dimensional manifold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import nn

from .data.synthetic import CLASSES

__all__ = ["SIZES", "SHIPPED_VIDEO_MODELS", "ClassConditionedWan", "build_model", "sample", "save_model", "model_folder", "load_model"]

# Widths per size: "tiny" is for tests (well under a second a step), "small" is the trained model.
SIZES: Dict[str, Dict[str, Any]] = {
    "tiny": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "text_dim": 16,
             "freq_dim": 32, "text_tokens": 2, "patch_size": (1, 4, 4)},
    "small": {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512, "text_dim": 64,
              "freq_dim": 64, "text_tokens": 4, "patch_size": (1, 6, 6)},
}
"""Transformer settings by size name; ``text_tokens`` is the number of class tokens per sample."""

SHIPPED_VIDEO_MODELS: Dict[str, Path] = {
    "clips-wan": Path(__file__).resolve().parent / "assets" / "video" / "clips-wan",
}
"""The shipped models by name (:func:`save_model` folders with their model card and training log):
``clips-wan`` is the ``small`` model trained on plain-background clips with representation
alignment (docs/video.md: the classifier finds the requested class in about 21 % of its frames
against 10 % chance and 98 % on real clips; weak, but above chance)."""

_CONFIG_FILE = "class_conditioned_wan.json"
_TABLE_FILE = "class_embedding.safetensors"


class ClassConditionedWan(nn.Module):
    """A ``WanTransformer3DModel`` conditioned on a class through a learned token table.

    Args:
        transformer: The denoiser (pixel space: ``in_channels == out_channels == 3``).
        text_tokens: Class tokens handed to the transformer per sample.
        num_classes: Number of classes; one more entry, index ``num_classes``, means "no class".

    Call ``model(videos, sigmas, labels)`` with ``videos`` ``(batch, 3, frames, height, width)``,
    ``sigmas`` ``(batch,)`` in ``[0, 1]`` (the noise level; the transformer receives
    ``1000 * sigma`` as its timestep, as diffusers' flow-matching scheduler counts) and
    ``labels`` ``(batch,)`` int; it returns the predicted velocity, shaped as ``videos``:
    ``(videos - x_0) / max(sigma, MIN_SIGMA)`` from the transformer's clean-clip prediction ``x_0``.
    """

    MIN_SIGMA = 0.05
    """Least noise level the velocity divides by (JiT's clip of ``1 - t``), so it stays bounded near the data."""

    def __init__(self, transformer: nn.Module, text_tokens: int, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.transformer = transformer
        self.num_classes, self.text_tokens = num_classes, text_tokens
        text_dim = transformer.config.text_dim
        self.class_embedding = nn.Embedding(num_classes + 1, text_tokens * text_dim)
        nn.init.normal_(self.class_embedding.weight, std=1.0)

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance)."""
        return self.num_classes

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        """The ``encoder_hidden_states`` of ``labels``: ``(batch, text_tokens, text_dim)``."""
        return self.class_embedding(labels).view(labels.shape[0], self.text_tokens, -1)

    def predict_clean(self, videos: torch.Tensor, sigmas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The transformer's estimate of the clean clip ``x_0``, shaped as ``videos``."""
        return self.transformer(hidden_states=videos, timestep=sigmas * 1000.0,
                                encoder_hidden_states=self.condition(labels), return_dict=False)[0]

    def forward(self, videos: torch.Tensor, sigmas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        clean = self.predict_clean(videos, sigmas, labels)
        return (videos - clean) / sigmas.clamp_min(self.MIN_SIGMA).view(-1, 1, 1, 1, 1)


def build_model(size: str = "small", seed: int = 0) -> ClassConditionedWan:
    """A freshly initialised :class:`ClassConditionedWan` of ``size`` (:data:`SIZES`).

    Raises:
        ValueError: for an unknown size.
    """
    from diffusers import WanTransformer3DModel

    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    settings = dict(SIZES[size])
    text_tokens = settings.pop("text_tokens")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(in_channels=3, out_channels=3, **settings)
        return ClassConditionedWan(transformer, text_tokens)


def flow_scheduler(shift: float = 1.0) -> Any:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` as this model is trained for (1000 steps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@torch.no_grad()
def sample(model: ClassConditionedWan, labels: torch.Tensor, noise: torch.Tensor, steps: int = 20,
           guidance: float = 2.0) -> torch.Tensor:
    """Generate clips of ``labels`` from ``noise`` with Euler steps of the flow ODE.

    Args:
        model: The trained model.
        labels: ``(batch,)`` class indices.
        noise: ``(batch, 3, frames, height, width)`` standard normal noise; the same noise
            gives the same clips.
        steps: Euler steps (``FlowMatchEulerDiscreteScheduler.set_timesteps``).
        guidance: Classifier-free guidance scale; 1 means none (one forward per step).
            To sample from a merged model, patch ``model.transformer`` in place first
            (``tome.apply_patch``).

    Returns:
        Clips ``(batch, 3, frames, height, width)`` in ``[-1, 1]`` (clamped).

    Raises:
        ValueError: for fewer than one step, a guidance scale below 1, or labels that do not
            match the noise's batch.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if guidance < 1:
        raise ValueError(f"guidance must be >= 1, got {guidance!r}")
    if labels.shape != (noise.shape[0],):
        raise ValueError(f"labels must have shape ({noise.shape[0]},) to match the noise, got {tuple(labels.shape)}")
    scheduler = flow_scheduler()
    scheduler.set_timesteps(steps)
    was_training = model.training
    model.eval()
    x = noise.clone()
    null = torch.full_like(labels, model.null_class)
    for timestep in scheduler.timesteps:
        sigma = (timestep / 1000.0).expand(x.shape[0])
        if guidance == 1:
            velocity = model(x, sigma, labels)
        else:
            both = model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
            conditional, unconditional = both.chunk(2)
            velocity = unconditional + guidance * (conditional - unconditional)
        x = scheduler.step(velocity, timestep, x, return_dict=False)[0]
    model.train(was_training)
    return x.clamp(-1, 1)


def save_model(model: ClassConditionedWan, folder: Union[str, Path]) -> Path:
    """Write ``model`` to ``folder``: ``transformer/`` (diffusers ``save_pretrained``: safetensors
    and config), the class table (safetensors) and its settings (json)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    save_file({"weight": model.class_embedding.weight.detach().contiguous()}, folder / _TABLE_FILE)
    (folder / _CONFIG_FILE).write_text(json.dumps({"text_tokens": model.text_tokens, "num_classes": model.num_classes,
                                                   "classes": list(CLASSES)}, indent=2) + "\n")
    return folder


def model_folder(name: Union[str, Path]) -> Path:
    """The folder ``name`` means: itself, or the shipped model of that name (a key of
    :data:`SHIPPED_VIDEO_MODELS`) when no file or folder of that name exists here."""
    if not Path(name).exists() and str(name) in SHIPPED_VIDEO_MODELS:
        return SHIPPED_VIDEO_MODELS[str(name)]
    return Path(name)


def load_model(folder: Union[str, Path]) -> ClassConditionedWan:
    """Load a model written by :func:`save_model` (offline), in eval mode.

    Args:
        folder: The folder, or the name of a shipped model (a key of :data:`SHIPPED_VIDEO_MODELS`).

    Raises:
        FileNotFoundError: when ``folder`` does not hold such a model (the message lists the
            shipped names).
    """
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    folder = model_folder(folder)
    if not (folder / _CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no class-conditioned Wan model (no {_CONFIG_FILE}); "
                                f"the shipped ones are {sorted(SHIPPED_VIDEO_MODELS)}")
    settings = json.loads((folder / _CONFIG_FILE).read_text())
    transformer = WanTransformer3DModel.from_pretrained(folder / "transformer", local_files_only=True)
    model = ClassConditionedWan(transformer, settings["text_tokens"], settings["num_classes"])
    model.class_embedding.load_state_dict(load_file(folder / _TABLE_FILE))
    return model.eval()
