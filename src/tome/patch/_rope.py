"""Rotary positions of merged tokens, for every family with rotary embeddings.

Rotary embeddings (RoPE) rotate the queries and keys of the patch tokens by their
2-D position in every block. A token that stands for several patches needs a
position too. The rotary angles are linear in the patch coordinates, so a model's
run loop starts carrying the angles of every token in
:class:`~tome.patch._shared.ToMeState` (``positions``) when a block of the run
merges (:class:`RotaryPositions`), the state merges them like the features (by
default a merged token sits at the size-weighted mean of its patches' coordinates,
``rope_position="mean"``; ``"destination"`` keeps the position of the token the
others merged into), and each later block rotates with a table recomputed from the
merged tokens' angles with the model's own frequencies (RoPE is defined for any
real position). Until a block has merged, blocks use the model's own table, so
r = 0 is exact. Prefix tokens (class, registers) never merge and are never rotated.

Used by timm ``Eva`` and ``NaFlexVit`` (``_eva.py``, ``_naflex.py``) and
transformers ``DINOv3ViTModel`` (``_hf_dinov3.py``); ``docs/backbones.md`` has the
measurements behind the defaults.

Heo et al., "Rotary Position Embedding for Vision Transformer", ECCV 2024.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ._attention_body import attend
from ._lifecycle import ToMeAttentionMixin, ToMeBlockMixin
from ._shared import POSITION_RULES, AttentionCall, ToMeState

__all__ = [
    "DEFAULT_ROPE_METRIC",
    "ROPE_METRICS",
    "RotaryPositions",
    "ToMeRotaryAttentionMixin",
    "ToMeRotaryBlockMixin",
    "check_rope_options",
    "cos_sin",
    "merged_angles",
    "rope_table",
    "rotate_patches",
    "token_angles",
]

# Which keys the bipartite matching compares: after the rotation (what attention sees,
# position included) or before it (content only).
ROPE_METRICS = ("rotated", "plain")
DEFAULT_ROPE_METRIC = "rotated"


def check_rope_options(rope_position: str, rope_metric: str) -> None:
    """Raise ``ValueError`` unless ``rope_position`` is one of ``POSITION_RULES`` and
    ``rope_metric`` one of ``ROPE_METRICS``."""
    if rope_position not in POSITION_RULES:
        raise ValueError(f"rope_position={rope_position!r} is not one of {POSITION_RULES}")
    if rope_metric not in ROPE_METRICS:
        raise ValueError(f"rope_metric={rope_metric!r} is not one of {ROPE_METRICS}")


@dataclass(frozen=True)
class RotaryPositions:
    """Where one forward's tokens sit, for the run loop to carry once a block merges.

    Attributes:
        angles: ``x -> (batch, tokens, head_dim // 2)`` float32 rotary angles of the
            tokens ``x`` ``(batch, tokens, channels)`` entering the first block (zeros for
            prefix tokens and padding). Called at most once per forward, by the run loop,
            and only when a block of the run merges, so a family may refuse there what
            it cannot merge (e.g. coordinate augmentation while training).
        rule: How merged tokens' positions are formed (``rope_position``): ``"mean"`` or
            ``"destination"``.
    """

    angles: Callable[[torch.Tensor], torch.Tensor]
    rule: str = "mean"

    def start(self, state: ToMeState, x: torch.Tensor) -> ToMeState:
        """``state`` (the first block's) carrying the angles of the tokens ``x``."""
        return replace(state, positions=self.angles(x), position_rule=self.rule)


def token_angles(patch_angles: torch.Tensor, prefix_tokens: int, batch: int) -> torch.Tensor:
    """The angles of every token: zeros for the prefix tokens, then the patches'.

    Args:
        patch_angles: ``(patches, k)`` angles of the patch grid, row-major.
        prefix_tokens: Leading (unrotated) tokens.
        batch: Batch size.

    Returns:
        ``(batch, prefix_tokens + patches, k)``, the same grid for every sample.
    """
    prefix = patch_angles.new_zeros(prefix_tokens, patch_angles.shape[1])
    return torch.cat([prefix, patch_angles]).unsqueeze(0).expand(batch, -1, -1)


def merged_angles(state: ToMeState) -> Optional[torch.Tensor]:
    """``(batch, patch tokens, k)`` angles of the non-prefix tokens ``state`` describes, or
    None while nothing has merged (then the model's own table is exact).

    Raises:
        RuntimeError: if tokens were merged without their positions (the run loop of the
            whole patched model starts them; blocks run one by one in another loop do not).
    """
    if state.size is None:
        return None
    if state.positions is None:
        raise RuntimeError(
            "tokens were merged but their rotary positions were not carried: the patched model's own forward "
            "starts them, so call the whole model rather than its encoder or blocks one by one"
        )
    return state.positions[:, state.protected_tokens:]


def rope_table(angles: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """timm's concatenated ``[sin, cos]`` rotary table from angles.

    Args:
        angles: ``(batch, tokens, head_dim // 2)`` rotary angles.
        rotate_half: The attention's layout: ``[f0, f1, .., f0, f1, ..]`` if True,
            interleaved ``[f0, f0, f1, f1, ..]`` otherwise.

    Returns:
        ``(batch, 1, tokens, 2 * head_dim)``, broadcast over heads by timm's
        ``apply_rot_embed_cat``.
    """
    sin, cos = angles.sin(), angles.cos()
    if rotate_half:
        sin, cos = torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)
    else:
        sin, cos = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)
    return torch.cat([sin, cos], dim=-1).unsqueeze(1)


def cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``(cos, sin)`` rotary pair from angles ``(batch, tokens, head_dim // 2)``:
    each ``(batch, 1, tokens, head_dim)`` in ``dtype``, the halves' layout ``[f0, f1, .., f0, f1, ..]``."""
    angles = angles.tile(2).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_patches(x: torch.Tensor, prefix_tokens: int, rotate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x`` ``(batch, heads, tokens, head_dim)`` with ``rotate`` applied to the tokens after the prefix."""
    return torch.cat([x[:, :, :prefix_tokens], rotate(x[:, :, prefix_tokens:])], dim=2)


class ToMeRotaryBlockMixin(ToMeBlockMixin):
    """A block whose caller hands it a rotary table (the keyword ``_tome_rope_arg``).

    While merging, its attention branch gets the table of the current tokens: the
    caller's until a block has merged, then one recomputed from the carried angles in
    the attention's layout (:meth:`_tome_table`). A family implements
    ``_tome_attn_branch(x, bias, rope=table)`` and :meth:`_tome_table`.
    """

    _tome_block_args: Tuple[str, ...] = ()  # the block forward's arguments after x, in order
    _tome_rope_arg = "rope"

    def _tome_call(
        self, x: torch.Tensor, args: tuple, kwargs: Dict[str, Any], call: Any, masks_mask_nothing: bool = False
    ) -> Any:
        # By name, so the table is found however the caller passed it.
        kwargs = {**dict(zip(self._tome_block_args, args)), **kwargs}
        return super()._tome_call(x, (), kwargs, call, masks_mask_nothing)

    def _tome_attn_branch_for(self, state: ToMeState, x: torch.Tensor, kwargs: Dict[str, Any]) -> Callable[..., Any]:
        table = kwargs.get(self._tome_rope_arg)
        angles = None if table is None else merged_angles(state)
        if angles is not None:
            table = self._tome_table(angles, x.dtype)
        return functools.partial(self._tome_attn_branch, rope=table)

    def _tome_table(self, angles: torch.Tensor, dtype: torch.dtype) -> Any:
        """The rotary table, in the layout the block's attention takes, for merged tokens' angles."""
        raise NotImplementedError


class ToMeRotaryAttentionMixin(ToMeAttentionMixin):
    """An attention module that rotates its patch tokens' queries and keys: with
    ``tome=AttentionCall(bias)`` it takes the current tokens' table as ``rope=``.

    ``_tome_rotated_metric``: whether the reported keys are the rotated ones (what
    attention compares, position included) or those before the rotation (content only).
    """

    _tome_rotated_metric = True

    def forward(self, *args: Any, tome: Optional[AttentionCall] = None, **kwargs: Any) -> Any:
        if tome is None:
            return super().forward(*args, **kwargs)
        return self._tome_rope_attention(args[0], kwargs.get("rope"), tome)

    def _tome_rope_attention(self, x: torch.Tensor, rope: Any, call: AttentionCall) -> Any:
        """Attention of ``x`` ``(batch, tokens, channels)`` rotated by ``rope``, with ``call.bias``;
        sets ``call.metric``."""
        raise NotImplementedError

    def _tome_attend(
        self,
        call: AttentionCall,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix_tokens: int,
        rotate: Optional[Callable[[torch.Tensor], torch.Tensor]],
        **options: Any,
    ) -> torch.Tensor:
        """:func:`~tome.patch._attention_body.attend` after rotating the queries and keys of the
        tokens after ``prefix_tokens`` by ``rotate`` (None: no rotation), reporting the rotated
        or the plain keys as :attr:`_tome_rotated_metric` says. ``options``: ``attend``'s."""
        plain_k = k
        if rotate is not None:
            q = rotate_patches(q, prefix_tokens, rotate).type_as(v)
            k = rotate_patches(k, prefix_tokens, rotate).type_as(v)
        return attend(call, q, k, v, metric_keys=None if self._tome_rotated_metric else plain_k, **options)
