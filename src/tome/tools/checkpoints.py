"""Loading weights for the tools: timm's pretrained weights, local files, URLs, and the
checkpoints published with ToMe.

Everything is loaded safely: ``torch.load(weights_only=True)`` for pickles,
``safetensors`` for ``.safetensors``. Network access fails fast with a clear
message instead of hanging when the host cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

__all__ = [
    "KNOWN_CHECKPOINTS",
    "KnownCheckpoint",
    "create_pretrained",
    "known_checkpoint",
    "load_checkpoint",
    "load_safetensors",
    "load_weights_only",
    "read_state_dict",
]

_PROBE_TIMEOUT_S = 4.0
_IMAGENET_EVAL = {
    # The ToMe checkpoints were trained and evaluated with ImageNet mean/std and a 0.875 crop.
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "interpolation": "bicubic",
}


@dataclass(frozen=True)
class KnownCheckpoint:
    """A checkpoint trained with ToMe and published by its authors.

    Attributes:
        name: Short name accepted by ``--checkpoint``.
        url: Where the original ToMe README links it.
        architecture: timm model name with the same parameter layout.
        model_kwargs: Extra ``timm.create_model`` arguments for that layout.
        r: Tokens merged per layer during training.
        prop_attn: Proportional attention as used in training.
        data_config: Preprocessing the authors prescribe (replaces the timm default).
        description: What the model is.
    """

    name: str
    url: str
    architecture: str
    r: int
    prop_attn: bool
    description: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    data_config: Mapping[str, Any] = field(default_factory=lambda: dict(_IMAGENET_EVAL))


# From the original ToMe README (github.com/facebookresearch/ToMe): DeiT (v1) models
# trained with ToMe, and MAE models fine-tuned with ToMe (MAE code base,
# global_pool=True, i.e. average pooling with fc_norm; prop_attn=True for these).
KNOWN_CHECKPOINTS: Dict[str, KnownCheckpoint] = {
    ck.name: ck
    for ck in (
        KnownCheckpoint(
            "deit_S_r13",
            "https://dl.fbaipublicfiles.com/tome/f367470145_deit_S_r13.pth",
            "deit_small_patch16_224",
            r=13,
            prop_attn=True,
            description="DeiT-S/16 trained with ToMe r=13 (79.36% top-1)",
        ),
        KnownCheckpoint(
            "deit_T_r13",
            "https://dl.fbaipublicfiles.com/tome/f367470145_deit_T_r13.pth",
            "deit_tiny_patch16_224",
            r=13,
            prop_attn=True,
            description="DeiT-Ti/16 trained with ToMe r=13 (71.27% top-1)",
        ),
        KnownCheckpoint(
            "vit_B_16_r16",
            "https://dl.fbaipublicfiles.com/tome/f367082919_vit_B_16_r16.pth",
            "vit_base_patch16_224",
            r=16,
            prop_attn=True,
            description="MAE ViT-B/16 fine-tuned with ToMe r=16 (81.91% top-1)",
            model_kwargs={"global_pool": "avg"},
        ),
        KnownCheckpoint(
            "vit_L_16_r8",
            "https://dl.fbaipublicfiles.com/tome/f366894475_vit_L_16_r8.pth",
            "vit_large_patch16_224",
            r=8,
            prop_attn=True,
            description="MAE ViT-L/16 fine-tuned with ToMe r=8 (85.09% top-1)",
            model_kwargs={"global_pool": "avg"},
        ),
        KnownCheckpoint(
            "vit_H_14_r7",
            "https://dl.fbaipublicfiles.com/tome/f366895717_vit_H_14_r7.pth",
            "vit_huge_patch14_224",
            r=7,
            prop_attn=True,
            description="MAE ViT-H/14 fine-tuned with ToMe r=7 (86.46% top-1)",
            model_kwargs={"global_pool": "avg"},
        ),
    )
}

# Aliases matching the paper's model names.
_ALIASES = {"deit_s_r13": "deit_S_r13", "deit_ti_r13": "deit_T_r13", "deit_t_r13": "deit_T_r13",
            "vit_b_16_r16": "vit_B_16_r16", "mae_vit_b_r16": "vit_B_16_r16", "vit_l_16_r8": "vit_L_16_r8",
            "mae_vit_l_r8": "vit_L_16_r8", "vit_h_14_r7": "vit_H_14_r7", "mae_vit_h_r7": "vit_H_14_r7"}


def known_checkpoint(name: str) -> Optional[KnownCheckpoint]:
    """The published checkpoint called ``name`` (case-insensitive), or None."""
    if name in KNOWN_CHECKPOINTS:
        return KNOWN_CHECKPOINTS[name]
    canonical = _ALIASES.get(name.lower())
    return KNOWN_CHECKPOINTS[canonical] if canonical else None


# ----------------------------------------------------------------------------- network


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def _proxy_configured() -> bool:
    return any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def host_reachable(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    Name resolution has no timeout of its own, so the probe runs in a daemon
    thread that is abandoned after ``timeout``.
    """
    if _proxy_configured():
        return True  # the proxy decides; probing the host directly would be misleading
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result["ok"]


def _offline_message(what: str, host: str, hint: str) -> str:
    return f"{what}: not in the local cache, and {host} cannot be reached (no internet connection?). {hint}"


# ----------------------------------------------------------------------------- timm pretrained


def _cached_pretrained_file(pretrained_cfg: Mapping[str, Any]) -> Optional[str]:
    """Path of already-downloaded weights for a timm pretrained config, if any."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            names = [pretrained_cfg.get("hf_hub_filename")] if pretrained_cfg.get("hf_hub_filename") else []
            names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
            for filename in names:
                path = try_to_load_from_cache(hub_id, filename)
                if isinstance(path, str) and os.path.isfile(path):
                    return path
    url = pretrained_cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)
        if path.is_file() and not pretrained_cfg.get("custom_load"):
            return str(path)
    return None


def create_pretrained(name: str, **model_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True)`` that fails fast when offline.

    Weights already in the Hugging Face or torch hub cache are used without any
    network access. Otherwise the weights' host is probed first (a few seconds at
    most) so that a machine without internet gets a clear error instead of a long
    series of retries.

    Raises:
        ConnectionError: if the weights are not cached and their host cannot be reached.
        ValueError: if timm has no pretrained weights for ``name``.
    """
    import timm
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name)
    if pretrained_cfg is None:
        raise ValueError(f"timm has no pretrained weights for model {name!r}")
    cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg)
    cached = _cached_pretrained_file(cfg)
    if cached is not None:
        # timm's own loader (with its checkpoint filter), pointed at the cached file.
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": cached, "custom_load": False}, **model_kwargs
        )
    hint = (
        f"Download the weights on a connected machine (python -c \"import timm; "
        f"timm.create_model('{name}', pretrained=True)\") or pass --checkpoint PATH."
    )
    if cfg.get("hf_hub_id"):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ConnectionError(
                f"pretrained weights for {name} are not in the local cache and HF_HUB_OFFLINE is set. {hint}"
            )
        host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    elif cfg.get("url"):
        host = urllib.parse.urlparse(cfg["url"]).hostname or ""
    else:
        raise ValueError(f"timm has no download location for the pretrained weights of {name!r}")
    if not host_reachable(host):
        raise ConnectionError(_offline_message(f"Pretrained weights for {name}", host, hint))
    return timm.create_model(name, pretrained=True, **model_kwargs)


# ----------------------------------------------------------------------------- checkpoints


def load_weights_only(path: Any) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.

    Raises:
        ValueError: naming ``path`` when it is not a PyTorch checkpoint (empty, text, truncated,
            corrupt) or holds Python objects that safe loading refuses.
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive (PK...); files from torch < 1.6 are a pickle (protocol byte 0x80).
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        found = "an empty file" if not head else f"a file starting with {head!r}"
        raise ValueError(
            f"checkpoint {str(path)!r} is not a PyTorch checkpoint (found {found}); expected a .pth/.pt "
            "file written by torch.save, or a .safetensors file"
        )
    # Training scripts (DeiT, MAE) save their argparse.Namespace next to the weights;
    # it is a plain attribute container, so it is allowed alongside tensors.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # an unpickling error names the refused global
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            if refused is not None:
                raise ValueError(
                    f"checkpoint {str(path)!r} holds Python objects that safe loading refuses "
                    f"({refused.group(1)}): it is not a weights-only checkpoint, and loading it could run code. "
                    "If you trust the file, re-save only its tensors with torch.save(state_dict, path)."
                ) from None
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"checkpoint {str(path)!r} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                f"{type(error).__name__}: {first_line[:200]}; expected a .pth/.pt file written by torch.save, "
                "or a .safetensors file"
            ) from None


def load_safetensors(path: Any) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file.

    Raises:
        ValueError: naming ``path`` when it is not a readable safetensors file.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # SafetensorError and friends: the header or data is not safetensors
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"{str(path)!r} is not a readable .safetensors file ({first_line[:200]}); expected a file "
            "written by safetensors.torch.save_file"
        ) from None


def _download(url: str) -> str:
    """Path of ``url`` in the torch hub cache, downloading it when absent."""
    filename = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint.pth"
    cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cache.is_file():
        return str(cache)
    host = urllib.parse.urlparse(url).hostname or url
    if not host_reachable(host, 443 if url.startswith("https") else 80):
        raise ConnectionError(
            _offline_message(
                f"Checkpoint {url}", host, f"Download it on a connected machine and pass its local path, or put it at {cache}."
            )
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(cache), progress=True)
    return str(cache)


def read_state_dict(source: str) -> Dict[str, torch.Tensor]:
    """The state_dict in a checkpoint file, URL or published checkpoint name.

    Accepts a bare state_dict or a training checkpoint holding it under
    ``"model"``, ``"state_dict"`` or ``"model_ema"``; a ``module.`` prefix left by
    DistributedDataParallel is removed.

    Raises:
        FileNotFoundError: if a local path does not exist.
        ConnectionError: if a URL is neither cached nor reachable.
        ValueError: if the file holds no state_dict or refuses safe loading.
    """
    known = known_checkpoint(source)
    if known is not None:
        source = known.url
    if _is_url(source):
        path = _download(source)
    else:
        path = os.path.expanduser(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint {source!r} is not a file, a URL, or a known checkpoint name "
                f"({', '.join(KNOWN_CHECKPOINTS)})"
            )
    if path.endswith(".safetensors"):
        loaded: Any = load_safetensors(path)
    else:
        loaded = load_weights_only(path)
    return _unwrap_state_dict(loaded, source)


def _unwrap_state_dict(loaded: Any, source: str) -> Dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping):
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(torch.is_tensor(v) for v in loaded.values()):
        kind = type(loaded).__name__
        keys = list(loaded)[:5] if isinstance(loaded, Mapping) else []
        raise ValueError(
            f"checkpoint {source!r} holds no state_dict (found a {kind} with keys {keys}); expected tensors, "
            "possibly under 'model' or 'state_dict'"
        )
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


def _is_timm_vit(model: nn.Module) -> bool:
    from ..patch._timm import is_timm_vit

    return is_timm_vit(model)


def load_checkpoint(model: nn.Module, source: str) -> str:
    """Load weights from ``source`` into ``model`` (strictly: every key must match).

    For timm ViTs the state_dict first goes through timm's own checkpoint filter,
    which converts older layouts and resamples position embeddings to the model's size.

    Args:
        model: The model to fill.
        source: A local ``.pth``/``.pt``/``.bin``/``.safetensors`` file, an http(s)
            URL, or a published checkpoint name (see ``KNOWN_CHECKPOINTS``).

    Returns:
        A short description of where the weights came from.

    Raises:
        ValueError: naming missing/unexpected keys or shape mismatches.
    """
    state_dict = read_state_dict(source)
    if _is_timm_vit(model):
        from timm.models.vision_transformer import checkpoint_filter_fn

        state_dict = checkpoint_filter_fn(state_dict, model)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        message = str(error).replace("\n\t", " ").replace("\n", " ")
        if len(message) > 600:
            message = message[:600] + " ..."
        raise ValueError(f"checkpoint {source!r} does not fit {type(model).__name__}: {message}") from None
    known = known_checkpoint(source)
    return known.description if known is not None else os.path.basename(source.rstrip("/")) or source

