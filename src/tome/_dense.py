"""Dense features back at full resolution after Token Merging.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023 (arXiv 2210.09461).

A merged model returns fewer tokens than it was given. Dense tasks (feature
maps, segmentation, correspondence) want one feature per original patch: every
original token takes the feature of the merged token that contains it. Pure
tensor functions; imports torch only.
"""

from __future__ import annotations

import torch

__all__ = ["unmerge_tokens"]


def _groups_from_source(source: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(batch, original tokens)`` index of the token holding each original token."""
    if source.shape[1] != num_tokens:
        raise ValueError(
            f"source has {source.shape[1]} rows but tokens has {num_tokens} tokens; expected a map of "
            "shape (batch, tokens, original tokens) from the same forward"
        )
    members = source != 0
    counts = members.sum(dim=1)
    if not bool((counts == 1).all()):
        bad = int((counts != 1).sum())
        raise ValueError(
            f"source must assign every original token to exactly one token; {bad} original tokens "
            "are in none or several (is it model._tome_info['source']?)"
        )
    return members.to(torch.uint8).argmax(dim=1)


def unmerge_tokens(tokens: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Map merged tokens back to one row per original token.

    Every original token gets the features of the merged token that contains it,
    so the result can be reshaped to the original patch grid. Works for every
    family: prefix tokens (class, distillation, registers) map to themselves.

    Args:
        tokens: ``(batch, tokens, channels)`` merged tokens, e.g. ``last_hidden_state``.
        source: Where each original token went: the dense 0/1 map
            ``(batch, tokens, original tokens)`` from ``model._tome_info["source"]``
            (patch with ``trace_source=True``), or a ``(batch, original tokens)``
            integer index of the token holding each original token.

    Returns:
        ``(batch, original tokens, channels)``, same dtype and device as ``tokens``.

    Raises:
        ValueError: if the shapes do not belong together, or a dense map does not
            put every original token in exactly one token.

    Example::

        model = tome.apply_patch(Dinov2Model.from_pretrained(...), r=8, trace_source=True)
        out = model(pixel_values)
        dense = tome.unmerge_tokens(out.last_hidden_state, model._tome_info["source"])
        grid = dense[:, 1:].reshape(batch, height // 14, width // 14, -1)
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must have shape (batch, tokens, channels), got shape {tuple(tokens.shape)}")
    batch, num_tokens, channels = tokens.shape
    if source.dim() == 3:
        if source.shape[0] != batch:
            raise ValueError(f"source has batch {source.shape[0]} but tokens has batch {batch}")
        groups = _groups_from_source(source, num_tokens)
    elif source.dim() == 2 and not source.is_floating_point() and not source.is_complex():
        if source.shape[0] != batch:
            raise ValueError(f"source has batch {source.shape[0]} but tokens has batch {batch}")
        groups = source.long()
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_tokens):
            raise ValueError(f"source indices must lie in [0, {num_tokens}) for {num_tokens} tokens")
    else:
        raise ValueError(
            "source must be a (batch, tokens, original tokens) 0/1 map or a (batch, original tokens) "
            f"integer index, got shape {tuple(source.shape)} and dtype {source.dtype}"
        )
    index = groups.to(tokens.device).unsqueeze(-1).expand(-1, -1, channels)
    return tokens.gather(1, index)
