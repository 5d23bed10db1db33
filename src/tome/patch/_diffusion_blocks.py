"""The registry of diffusion denoisers and transformer blocks that ToMe merges in.

One row per class, in the manner of diffusers' own ``TransformerBlockRegistry``
(``diffusers/hooks/_helpers.py``), which keeps what its caches must know about each
block class. Here a :class:`ModelRow` names a model (a denoiser, or a container such as
the ``Transformer2DModel`` inside a UNet) whose transformer blocks attend over the
latent grid, which of its block classes do, and how its token grid
``(frames, height, width)`` is read from its config and the input's shape; a
:class:`BlockRow` says which attention modules of a block to wrap and where the image
(or video) tokens sit among their keys. A block class found in a model that has no
row (AnimateDiff's motion modules, temporal transformers) is left alone, and a
denoiser with no merging block is refused with a ``TypeError``: nothing is patched and
left merging nothing.

Adding a model is one :func:`register_model` row, plus a :class:`BlockRow` when its
blocks are new; what is truly specific (a rotary layout, a grid read another way) is a
function passed in the row. Class names are matched over the MRO, so diffusers is never
imported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

# (frames, height, width) of the full-resolution token grid
Grid = Tuple[int, int, int]


class PlacedGrid(NamedTuple):
    """A token grid that shares the latent sequence with other tokens (reference images
    appended by editing pipelines): ``(frames, height, width)`` as a :data:`Grid`, and how
    many latent tokens lie before and after it. Only the grid's tokens merge."""

    frames: int
    height: int
    width: int
    before: int = 0
    after: int = 0


# (model, input latent, image ids) -> the token grid, or None when it cannot be read
GridReader = Callable[[nn.Module, Any, Any], Optional[Union[Grid, PlacedGrid]]]


@dataclasses.dataclass(frozen=True)
class Slot:
    """An attention module of a block that merging wraps.

    Attributes:
        attr: Its attribute name on the block (``"attn1"``).
        role: ``"self"`` or ``"cross"`` for the attention modules of a block that
            computes the merge itself (``BasicTransformerBlock``); ``"direct"`` for one
            that takes the per-forward state straight from the denoiser and merges its
            keys and values (``mode="kv"``).
        image_at: Where the image tokens sit among its keys: ``"start"`` (image first,
            or image only) or ``"end"`` (text tokens first).
    """

    attr: str
    role: str = "direct"
    image_at: str = "start"


@dataclasses.dataclass(frozen=True)
class Rotary:
    """A rotary position embedding applied by the attention processor, which lets keys be
    merged before the rotation (see docs/diffusion.md, "Rotary positions").

    Attributes:
        argument: Name of the attention module's forward argument holding the
            ``(cos, sin)`` table, each ``(1, tokens, 1, head_dim)``, pairs interleaved.
        position: Position of that argument in the forward (not counting ``self``).
        frequencies: ``model -> (axis, frequency)``, two ``(head_dim // 2,)`` tensors: the
            grid axis (0 frames, 1 height, 2 width) each channel pair rotates with, and its
            angle per position step.
        merge_before: Whether keys are matched and averaged before the rotation (rotated
            back, averaged, rotated at their group's mean position) rather than after it
            (averaged as rotated); decided per model by measurement (docs/diffusion.md).
    """

    argument: str
    position: int
    frequencies: Callable[[nn.Module], Tuple[torch.Tensor, torch.Tensor]]
    merge_before: bool = False


@dataclasses.dataclass(frozen=True)
class BlockRow:
    """A transformer block class whose attention can merge.

    Attributes:
        name: The block's class name.
        slots: Its attention modules to wrap.
        modes: The merging modes it allows (``"tokens"``: the block computes the merge
            from its input and runs sub-layers on merged tokens; ``"kv"``: keys and
            values merged inside self-attention).
        rotary: The rotary embedding its self-attention applies, if any.
        why_modes: Why it allows only ``modes``, for the error that refuses another mode.
    """

    name: str
    slots: Tuple[Slot, ...]
    modes: Tuple[str, ...] = ("kv",)
    rotary: Optional[Rotary] = None
    why_modes: str = ""

    @property
    def merges_in_block(self) -> bool:
        """Whether the block itself computes the merge (its slots have roles self/cross)."""
        return any(slot.role != "direct" for slot in self.slots)


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """A model whose blocks of the classes ``blocks`` attend over its latent grid.

    Attributes:
        name: The model's class name.
        blocks: The block classes (:class:`BlockRow` names) of its that merge.
        grid: How a denoiser of this class reads its token grid (unused for containers
            such as ``Transformer2DModel`` inside a UNet, whose UNet reads it).
        video: Whether one sequence holds the tokens of every frame (Wan), so merging
            can cross frames; ``False`` where frames are batch entries to the blocks.
        ids: The forward argument handed to ``grid`` beside the input latent
            (``"img_ids"`` for Flux, ``"img_shapes"`` for Qwen-Image), or several, whose
            values are handed as a tuple (LTX-Video's ``num_frames``, ``height``, ``width``).
        lists: The attributes (``nn.ModuleList``) of the model whose blocks attend over the
            grid; blocks of the listed classes in other lists are left alone (Z-Image's caption
            refiner).
    """

    name: str
    blocks: Tuple[str, ...]
    grid: Optional[GridReader] = None
    video: bool = False
    ids: Union[str, Tuple[str, ...]] = "img_ids"
    lists: Tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks", "blocks", "vace_blocks")


_BLOCKS: Dict[str, BlockRow] = {}
_MODELS: Dict[str, ModelRow] = {}


def register_block(row: BlockRow) -> BlockRow:
    """Add (or replace) the row of a block class."""
    _BLOCKS[row.name] = row
    return row


def register_model(row: ModelRow) -> ModelRow:
    """Add (or replace) the row of a model class.

    Raises:
        ValueError: if it names a block class without a :class:`BlockRow`.
    """
    unknown = [name for name in row.blocks if name not in _BLOCKS]
    if unknown:
        raise ValueError(f"{row.name} names block classes {unknown} that have no BlockRow; register them first")
    _MODELS[row.name] = row
    return row


# Why models of today's pipelines that have no row are refused (added to their TypeError).
REFUSED: Dict[str, str] = {
    "HunyuanVideoFramepackTransformer3DModel": "it appends history latents at 1x, 2x and 4x downsampling to the "
    "latent sequence, several grids in one sequence with no row to tell them apart",
    "WanAnimate2Transformer3DModel": "its generation pass attends through a flex-attention block mask over "
    "generation and cached reference frames, which kv mode does not merge",
}


def _class_names(obj: Any) -> Tuple[str, ...]:
    return tuple(cls.__name__ for cls in type(obj).__mro__)


def block_row(module: nn.Module) -> Optional[BlockRow]:
    """The row of ``module``'s class (or of its nearest registered base class)."""
    for name in _class_names(module):
        if name in _BLOCKS:
            return _BLOCKS[name]
    return None


def model_row(module: Optional[nn.Module]) -> Optional[ModelRow]:
    """The row of ``module``'s class (or of its nearest registered base class)."""
    if module is None:
        return None
    for name in _class_names(module):
        if name in _MODELS:
            return _MODELS[name]
    return None


def supported_models() -> Tuple[str, ...]:
    """The registered model classes, for error messages."""
    return tuple(_MODELS)


def block_names() -> Tuple[str, ...]:
    return tuple(_BLOCKS)


# --- the token grid ---------------------------------------------------------------------


def patch_sizes(model: nn.Module) -> Tuple[int, int, int]:
    """``(frames, height, width)`` latent pixels per token, from the model's config
    (UNets and their ControlNets: one token per latent pixel)."""
    if hasattr(model, "down_blocks"):
        return (1, 1, 1)
    patch = getattr(getattr(model, "config", None), "patch_size", None) or 1
    if isinstance(patch, (tuple, list)):
        return (int(patch[0]), int(patch[1]), int(patch[2])) if len(patch) == 3 else (1, int(patch[0]), int(patch[1]))
    frames = getattr(model.config, "patch_size_t", None) or 1  # HunyuanVideo, CogVideoX 1.5
    return (int(frames), int(patch), int(patch))


def image_grid(model: nn.Module, sample: Any, ids: Any) -> Optional[Grid]:
    """Images ``(batch, channels, height, width)``, or video whose frames the blocks see as
    batch entries (``(batch, [channels, frames | frames, channels], height, width)``)."""
    if not isinstance(sample, torch.Tensor) or sample.dim() not in (4, 5):
        return None
    _, ph, pw = model._tome_patch
    return (1, sample.shape[-2] // ph, sample.shape[-1] // pw)


def video_grid(model: nn.Module, sample: Any, ids: Any) -> Optional[Grid]:
    """Video ``(batch, channels, frames, height, width)`` patchified into one sequence."""
    if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
        return None
    pt, ph, pw = model._tome_patch
    return (sample.shape[2] // pt, sample.shape[3] // ph, sample.shape[4] // pw)


def reference_frame_grid(model: nn.Module, sample: Any, ids: Any) -> Optional[PlacedGrid]:
    """Video ``(batch, channels, 1 + frames, height, width)`` whose first frame is a reference
    image (Wan Animate's character): the grid is the other frames, the reference frame's tokens
    lie before it in the sequence and stay unmerged."""
    grid = video_grid(model, sample, ids)
    if grid is None or grid[0] < 2:
        return None
    frames, height, width = grid
    return PlacedGrid(frames - 1, height, width, before=height * width)


def frames_first_grid(model: nn.Module, sample: Any, ids: Any) -> Optional[Grid]:
    """Video ``(batch, frames, channels, height, width)`` patchified into one sequence
    (CogVideoX: ``patch_size_t`` frames per token where the config sets it, else one)."""
    if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
        return None
    pt = int(getattr(getattr(model, "config", None), "patch_size_t", None) or 1)
    _, ph, pw = model._tome_patch
    return (sample.shape[1] // pt, sample.shape[3] // ph, sample.shape[4] // pw)


# Where a denoiser whose grid is in the values of img_ids (Flux, Flux.2) keeps the grids it has
# read, per token count of its latent sequence (see packed_grid and flux2_grid).
PACKED_GRIDS = "_tome_packed_grids"


def packed_grid(model: nn.Module, sample: Any, ids: Any) -> Optional[Grid]:
    """Packed tokens ``(batch, tokens, channels)`` with image ids ``(tokens, 3)`` (Flux):
    the grid is the ids' extent, read with one host sync per call and remembered per
    token count. Latents given as ``(batch, channels, height, width)`` are read from their shape.

    Returns None (nothing merges, with a warning) unless the ids lay the tokens out row
    by row from ``(0, 0)``, as every Flux pipeline does: ids of another layout (random
    ids, a transposed or shuffled grid) would otherwise merge tokens that are not
    neighbours while still covering a ``height x width`` extent.

    A traced call (``torch.compile``, ``torch.export``) cannot read values: it takes the grid
    remembered for its token count (from an eager call, or ``tome.patch.set_token_grid``)
    and checks inside the graph, without a host sync, that the ids are that grid.

    Raises:
        ValueError: in a traced call, when no grid is remembered for its token count.
    """
    if isinstance(sample, torch.Tensor) and sample.dim() in (4, 5):
        return image_grid(model, sample, ids)
    if not (isinstance(sample, torch.Tensor) and sample.dim() == 3 and isinstance(ids, torch.Tensor)
            and ids.dim() in (2, 3) and ids.shape[-1] == 3 and ids.shape[-2] == sample.shape[1]):
        return None
    if torch.compiler.is_compiling():
        return _traced_grid(model, ids, target=False,
                            unknown="ids that are not one grid covering every token (Flux Kontext's reference-image "
                                    "tokens) do not merge: use ratio=0 for them")
    ids = ids[0] if ids.dim() == 3 else ids  # the model reads the first sample's ids (deprecated 3-D form)
    height, width = ids[:, 1].max().long() + 1, ids[:, 2].max().long() + 1
    index = torch.arange(ids.shape[0], device=ids.device)
    row_major = ((ids[:, 1] == index // width) & (ids[:, 2] == index % width)).all()
    height, width, row_major = torch.stack([height, width, row_major.long()]).tolist()  # the one host sync
    if not row_major or height * width != ids.shape[0]:
        return None
    return remember_grid(model, ids.shape[0], (1, height, width))


def flux2_grid(model: nn.Module, sample: Any, ids: Any) -> Optional[PlacedGrid]:
    """Packed tokens ``(batch, tokens, channels)`` with ``img_ids`` ``([batch,] tokens, 4)``
    ``(t, h, w, l)`` (Flux.2): the grid is the block of tokens with the smallest ``t``, the
    target latents (every Flux.2 pipeline gives them ``t = 0`` and reference images ``t = 10,
    20, ...``), read with one host sync per call and remembered per token count, as for Flux.
    Reference tokens may sit before the grid (Flux.2 Klein's KV-cache extraction step) or
    after it (Flux.2 editing); they are kept unmerged. The model reads the first sample's ids,
    and so does this.

    Returns None (nothing merges, with a warning) if the target tokens are not one
    contiguous row-major ``height x width`` block.

    A traced call (``torch.compile``, ``torch.export``) takes the layout remembered for its
    token count (from an eager call, or ``tome.patch.set_token_grid`` for a sequence that is
    the grid alone) and checks inside the graph, without a host sync, that the ids are that layout.

    Raises:
        ValueError: in a traced call, when no layout is remembered for its token count.
    """
    if not (isinstance(sample, torch.Tensor) and sample.dim() == 3 and isinstance(ids, torch.Tensor)
            and ids.dim() in (2, 3) and ids.shape[-1] >= 3 and ids.shape[-2] == sample.shape[1]):
        return None
    ids = ids[0] if ids.dim() == 3 else ids
    if torch.compiler.is_compiling():
        return _traced_grid(model, ids, target=True,
                            unknown="with reference-image tokens in the sequence (editing), call it once without "
                                    "compiling on those inputs: set_token_grid declares a grid without them")
    t, h, w = ids[:, 0], ids[:, 1].long(), ids[:, 2].long()
    target = t == t.min()
    rank = target.long().cumsum(0) - 1  # place of each target token among them
    first = target.long().argmax()
    height = torch.where(target, h, -1).max() + 1
    width = torch.where(target, w, -1).max() + 1
    position = torch.arange(len(t), device=t.device)
    # row-major and contiguous: the k-th target token sits at (k // width, k % width), at first + k
    in_order = (~target | ((h * width + w == rank) & (position - first == rank))).all()
    count, first, height, width, in_order = torch.stack(
        [target.sum(), first, height, width, in_order.long()]).tolist()  # the one host sync
    if not in_order or count != height * width:
        return None
    return remember_grid(model, len(t), PlacedGrid(1, height, width, first, len(t) - first - count))


def remember_grid(model: nn.Module, tokens: int, grid: Union[Grid, PlacedGrid]) -> Union[Grid, PlacedGrid]:
    """Keep ``grid`` (read from the ids of an eager call, or declared by ``tome.patch.set_token_grid``)
    for traced calls on ``tokens`` tokens."""
    model.__dict__.setdefault(PACKED_GRIDS, {})[tokens] = grid
    return grid


def _traced_grid(model: nn.Module, ids: torch.Tensor, target: bool, unknown: str) -> Union[Grid, PlacedGrid]:
    """The grid remembered for the token count of ``ids`` (``([batch,] tokens, axes)``), checked
    against them inside the graph (see :func:`_check_ids`).

    Raises:
        ValueError: if no grid is remembered for that token count; ``unknown`` ends its message.
    """
    tokens, grids = ids.shape[-2], getattr(model, PACKED_GRIDS, None) or {}
    if tokens not in grids:
        raise ValueError(
            f"{type(model).__name__} cannot read its token grid from the values of img_ids while torch.compile "
            f"or torch.export traces it; call it once without compiling on inputs of {tokens} tokens, or declare "
            f"the grid with tome.patch.set_token_grid(model, height, width) (in tokens, height * width = {tokens}); "
            + unknown
        )
    _check_ids(ids, grids[tokens], target)
    return grids[tokens]


def _check_ids(ids: torch.Tensor, grid: Union[Grid, PlacedGrid], target: bool) -> None:
    """Assert, inside the graph, that image ids ``(..., tokens, axes)`` lay ``grid`` out row by
    row (axes 1 and 2) after its ``before`` tokens; with ``target`` (Flux.2), also that exactly
    the grid's tokens have the smallest ``t`` (axis 0)."""
    _, height, width = grid[:3]
    before, after = getattr(grid, "before", 0), getattr(grid, "after", 0)
    tokens = ids.shape[-2]
    block = ids[..., before:tokens - after, :]
    rows = torch.arange(height, device=ids.device, dtype=ids.dtype).repeat_interleave(width)
    cols = torch.arange(width, device=ids.device, dtype=ids.dtype).repeat(height)
    same = (block[..., 1] == rows).all() & (block[..., 2] == cols).all()
    if target:
        t = ids[..., 0]
        position = torch.arange(tokens, device=ids.device)
        inside = (position >= before) & (position < tokens - after)
        same = same & ((t == t.min(dim=-1, keepdim=True).values) == inside).all()
    where = f" between {before} and {after} other tokens" if before or after else ""
    torch._assert_async(same, f"img_ids are not the {height} x {width} token grid{where} remembered for {tokens} "
                              "tokens; call the model once without compiling on this grid, or tome.patch.set_token_grid")


# The grid readers that read img_ids' values and remember what they read (tome.patch.set_token_grid).
IDS_GRIDS = (packed_grid, flux2_grid)


def list_grid(model: nn.Module, sample: Any, patches: Any) -> Optional[Grid]:
    """Latents given as a list of ``(channels, frames, height, width)`` tensors, one per sample
    (Z-Image), patchified by the forward's ``(patch_size, f_patch_size)`` (2 and 1 when not
    given). Each sample's sequence starts with its grid's tokens.

    Raises:
        ValueError: for a nested list (Z-Image Omni: condition images and SigLIP tokens in the
            same sequence, not merged), or samples of different sizes (one partition serves the
            whole batch).
    """
    if not (isinstance(sample, (list, tuple)) and sample):
        return None
    name = type(model).__name__
    if isinstance(sample[0], (list, tuple)):
        raise ValueError(
            f"{name} got a list of image lists (the omni mode: condition images and SigLIP features in the latent "
            "sequence), which token merging does not support; set ratio=0 (or tome.remove_patch) for this pipeline"
        )
    shapes = {tuple(x.shape) for x in sample if isinstance(x, torch.Tensor)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"{name} got latents of shapes {sorted(shapes)}: token merging needs one (channels, frames, "
                         "height, width) shape for every sample of a batch")
    spatial, temporal = (n if isinstance(n, int) else d for n, d in zip(patches, (2, 1)))
    _, frames, height, width = next(iter(shapes))
    return (frames // temporal, height // spatial, width // spatial)


def shapes_grid(model: nn.Module, sample: Any, shapes: Any) -> Optional[Grid]:
    """Packed tokens ``(batch, tokens, channels)`` with ``img_shapes`` (Qwen-Image): a list
    per batch entry of ``(frames, height, width)`` token grids, or one such triple, plain
    Python ints, so no host sync. The sequence must be exactly that one grid.

    Raises:
        ValueError: if an entry lists more than one grid: reference images appended to the
            latent sequence (Qwen-Image-Edit and Edit Plus) are not merged.
    """
    if not (isinstance(sample, torch.Tensor) and sample.dim() == 3 and isinstance(shapes, (list, tuple)) and shapes):
        return None
    first = shapes[0] if isinstance(shapes, list) else shapes
    grids = first if isinstance(first, list) else [first]
    if len(grids) != 1:
        raise ValueError(
            f"{type(model).__name__} got {len(grids)} image grids per sample in img_shapes ({grids}): the pipeline "
            "appends reference-image tokens to the latent sequence (Qwen-Image-Edit), which token merging does "
            "not support; set ratio=0 (or tome.remove_patch) for this pipeline"
        )
    frames, height, width = (int(n) for n in grids[0])
    return (frames, height, width) if frames * height * width == sample.shape[1] else None


def sizes_grid(model: nn.Module, sample: Any, sizes: Any) -> Optional[Grid]:
    """Packed tokens ``(batch, tokens, channels)`` with the token grid given as the forward's
    ``(num_frames, height, width)`` ints (LTX-Video, whose rotary embedding reads them too).

    Raises:
        ValueError: if the sequence holds more tokens than the grid: condition tokens
            appended to the latent sequence (LTX's condition pipeline) are not merged.
    """
    if not (isinstance(sample, torch.Tensor) and sample.dim() == 3 and isinstance(sizes, tuple)
            and all(isinstance(n, int) for n in sizes)):
        return None
    frames, height, width = sizes
    if sample.shape[1] > frames * height * width:
        raise ValueError(
            f"{type(model).__name__} got {sample.shape[1]} tokens for a {frames} x {height} x {width} grid: the "
            "pipeline appends condition tokens to the latent sequence (LTXConditionPipeline), which token merging "
            "does not support; set ratio=0 (or tome.remove_patch) for this pipeline"
        )
    return (frames, height, width) if frames * height * width == sample.shape[1] else None


# --- rotary embeddings ------------------------------------------------------------------


def wan_frequencies(model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Axis and angle step of each channel pair of Wan's 3-D rotary embedding, read from
    the model's own table (``WanRotaryPosEmbed``: frames, height, width channels in turn)."""
    rope = model.rope
    sizes = (rope.t_dim // 2, rope.h_dim // 2, rope.w_dim // 2)
    axis = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    cos, sin = rope.freqs_cos[1, 0::2].double(), rope.freqs_sin[1, 0::2].double()
    return axis, torch.atan2(sin, cos)  # the angle of position 1 is the step (all below pi)


def unrotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo a rotary rotation whose channel pairs are interleaved (``x[..., 0::2]``, ``x[..., 1::2]``).

    Args:
        x: ``(batch, heads, tokens, head_dim)``, rotated.
        cos, sin: ``(..., tokens, head_dim // 2)`` broadcastable to ``x``'s pairs.
    """
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    return torch.stack((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).flatten(-2)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs interleaved as in :func:`unrotate_interleaved`."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def grid_positions(grid: Grid, device: Any) -> torch.Tensor:
    """``(tokens, 3)`` float32 ``(frame, row, column)`` of every token, frame-major."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


# --- diffusers' own block registry ------------------------------------------------------


def register_with_diffusers(runtime_class: type) -> None:
    """Enter a swapped block class in diffusers' ``TransformerBlockRegistry`` under its
    parent's metadata, so diffusers' hooks that look blocks up by exact class (First Block
    Cache, layer skip, MagCache) accept patched blocks. A parent diffusers does not know
    is left unknown, as it was."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # an older diffusers without the registry
        return
    parent = runtime_class.__dict__.get("_tome_parent")
    if parent is None or runtime_class in TransformerBlockRegistry._registry:
        return
    try:
        metadata = TransformerBlockRegistry.get(parent)
    except ValueError:
        return
    TransformerBlockRegistry.register(runtime_class, dataclasses.replace(metadata, _cached_parameter_indices=None))
    # Arguments are found by the parent's forward signature: the swapped forward takes *args.
    TransformerBlockRegistry._registry[runtime_class]._cls = parent


# --- the rows ---------------------------------------------------------------------------

_BASIC = register_block(BlockRow(
    "BasicTransformerBlock", (Slot("attn1", "self"), Slot("attn2", "cross")), modes=("tokens", "kv"),
))
register_block(BlockRow("JointTransformerBlock", (Slot("attn"), Slot("attn2"))))  # SD3: [image, text]; SD3.5: attn2 image only
register_block(BlockRow("FluxTransformerBlock", (Slot("attn", image_at="end"),)))  # Flux: [text, image]
register_block(BlockRow("FluxSingleTransformerBlock", (Slot("attn", image_at="end"),)))
# attn1: video tokens only, 3-D rotary; attn2 is cross-attention to text (and image) tokens. Keys merge
# after the rotation: measured on a tiny trained-scale Wan at ratio 0.5, merging before it (rotate
# back, average, rotate at the mean position) moved the output 2-3x more (docs/diffusion.md).
register_block(BlockRow(
    "WanTransformerBlock", (Slot("attn1"),), modes=("kv", "tokens"), rotary=Rotary("rotary_emb", 3, wan_frequencies),
))

for _name in ("Transformer2DModel", "PixArtTransformer2DModel", "DiTTransformer2DModel"):
    register_model(ModelRow(_name, ("BasicTransformerBlock",), image_grid))
# Stable Video Diffusion's spatial transformer; its TemporalBasicTransformerBlocks have no row
register_model(ModelRow("TransformerSpatioTemporalModel", ("BasicTransformerBlock",), image_grid))
for _name in ("SD3Transformer2DModel", "SD3ControlNetModel"):
    register_model(ModelRow(_name, ("JointTransformerBlock",), image_grid))
for _name in ("FluxTransformer2DModel", "FluxControlNetModel"):
    register_model(ModelRow(_name, ("FluxTransformerBlock", "FluxSingleTransformerBlock"), packed_grid))
register_model(ModelRow("WanTransformer3DModel", ("WanTransformerBlock",), video_grid, video=True))
# CogVideoX (and 1.5): joint attention over [text, video]; its 3-D rotary (optional) rotates the video part
register_block(BlockRow("CogVideoXBlock", (Slot("attn1", image_at="end"),)))
register_model(ModelRow("CogVideoXTransformer3DModel", ("CogVideoXBlock",), frames_first_grid, video=True))
# Wan VACE: its control blocks attend over control tokens laid out on the same video grid
register_block(dataclasses.replace(_BLOCKS["WanTransformerBlock"], name="WanVACETransformerBlock"))
register_model(ModelRow(
    "WanVACETransformer3DModel", ("WanTransformerBlock", "WanVACETransformerBlock"), video_grid, video=True,
))

# Qwen-Image: joint attention over [text, image] (rotary applied to each stream before the
# concatenation, so keys merge as rotated, as for Flux); the grid comes from img_shapes.
register_block(BlockRow("QwenImageTransformerBlock", (Slot("attn", image_at="end"),)))
register_model(ModelRow("QwenImageTransformer2DModel", ("QwenImageTransformerBlock",), shapes_grid, ids="img_shapes"))
# HunyuanVideo: [video, text] in both its dual- and single-stream blocks (the text keys padded
# by a key mask, merged with the keys); 3-D rotary applied to the video part before the
# attention call, so keys merge as rotated. The image-to-video variants keep the same
# sequence (latent_concat adds channels; token_replace modulates the first frame differently).
_HUNYUAN = ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
            "HunyuanVideoTokenReplaceTransformerBlock", "HunyuanVideoTokenReplaceSingleTransformerBlock")
for _name in _HUNYUAN:
    register_block(BlockRow(_name, (Slot("attn"),)))
register_model(ModelRow("HunyuanVideoTransformer3DModel", _HUNYUAN, video_grid, video=True))
# LTX-Video: attn1 attends over the video tokens only, rotary applied before the attention
# call (keys merge as rotated); attn2 is cross-attention to text, left alone.
register_block(BlockRow("LTXVideoTransformerBlock", (Slot("attn1"),)))
register_model(ModelRow("LTXVideoTransformer3DModel", ("LTXVideoTransformerBlock",), sizes_grid, video=True,
                        ids=("num_frames", "height", "width")))
# Sana: attn1 is ReLU linear attention (no softmax, no scaled_dot_product_attention), so its
# keys cannot merge inside the softmax: it runs on merged tokens (mode "tokens" only), which
# shortens its O(tokens) cost; attn2 (text) is left alone. No rotary embedding.
register_block(BlockRow(
    "SanaTransformerBlock", (Slot("attn1"),), modes=("tokens",),
    why_modes="its self-attention is ReLU linear attention, with no softmax (scaled_dot_product_attention) in "
              "which keys and values could merge, so it runs on merged tokens instead",
))
register_model(ModelRow("SanaTransformer2DModel", ("SanaTransformerBlock",), image_grid))
# Mochi: joint attention over [video, text], run one sample at a time with that sample's
# valid text tokens; 3-D rotary applied to the video keys before the call (keys merge as rotated).
register_block(BlockRow("MochiTransformerBlock", (Slot("attn1"),)))
register_model(ModelRow("MochiTransformer3DModel", ("MochiTransformerBlock",), video_grid, video=True))
# Flux.2: joint attention over [text, image] in both block kinds (rotary applied before the call,
# so keys merge as rotated, as for Flux). The grid is the target latents' block of img_ids; the
# reference-image tokens editing appends ([text, image, references], or [text, references, image]
# when Klein's KV cache is extracted, or cached references injected between text and image) are
# attended to unmerged.
for _name in ("Flux2TransformerBlock", "Flux2SingleTransformerBlock"):
    register_block(BlockRow(_name, (Slot("attn", image_at="end"),)))
register_model(ModelRow("Flux2Transformer2DModel", ("Flux2TransformerBlock", "Flux2SingleTransformerBlock"), flux2_grid))
# Z-Image: single-stream attention over [image, caption] in its main layers and over the image
# alone in its noise refiner (each sample's image tokens first, padded to a multiple of 32 by
# tokens that stay unmerged); rotary applied before the call, so keys merge as rotated. The
# caption refiner (same block class) is left alone.
register_block(BlockRow("ZImageTransformerBlock", (Slot("attention"),)))
register_model(ModelRow("ZImageTransformer2DModel", ("ZImageTransformerBlock",), list_grid,
                        ids=("patch_size", "f_patch_size"), lists=("layers", "noise_refiner")))
# HunyuanVideo 1.5: joint attention over [video, text] (3-D rotary applied to the video part
# before the call, so keys merge as rotated), with a padding mask over queries and keys that the
# processor builds; its key axis merges with the keys. Image-to-video adds channels and image
# tokens to the text side, so the latent sequence stays one video grid.
register_block(BlockRow("HunyuanVideo15TransformerBlock", (Slot("attn"),)))
register_model(ModelRow("HunyuanVideo15Transformer3DModel", ("HunyuanVideo15TransformerBlock",), video_grid, video=True))
# Wan Animate: Wan's blocks over a sequence whose first frame is the reference (character) image
# (pose latents are added to the other frames); only the other frames merge. Its face adapters
# attend from every token to motion features and are left alone.
register_model(ModelRow("WanAnimateTransformer3DModel", ("WanTransformerBlock",), reference_frame_grid, video=True))
