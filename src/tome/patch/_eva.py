"""ToMe for timm ``Eva`` models with rotary position embeddings (``timm.models.eva``).

Covers DINOv3 (``vit_*_dinov3``: class token, 4 register tokens, RoPE on
patch-centre coordinates in [-1, 1]), EVA-02 (``eva02_*``: absolute position
embedding plus RoPE, SwiGLU) and the other ``Eva`` builds timm registers with
the same parts (``vit_*_rope_*``, with or without class token, avg / token / map
pooling, ``dynamic_img_size``).

Rotary embeddings rotate the queries and keys of the patch tokens by their 2-D
position in every block; merged tokens carry their rotary angles through the
blocks and are rotated by tables recomputed from them (:mod:`tome.patch._rope`:
``rope_position`` says where a merged token sits, ``rope_metric`` whether the
matching compares the keys after the rotation, the default, or before it).
Prefix tokens (class, registers) never merge and are never rotated, as in the
model itself. ``docs/backbones.md`` has the measurements behind the defaults.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv 2210.09461);
Heo et al., "Rotary Position Embedding for Vision Transformer", ECCV 2024;
Siméoni et al., "DINOv3", 2025 (arXiv 2508.10104); Fang et al., "EVA-02", 2023.
"""

import functools
import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._attention_body import packed_heads, split_heads
from ._checks import check_attention_pool, check_family, check_own_methods, has_class, refuse_position_augmentation
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ToMeSettings,
    call_attention,
    check_choice,
    configure,
    example_images,
    original_class,
    patch_model,
    register,
    setting,
)
from ._rope import (
    DEFAULT_ROPE_METRIC,
    ROPE_METRICS,
    RotaryPositions,
    ToMeRotaryAttentionMixin,
    ToMeRotaryBlockMixin,
    rope_table,
    token_angles,
)
from ._shared import POSITION_RULES, AttentionCall, ToMeState, size_bias
from ._timm import ToMeTimmHead, pool_tokens, tiny_timm

__all__ = ["eva", "is_timm_eva", "rope_angles", "rope_table", "ROPE_METRICS", "DEFAULT_ROPE_METRIC", "RopeSettings"]

_SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "", "map")
_SUPPORTED_ROPES = ("RotaryEmbeddingDinoV3", "RotaryEmbeddingCat")

_MASK_REFUSAL = (
    "attn_mask / is_causal cannot be combined with token merging (r > 0): merged tokens no longer "
    "line up with the mask. Set model.r = 0 to use a mask."
)


def is_timm_eva(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``Eva`` (checked by class name and module; timm is not imported)."""
    return has_class(model, "Eva", "timm.models.eva")


# ----------------------------------------------------------------------------- rotary positions


def rope_angles(rope: nn.Module, grid: Tuple[int, int]) -> torch.Tensor:
    """The rotary angles of every patch of a ``grid = (height, width)`` patch grid.

    The angles are what timm's rotary module takes the sine and cosine of: linear in
    each patch's coordinates, one per (axis, frequency). Computed with the module's
    own coordinates and frequencies, in the same order of operations, so
    ``rope_table(rope_angles(...))`` reproduces the module's table.

    Args:
        rope: ``model.rope``, a ``RotaryEmbeddingDinoV3`` or ``RotaryEmbeddingCat``.
        grid: Patch grid ``(height, width)``.

    Returns:
        ``(height * width, head_dim // 2)`` float32, patches in row-major order.
    """
    from timm.layers import pos_embed_sincos as sincos

    height, width = int(grid[0]), int(grid[1])
    if type(rope).__name__ == "RotaryEmbeddingDinoV3":
        coords = sincos.make_coords_dinov3(
            height, width, normalize_coords=rope.normalize_coords, grid_indexing=rope.grid_indexing,
            grid_offset=rope.grid_offset,
        )
        coords = coords[:, :, None].to(device=rope.periods.device, dtype=rope.periods.dtype)
        return (2 * math.pi * coords / rope.periods[None, None, :]).flatten(1)
    bands = rope.bands
    coords, _, _ = sincos.build_fourier_pos_embed(
        [height, width], bands=bands, in_pixels=rope.in_pixels, ref_feat_shape=rope.ref_feat_shape,
        grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing, grid_type=rope.grid_type,
        normalize_coords=rope.normalize_coords, include_grid=True,
    )
    # coords: (height, width, 2, 1), as timm multiplies it by the bands.
    return (coords * bands).flatten(-2).flatten(0, -2).float()


# ----------------------------------------------------------------------------- attention and blocks


class ToMeEvaAttention(ToMeRotaryAttentionMixin):
    """timm ``EvaAttention`` that adds a ``log(size)`` bias and reports the keys when asked.

    The metric is the keys averaged over heads after the rotation (what attention
    compares, position included); :class:`ToMeEvaAttentionPlainKeys` reports them
    before it.
    """

    def _tome_rope_attention(self, x: torch.Tensor, rope: Optional[torch.Tensor], call: AttentionCall) -> torch.Tensor:
        from timm.layers import apply_rot_embed_cat

        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._tome_qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        rotate = None
        if rope is not None:
            rotate = functools.partial(apply_rot_embed_cat, emb=rope, half=getattr(self, "rotate_half", False))
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = self._tome_attend(call, q, k, v, self.num_prefix_tokens, rotate, dropout_p=dropout_p,
                                scale=self.scale, fused=self.fused_attn)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def _tome_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``(batch, heads, tokens, head_dim)`` as ``EvaAttention`` projects them."""
        if self.qkv is None:
            return tuple(split_heads(proj(x), heads=self.num_heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        return packed_heads(qkv, self.num_heads)


class ToMeEvaAttentionPlainKeys(ToMeEvaAttention):
    """:class:`ToMeEvaAttention` whose metric is the keys before the rotation (content only)."""

    _tome_rotated_metric = False


class _ToMeEvaBlockBase(ToMeRotaryBlockMixin):
    """An Eva block: the rotary table of the current tokens goes to its attention."""

    _tome_block_args = ("rope", "attn_mask", "is_causal")  # EvaBlock.forward's arguments after x

    def _tome_table(self, angles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return rope_table(angles, bool(getattr(self.attn, "rotate_half", False)))


class ToMeEvaBlock(_ToMeEvaBlockBase):
    """timm ``EvaBlock`` (pre-norm, optional LayerScale ``gamma_1``/``gamma_2``) with a merge."""

    def _tome_attn_branch(
        self, x: torch.Tensor, bias: Optional[torch.Tensor], rope: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        out, metric = call_attention(self.attn, self.norm1(x), bias, rope=rope)
        if self.gamma_1 is not None:
            out = self.gamma_1 * out
        return self.drop_path1(out), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            out = self.gamma_2 * out
        return self.drop_path2(out)


class ToMeEvaBlockPostNorm(_ToMeEvaBlockBase):
    """timm ``EvaBlockPostNorm`` (norm after each branch) with a merge."""

    def _tome_attn_branch(
        self, x: torch.Tensor, bias: Optional[torch.Tensor], rope: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        out, metric = call_attention(self.attn, x, bias, rope=rope)
        return self.drop_path1(self.norm1(out)), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.norm2(self.mlp(x)))


# ----------------------------------------------------------------------------- the model


class ToMeEva(ToMeTimmHead):
    """timm ``Eva`` whose blocks merge tokens and carry the merged tokens' rotary positions.

    ``forward_features`` returns the merged tokens with their sizes attached, so
    ``forward_head`` pools exactly those (size-weighted); ``forward_intermediates``
    maps every intermediate back to the patch grid.
    """

    def _tome_blocks(self) -> Sequence[nn.Module]:
        return list(self.blocks)

    def _tome_full_tokens(self) -> Optional[int]:
        if self.dynamic_img_size:
            return None
        return self.patch_embed.num_patches + self.num_prefix_tokens

    def _tome_embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Tuple[int, int]]:
        """Patch embedding, positions and pre-norm, as ``Eva`` does them; also the patch grid."""
        x = self.patch_embed(images)
        if self.dynamic_img_size and isinstance(x, torch.fx.Proxy) and self.rope is not None and any(self._tome_schedule()):
            raise TypeError(
                "torch.fx cannot trace a merging Eva built with dynamic_img_size=True: the patch grid, and so the "
                "rotary positions merged tokens carry, depend on the input's shape. Build it with "
                "dynamic_img_size=False for a fixed size, set model.r = 0, or use torch.compile / torch.export"
            )
        grid = (int(x.shape[1]), int(x.shape[2])) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x, rope = self._pos_embed(x)
        return self.norm_pre(x), rope, grid  # type: ignore[return-value]

    def _tome_positions(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """``(batch, tokens, head_dim // 2)`` rotary angles of every token (zeros for the prefix)."""
        refuse_position_augmentation(self)  # type: ignore[arg-type]
        return token_angles(rope_angles(self.rope, grid).to(x.device), self.num_prefix_tokens, x.shape[0])

    def _tome_encode(
        self, images: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, **options: Any
    ) -> Tuple[torch.Tensor, ToMeState]:
        # attn_mask is always None here: _tome_masked refuses masks while merging.
        x, rope, grid = self._tome_embed(images)
        positions = None
        if rope is not None:
            angles = functools.partial(self._tome_positions, grid=grid)
            positions = RotaryPositions(angles, self._tome_info["rope_position"])
        return self._tome_run(x, self.grad_checkpointing, positions=positions, block_kwargs={"rope": rope}, **options)

    def _tome_masked(self, attn_mask: Optional[torch.Tensor], is_causal: bool) -> bool:
        """Whether to run timm's own code for a masked call; refuses masks while merging."""
        if isinstance(attn_mask, torch.fx.Proxy) or isinstance(is_causal, torch.fx.Proxy):
            # torch.fx symbolic tracing hands placeholders for the defaults: a merging graph takes no mask.
            return not any(self._tome_schedule())
        if attn_mask is None and not is_causal:
            return False
        if any(self._tome_schedule()):
            raise ValueError(_MASK_REFUSAL)
        return True

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` with merging carried through the blocks.

        Each intermediate is mapped back to one row per patch (every patch takes the
        features of the token that holds it), so ``NCHW`` maps have the patch grid's
        shape, as without merging. The final features (unless ``intermediates_only``)
        stay merged, with their sizes attached for ``forward_head``.
        """
        if not any(self._tome_schedule()) or self._tome_masked(attn_mask, is_causal):
            return super().forward_intermediates(  # type: ignore[misc]
                x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm, stop_early=stop_early,
                output_fmt=output_fmt, intermediates_only=intermediates_only, attn_mask=attn_mask,
                is_causal=is_causal,
            )
        return self._tome_intermediates(x, attn_mask, indices, norm, stop_early, output_fmt, intermediates_only,
                                        False, return_prefix_tokens)

    def _tome_pools_patches(self) -> bool:
        """Whether the head reads more than the (protected) class token."""
        return not (self.attn_pool is None and self.global_pool in ("token", ""))

    def _tome_pool(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        if self.attn_pool is not None:
            # Eva's attention pool reads every token, prefix included: each key counts once per patch.
            return self.attn_pool(x, attn_mask=size_bias(size, x.dtype))
        return pool_tokens(x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :], self.global_pool)


# ----------------------------------------------------------------------------- checks and registration

_BLOCK_MIXINS = {"EvaBlock": ToMeEvaBlock, "EvaBlockPostNorm": ToMeEvaBlockPostNorm}


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` unless every part of ``model`` can be run exactly with merging."""
    from timm.models import eva as timm_eva

    check_family(model, "eva", is_timm_eva, "a timm Eva (timm.models.eva)")
    own = original_class(model)
    methods = ("forward_features", "forward", "forward_head", "forward_intermediates", "_pos_embed", "pool")
    check_own_methods(model, timm_eva.Eva, methods)
    if model.global_pool not in _SUPPORTED_POOLS:
        raise TypeError(f"{own.__name__} uses global_pool={model.global_pool!r}; supported: {_SUPPORTED_POOLS}")
    check_attention_pool(model)
    if getattr(model, "rope_mixed", False) or (model.rope is not None and type(model.rope).__name__ not in _SUPPORTED_ROPES):
        raise TypeError(
            f"{own.__name__} uses rotary embedding {type(model.rope).__name__}; ToMe supports {_SUPPORTED_ROPES} "
            "(per-layer learned 'mixed' and 'mrope' frequencies are not supported)"
        )
    for index, block in enumerate(model.blocks):
        block_cls = original_class(block)
        if block_cls not in (timm_eva.EvaBlock, timm_eva.EvaBlockPostNorm):
            raise TypeError(f"{own.__name__}.blocks[{index}] is a {block_cls.__name__}; ToMe supports timm's "
                            "EvaBlock and EvaBlockPostNorm")
        if original_class(block.attn) is not timm_eva.EvaAttention:
            raise TypeError(
                f"{own.__name__}.blocks[{index}].attn is a {original_class(block.attn).__name__}; ToMe supports "
                "timm's EvaAttention (attn_type='rope', used by the PE models, is not supported)"
            )


@dataclass
class RopeSettings(ToMeSettings):
    """The settings of the rotary families (timm Eva, NaFlexViT, Hugging Face DINOv3):
    those of :class:`tome.patch.ToMeSettings` and two for rotary positions.

    Args:
        rope_position: A merged token's rotary position: ``"mean"`` (size-weighted mean
            of its patches' coordinates) or ``"destination"`` (the position of the token
            the others merged into).
        rope_metric: The keys the matching compares: ``"rotated"`` (after the rotation,
            as attention compares them; the default, measured better) or ``"plain"``
            (before it). ``docs/backbones.md`` has the measurements.
    """

    rope_position: str = field(default="mean", metadata={"choices": POSITION_RULES})
    rope_metric: str = field(default=DEFAULT_ROPE_METRIC, metadata={"choices": ROPE_METRICS})

    def validate(self) -> None:
        super().validate()
        check_choice("rope_position", self.rope_position, POSITION_RULES)
        check_choice("rope_metric", self.rope_metric, ROPE_METRICS)


def rope_setting_properties(model_mixin: type) -> None:
    """Give a rotary family's model mixin the ``rope_position`` and ``rope_metric`` properties."""
    for name in ("rope_position", "rope_metric"):
        setattr(model_mixin, name, setting(name, f"The ``{name}`` setting (see :class:`RopeSettings`); setting "
                                                 "it re-patches with only this setting changed."))


def eva(model: nn.Module, trace_source: bool = KEEP, prop_attn: Optional[bool] = KEEP, **settings: Any) -> nn.Module:
    """Patch a timm ``Eva`` (DINOv3, EVA-02, RoPE ViTs) in place to merge tokens; set ``model.r`` after.

    Called on a patched model, it changes only the settings given.

    Args:
        model: A ``timm.models.eva.Eva``.
        trace_source: Track which original patches each token contains; read
            ``tome.last_forward(model).source`` after a forward.
        prop_attn: Proportional attention (``log(size)`` added to attention logits);
            None: the default rule (on: :func:`tome.patch.default_prop_attn`).
        **settings: ``rope_position``, ``rope_metric``, ``r`` and ``method``
            (:class:`RopeSettings`).

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model or one of its parts is not something ToMe can run exactly.
        ValueError: for an unknown setting or an invalid value (``rope_position``, ``rope_metric``, ...).
    """
    return configure(model, family="eva", caller="tome.patch.eva", trace_source=trace_source, prop_attn=prop_attn,
                     **settings)


def _patch(model: nn.Module, settings: RopeSettings) -> nn.Module:
    check_supported(model)
    attn_mixin = ToMeEvaAttention if settings.rope_metric == "rotated" else ToMeEvaAttentionPlainKeys
    return patch_model(
        model,
        ToMeEva,
        list(model.blocks),
        lambda block: _BLOCK_MIXINS[original_class(block).__name__],
        attention=lambda block: (block.attn, attn_mixin),
        settings=settings,
        protected_tokens=model.num_prefix_tokens,
        class_token=model.cls_token is not None,
    )


rope_setting_properties(ToMeEva)
register(FamilySpec(
    name="eva",
    detector=is_timm_eva,
    patch=_patch,
    settings=RopeSettings,
    priority=20,
    exports=True,
    traceable=True,
    examples=lambda: (
        # A fixed image size: torch.fx follows a merging Eva only then (tests/patch/test_tracing.py).
        Example("dinov3", tiny_timm("vit_small_patch16_dinov3", dynamic_img_size=False), example_images,
                requires=("timm",)),
        Example("eva02", tiny_timm("eva02_tiny_patch14_224", ref_feat_shape=(4, 4)), example_images,
                requires=("timm",), exports=False),  # exports as "dinov3" does (tested once, to keep it fast)
    ),
))
