"""ToMe for timm Vision Transformers (``timm.models.vision_transformer`` and ``deit``).

Handles everything a timm >= 1.0 ``VisionTransformer`` can be built with that
ToMe can run exactly: LayerScale, qk-norm, attention output norm and gate,
class/register/distillation prefix tokens, models without a class token,
``token``/``avg``/``max``/``avgmax``/``map`` pooling, ``dynamic_img_size``,
gradient checkpointing, fused or explicit attention. Anything else is refused
with a ``TypeError`` at patch time.
"""


import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._dense import unmerge_tokens
from ._attention_body import attend, packed_heads
from ._checks import check_attention_pool, check_family, check_own_methods, has_class
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ToMeAttentionMixin,
    ToMeBlockMixin,
    ToMeModelMixin,
    ToMeSettings,
    call_attention,
    configure,
    example_images,
    in_parent_module,
    original_class,
    patch_model,
    register,
)
from ._shared import ATTENTION_FEATURES, AttentionCall, ToMeState, padding_bias, weighted_mean

__all__ = ["timm", "apply_to_timm", "is_timm_vit", "is_timm_mae", "tiny_timm"]

_SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "", "map")


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (checked by class, timm not imported otherwise)."""
    return has_class(model, "VisionTransformer", "timm.models.vision_transformer")


class ToMeTimmAttention(ToMeAttentionMixin):
    """timm ``Attention`` that adds a ``log(size)`` bias and reports the mean key when asked."""

    _tome_features = ATTENTION_FEATURES

    def _tome_attention(self, x: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = packed_heads(self.qkv(x), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = self.norm(attend(call, q, k, v, dropout_p=dropout_p, scale=self.scale, fused=self.fused_attn))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class ToMeTimmBlock(ToMeBlockMixin):
    """timm ``Block`` (pre-norm) with a merge between attention and MLP."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        out, metric = call_attention(self.attn, self.norm1(x), bias)
        return self.drop_path1(self.ls1(out)), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ToMeTimmResPostBlock(ToMeBlockMixin):
    """timm ``ResPostBlock`` (norm after each branch) with a merge between attention and MLP."""

    def _tome_attn_branch(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        out, metric = call_attention(self.attn, x, bias)
        return self.drop_path1(self.norm1(out)), metric

    def _tome_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.norm2(self.mlp(x)))


_CAUSAL_REFUSAL = (
    "is_causal=True cannot be combined with token merging (r > 0): a merged token stands for patches "
    "before and after others. Set model.r = 0 to run causally."
)


def key_padding_from_attn_mask(attn_mask: torch.Tensor, batch: int, tokens: int) -> Optional[torch.Tensor]:
    """A timm ``attn_mask`` as first-block token sizes, when it is a key-padding mask.

    timm's attention takes a boolean mask (True = attend) or an additive float mask
    (0 = attend; ``-inf``, or any value at most -1e4, = masked) broadcastable
    to ``(batch, heads, tokens, tokens)``. ToMe can merge with a mask whose every real
    query attends to the same set of keys, the real tokens: ``(batch, 1, 1, tokens)``
    (key-only) or ``(batch, 1, tokens, tokens)`` with ``valid_q & valid_k``
    (symmetric; what timm's NaFlex ``create_attention_mask`` builds). Rows of padding
    queries are not looked at.

    Args:
        attn_mask: The mask, 2-D to 4-D.
        batch, tokens: Batch size and tokens entering the first block (prefix included).

    Returns:
        ``(batch, tokens, 1)`` float32, 1 for real tokens and 0 for padding; None when
        the mask masks nothing (then the model runs as without it).

    Raises:
        ValueError: naming the mask's shape or values when it is not such a mask
            (causal, block-diagonal, or a float bias other than 0 / masked).
    """
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() < 2 or attn_mask.dim() > 4:
        raise ValueError(f"attn_mask of shape {shape} is not a timm attention mask (2-D to 4-D, broadcastable to "
                         f"(batch={batch}, heads, {tokens}, {tokens}))")
    if attn_mask.dtype == torch.bool:
        allowed = attn_mask
    else:
        # -1e4 and below give a softmax weight of exactly 0 in float32: masked, however it is written.
        blocked = attn_mask <= -1e4
        if not bool(((attn_mask == 0) | blocked).all()):
            raise ValueError(
                f"attn_mask (float, shape {shape}) holds additive biases other than 0 and -inf; ToMe can merge "
                "tokens only with a key-padding mask (0 = attend, -inf or <= -1e4 = padding). Set model.r = 0 to use this mask."
            )
        allowed = ~blocked
    allowed = allowed.reshape((1,) * (4 - allowed.dim()) + shape)
    try:
        allowed = allowed.expand(batch, allowed.shape[1], allowed.shape[2], tokens)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to (batch={batch}, heads, {tokens}, "
                         f"{tokens}) (prefix tokens included)") from None
    if allowed.shape[2] not in (1, tokens):
        raise ValueError(f"attn_mask of shape {shape} has {allowed.shape[2]} query rows; expected 1 or {tokens}")
    valid = allowed.any(dim=2).any(dim=1)  # (batch, tokens): keys some query attends to
    rows = valid[:, None, :, None] if allowed.shape[2] == tokens else True  # rows of padding queries: anything
    if bool(((allowed != valid[:, None, None, :]) & rows).any()):
        raise ValueError(
            f"attn_mask of shape {shape} is not a key-padding mask (real queries attend to different sets of keys, "
            "e.g. a causal or block-diagonal mask); ToMe can merge tokens only with a key-padding mask "
            "((batch, 1, 1, tokens), or (batch, 1, tokens, tokens) masking padding rows and columns). "
            "Set model.r = 0 to use this mask."
        )
    if bool(valid.all()):
        return None
    return valid.to(torch.float32).unsqueeze(-1)


class ToMeTimmHead(ToMeModelMixin):
    """The forward, features and head of a timm model whose blocks merge (ViT, Eva).

    ``forward_features`` returns the merged tokens with their sizes attached, so
    ``forward_head`` pools exactly those, weighted by size. A family supplies
    ``_tome_masked``, ``_tome_encode``, ``_tome_pools_patches`` and ``_tome_pool``.
    """

    def _tome_encode(
        self, images: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, **options: Any
    ) -> Tuple[torch.Tensor, ToMeState]:
        """Images through the embedding and the blocks, merging on the schedule: the tokens
        after the last block run and the final state. ``options``: ``_tome_run``'s."""
        raise NotImplementedError

    def _tome_features(
        self, images: torch.Tensor, attn_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x, state = self._tome_encode(images, attn_mask)
        return self.norm(x), state.size

    def _tome_intermediates(
        self, images: torch.Tensor, attn_mask: Optional[torch.Tensor], indices: Optional[Union[int, List[int]]],
        norm: bool, stop_early: bool, output_fmt: str, intermediates_only: bool, output_dict: bool,
        return_prefix_tokens: bool,
    ) -> Any:
        """The merging ``forward_intermediates``: intermediates on the patch grid, features merged."""
        run = functools.partial(self._tome_encode, images, attn_mask)
        intermediates, features = run_intermediates(self, run, indices, norm, stop_early, output_fmt, intermediates_only)
        grid = self.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])) if output_fmt == "NCHW" else None
        return pack_intermediates(intermediates, self.num_prefix_tokens, grid, features, output_dict,
                                  return_prefix_tokens)

    def forward_features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if self._tome_masked(attn_mask, is_causal):
            return self._tome_tag(super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal), None)  # type: ignore[misc]
        return self._tome_tag(*self._tome_features(x, attn_mask))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._tome_head(x, self._tome_sizes_of(x) if self._tome_pools_patches() else None, pre_logits)

    @in_parent_module  # so torch.fx finds timm's do-not-trace functions as it does unpatched
    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        return self._tome_forward(x, attn_mask, is_causal)

    def _tome_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        if self._tome_masked(attn_mask, is_causal):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        return self._tome_head(*self._tome_features(x, attn_mask), False)

    def _tome_head(self, x: torch.Tensor, size: Optional[torch.Tensor], pre_logits: bool) -> torch.Tensor:
        # Nothing merged, or a head that only reads prefix tokens: the model's own head is exact.
        if size is None or not self._tome_pools_patches():
            return super().forward_head(x, pre_logits=pre_logits)  # type: ignore[misc]
        x = self._tome_pool(x, size)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def run_intermediates(
    model: nn.Module,
    run: Callable[..., Tuple[torch.Tensor, ToMeState]],
    indices: Optional[Union[int, List[int]]],
    norm: bool,
    stop_early: bool,
    output_fmt: str,
    intermediates_only: bool,
) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """The merging part of a timm model's ``forward_intermediates``.

    Args:
        model: The patched model (``blocks``, ``norm``).
        run: ``run(stop_after=, trace_source=, after_block=) -> (tokens, state)``: the
            model's embedding and block loop (``ToMeModelMixin._tome_run`` or a caller of it).
        indices, norm, stop_early, output_fmt, intermediates_only: As in timm.

    Returns:
        The output of every block in ``indices`` (normed by ``model.norm`` if ``norm``)
        mapped back to one row per original token, ``(batch, tokens before merging,
        channels)``, and the final features (merged, their sizes attached), or None
        for ``intermediates_only``.

    Raises:
        ValueError: for an ``output_fmt`` other than ``"NCHW"`` or ``"NLC"``.
    """
    from timm.models._features import feature_take_indices

    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    take_indices, max_index = feature_take_indices(len(model.blocks), indices)
    intermediates: List[torch.Tensor] = []

    def collect(index: int, tokens: torch.Tensor, state: ToMeState) -> None:
        if index in take_indices:
            tokens = model.norm(tokens) if norm else tokens
            intermediates.append(unmerge_tokens(tokens, state.group_index(tokens.shape[0], tokens.device)))

    x, state = run(stop_after=max_index if stop_early else None, trace_source=True, after_block=collect)
    return intermediates, None if intermediates_only else model._tome_tag(model.norm(x), state.size)


def pack_intermediates(
    intermediates: List[torch.Tensor],
    prefix: int,
    grid: Optional[Tuple[int, int]],
    features: Optional[torch.Tensor],
    output_dict: bool,
    return_prefix_tokens: bool,
    extra: Optional[Dict[str, Any]] = None,
) -> Any:
    """timm's ``forward_intermediates`` result from intermediates with one row per token.

    Args:
        intermediates: ``(batch, prefix + patches, channels)`` each, already on the patch grid.
        prefix: Prefix tokens leading each intermediate (split off as timm does).
        grid: ``(height, width)`` in patches for ``"NCHW"`` maps, None for ``"NLC"``.
        features: The final (merged) features, or None for ``intermediates_only``.
        output_dict, return_prefix_tokens: As in timm.
        extra: More entries of the dictionary output (before ``image_features``).
    """
    prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
    intermediates = [y[:, prefix:] for y in intermediates]
    if grid is not None:
        intermediates = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                         for y in intermediates]
    if output_dict:
        result: Dict[str, Any] = {"image_intermediates": intermediates}
        if prefix_tokens is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix_tokens
        result.update(extra or {})
        if features is not None:
            result["image_features"] = features
        return result
    if return_prefix_tokens and prefix_tokens is not None:
        intermediates = list(zip(intermediates, prefix_tokens))  # type: ignore[arg-type]
    return intermediates if features is None else (features, intermediates)


def _padding_of(attn_mask: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """First-block sizes from a key-padding ``attn_mask`` over the tokens ``x``; None for no mask
    (and under torch.fx, whose placeholder for the default stands for no mask)."""
    if attn_mask is None or isinstance(attn_mask, torch.fx.Proxy):
        return None
    return key_padding_from_attn_mask(attn_mask, x.shape[0], x.shape[1])


def pool_tokens(x: torch.Tensor, size: torch.Tensor, global_pool: str) -> torch.Tensor:
    """timm's ``"avg"``, ``"max"`` and ``"avgmax"`` pooling of ``(batch, tokens, channels)``, averages weighted by ``size``."""
    if global_pool == "avg":
        return weighted_mean(x, size)
    if global_pool == "max":
        return _masked_max(x, size)
    return 0.5 * (_masked_max(x, size) + weighted_mean(x, size))  # avgmax


def _masked_max(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Max over the tokens of ``x`` that are not padding (size 0)."""
    return torch.where(size > 0, x, torch.finfo(x.dtype).min).amax(dim=1)


class ToMeTimmVisionTransformer(ToMeTimmHead):
    """timm ``VisionTransformer`` whose blocks merge tokens; pooling weighted by size.

    ``forward_features`` returns the merged tokens with their sizes attached, so
    ``forward_head`` pools exactly those; ``forward_intermediates`` (and so
    ``get_intermediate_layers`` and ``features_only`` models) carries one state
    through the blocks and maps every intermediate back to the patch grid.
    """

    def _tome_blocks(self) -> Sequence[nn.Module]:
        return list(self.blocks)

    def _tome_full_tokens(self) -> Optional[int]:
        if self.dynamic_img_size or getattr(self.patch_embed, "num_patches", None) is None:
            return None
        return self.patch_embed.num_patches + self.num_prefix_tokens

    def _tome_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _tome_masked(self, attn_mask: Optional[torch.Tensor], is_causal: bool) -> bool:
        """Whether to run timm's own code for a masked call (nothing merges). While merging a
        key-padding ``attn_mask`` is carried as token sizes; ``is_causal`` is refused."""
        if isinstance(attn_mask, torch.fx.Proxy) or isinstance(is_causal, torch.fx.Proxy):
            # torch.fx symbolic tracing hands placeholders for the defaults: a merging graph
            # takes no mask (merged tokens would not line up with one).
            return not any(self._tome_schedule())
        if attn_mask is None and not is_causal:
            return False
        if not any(self._tome_schedule()):
            return True
        if is_causal:
            raise ValueError(_CAUSAL_REFUSAL)
        return False

    def _tome_encode(
        self, images: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, **options: Any
    ) -> Tuple[torch.Tensor, ToMeState]:
        x = self._tome_embed(images)
        return self._tome_run(x, self.grad_checkpointing, padding=_padding_of(attn_mask, x), **options)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Any:
        """timm's ``forward_intermediates`` with merging carried through the blocks.

        Each intermediate is mapped back to one row per patch (every patch takes
        the features of the token that holds it), so ``NCHW`` maps have the
        patch grid's shape and ``NLC`` lists one row per patch, as without
        merging. The final features (unless ``intermediates_only``) stay merged,
        with their sizes attached for ``forward_head``.
        """
        if not any(self._tome_schedule()) or self._tome_masked(attn_mask, is_causal):
            return super().forward_intermediates(  # type: ignore[misc]
                x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm, stop_early=stop_early,
                output_fmt=output_fmt, intermediates_only=intermediates_only, output_dict=output_dict,
                attn_mask=attn_mask, is_causal=is_causal,
            )
        return self._tome_intermediates(x, attn_mask, indices, norm, stop_early, output_fmt, intermediates_only,
                                        output_dict, return_prefix_tokens)

    def _tome_pools_patches(self) -> bool:
        """Whether the head reads more than the (protected) prefix tokens."""
        return not ((self.attn_pool is None and self.global_pool in ("token", "")) or hasattr(self, "dist_token"))

    def _tome_pool(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        if self.attn_pool is not None:
            # Attention pooling: every key counts once per patch it stands for (padding: not at all).
            return self.attn_pool(x, attn_mask=padding_bias(size, x.dtype))
        return pool_tokens(x, size, self.global_pool)


_BLOCK_MIXINS = {"Block": ToMeTimmBlock, "ResPostBlock": ToMeTimmResPostBlock}


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` unless every part of ``model`` can be run exactly with merging."""
    from timm.models import vision_transformer as vt

    check_family(model, "timm", is_timm_vit, "a timm VisionTransformer (vision_transformer.py, deit.py)")
    own = original_class(model)
    methods = ["forward_features", "forward", "forward_head", "forward_intermediates", "_pos_embed", "pool"]
    if own.__name__ == "VisionTransformerDistilled":  # its own head and position embedding for two prefix tokens
        methods = [method for method in methods if method not in ("forward_head", "_pos_embed")]
    hint = (
        " It looks like the MAE code base's ViT (boolean global_pool): use tome.patch.mae(model)."
        if isinstance(getattr(model, "global_pool", None), bool)
        else " Supported: timm's VisionTransformer and subclasses that keep its forward methods."
    )
    check_own_methods(model, vt.VisionTransformer, methods, hint)
    if model.global_pool not in _SUPPORTED_POOLS:
        raise TypeError(
            f"{own.__name__} uses global_pool={model.global_pool!r}, which ToMe cannot weight by token "
            f"size; supported: {_SUPPORTED_POOLS}"
        )
    check_attention_pool(model)
    check_blocks(model)


def check_blocks(model: nn.Module) -> None:
    """Raise ``TypeError`` unless every block and attention layer is one ToMe runs exactly."""
    from timm.layers.attention import Attention
    from timm.models import vision_transformer as vt

    own = original_class(model)
    for index, block in enumerate(model.blocks):
        block_cls = original_class(block)
        if block_cls not in (vt.Block, vt.ResPostBlock):
            raise TypeError(
                f"{own.__name__}.blocks[{index}] is a {block_cls.__name__}; ToMe supports timm Block and "
                "ResPostBlock (parallel and differential-attention blocks are not supported)"
            )
        if original_class(block.attn) is not Attention:
            raise TypeError(
                f"{own.__name__}.blocks[{index}].attn is a {type(block.attn).__name__}; ToMe supports "
                "timm's Attention (RoPE and other attention variants are not supported)"
            )


def apply_to_timm(model: nn.Module, settings: ToMeSettings, model_mixin: type) -> nn.Module:
    """Patch a checked timm ViT with ``model_mixin`` (used by the timm and MAE families)."""
    return patch_model(
        model,
        model_mixin,
        list(model.blocks),
        lambda block: _BLOCK_MIXINS[original_class(block).__name__],
        attention=lambda block: (block.attn, ToMeTimmAttention),
        settings=settings,
        protected_tokens=model.num_prefix_tokens,
        class_token=bool(getattr(model, "has_class_token", model.cls_token is not None)),
        distill_token=getattr(model, "dist_token", None) is not None,
    )


def is_timm_mae(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ViT carrying MAE weights (timm's ``.mae`` pretrained tags)."""
    if not is_timm_vit(model):
        return False
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = str(cfg.get("tag") or "")
    return "mae" in tag.split("_") or tag == "mae" or str(cfg.get("hf_hub_id") or "").endswith(".mae")


def timm(model: nn.Module, trace_source: bool = KEEP, prop_attn: Optional[bool] = KEEP, **settings: Any) -> nn.Module:
    """Patch a timm Vision Transformer in place to merge tokens; set ``model.r`` after.

    Called on a patched model, it changes only the settings given.

    Args:
        model: A ``timm.models.VisionTransformer`` (also DeiT, distilled DeiT,
            DeiT-III, DINOv2, register and class-token-free variants).
        trace_source: Track which original patches each token contains; read
            ``tome.last_forward(model).source`` after a forward.
        prop_attn: Proportional attention (``log(size)`` added to attention logits;
            paper, Sec. 3); None: the default rule (on, except for timm's MAE
            weights, ``.mae`` tags: :func:`tome.patch.default_prop_attn`).
        **settings: The other settings, ``r`` and ``method`` (:class:`tome.patch.ToMeSettings`).

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model, one of its blocks, attention layers or its pooling
            is not something ToMe can run exactly.
        ValueError: for an unknown setting or an invalid value.
    """
    return configure(model, family="timm", caller="tome.patch.timm", trace_source=trace_source,
                     prop_attn=prop_attn, **settings)


def _patch(model: nn.Module, settings: ToMeSettings) -> nn.Module:
    check_supported(model)
    return apply_to_timm(model, settings, ToMeTimmVisionTransformer)


_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def tiny_timm(architecture: str, **config: Any) -> Callable[[], nn.Module]:
    """A builder of a tiny random timm model (32 x 32 images, 8 x 8 patches, 2 blocks) for examples."""

    def build() -> nn.Module:
        from timm import create_model

        return create_model(architecture, pretrained=False, **{**_TINY, **config}).eval()

    return build


register(FamilySpec(
    name="timm",
    detector=is_timm_vit,
    patch=_patch,
    priority=20,
    exports=True,
    traceable=True,
    attention_features="timm Attention",
    examples=lambda: (
        Example("registers", tiny_timm("vit_tiny_patch16_224", reg_tokens=2, init_values=0.1), example_images,
                requires=("timm",)),
        Example("map", tiny_timm("vit_tiny_patch16_224", global_pool="map", qk_norm=True), example_images,
                requires=("timm",)),
    ),
))
