"""The attention-then-merge step shared by every model family.

A family module knows where its model keeps attention, prefix tokens and
pooling; everything ToMe does inside a block lives here:

    x = x + attention_branch(x, bias=log(size))   # attention sees N tokens
    x, state = state.merge(x, metric, r)          # N -> N - r tokens
    x = x + mlp_branch(x)                         # MLP sees N - r tokens

Per-forward state (sizes, source groups) is a :class:`ToMeState` created at the
top of a model's forward and handed from block to block. It is immutable: a
merge returns a new state, so blocks can be re-run (gradient checkpointing),
called directly, or run by several threads at once.

Blocks are called through ``nn.Module.__call__`` as the framework itself calls
them, with one extra keyword, ``tome=BlockCall(state, r)``: the block reads its
entry state and r from it and writes its exit state back. A block's attention
module is called the same way with ``tome=AttentionCall(bias)`` and writes the
metric back. So hooks on blocks and attention modules fire as in the unpatched
model, and a block's hooks see tensors in and out, as they always did.

The step lives in three modules, one concern each, gathered here (every name this
module defined before the split is still importable from it, except the kernel
setting's private state: read it with :func:`get_prop_attn_kernel`):

- :mod:`._state`: :class:`ToMeState` and its algebra (merge, sizes, sources, padding,
  positions), :func:`merge_tokens` for ``torch.fx``, :func:`weighted_mean`;
- :mod:`._prop_attn`: :func:`attention` with proportional attention's bias and the
  process-wide kernel choice (:func:`set_prop_attn_kernel`);
- :mod:`._block_loop`: the call protocol (:class:`BlockCall`, :class:`AttentionCall`,
  :class:`ToMeForward`), :func:`merge_block` and :func:`run_blocks`.
"""

from ._block_loop import (  # noqa: F401
    ATTENTION_FEATURES,
    AttentionCall,
    BlockCall,
    ToMeForward,
    merge_block,
    run_blocks,
)
from ._prop_attn import (  # noqa: F401
    PROP_ATTN_KERNELS,
    _fold_bias,
    attention,
    finite_key_bias,
    get_prop_attn_kernel,
    is_finite_key_bias,
    prop_attn_kernel,
    set_prop_attn_kernel,
)
from ._state import (  # noqa: F401
    _LOW_PRECISION,
    POSITION_RULES,
    ToMeState,
    _padding_last,
    merge_positions,
    merge_tokens,
    padding_bias,
    rule_check,
    size_bias,
    sources_from_groups,
    weighted_mean,
)

__all__ = [
    "AttentionCall",
    "BlockCall",
    "ToMeForward",
    "ToMeState",
    "attention",
    "finite_key_bias",
    "get_prop_attn_kernel",
    "prop_attn_kernel",
    "set_prop_attn_kernel",
    "merge_block",
    "merge_positions",
    "padding_bias",
    "run_blocks",
    "size_bias",
    "sources_from_groups",
    "weighted_mean",
]
