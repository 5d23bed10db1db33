"""ToMe for timm ``NaFlexVit`` (``timm.models.naflexvit``): variable resolution and aspect ratio.

NaFlex models take a batch of images of different sizes as one padded sequence of
patches (``patches`` ``(batch, patches, patch_size**2 * channels)``, ``patch_coord``
``(batch, patches, 2)`` and a validity mask ``patch_valid`` ``(batch, patches)``),
or plain images ``(batch, channels, height, width)``. Blocks are timm's ``Block``
(the ``naflexvit_*`` models) or ``EvaBlock`` with rotary embeddings (Eva models
built with ``use_naflex=True``, e.g. DINOv3).

While merging, ``patch_valid`` (or a key-padding ``attn_mask``) is carried as token
sizes: padding tokens have size 0, so they add nothing to merged tokens, pools or
attention. In each block a sample merges exactly the pairs of real tokens it would
merge were it run alone, by any merge method (the ``valid`` mask of the matchers in
``tome.merge``), and its real
tokens stay in front of its padding, in the order they would have alone; so each
sample's output in a padded batch equals its output run alone, as long as its real
tokens allow the block's r (r at most half its real, non-prefix tokens). A sample
with fewer real tokens merges all of its real tokens of set A it can, and the rest
of r comes out of its padding (which costs it nothing); its output then differs
from its run alone, where r would be capped lower.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv 2210.09461);
Dehghani et al., "Patch n' Pack: NaViT", NeurIPS 2023 (arXiv 2307.06304).
"""

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import check_attention_pool, check_family, check_own_methods, has_class, refuse_position_augmentation
from ._eva import (
    RopeSettings,
    ToMeEvaAttention,
    ToMeEvaAttentionPlainKeys,
    ToMeEvaBlock,
    rope_angles,
    rope_setting_properties,
)
from ._lifecycle import (
    KEEP,
    Example,
    FamilySpec,
    ToMeModelMixin,
    configure,
    example_images,
    original_class,
    patch_model,
    register,
)
from ._rope import RotaryPositions, token_angles
from ._shared import ToMeState, padding_bias
from ._timm import (
    ToMeTimmAttention,
    ToMeTimmBlock,
    ToMeTimmResPostBlock,
    key_padding_from_attn_mask,
    pack_intermediates,
    pool_tokens,
    run_intermediates,
    tiny_timm,
)

__all__ = ["naflexvit", "is_timm_naflexvit"]

_SUPPORTED_ROPES = ("RotaryEmbeddingDinoV3", "RotaryEmbeddingCat")


def is_timm_naflexvit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``NaFlexVit`` (checked by class name and module; timm is not imported)."""
    return has_class(model, "NaFlexVit", "timm.models.naflexvit")


def _unpack(x: Any, patch_coord: Any, patch_valid: Any, attn_mask: Any) -> Tuple[Any, Any, Any, Any]:
    """NaFlexVit's inputs: a NaFlex collator dict takes priority over the keyword arguments."""
    if isinstance(x, dict):
        return x["patches"], x.get("patch_coord", patch_coord), x.get("patch_valid", patch_valid), x.get("attn_mask", attn_mask)
    return x, patch_coord, patch_valid, attn_mask


class ToMeNaFlexVit(ToMeModelMixin):
    """timm ``NaFlexVit`` whose blocks merge tokens; padding carried as size-0 tokens.

    ``forward_features`` returns the merged tokens with their sizes attached (in NaFlex
    mode the dict's ``patch_valid`` marks which merged tokens hold real patches), so
    ``forward_head`` pools exactly those, weighted by size.
    """

    def _tome_blocks(self) -> Sequence[nn.Module]:
        return list(self.blocks)

    def _tome_run_naflex(
        self,
        patches: torch.Tensor,
        patch_coord: Optional[torch.Tensor],
        patch_valid: Optional[torch.Tensor],
        attn_mask: Optional[torch.Tensor],
        *,
        stop_after: Optional[int] = None,
        trace_source: Optional[bool] = None,
        after_block: Any = None,
    ) -> Tuple[torch.Tensor, ToMeState]:
        """Embeddings and blocks, merging on the schedule; returns the last tokens and state."""
        refuse_position_augmentation(self)  # type: ignore[arg-type]
        # patch_valid=None: the embedding step builds no (batch, tokens, tokens) mask we would not use.
        embeds = self._forward_embeds(patches, patch_coord=patch_coord, patch_valid=None, attn_mask=None)
        x, rope = embeds["patches"], embeds["rope_embeds"]
        padding = self._tome_padding(patch_valid, attn_mask, *x.shape[:2])
        positions = None
        if rope is not None:
            angles = functools.partial(self._tome_positions, patches=patches, patch_coord=patch_coord)
            positions = RotaryPositions(angles, self._tome_info["rope_position"])
        return self._tome_run(x, self.grad_checkpointing, stop_after=stop_after, trace_source=trace_source,
                              after_block=after_block, padding=padding, positions=positions,
                              block_kwargs=None if rope is None else {"rope": rope})

    def _tome_padding(
        self, patch_valid: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor], batch: int, tokens: int
    ) -> Optional[torch.Tensor]:
        """``(batch, tokens, 1)`` first-block sizes (0 for padding) from ``patch_valid`` and
        a key-padding ``attn_mask``; None when every token is real."""
        padding = None if attn_mask is None else key_padding_from_attn_mask(attn_mask, batch, tokens)
        if patch_valid is not None:
            prefix = patch_valid.new_ones(batch, self.num_prefix_tokens, dtype=torch.bool)
            valid = torch.cat([prefix, patch_valid.bool()], dim=1)
            if tuple(valid.shape) != (batch, tokens):
                raise ValueError(f"patch_valid of shape {tuple(patch_valid.shape)} does not cover the "
                                 f"{tokens - self.num_prefix_tokens} patches of each of the {batch} samples")
            if not bool(valid.all()):
                valid = valid.to(torch.float32).unsqueeze(-1)
                padding = valid if padding is None else padding * valid
        return padding

    def _tome_positions(
        self, x: torch.Tensor, patches: torch.Tensor, patch_coord: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """``(batch, tokens, head_dim // 2)`` rotary angles of every token: each sample's own
        grid, in row-major order, as timm lays out its rotary table (zeros for the prefix
        and for padding)."""
        prefix = self.num_prefix_tokens
        if patch_coord is None:
            grid = self.embeds.dynamic_feat_size(tuple(patches.shape[-2:]))
            return token_angles(rope_angles(self.rope, grid).to(x.device), prefix, x.shape[0])
        from timm.models.naflexvit import calculate_naflex_grid_sizes

        grids = calculate_naflex_grid_sizes(patch_coord)
        tables: Dict[Tuple[int, int], torch.Tensor] = {}
        rows = []
        for grid in grids:
            if grid not in tables:
                tables[grid] = rope_angles(self.rope, grid).to(x.device)
            table = tables[grid]
            row = table.new_zeros(x.shape[1], table.shape[1])
            row[prefix : prefix + table.shape[0]] = table
            rows.append(row)
        return torch.stack(rows)

    # ------------------------------------------------------------------------- forward methods

    def forward(
        self,
        x: Union[torch.Tensor, Dict[str, torch.Tensor]],
        patch_coord: Optional[torch.Tensor] = None,
        patch_valid: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not any(self._tome_schedule()):
            return super().forward(x, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask)  # type: ignore[misc]
        patches, patch_coord, patch_valid, attn_mask = _unpack(x, patch_coord, patch_valid, attn_mask)
        if isinstance(x, dict) or patch_coord is not None:
            if patch_coord is None or patch_valid is None:
                raise ValueError("NaFlex inputs need patch_coord and patch_valid (as timm's NaFlexVit requires)")
        features = self.forward_features(patches, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask)
        if isinstance(features, dict):
            return self.forward_head(**features)
        return self.forward_head(features)

    def forward_features(
        self,
        patches: torch.Tensor,
        patch_coord: Optional[torch.Tensor] = None,
        patch_valid: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        if not any(self._tome_schedule()):
            return super().forward_features(patches, patch_coord=patch_coord, patch_valid=patch_valid,  # type: ignore[misc]
                                            attn_mask=attn_mask)
        x, state = self._tome_run_naflex(patches, patch_coord, patch_valid, attn_mask)
        x = self._tome_tag(self.norm(x), state.size)
        if patch_coord is None:
            return x
        # Which merged (non-prefix) tokens hold real patches, for timm-style consumers of the dict.
        valid = None if state.size is None else state.size[:, self.num_prefix_tokens :, 0] > 0
        return {"patches": x, "patch_valid": valid}

    def forward_head(
        self, patches: torch.Tensor, pre_logits: bool = False, patch_valid: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        size = self._tome_sizes_of(patches) if self._tome_pools_patches() else None
        if size is None:
            return super().forward_head(patches, pre_logits=pre_logits, patch_valid=patch_valid)  # type: ignore[misc]
        x = self._tome_pool(patches, size)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def _tome_pools_patches(self) -> bool:
        """Whether the head reads more than the (protected) prefix tokens."""
        return not (self.attn_pool is None and self.global_pool in ("token", ""))

    def _tome_pool(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens :], size[:, self.num_prefix_tokens :]
        if self.attn_pool is not None:
            # Every key counts once per patch it stands for; padding (size 0) not at all.
            return self.attn_pool(x, attn_mask=padding_bias(size, x.dtype))
        return pool_tokens(x, size, self.global_pool)

    def forward_intermediates(
        self,
        x: Union[torch.Tensor, Dict[str, torch.Tensor]],
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        patch_coord: Optional[torch.Tensor] = None,
        patch_valid: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Any:
        """timm's ``forward_intermediates`` with merging carried through the blocks.

        Each intermediate is mapped back to one row per input patch (every patch takes
        the features of the token that holds it; padding patches those of a padding
        token), so NaFlex (dict) inputs give ``NLC`` rows aligned with ``patch_valid``
        and images give ``NCHW`` maps of the patch grid, as without merging. The final
        features (unless ``intermediates_only``) stay merged, sizes attached.
        """
        if not any(self._tome_schedule()):
            return super().forward_intermediates(  # type: ignore[misc]
                x, indices, return_prefix_tokens=return_prefix_tokens, norm=norm, stop_early=stop_early,
                output_fmt=output_fmt, intermediates_only=intermediates_only, output_dict=output_dict,
                patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask,
            )
        if isinstance(x, dict) and output_fmt == "NCHW":
            raise ValueError('output_fmt="NCHW" is not supported for NaFlex (dict) inputs (per-sample grids '
                             'vary), use "NLC"')
        patches, patch_coord, patch_valid, attn_mask = _unpack(x, patch_coord, patch_valid, attn_mask)
        run = functools.partial(self._tome_run_naflex, patches, patch_coord, patch_valid, attn_mask)
        intermediates, features = run_intermediates(self, run, indices, norm, stop_early, output_fmt, intermediates_only)
        grid = self.embeds.dynamic_feat_size(tuple(patches.shape[-2:])) if output_fmt == "NCHW" else None
        extra = {"patch_valid": patch_valid} if patch_valid is not None else None
        return pack_intermediates(intermediates, self.num_prefix_tokens, grid, features, output_dict,
                                  return_prefix_tokens, extra)


# ----------------------------------------------------------------------------- checks and registration


def _block_mixins() -> Dict[type, type]:
    from timm.models import eva as timm_eva
    from timm.models import vision_transformer as vt

    return {vt.Block: ToMeTimmBlock, vt.ResPostBlock: ToMeTimmResPostBlock, timm_eva.EvaBlock: ToMeEvaBlock}


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` unless every part of ``model`` can be run exactly with merging."""
    from timm.layers.attention import Attention
    from timm.models import eva as timm_eva
    from timm.models import naflexvit as timm_naflex

    check_family(model, "naflexvit", is_timm_naflexvit, "a timm NaFlexVit (timm.models.naflexvit)")
    own = original_class(model)
    methods = ("forward_features", "forward", "forward_head", "forward_intermediates", "_forward_embeds", "_pool")
    check_own_methods(model, timm_naflex.NaFlexVit, methods)
    check_attention_pool(model)
    if model.rope is not None and (model.rope_is_mixed or type(model.rope).__name__ not in _SUPPORTED_ROPES):
        raise TypeError(f"{own.__name__} uses rotary embedding {type(model.rope).__name__}; ToMe supports "
                        f"{_SUPPORTED_ROPES} (rope_type 'axial' and 'dinov3'; not 'mixed' or 'mrope')")
    mixins = _block_mixins()
    for index, block in enumerate(model.blocks):
        block_cls = original_class(block)
        if block_cls not in mixins:
            raise TypeError(f"{own.__name__}.blocks[{index}] is a {block_cls.__name__}; ToMe supports timm's Block, "
                            "ResPostBlock and EvaBlock (parallel and differential-attention blocks are not supported)")
        wanted = timm_eva.EvaAttention if block_cls is timm_eva.EvaBlock else Attention
        if original_class(block.attn) is not wanted:
            raise TypeError(f"{own.__name__}.blocks[{index}].attn is a {original_class(block.attn).__name__}; ToMe "
                            f"supports {wanted.__name__} in a {block_cls.__name__} (attn_type='rope' is not supported)")


def naflexvit(
    model: nn.Module, trace_source: bool = KEEP, prop_attn: Optional[bool] = KEEP, **settings: Any
) -> nn.Module:
    """Patch a timm ``NaFlexVit`` in place to merge tokens; set ``model.r`` after.

    Padded NaFlex batches (``patch_valid``) merge per sample: padding never merges
    with real tokens and never counts in a merged token's size, and each sample's
    output equals its output run alone while its real tokens allow r (module docstring).
    Called on a patched model, it changes only the settings given.

    Args:
        model: A ``timm.models.naflexvit.NaFlexVit`` (``naflexvit_*``, or an Eva model
            built with ``use_naflex=True``).
        trace_source: Track which original patches each token contains; read
            ``tome.last_forward(model).source`` after a forward.
        prop_attn: Proportional attention (``log(size)`` added to attention logits;
            paper, Sec. 3); None: the default rule (on: :func:`tome.patch.default_prop_attn`).
        **settings: ``rope_position`` and ``rope_metric`` for models with rotary embeddings,
            as in :func:`tome.patch.eva`, ``r`` and ``method`` (:class:`tome.patch.RopeSettings`).

    Returns:
        The same model, patched. ``model.r`` starts at 0 (no merging).

    Raises:
        TypeError: if the model or one of its parts is not something ToMe can run exactly.
        ValueError: for an unknown setting or an invalid value (``rope_position``, ``rope_metric``, ...).
    """
    return configure(model, family="naflexvit", caller="tome.patch.naflexvit", trace_source=trace_source,
                     prop_attn=prop_attn, **settings)


def _patch(model: nn.Module, settings: RopeSettings) -> nn.Module:
    check_supported(model)
    from timm.models import eva as timm_eva

    eva_attn = ToMeEvaAttention if settings.rope_metric == "rotated" else ToMeEvaAttentionPlainKeys
    mixins = _block_mixins()
    return patch_model(
        model,
        ToMeNaFlexVit,
        list(model.blocks),
        lambda block: mixins[original_class(block)],
        attention=lambda block: (block.attn, eva_attn if original_class(block) is timm_eva.EvaBlock else ToMeTimmAttention),
        settings=settings,
        protected_tokens=model.num_prefix_tokens,
        class_token=bool(model.has_class_token),
    )


_GRIDS = ((4, 4), (3, 3), (2, 5))  # patches per sample of the example batches: 16, 9 and 10, padded to 16


def _padded_batch(batch: int, seed: int) -> Dict[str, torch.Tensor]:
    """A NaFlex batch of 8 x 8-pixel patches as timm's collator lays it out: each sample's
    patches in row-major order, then padding (``patch_valid`` False)."""
    generator = torch.Generator().manual_seed(seed)
    patches = torch.zeros(batch, 16, 8 * 8 * 3)
    coord = torch.zeros(batch, 16, 2, dtype=torch.long)
    valid = torch.zeros(batch, 16, dtype=torch.bool)
    for index in range(batch):
        height, width = _GRIDS[index % len(_GRIDS)]
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        patches[index, : height * width] = torch.randn(height * width, 8 * 8 * 3, generator=generator)
        coord[index, : height * width] = torch.stack([rows, cols], dim=-1).reshape(-1, 2)
        valid[index, : height * width] = True
    return {"x": patches, "patch_coord": coord, "patch_valid": valid}


rope_setting_properties(ToMeNaFlexVit)
register(FamilySpec(
    name="naflexvit",
    detector=is_timm_naflexvit,
    patch=_patch,
    settings=RopeSettings,
    priority=20,
    exports=True,
    examples=lambda: (
        Example("siglip_images", tiny_timm("naflexvit_base_patch16_siglip"), example_images, requires=("timm",)),
        # timm's NaFlex embedding of padded batches is compiled with a graph break (torch.compiler.disable)
        # and does not export (its sizes depend on the data): unpatched either.
        Example("gap_padded", tiny_timm("naflexvit_base_patch16_gap"), _padded_batch, requires=("timm",),
                fullgraph=False, exports=False),
        Example("dinov3_padded", tiny_timm("vit_small_patch16_dinov3", use_naflex=True), _padded_batch,
                requires=("timm",), fullgraph=False, exports=False),
    ),
))
