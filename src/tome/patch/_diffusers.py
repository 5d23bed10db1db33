"""Token merging for diffusers denoisers: Stable Diffusion UNets, ControlNets, DiTs and
video transformers.

Which models and blocks merge, which attention modules are wrapped, where the image
tokens sit among their keys and how the token grid is read is the registry of
:mod:`tome.patch._diffusion_blocks` (one row per model and block class); this module
is the family's entry and its shared machinery.

Two ways of merging, both of ToMe's bipartite soft matching over a stride partition
of the image tokens (one destination per ``sy x sx`` cell, or per ``st x sy x sx``
cell of a video sequence):

- ``mode="tokens"``: ToMe for Stable Diffusion (Bolya & Hoffman, "Token Merging
  for Fast Stable Diffusion", CVPRW 2023, sections 3-4). In every
  ``BasicTransformerBlock`` of a level at most ``max_downsample`` below the latent,
  the merge is computed once from the block's input, and self-attention (and
  optionally cross-attention and the feed-forward) runs on the merged tokens;
  each output is unmerged before its residual add. With ``use_rand=False`` the
  outputs equal ``tomesd`` 0.1.3's.
- ``mode="kv"``: only the keys and values of self-attention are merged (matched on
  the keys), queries keep every token, and ``log(size)`` is added to the logits
  (proportional attention, ToMe section 3), so merging exact duplicates changes
  nothing and no unmerge is needed.

The integration goes through the seams diffusers offers instead of copying a
block's forward: the denoiser hands a per-forward :class:`_Step` down in the
``cross_attention_kwargs`` it already passes to every transformer block; a block
turns it into a plan for its own attention modules, which receive it through the
same dictionary. Every block variant (PixArt's ``ada_norm_single``, positional
embeddings, GLIGEN, feed-forward chunking) keeps its own forward, and the
attention processors in use (sdpa, xformers, IP-Adapter, LoRA) keep running.
Denoisers whose forward does not pass that dictionary to their blocks (Stable
Video Diffusion's UNet, the SD3 and Flux ControlNets) hand the state over in a
context variable set while their forward runs. A merging module that runs
without the state of a denoiser set to merge (its patched forward was bypassed)
warns, and so does a denoiser none of whose merging blocks received it.

Similarities are scored in float32 whatever the model's dtype (see
:func:`match_stride_2d`), so fp16 and bf16 models pick the partners their inputs
upcast to float32 would.
"""

import contextvars
import dataclasses
import inspect
import math
import re
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import merge as _merge
from ..merge import TokenAssignment, hashed_stride_choice, sign_projection
from . import _diffusion_blocks as _rows
from ._checks import has_class
from ._lifecycle import KEEP, Example, FamilySpec, configure, register, setting, swap_class, with_parent_signature
from ._shared import attention, finite_key_bias

__all__ = ["diffusers", "DiffusionSettings", "is_diffusers", "MODES", "set_token_grid"]

MODES = ("tokens", "kv")

# The key under which the per-forward state travels in ``cross_attention_kwargs``.
_KEY = "tome"

# Which models' blocks merge, which attention modules they wrap, how the grid is read:
# the rows of tome.patch._diffusion_blocks. Blocks of a model without a row (AnimateDiff
# motion modules, temporal transformers of video UNets) attend over frames and are never
# merged; nor are the TemporalBasicTransformerBlocks of Stable Video Diffusion.
_TEMPORAL_BLOCKS = ("TemporalBasicTransformerBlock",)
# Denoisers whose forward calls its transformer blocks without the attention kwargs it
# takes (or takes none): the per-forward state reaches their blocks through a context
# variable set for the duration of the denoiser's forward instead.
_VIA_CONTEXT = ("UNetSpatioTemporalConditionModel", "SD3ControlNetModel", "FluxControlNetModel",
                "ZImageTransformer2DModel")  # Z-Image takes joint_attention_kwargs for LoRA's scale only
_DENOISERS = ("unet", "transformer", "controlnet")


def _class_names(obj: Any) -> List[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def _is_diffusers_model(obj: Any) -> bool:
    return isinstance(obj, nn.Module) and has_class(obj, "ModelMixin", "diffusers")


def _is_pipeline(obj: Any) -> bool:
    return "DiffusionPipeline" in _class_names(obj)


def is_diffusers(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers pipeline or model (checked by class name, so
    diffusers is never imported)."""
    return _is_pipeline(obj) or _is_diffusers_model(obj)


@dataclasses.dataclass
class DiffusionSettings:
    """The options of :func:`diffusers`, kept on a patched denoiser and readable and
    settable as its attributes (``unet.ratio = 0.3``).

    Attributes:
        ratio: Fraction of a level's tokens merged away, in ``[0, 1)``; ``r = int(tokens * ratio)``,
            capped at the non-destination tokens (``1 - 1/(st*sx*sy)`` of them). 0 is the unpatched model.
        max_downsample: Merge in levels at most this far below the latent (1, 2, 4, 8, as
            tomesd). ``None`` takes the highest-resolution level that has attention
            (1 on SD 1.x/2.x and DiTs, 2 on SDXL).
        sx, sy: Cell width and height, in tokens, of the stride partition (one destination per cell).
        st: Cell depth in frames, for video transformers whose sequence holds every frame
            (Wan): one destination per ``st x sy x sx`` cell. Capped at the number of frames
            (images: 1).
        use_rand: Random destination in each cell, the same for the whole batch (off for
            odd batches); drawn as a hash of ``seed``, the timestep and the block, so runs repeat.
        merge_attn, merge_crossattn, merge_mlp: With ``mode="tokens"``, run self-attention,
            cross-attention, the feed-forward on merged tokens.
        mode: ``"tokens"`` (tomesd's method; UNets, PixArt) or ``"kv"`` (merge keys and values
            only; every model). ``None`` picks ``"tokens"`` where every block is a
            ``BasicTransformerBlock`` and ``"kv"`` elsewhere (SD3, Flux, Wan).
        seed: Seed of the random destinations.
        match_channels: With ``mode="tokens"``, match on the block input projected onto this
            many channels by a fixed random sign matrix (cosine similarities are kept
            approximately) instead of on all of them; the similarity matrix then costs
            ``match_channels / channels`` as much. ``None`` matches on every channel (tomesd).
    """

    ratio: float = dataclasses.field(default=0.5, metadata={"example": 0.3})
    max_downsample: Optional[int] = dataclasses.field(default=None, metadata={"example": 2})
    sx: int = dataclasses.field(default=2, metadata={"example": 3})
    sy: int = dataclasses.field(default=2, metadata={"example": 1})
    st: int = dataclasses.field(default=1, metadata={"example": 2})
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    mode: Optional[str] = dataclasses.field(default=None, metadata={"choices": MODES})
    seed: int = dataclasses.field(default=0, metadata={"example": 1})
    match_channels: Optional[int] = dataclasses.field(default=None, metadata={"example": 8})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"ratio={ratio!r} must be a number in [0, 1): the fraction of tokens merged away")
        for name in ("sx", "sy", "st"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int (the cell size of the stride partition)")
        if self.sx * self.sy * self.st < 2:
            raise ValueError(
                "sx=1, sy=1 and st=1 make every token a destination, so nothing could merge; use st*sx*sy >= 2"
            )
        md = self.max_downsample
        if md is not None and (isinstance(md, bool) or not isinstance(md, int) or md < 1):
            raise ValueError(
                f"max_downsample={md!r} must be None (the highest-resolution level with attention) "
                "or a positive int such as 1, 2, 4 or 8"
            )
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; expected one of {MODES}")
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.mode == "kv" and (self.merge_crossattn or self.merge_mlp):
            raise ValueError(
                "merge_crossattn and merge_mlp apply to mode='tokens' only; mode='kv' merges the keys "
                "and values of self-attention"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")
        mc = self.match_channels
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
            raise ValueError(f"match_channels={mc!r} must be None (every channel, as tomesd) or a positive int")
        if mc is not None and self.mode == "kv":
            raise ValueError("match_channels applies to mode='tokens'; mode='kv' already matches on keys averaged over heads")


@dataclasses.dataclass(frozen=True)
class _Step:
    """Per-forward state, made by the denoiser and handed down to its blocks."""

    settings: DiffusionSettings  # a frozen snapshot: changing the model's settings mid-forward has no effect
    max_downsample: int
    height: int  # token grid of the highest-resolution level (downsample 1)
    width: int
    key: Optional[torch.Tensor]  # seed and timestep mixed; None when destinations are fixed
    frames: int = 1  # frames of the grid in one token sequence (video transformers); 1 for images
    # latent tokens before and after the grid in the sequence (reference images, Flux.2), never merged
    before: int = 0
    after: int = 0
    # One entry per merging module that received this state (filled outside torch.compile
    # only): a forward whose list stays empty ran none of them, see _Owner.
    received: List[str] = dataclasses.field(default_factory=list, compare=False, repr=False)

    def grid(self, num_tokens: int) -> Optional[Tuple[int, int]]:
        """The ``(height, width)`` of a level with ``num_tokens`` tokens, if it merges."""
        full = self.height * self.width
        # tomesd's rule, which also holds for latents not divisible by the strides
        downsample = int(math.ceil(math.sqrt(full // num_tokens))) if num_tokens <= full else 0
        if downsample < 1 or downsample > self.max_downsample:
            return None
        h, w = -(-self.height // downsample), -(-self.width // downsample)
        return (h, w) if h * w == num_tokens else None

    def strides(self) -> Tuple[int, int, int]:
        """``(st, sy, sx)``, with ``st`` at most the number of frames (1 for images)."""
        s = self.settings
        return (min(s.st, self.frames), s.sy, s.sx)

    def choice(self, batch: int, cells: Tuple[int, ...], block_key: torch.Tensor) -> Optional[torch.Tensor]:
        """Random destination offsets, ``cells``-shaped (``(cells_y, cells_x)`` or
        ``(cells_t, cells_y, cells_x)``), or None for the first token of every cell."""
        # An odd batch cannot hold both halves of a classifier-free-guidance batch, whose
        # halves must see the same partition; tomesd turns randomness off then as well.
        if self.key is None or batch % 2 == 1 or math.prod(cells) == 0:
            return None
        size = math.prod(self.strides()[-len(cells):])
        key = self.key + block_key * 104729  # a 0-d CPU tensor: used as a scalar on any device
        return hashed_stride_choice(math.prod(cells[:-1]), cells[-1], size, key).view(cells)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a block hands its attention modules (and feed-forward) for one call."""

    assignment: Optional[TokenAssignment]  # mode "tokens": the block's merge
    kv: Optional[Tuple[_rows.Grid, Optional[torch.Tensor]]]  # mode "kv": ((frames, height, width), choice)
    step: _Step


@dataclasses.dataclass(frozen=True)
class _RotaryCall:
    """What merging keys before a rotary rotation needs from one attention call."""

    cos: torch.Tensor  # (1, tokens, 1, head_dim): the table the processor rotates with, pairs interleaved
    sin: torch.Tensor
    axis: torch.Tensor  # (head_dim // 2,): grid axis of each channel pair
    angle_step: torch.Tensor  # (head_dim // 2,): its angle per position step


def _match_grid(metric: torch.Tensor, grid: _rows.Grid, step: "_Step", r: int,
                choice: Optional[torch.Tensor]) -> Optional[TokenAssignment]:
    """Match ``metric`` ``(batch, frames * height * width, channels)`` over the stride partition."""
    frames, height, width = grid
    st, sy, sx = step.strides()
    if frames == 1:  # images: tomesd's 2-D partition, exactly as before video support
        return match_stride_2d(metric, height, width, sx, sy, r, choice)
    return _merge.match_stride_3d(metric.float(), grid, (st, sy, sx), r, choice)


def _merged_angles(rotary: _RotaryCall, grid: _rows.Grid, assignment: TokenAssignment, batch: int,
                   device: torch.device) -> torch.Tensor:
    """``(batch, merged tokens, head_dim // 2)`` rotary angles (float64) at the mean grid position
    of each merged token: RoPE is defined for any real position, and its angle is linear in it."""
    positions = _rows.grid_positions(grid, device).double()
    positions = assignment.merge(positions.expand(batch, -1, -1), mode="mean")
    return positions[..., rotary.axis.to(device)] * rotary.angle_step.to(device)


class _MergedKeysAttention(TorchFunctionMode):
    """While active, ``scaled_dot_product_attention`` attends to merged keys and values.

    The image tokens' keys (averaged over heads, after any normalisation and rotary
    embedding the processor applied) are matched over the stride partition (2-D, or
    3-D over the frames of a video sequence); keys and values of each group are
    averaged and the logits of a merged key get ``log(size)`` (proportional attention,
    ToMe section 3). With ``rotary`` (a model whose row merges keys before the
    rotation), keys are rotated back, matched and averaged unrotated, and rotated again
    at their group's mean position. Text tokens of joint attention (SD3, Flux) are kept
    as they are. Queries keep every token, so the output needs no unmerge.
    """

    def __init__(self, grid: _rows.Grid, choice: Optional[torch.Tensor], step: "_Step", image_at: str,
                 rotary: Optional[_RotaryCall] = None) -> None:
        super().__init__()
        self.grid, self.choice, self.step = grid, choice, step
        self.settings, self.image_at, self.rotary = step.settings, image_at, rotary
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return self._attend(func, *args, **kwargs)

    def _match(self, metric: torch.Tensor, r: int) -> Optional[TokenAssignment]:
        return _match_grid(metric, self.grid, self.step, r, self.choice)

    def _unrotated(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        rotary = self.rotary
        rows = slice(start, start + keys.shape[2]) if rotary.cos.shape[1] != keys.shape[2] else slice(None)
        cos = rotary.cos[:, rows, :, 0::2].transpose(1, 2).float()
        sin = rotary.sin[:, rows, :, 1::2].transpose(1, 2).float()
        return _rows.unrotate_interleaved(keys, cos, sin)

    def _rotated(self, keys: torch.Tensor, assignment: TokenAssignment) -> torch.Tensor:
        """Rotate merged unrotated keys ``(batch, heads, merged, head_dim)`` at the mean grid
        position of each group (RoPE is linear in the position, see docs/diffusion.md)."""
        angles = _merged_angles(self.rotary, self.grid, assignment, keys.shape[0], keys.device)
        return _rows.rotate_interleaved(keys, angles.cos().float()[:, None], angles.sin().float()[:, None])

    def _attend(self, func: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        s = self.settings
        total, image = key.shape[-2], math.prod(self.grid)
        # the grid and the other latent tokens of the sequence (reference images): a call that
        # does not see them all (Flux.2's reference tokens attending to themselves) is not merged
        latent, after = image + self.step.before + self.step.after, self.step.after
        # a mask over keys, for all queries (text padding: Qwen-Image) or per query (HunyuanVideo 1.5's
        # padding mask of queries and keys): its key axis merges with the keys, its query axis stays
        key_mask = attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[-2] in (1, query.shape[-2]) and (
            attn_mask.shape[-1] == total)
        if (attn_mask is not None and not key_mask) or kwargs.get("is_causal") or args or latent > total or key.dim() != 4:
            if attn_mask is not None:
                raise ValueError(
                    "mode='kv' cannot merge the keys of an attention that is given an attention mask over queries "
                    f"and keys (shape {tuple(attn_mask.shape)}); use mode='tokens' (UNets, PixArt) or ratio=0 for this call"
                )
            return func(query, key, value, attn_mask, *args, **kwargs)
        start = self.step.before if self.image_at == "start" else total - image - after
        batch, heads, _, dim = key.shape
        keys = key[:, :, start : start + image]
        plain = None if self.rotary is None else self._unrotated(keys, start)
        with torch.no_grad():
            assignment = self._match((keys if plain is None else plain).mean(dim=1), int(image * s.ratio))
        if assignment is None:
            return func(query, key, value, *args, **kwargs)

        def merged(t: torch.Tensor, part: Optional[torch.Tensor] = None) -> torch.Tensor:
            if part is None:
                part = t[:, :, start : start + image].transpose(1, 2).reshape(batch, image, -1)
                part = assignment.merge(part, mode="mean").view(batch, assignment.num_out, heads, -1).transpose(1, 2)
            return torch.cat([t[:, :, :start], part.to(t.dtype), t[:, :, start + image :]], dim=2)

        if plain is None:
            merged_key = merged(key)
        else:
            part = assignment.merge(plain.transpose(1, 2).reshape(batch, image, -1), mode="mean")
            part = part.view(batch, assignment.num_out, heads, -1).transpose(1, 2)
            merged_key = merged(key, self._rotated(part, assignment))
        bias = assignment.sizes().log()  # float32; cast (mask) or divided by the scale (channel) later
        text = total - image
        pad = bias.new_zeros(batch, text)
        bias = torch.cat([pad[:, : start], bias, pad[:, start:]] if start else [bias, pad], dim=1)[:, None, None, :]
        if attn_mask is not None:
            full = _merged_mask(attn_mask, assignment, start, image, batch)
            bias = bias.masked_fill(~full, float("-inf")) if attn_mask.dtype == torch.bool else bias + full
            return func(query, merged_key, merged(value), bias.to(query.dtype), **kwargs)
        if set(kwargs) <= {"dropout_p", "scale", "is_causal", "enable_gqa"} and not kwargs.get("enable_gqa"):
            # Sizes are >= 1, so the bias is finite: attention() folds it into a query/key
            # channel where tome.set_prop_attn_kernel says so (CUDA by default), keeping every
            # SDPA backend eligible. This call runs inside the mode, so it does not come back here.
            return attention(query, merged_key, merged(value), finite_key_bias(bias),
                             dropout_p=kwargs.get("dropout_p", 0.0), scale=kwargs.get("scale"))
        return func(query, merged_key, merged(value), bias.to(query.dtype), **kwargs)


def _merged_mask(attn_mask: torch.Tensor, assignment: TokenAssignment, start: int, image: int,
                 batch: int) -> torch.Tensor:
    """An attention mask ``(batch | 1, heads | 1, queries | 1, keys)`` over the keys as merged:
    the image keys ``start : start + image`` become ``assignment.num_out``, each keeping the mask
    of its group (boolean: visible if any member was; additive: the group's mean).

    Raises:
        ValueError: for a mask per query that differs between the image keys one query sees (a
            causal or local mask), which merged keys cannot keep.
    """
    mask = attn_mask.expand(batch, *attn_mask.shape[1:])  # per head or for all; per query or for all
    heads_rows = mask.shape[1:3]
    part = mask[..., start : start + image]
    if heads_rows[1] > 1:
        # Per query: kept exactly where every query sees the same on all image keys (padding
        # masks, HunyuanVideo 1.5's): then each merged key takes that value. Checked with one
        # host sync; while traced (torch.compile, export) inside the graph instead, since a
        # branch on the value would break the graph (regional compilation with fullgraph=True).
        uniform = (part == part[..., :1]).all()
        message = (f"mode='kv' cannot merge the image keys of an attention whose attention mask over queries and "
                   f"keys (shape {tuple(attn_mask.shape)}) differs between the image keys one query sees (a "
                   "causal or local mask): merged keys could not keep it; use mode='tokens' or ratio=0")
        if _compiling():
            torch._assert_async(uniform, message)
        elif not bool(uniform):
            raise ValueError(message)
        part = part[..., :1].expand(*part.shape[:-1], assignment.num_out)
    else:
        part = part.flatten(1, 2).transpose(1, 2)  # (batch, image, heads)
        if attn_mask.dtype == torch.bool:
            part = assignment.merge(part.to(torch.uint8), mode="amax").bool()
        else:
            part = assignment.merge(part, mode="mean").to(attn_mask.dtype)
        part = part.transpose(1, 2).unflatten(1, heads_rows)
    return torch.cat([mask[..., :start], part, mask[..., start + image :]], dim=-1)


def _parameters(module: nn.Module) -> List[str]:
    """Parameter names of the original class's forward, without ``self``."""
    cls = type(module).__dict__.get("_tome_parent", type(module))
    return list(inspect.signature(cls.forward).parameters)[1:]


def _positions(module: nn.Module, *names: str) -> Dict[str, int]:
    """Positions of the named parameters in ``module.forward`` (not counting ``self``);
    read once at patch time, so that a compiled forward does no introspection."""
    params = _parameters(module)
    return {name: params.index(name) for name in names if name in params}


def _get_arg(module: nn.Module, args: tuple, kwargs: Dict[str, Any], name: str) -> Tuple[Any, int]:
    """The value of argument ``name`` in a call ``(args, kwargs)`` and its position (-1: keyword or absent)."""
    if name in kwargs:
        return kwargs[name], -1
    index = module._tome_arg_index.get(name, -1)
    if 0 <= index < len(args):
        return args[index], index
    return None, -1


def _set_arg(args: tuple, kwargs: Dict[str, Any], name: str, index: int, value: Any) -> tuple:
    if index >= 0:
        return args[:index] + (value,) + args[index + 1 :]
    kwargs[name] = value
    return args


def match_stride_2d(metric: torch.Tensor, height: int, width: int, sx: int, sy: int, r: int,
                    choice: Optional[torch.Tensor] = None) -> Optional[TokenAssignment]:
    """:func:`tome.merge.match_stride_2d` with the similarities computed in float32.

    Near-tied scores rounded to fp16 or bf16 pick other partners (a few in every
    thousand tokens of an SD 1.5 block), so the merge would depend on the precision
    and on the batch a sample runs in. Scoring in float32 gives fp16 and bf16 models
    the partners of the same inputs upcast to float32; a float32 metric is used as is.
    """
    return _merge.match_stride_2d(metric.float(), height, width, sx, sy, r, choice)


# Whether torch.compile is tracing (a constant to it): the runtime checks that warn are
# skipped there. torch.compiler.is_compiling is torch >= 2.3.
_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


# The per-forward state of a denoiser that does not hand attention kwargs to its blocks
# (see _VIA_CONTEXT); set only while that denoiser's forward runs, per thread.
_CONTEXT_STEP: contextvars.ContextVar[Optional[_Step]] = contextvars.ContextVar("tome_diffusers_step", default=None)


class _Owner:
    """What the merging modules of a patched denoiser know of it, shared by all of them
    (and updated when an option changes): its class, settings, and how its per-forward
    state arrives. It lets a module that ran without that state say so."""

    def __init__(self, denoiser: str, settings: DiffusionSettings, via_context: bool,
                 rotary_pairs: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        self.denoiser, self.settings, self.via_context = denoiser, settings, via_context
        self.rotary_pairs = rotary_pairs  # (axis, angle step) per channel pair, for keys merged before rotation
        # The state of the forward torch.compile is tracing (dynamo cannot trace ContextVar.set):
        # set and read only while tracing, and None again when the compiled forward returns.
        self.traced_step: Optional[_Step] = None

    def context_step(self) -> Optional[_Step]:
        if not self.via_context:
            return None
        # a denoiser traced whole hands the state over here; blocks compiled on their own
        # (compile_repeated_blocks) under an eager denoiser read the context variable
        traced = self.traced_step if _compiling() else None
        return traced if traced is not None else _CONTEXT_STEP.get()

    def missed(self, module: nn.Module) -> None:
        """A merging module ran without the per-forward state of its denoiser: warn if the
        denoiser is set to merge (its patched forward was bypassed)."""
        if self.settings.ratio == 0 or _compiling():
            return
        warnings.warn(
            f"{self.denoiser} is patched to merge tokens (ratio={self.settings.ratio}), but its "
            f"{type(module).__name__} ran without the state that the patched {self.denoiser}.forward hands "
            f"down, so nothing merges: the denoiser's patched forward did not run. A wrapper or hook that kept "
            f"the unpatched forward (other than accelerate's and diffusers' hooks, which follow the patch) "
            f"bypasses it; patch before wrapping, or call the model itself rather than its blocks.",
            RuntimeWarning,
            stacklevel=3,
        )


def _cache_hooked(denoiser: nn.Module) -> bool:
    """Whether one of diffusers' caches (its stateful hooks: First Block Cache, Pyramid Attention
    Broadcast, FasterCache, TaylorSeer, MagCache, ...) is on the denoiser or one of its modules.
    Those may skip every merging block or attention call of a step, which is no bypass."""
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and any(getattr(hook, "_is_stateful", False) for hook in registry.hooks.values()):
            return True
    return False


def _blocks_compiled(denoiser: nn.Module) -> bool:
    """Whether a module inside ``denoiser`` is compiled on its own (``module.compile()``, as
    diffusers' ``compile_repeated_blocks`` does, or a ``torch.compile`` wrapper put in its
    place): its traced code runs without recording that it received the merge state."""
    return any(getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule"
               for m in denoiser.modules())


def _unreached(denoiser: nn.Module) -> None:
    # Looked up only here, on the path of a forward that had no report.
    if _compiling() or _cache_hooked(denoiser) or _blocks_compiled(denoiser):
        return
    warnings.warn(
        f"{type(denoiser).__name__} is patched to merge tokens ({denoiser._tome_info['merging_blocks']} merging "
        f"blocks, ratio={denoiser._tome_settings.ratio}), but none of its patched transformer blocks received "
        f"the merge state in this forward, so nothing merged: their patched forward was bypassed, for example "
        f"by a wrapper that kept a block's unpatched forward. Patch before wrapping the blocks.",
        RuntimeWarning,
        stacklevel=3,
    )


class ToMeDiffusersAttentionMixin:
    """An attention module of a merging block: with a plan in its keyword arguments it
    runs on merged tokens (``tokens``) or merged keys and values (``kv``); otherwise it
    is the original module. Its own hooks see its usual input and output."""

    _tome_keep_name = True
    # "self" for a block's attn1, "cross" for its attn2, "direct" for the attention modules of
    # blocks that do not compute the merge (SD3, Flux, Wan), which take the per-forward state
    # directly (see the Slot rows of tome.patch._diffusion_blocks)
    _tome_role: str = "self"
    _tome_image_at: str = "start"  # where the image tokens sit among the keys ("start" or "end")
    _tome_block_key: torch.Tensor = torch.tensor(0)  # see _block_key
    _tome_owner: Optional[_Owner] = None
    _tome_rotary: Optional[_rows.Rotary] = None  # the rotary embedding its processor applies, from the row

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        plan = kwargs.pop(_KEY, None)
        if self._tome_role == "direct":
            plan = self._tome_direct_plan(hidden_states, plan)
            if plan is None:
                return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        elif not isinstance(plan, _Plan):  # no plan, or a _Step its block's patched forward never saw
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        s = plan.step.settings
        if self._tome_role == "direct" and s.mode == "tokens":
            return self._tome_on_merged_tokens(plan, hidden_states, args, kwargs)
        if plan.assignment is not None:  # mode "tokens"
            if not (s.merge_attn if self._tome_role == "self" else s.merge_crossattn):
                return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
            out = super().forward(plan.assignment.merge(hidden_states), *args, **kwargs)  # type: ignore[misc]
            return plan.assignment.unmerge(out)
        if self._tome_role == "cross" or (
            self._tome_role == "self" and kwargs.get("encoder_hidden_states", args[0] if args else None) is not None
        ):
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        grid, choice = plan.kv  # type: ignore[misc]
        mode = _MergedKeysAttention(grid, choice, plan.step, self._tome_image_at, self._tome_rotary_call(args, kwargs))
        with mode:
            out = super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        if mode.calls == 0:
            processor = getattr(self, "processor", None)
            raise RuntimeError(
                f"mode='kv' merges keys inside torch.nn.functional.scaled_dot_product_attention, which the "
                f"attention processor {type(processor).__name__} of this module did not call; use the default "
                "processor (set_default_attn_processor() or AttnProcessor2_0) or the 'native' attention backend"
            )
        return out

    def _tome_direct_plan(self, hidden_states: torch.Tensor, step: Optional[_Step]) -> Optional[_Plan]:
        """The plan of a module that takes the denoiser's per-forward state directly."""
        owner = self._tome_owner
        if step is None and owner is not None:
            step = owner.context_step()
        if step is None:
            if owner is not None:
                owner.missed(self)
            return None
        if not _compiling():
            step.received.append(type(self).__name__)
        if step.height * step.width == 0:  # the denoiser could not read the token grid
            return None
        st, sy, sx = step.strides()
        if step.frames == 1:
            cells: Tuple[int, ...] = (step.height // sy, step.width // sx)
        else:
            cells = (step.frames // st, step.height // sy, step.width // sx)
        choice = step.choice(hidden_states.shape[0], cells, self._tome_block_key)
        return _Plan(None, ((step.frames, step.height, step.width), choice), step)

    def _tome_on_merged_tokens(self, plan: _Plan, hidden_states: torch.Tensor, args: tuple,
                               kwargs: Dict[str, Any]) -> Any:
        """Mode ``tokens`` in a module that takes the state directly (Wan's self-attention):
        attention runs on merged tokens, each at its group's mean position, and its output is
        unmerged (ToMe for SD, section 3, with the block's own attention input as the metric)."""
        grid, choice = plan.kv  # type: ignore[misc]
        step = plan.step
        if step.before or step.after:
            raise ValueError(
                f"mode='tokens' runs attention on merged tokens of one grid, but the {step.before + step.after} "
                f"reference tokens of this {self._tome_owner.denoiser if self._tome_owner else 'model'}'s sequence "
                "lie outside it; use mode='kv' (the default), which attends to them unmerged"
            )
        if hidden_states.dim() != 3 or hidden_states.shape[1] != math.prod(grid):
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        with torch.no_grad():
            metric = hidden_states.float()
            assignment = _match_grid(metric, grid, step, int(hidden_states.shape[1] * step.settings.ratio), choice)
        if assignment is None:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        rotary, call = self._tome_rotary, self._tome_rotary_call(args, kwargs, always=True)
        if rotary is not None and call is not None:
            angles = _merged_angles(call, grid, assignment, hidden_states.shape[0], hidden_states.device)
            angles = angles.repeat_interleave(2, dim=-1)[:, :, None]  # (batch, merged, 1, head_dim), pairs interleaved
            table = (angles.cos().to(call.cos.dtype), angles.sin().to(call.sin.dtype))
            if rotary.argument in kwargs:
                kwargs = {**kwargs, rotary.argument: table}
            else:
                args = args[: rotary.position - 1] + (table,) + args[rotary.position :]
        out = super().forward(assignment.merge(hidden_states), *args, **kwargs)  # type: ignore[misc]
        return assignment.unmerge(out)

    def _tome_rotary_call(self, args: tuple, kwargs: Dict[str, Any], always: bool = False) -> Optional[_RotaryCall]:
        """The rotary table of this call, where keys merge before the rotation (or ``always``)."""
        rotary, owner = self._tome_rotary, self._tome_owner
        if rotary is None or owner is None or owner.rotary_pairs is None or not (always or rotary.merge_before):
            return None
        table = kwargs.get(rotary.argument, args[rotary.position - 1] if len(args) >= rotary.position else None)
        if not isinstance(table, (tuple, list)) or len(table) != 2:
            return None
        return _RotaryCall(table[0], table[1], *owner.rotary_pairs)


class ToMeDiffusersFeedForwardMixin:
    """The feed-forward of a block with ``merge_mlp``: runs on the merged tokens."""

    _tome_keep_name = True
    _tome_pending: Optional[TokenAssignment] = None  # set by the block around its own call

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        assignment = self._tome_pending
        if assignment is None:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        return assignment.unmerge(super().forward(assignment.merge(hidden_states), *args, **kwargs))  # type: ignore[misc]


class ToMeDiffusersBlockMixin:
    """A ``BasicTransformerBlock``: computes this call's merge from its input and hands it
    to its attention modules through ``cross_attention_kwargs``. Blocks that do not mix
    image tokens (temporal ones) only remove the per-forward state."""

    _tome_keep_name = True
    _tome_spatial: bool = False
    _tome_block_key: torch.Tensor = torch.tensor(0)  # see _block_key
    _tome_owner: Optional[_Owner] = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        full = (hidden_states,) + args
        cross, index = _get_arg(self, full, kwargs, "cross_attention_kwargs")  # type: ignore[arg-type]
        cross = dict(cross or {})
        step: Optional[_Step] = cross.pop(_KEY, None)
        if step is None and self._tome_spatial:
            owner = self._tome_owner
            step = owner.context_step() if owner is not None else None
            if step is None:
                if owner is not None:
                    owner.missed(self)
                return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        if step is None:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        if self._tome_spatial and not _compiling():
            step.received.append(type(self).__name__)
        plan = self._tome_plan(hidden_states, step) if self._tome_spatial else None
        if plan is not None:
            cross[_KEY] = plan
        args = _set_arg(full, kwargs, "cross_attention_kwargs", index, cross or None)[1:]
        ff = getattr(self, "ff", None)
        if plan is None or plan.assignment is None or not step.settings.merge_mlp or ff is None:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        if getattr(self, "_chunk_size", None) is not None:
            raise ValueError(
                "merge_mlp=True cannot be combined with feed-forward chunking (the feed-forward would merge "
                "each chunk on its own); call disable_forward_chunking() or set merge_mlp=False"
            )
        ff._tome_pending = plan.assignment
        try:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        finally:
            ff._tome_pending = None

    def _tome_plan(self, x: torch.Tensor, step: _Step) -> Optional[_Plan]:
        s = step.settings
        if x.dim() != 3:
            return None
        grid = step.grid(x.shape[1])
        if grid is None:
            return None
        height, width = grid
        choice = step.choice(x.shape[0], (height // s.sy, width // s.sx), self._tome_block_key)
        if s.mode == "kv":
            return _Plan(None, ((1, height, width), choice), step)
        metric = x.float()  # scored in float32, see match_stride_2d
        if s.match_channels is not None and s.match_channels < x.shape[-1]:
            metric = metric @ sign_projection(x.shape[-1], s.match_channels, x.device, torch.float32)
        assignment = match_stride_2d(metric, height, width, s.sx, s.sy, int(x.shape[1] * s.ratio), choice)
        return None if assignment is None else _Plan(assignment, None, step)


class ToMeDiffusersModelMixin:
    """A patched denoiser: makes the per-forward :class:`_Step` and passes it down."""

    _tome_keep_name = True
    _tome_patch: Tuple[int, int, int] = (1, 1, 1)  # latent pixels per token: frames, height, width
    _tome_kwargs_name: str = "cross_attention_kwargs"
    _tome_input: str = "sample"
    _tome_ids: Union[str, Tuple[str, ...]] = "img_ids"  # the argument(s) the grid reader gets (ModelRow.ids)
    _tome_owner: Optional[_Owner] = None

    @with_parent_signature
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        settings: DiffusionSettings = self._tome_settings
        if settings.ratio == 0:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        sample, _ = _get_arg(self, args, kwargs, self._tome_input)
        names = self._tome_ids
        if isinstance(names, str):
            ids, _ = _get_arg(self, args, kwargs, names)
        else:  # several arguments (LTX-Video: num_frames, height, width)
            ids = tuple(_get_arg(self, args, kwargs, name)[0] for name in names)
        grid = self._tome_grid_reader(self, sample, ids)  # type: ignore[attr-defined]
        if grid is None:
            self._tome_no_grid(sample)
            grid = (1, 0, 0)  # the blocks still get the state (so they do not report a bypass) and merge nothing
        timestep, _ = _get_arg(self, args, kwargs, "timestep")
        if timestep is None:  # Z-Image calls it t
            timestep, _ = _get_arg(self, args, kwargs, "t")
        step = _Step(
            settings=settings,
            max_downsample=_resolve_max_downsample(settings, self._tome_lowest_level),  # type: ignore[attr-defined]
            height=grid[1],
            width=grid[2],
            key=_step_key(settings, timestep, _device(sample)) if settings.use_rand and grid[1] else None,
            frames=grid[0],
            before=getattr(grid, "before", 0),
            after=getattr(grid, "after", 0),
        )
        if self._tome_owner.via_context:  # type: ignore[union-attr]
            if torch.is_grad_enabled() and self.is_gradient_checkpointing:  # type: ignore[attr-defined]
                raise ValueError(
                    f"{type(self).__name__} does not pass attention kwargs to its transformer blocks, so the merge "
                    "state reaches them only while its forward runs, not when gradient checkpointing recomputes "
                    "them in backward; disable gradient checkpointing or set ratio=0 for training"
                )
            if _compiling():
                owner = self._tome_owner
                owner.traced_step = step  # type: ignore[union-attr]
                try:
                    out = super().forward(*args, **kwargs)  # type: ignore[misc]
                finally:
                    owner.traced_step = None  # type: ignore[union-attr]
            else:
                token = _CONTEXT_STEP.set(step)
                try:
                    out = super().forward(*args, **kwargs)  # type: ignore[misc]
                finally:
                    _CONTEXT_STEP.reset(token)
        else:
            name = self._tome_kwargs_name
            extra, index = _get_arg(self, args, kwargs, name)
            extra = dict(extra or {})
            extra[_KEY] = step
            args = _set_arg(args, kwargs, name, index, extra)
            out = super().forward(*args, **kwargs)  # type: ignore[misc]
        if not step.received:
            _unreached(self)
        return out

    def _tome_no_grid(self, sample: Any) -> None:
        if _compiling():
            return
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        warnings.warn(
            f"{type(self).__name__} is patched to merge tokens (ratio={self._tome_settings.ratio}), but could not "
            f"read the token grid of this call ({self._tome_input} {shape}; packed tokens need img_ids that lay "
            "them out row by row as one height x width grid from (0, 0)), so nothing merged in this call",
            RuntimeWarning,
            stacklevel=3,
        )

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        info = self.__dict__.get("_tome_info")
        text = f"ToMe: {info['description']}" if info else ""
        return f"{base}\n{text}" if base else text


for _name in (f.name for f in dataclasses.fields(DiffusionSettings)):
    setattr(ToMeDiffusersModelMixin, _name, setting(_name, f"ToMe option ``{_name}`` (see :func:`tome.patch.diffusers`); "
                                                             "setting it re-patches with only this option changed."))


def _device(sample: Any) -> torch.device:
    """The device of the input latent: a tensor, or a list of them (Z-Image)."""
    while isinstance(sample, (list, tuple)) and sample:
        sample = sample[0]
    return sample.device if isinstance(sample, torch.Tensor) else torch.device("cpu")


def _step_key(settings: DiffusionSettings, timestep: Any, device: torch.device) -> torch.Tensor:
    """Seed and timestep as one int64 tensor: random destinations differ between steps and
    blocks yet are the same every time a run is repeated with the same seed."""
    if timestep is None:
        t = torch.zeros(1, device=device)
    else:
        t = torch.as_tensor(timestep, device=device).reshape(-1)[:1].float()
    return (torch.round(t * 1000).long() + settings.seed * 7919) & 0x7FFFFFFF


# --- structure: which blocks merge, at which downsample -----------------------------------


def _levels(denoiser: nn.Module) -> Dict[str, int]:
    """Downsample factor (relative to the latent) of every top-level stage of a UNet."""
    levels: Dict[str, int] = {}
    downsample = 1
    for i, stage in enumerate(getattr(denoiser, "down_blocks", None) or []):
        levels[f"down_blocks.{i}"] = downsample
        if getattr(stage, "downsamplers", None):
            downsample *= 2
    if getattr(denoiser, "mid_block", None) is not None:
        levels["mid_block"] = downsample
    for j, stage in enumerate(getattr(denoiser, "up_blocks", None) or []):
        levels[f"up_blocks.{j}"] = downsample
        if getattr(stage, "upsamplers", None):
            downsample = max(1, downsample // 2)
    return levels


# The model that holds a block: the module above the list that holds it (``transformer_blocks``
# of UNets, PixArt, SD3, Flux; ``blocks`` of Wan; the lists a model row names, ModelRow.lists).
_OWNER = re.compile(r"^(?:(.*)\.)?([A-Za-z_]\w*)\.\d+$")


def _blocks(denoiser: nn.Module) -> Iterator[Tuple[str, nn.Module, bool, int]]:
    """``(name, block, spatial, downsample)`` for every transformer block of a denoiser that has a
    block row; ``spatial``: its owner's model row lists its class (it attends over the latent grid)."""
    levels = _levels(denoiser)
    for name, module in denoiser.named_modules():
        row = _rows.block_row(module)
        if row is None:
            continue
        match = _OWNER.match(name)
        owner = denoiser.get_submodule(match.group(1) or "") if match else None
        owner_row = _rows.model_row(owner)
        spatial = owner_row is not None and row.name in owner_row.blocks and match.group(2) in owner_row.lists
        stage = "mid_block" if name.startswith("mid_block") else ".".join(name.split(".")[:2])
        yield name, module, spatial, levels.get(stage, 1)


def _summary(denoiser: nn.Module, settings: DiffusionSettings, lowest_level: int) -> Dict[str, Any]:
    max_downsample = _resolve_max_downsample(settings, lowest_level)
    per_level: Dict[int, List[int]] = {}
    skipped = [name for name, module in denoiser.named_modules() if type(module).__name__ in _TEMPORAL_BLOCKS]
    for name, _, spatial, downsample in _blocks(denoiser):
        if not spatial:
            skipped.append(name)
            continue
        per_level.setdefault(downsample, [0, 0])[0] += 1
        if downsample <= max_downsample:
            per_level[downsample][1] += 1
    merging = sum(m for _, m in per_level.values())
    total = sum(n for n, _ in per_level.values())
    levels = ", ".join(
        f"x{d}: {n} blocks{'' if d <= max_downsample else ' (not merged)'}" for d, (n, _) in sorted(per_level.items())
    )
    options = (
        f"mode={settings.mode}, ratio={settings.ratio}, max_downsample={settings.max_downsample}"
        f"{f' (= {max_downsample})' if settings.max_downsample is None else ''}, sx={settings.sx}, sy={settings.sy}, "
        f"use_rand={settings.use_rand}"
    )
    if settings.mode == "tokens":
        options += (
            f", merge_attn={settings.merge_attn}, merge_crossattn={settings.merge_crossattn}, "
            f"merge_mlp={settings.merge_mlp}, match_channels={settings.match_channels}"
        )
    description = f"{options}; merging in {merging} of {total} transformer blocks ({levels})"
    if skipped:
        description += f"; {len(skipped)} temporal/other blocks left alone"
    return {
        "description": description,
        "blocks": total,
        "merging_blocks": merging,
        "levels": {d: {"blocks": n, "merging": m} for d, (n, m) in sorted(per_level.items())},
        "skipped_blocks": skipped,
        **dataclasses.asdict(settings),
        "max_downsample_resolved": max_downsample,
    }


def _check_merges(denoiser: nn.Module, settings: DiffusionSettings, lowest_level: int) -> None:
    settings.validate()
    if settings.mode == "tokens" and not settings.merge_attn and not settings.merge_crossattn and not settings.merge_mlp:
        raise ValueError("merge_attn, merge_crossattn and merge_mlp are all False: nothing would be merged")
    summary = _summary(denoiser, settings, lowest_level)
    if summary["merging_blocks"] == 0:
        levels = sorted(summary["levels"])
        raise ValueError(
            f"no transformer block of {type(denoiser).__name__} is at a downsample of at most "
            f"max_downsample={settings.max_downsample}; its attention levels are {levels} "
            "(use max_downsample=None for the highest-resolution one)"
        )


def _resolve_max_downsample(settings: DiffusionSettings, lowest_level: int) -> int:
    """``max_downsample``, with ``None`` meaning the highest-resolution level that has attention."""
    if settings.max_downsample is not None:
        return settings.max_downsample
    return lowest_level


def _block_key(key: int) -> torch.Tensor:
    """A block's key as a 0-d int64 tensor: torch.compile treats int attributes of a module
    as constants, so with a Python int every block of a regionally compiled model
    (``compile_repeated_blocks``) would be a graph of its own and exceed dynamo's recompile
    limit; a tensor is an input of one graph that all blocks share."""
    return torch.tensor(key, dtype=torch.long)


def _swap_attention(attn: nn.Module, slot: _rows.Slot, key: int, owner: _Owner,
                    rotary: Optional[_rows.Rotary] = None) -> None:
    swap_class(attn, ToMeDiffusersAttentionMixin)
    object.__setattr__(attn, "_tome_role", slot.role)
    object.__setattr__(attn, "_tome_image_at", slot.image_at)
    object.__setattr__(attn, "_tome_block_key", _block_key(key))
    object.__setattr__(attn, "_tome_owner", owner)
    object.__setattr__(attn, "_tome_rotary", rotary)


def _merging_rows(denoiser: nn.Module) -> List[_rows.BlockRow]:
    """The rows of the block classes that attend over ``denoiser``'s latent grid, in name order."""
    found = {_rows.block_row(block) for _, block, spatial, _ in _blocks(denoiser) if spatial}
    return sorted((row for row in found if row is not None), key=lambda row: row.name)


def _default_mode(denoiser: nn.Module) -> str:
    """``"tokens"`` where every merging block computes its merge (``BasicTransformerBlock``:
    UNets, PixArt) or where a block cannot merge keys (Sana's linear attention), else ``"kv"``
    (joint attention of SD3 and Flux, Wan's video attention)."""
    rows = _merging_rows(denoiser)
    return "tokens" if all(row.merges_in_block for row in rows) or any("kv" not in row.modes for row in rows) else "kv"


def _check_mode(denoiser: nn.Module, settings: DiffusionSettings) -> None:
    mode, rows = settings.mode, _merging_rows(denoiser)
    direct = [row.name for row in rows if not row.merges_in_block]
    if mode == "tokens" and direct and (settings.merge_crossattn or settings.merge_mlp or not settings.merge_attn):
        raise ValueError(
            f"with mode='tokens', {', '.join(direct)} merge in self-attention only: use merge_attn=True, "
            f"merge_crossattn=False and merge_mlp=False for {type(denoiser).__name__} (got merge_attn="
            f"{settings.merge_attn}, merge_crossattn={settings.merge_crossattn}, merge_mlp={settings.merge_mlp})"
        )
    refusing = [row for row in rows if mode not in row.modes]
    if not refusing:
        return
    allowed = sorted(set.intersection(*(set(row.modes) for row in refusing)))
    reasons = [f"{row.name}: {row.why_modes}" for row in refusing if row.why_modes]
    if reasons:
        raise ValueError(
            f"mode={mode!r} is not available for {type(denoiser).__name__} ({'; '.join(reasons)}): "
            f"use mode={allowed[0]!r} (or mode=None)"
        )
    detail = "has blocks whose attention merges keys and values only (joint attention of SD3 and Flux, Wan's video attention)"
    raise ValueError(
        f"mode={mode!r} needs BasicTransformerBlocks; {type(denoiser).__name__} {detail} "
        f"({', '.join(row.name for row in refusing)} allow mode {' or '.join(map(repr, allowed))}): "
        f"use mode={allowed[0]!r} (or mode=None)"
    )


def _refuse(denoiser: nn.Module) -> None:
    name = type(denoiser).__name__
    if any(type(m).__name__ == "SD3SingleTransformerBlock" for m in denoiser.modules()):
        raise TypeError(
            f"{name} with SD3SingleTransformerBlocks (the SD 3.5 Large ControlNet) takes "
            "tokens the transformer already embedded, so their grid cannot be read and they are not merged; "
            "supported ControlNets: ControlNetModel, SD3ControlNetModel with its own pos_embed, FluxControlNetModel"
        )
    reason = _rows.REFUSED.get(name)
    raise TypeError(
        (f"{name} is not supported: {reason}; " if reason else "")
        + f"{name} has no transformer block over image tokens that token merging supports, so it is not patched "
        f"(supported: UNets and ControlNets whose attention sits in {', '.join(_rows.supported_models())}, "
        f"with blocks {', '.join(_rows.block_names())}; a model is added as a row of tome.patch._diffusion_blocks)"
    )


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Everything patching one denoiser needs, worked out (and checked) before anything changes."""

    denoiser: nn.Module
    settings: DiffusionSettings
    blocks: List[Tuple[str, nn.Module, bool, int]]
    lowest_level: int
    via_context: bool
    grid: _rows.GridReader
    rotary_pairs: Optional[Tuple[torch.Tensor, torch.Tensor]]


def _prepare(denoiser: nn.Module, settings: DiffusionSettings) -> _Prepared:
    """Check that ``denoiser`` can be patched with ``settings``; change nothing.

    Raises:
        TypeError: if it is not a diffusers model or has no transformer block over image tokens.
        ValueError: if no block would merge under ``settings``, or a block refuses its mode.
    """
    if not _is_diffusers_model(denoiser):
        raise TypeError(f"{type(denoiser).__name__} is not a diffusers model")
    blocks = list(_blocks(denoiser))
    spatial_levels = sorted({d for _, _, spatial, d in blocks if spatial})
    if not spatial_levels:
        _refuse(denoiser)
    if settings.mode is None:
        settings = dataclasses.replace(settings, mode=_default_mode(denoiser))
    _check_mode(denoiser, settings)
    _check_merges(denoiser, settings, spatial_levels[0])
    row = _rows.model_row(denoiser)
    grid = row.grid if row is not None and row.grid is not None else _rows.image_grid
    via_context = type(denoiser).__name__ in _VIA_CONTEXT or not (
        {"cross_attention_kwargs", "joint_attention_kwargs"} & set(_parameters(denoiser))
    )
    rotary = [r.rotary for r in _merging_rows(denoiser) if r.rotary is not None]
    pairs = rotary[0].frequencies(denoiser) if rotary else None
    return _Prepared(denoiser, settings, blocks, spatial_levels[0], via_context, grid, pairs)


def _patch_block(block: nn.Module, key: int, spatial: bool, owner: _Owner) -> None:
    """Swap a block that computes its merge (``BasicTransformerBlock``) and its sub-layers."""
    swap_class(block, ToMeDiffusersBlockMixin)
    _rows.register_with_diffusers(type(block))  # diffusers' caches look blocks up by exact class
    object.__setattr__(block, "_tome_arg_index", _positions(block, "cross_attention_kwargs"))
    object.__setattr__(block, "_tome_spatial", spatial)
    object.__setattr__(block, "_tome_block_key", _block_key(key))
    object.__setattr__(block, "_tome_owner", owner)
    if not spatial:
        return
    for slot in _rows.block_row(block).slots:  # type: ignore[union-attr]
        attn = getattr(block, slot.attr, None)
        if attn is not None:
            _swap_attention(attn, slot, key, owner)
    if getattr(block, "ff", None) is not None:
        swap_class(block.ff, ToMeDiffusersFeedForwardMixin)


def _patch_denoiser(prepared: _Prepared) -> nn.Module:
    denoiser, settings = prepared.denoiser, prepared.settings
    owner = _Owner(type(denoiser).__name__, settings, prepared.via_context, prepared.rotary_pairs)
    swap_class(denoiser, ToMeDiffusersModelMixin)
    denoiser.__dict__["_tome_lowest_level"] = prepared.lowest_level
    object.__setattr__(denoiser, "_tome_patch", _rows.patch_sizes(denoiser))
    object.__setattr__(denoiser, "_tome_grid_reader", prepared.grid)
    object.__setattr__(denoiser, "_tome_owner", owner)
    parameters = _parameters(denoiser)
    object.__setattr__(denoiser, "_tome_input", parameters[0])
    kwargs_name = "joint_attention_kwargs" if "joint_attention_kwargs" in parameters else "cross_attention_kwargs"
    object.__setattr__(denoiser, "_tome_kwargs_name", kwargs_name)
    row = _rows.model_row(denoiser)
    ids = row.ids if row is not None else "img_ids"
    object.__setattr__(denoiser, "_tome_ids", ids)
    names = (ids,) if isinstance(ids, str) else ids
    object.__setattr__(denoiser, "_tome_arg_index", _positions(denoiser, parameters[0], "timestep", "t", *names, kwargs_name))
    for key, (_, block, spatial, _) in enumerate(prepared.blocks):
        row = _rows.block_row(block)
        if row.merges_in_block:  # type: ignore[union-attr]
            _patch_block(block, key, spatial, owner)
            continue
        for slot in row.slots if spatial else ():  # type: ignore[union-attr]
            attn = getattr(block, slot.attr, None)
            if attn is not None:  # the attention modules take the per-forward state directly
                _swap_attention(attn, slot, key, owner, row.rotary)  # type: ignore[union-attr]
    denoiser.__dict__["_tome_settings"] = settings
    denoiser.__dict__["_tome_info"] = _summary(denoiser, settings, prepared.lowest_level)
    return denoiser


def _denoisers(obj: Any) -> List[nn.Module]:
    if not _is_pipeline(obj):
        return [obj]
    found = []
    for name in _DENOISERS:
        component = getattr(obj, name, None)
        if component is None:
            continue
        nets = getattr(component, "nets", None)  # MultiControlNetModel holds a list
        found.extend(nets if isinstance(nets, nn.ModuleList) else [component])
    if not found:
        raise TypeError(
            f"{type(obj).__name__} holds no denoiser to patch (looked for the components {', '.join(_DENOISERS)})"
        )
    return found


def diffusers(
    model: Any,
    ratio: float = KEEP,
    max_downsample: Optional[int] = KEEP,
    sx: int = KEEP,
    sy: int = KEEP,
    st: int = KEEP,
    use_rand: bool = KEEP,
    merge_attn: bool = KEEP,
    merge_crossattn: bool = KEEP,
    merge_mlp: bool = KEEP,
    mode: Optional[str] = KEEP,
    seed: int = KEEP,
    match_channels: Optional[int] = KEEP,
) -> Any:
    """Patch a diffusers pipeline or denoiser in place for token merging.

    ToMe for Stable Diffusion (Bolya & Hoffman, CVPRW 2023) with ``mode="tokens"``;
    key/value merging with proportional attention with ``mode="kv"`` (see the
    module docstring and ``docs/diffusion.md``). A pipeline has each denoiser it
    holds patched (``unet``, ``transformer`` and every ``controlnet``); each is
    checked before any is changed, so a refused pipeline is left as it was. The options
    stay readable and settable on every patched denoiser (``pipe.unet.ratio = 0.3``);
    ``denoiser._tome_info`` and ``print(denoiser)`` say which blocks merge.
    Patching again changes only the options given (a first patch takes
    :class:`DiffusionSettings`' defaults for the others); ``tome.remove_patch`` undoes it exactly.

    Args:
        model: A ``DiffusionPipeline`` or a diffusers model: UNets and ControlNets
            (``UNet2DConditionModel``, ``ControlNetModel``, ``UNetMotionModel``,
            ``UNetSpatioTemporalConditionModel``) and the transformers with a row in
            ``tome.patch._diffusion_blocks`` (``PixArtTransformer2DModel``, ``Transformer2DModel``,
            ``SD3Transformer2DModel``, ``SD3ControlNetModel``, ``FluxTransformer2DModel``,
            ``FluxControlNetModel``, ``Flux2Transformer2DModel``, ``ZImageTransformer2DModel``,
            ``WanTransformer3DModel``, ``WanVACETransformer3DModel``, ``CogVideoXTransformer3DModel``,
            ``HunyuanVideo15Transformer3DModel``, ...: ``tome.patch._diffusion_blocks.supported_models()``).
        ratio, max_downsample, sx, sy, st, use_rand, merge_attn, merge_crossattn, merge_mlp, mode,
            seed, match_channels: The options, described on :class:`DiffusionSettings`.

    Returns:
        ``model``, patched.

    Raises:
        TypeError: if ``model`` (or a denoiser of the pipeline) is not a diffusers model with
            transformer blocks over image tokens that have a row (the error names the supported ones).
        ValueError: for an invalid option, a mode a block does not allow, or when no block of
            some denoiser would merge (for example ``max_downsample=1`` on SDXL, whose
            highest-resolution level has no attention).
    """
    options = {name: value for name, value in locals().items() if name != "model"}
    return configure(model, family="diffusers", caller="tome.patch.diffusers", **options)


def set_token_grid(model: Any, height: int, width: int) -> Any:
    """Declare the token grid a patched packed-token denoiser (Flux, Flux.2) is called on.

    Flux's and Flux.2's latents are packed into ``(batch, tokens, channels)``; their grid is
    only in the values of ``img_ids``. An eager call reads it there (one host sync) and
    remembers it per token count; a call that ``torch.compile`` or ``torch.export`` traces
    cannot read values, so it takes the remembered grid and checks inside the graph, without
    a host sync, that ``img_ids`` lay it out row by row (a mismatch fails the call with a
    ``RuntimeError`` rather than merging wrong neighbours). Declare the grid here to compile
    or export before any eager call.

    The declared sequence is the grid alone (text to image). Flux.2 editing pipelines add
    reference-image tokens to it: one eager call on such inputs remembers where the grid
    lies among them, for traced calls on the same number of tokens.

    Args:
        model: A patched ``FluxTransformer2DModel``, ``FluxControlNetModel`` or
            ``Flux2Transformer2DModel``, or a pipeline holding them.
        height, width: The grid in tokens (the image's height and width in pixels / 16).

    Returns:
        ``model``.

    Raises:
        TypeError: if ``model`` holds no patched denoiser that reads its grid from ``img_ids``.
        ValueError: if ``height`` or ``width`` is not a positive int.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int (the token grid: pixels / 16)")
    found = [d for d in _parts(model) if getattr(d, "_tome_grid_reader", None) in _rows.IDS_GRIDS]
    if not found:
        raise TypeError(
            f"{type(model).__name__} holds no patched denoiser that reads its token grid from img_ids "
            "(FluxTransformer2DModel, FluxControlNetModel, Flux2Transformer2DModel patched with "
            "tome.patch.diffusers); the others read it from the shape of their input"
        )
    for denoiser in found:
        _rows.remember_grid(denoiser, height * width, (1, height, width))
    return model


def _patch(denoiser: nn.Module, settings: DiffusionSettings) -> nn.Module:
    return _patch_denoiser(_prepare(denoiser, settings))


def _parts(model: Any) -> List[nn.Module]:
    if not is_diffusers(model):
        raise TypeError(
            f"{type(model).__name__} is not a diffusers pipeline or model; tome.patch.diffusers patches "
            "DiffusionPipeline objects and diffusers denoisers (UNet2DConditionModel, ControlNetModel, "
            "PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel, ...)"
        )
    return _denoisers(model)


def _tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    levels = ("CrossAttnDownBlock2D", "DownBlock2D")  # SD 1.x's layout in two levels: no attention at the lowest
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32,) * 2,
        down_block_types=levels, up_block_types=tuple(t.replace("Down", "Up") for t in reversed(levels)),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def _unet_inputs(batch: int, seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # The timestep varies with the seed: random destinations (use_rand) depend on it.
    return {"sample": torch.randn(batch, 4, 16, 16, generator=generator), "timestep": torch.tensor(100 * seed + 200),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=generator)}


def _tiny_sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def _sd3_inputs(batch: int, seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 16, 12, generator=generator),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=generator),
            "pooled_projections": torch.randn(batch, 16, generator=generator), "timestep": torch.tensor([10] * batch)}


def _sample(out: Any) -> torch.Tensor:
    return out.sample


register(FamilySpec(
    name="diffusers",
    detector=is_diffusers,
    patch=_patch,
    settings=DiffusionSettings,
    priority=5,
    instance_attrs=(
        "_tome_settings", "_tome_lowest_level", "_tome_patch", "_tome_grid_reader", "_tome_rotary", "_tome_spatial",
        "_tome_block_key", "_tome_role", "_tome_pending", "_tome_arg_index", "_tome_input", "_tome_ids", "_tome_kwargs_name", "_tome_image_at", "_tome_owner",
        _rows.PACKED_GRIDS,
    ),
    no_merging={"ratio": 0.0},
    parts=_parts,
    read=lambda denoiser: denoiser.__dict__["_tome_settings"],
    examples=lambda: (
        Example("unet", _tiny_unet, _unet_inputs, merging={"ratio": 0.5}, output=_sample, requires=("diffusers",)),
        Example("sd3", _tiny_sd3, _sd3_inputs, merging={"ratio": 0.5}, output=_sample, requires=("diffusers",)),
    ),
))
