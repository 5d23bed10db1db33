"""Merge schedules: how many tokens each layer removes."""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

__all__ = ["parse_r", "check_r", "schedule_for_total", "tokens_per_layer", "RSchedule"]

RSchedule = Union[int, Sequence[int], Tuple[int, float]]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(value: object, what: str) -> int:
    if not _is_int(value):
        # Integral floats (16.0) and numpy integers are accepted; 2.5 is not.
        try:
            as_int = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError, OverflowError):  # OverflowError: float("inf")
            as_int = None
        if as_int is None or isinstance(value, bool) or as_int != value:
            raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
        value = as_int
    if value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def parse_r(num_layers: int, r: RSchedule) -> List[int]:
    """Expand a merge schedule into one ``r`` per layer.

    Args:
        num_layers: Number of transformer blocks.
        r: One of
            - ``int``: the same r in every layer;
            - ``list``: r per layer, padded with zeros up to ``num_layers``;
            - ``(r, inflection)`` with ``inflection`` in [-1, 1]: r varies linearly
              from ``r * (1 - inflection)`` to ``r * (1 + inflection)``. ``(r, 0)`` is
              constant, ``(r, -1)`` the paper's decreasing schedule (2r down to 0).

    Returns:
        A list of ``num_layers`` non-negative ints. Each layer still caps its r at
        half of its non-protected tokens when it runs.

    Raises:
        ValueError: naming the bad value (negative or fractional r, a list longer
            than ``num_layers``, an inflection outside [-1, 1], an unknown form).
    """
    num_layers = _check_count(num_layers, "num_layers")
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"a schedule tuple must be (r, inflection), got {r!r}")
        base, inflection = r
        base = _check_count(base, "r")
        try:
            inflection = float(inflection)
        except (TypeError, ValueError):
            raise ValueError(f"inflection must be a number in [-1, 1], got {r[1]!r}") from None
        if not -1.0 <= inflection <= 1.0:
            raise ValueError(f"inflection must lie in [-1, 1], got {r[1]!r}")
        if num_layers == 0:
            return []
        lo = int(base * (1 - inflection))
        hi = 2 * base - lo
        step = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return [int(lo + step * i) for i in range(num_layers)]
    if isinstance(r, list):
        values = [_check_count(v, f"r[{i}]") for i, v in enumerate(r)]
        if len(values) > num_layers:
            raise ValueError(
                f"the r list has {len(values)} entries but the model has {num_layers} layers: {r!r}"
            )
        return values + [0] * (num_layers - len(values))
    return [_check_count(r, "r")] * num_layers


def check_r(r: RSchedule) -> RSchedule:
    """Validate a schedule without knowing the depth (list length is checked later)."""
    parse_r(len(r) if isinstance(r, list) else 1, r)
    return r


def tokens_per_layer(num_tokens: int, schedule: Sequence[int], protected_tokens: int = 0) -> List[int]:
    """Token count entering each layer and after the last one, with per-layer capping.

    Args:
        num_tokens: Tokens entering the first block (prefix tokens included).
        schedule: r per layer, as from :func:`parse_r`.
        protected_tokens: Leading tokens that never merge.

    Returns:
        ``len(schedule) + 1`` counts.
    """
    counts = [num_tokens]
    for r in schedule:
        n = counts[-1]
        counts.append(n - max(0, min(r, (n - protected_tokens) // 2)))
    return counts


def schedule_for_total(num_layers: int, num_tokens: int, total: int, protected_tokens: int = 1) -> List[int]:
    """A constant-as-possible schedule that removes ``total`` tokens across the network.

    The tokens are spread as evenly as the per-layer cap allows, earlier layers
    taking the remainder (removing early saves the most compute).

    Args:
        num_layers: Number of transformer blocks.
        num_tokens: Tokens entering the first block (prefix tokens included).
        total: Tokens to remove in all.
        protected_tokens: Leading tokens that never merge.

    Returns:
        r per layer.

    Raises:
        ValueError: if ``total`` is negative or more than the network can remove.
    """
    total = _check_count(total, "total")
    num_layers = _check_count(num_layers, "num_layers")
    schedule = [0] * num_layers
    remaining = total
    # Greedy rounds of "one more token per layer", respecting each layer's cap.
    while remaining > 0:
        progressed = False
        for i in range(num_layers):
            if remaining == 0:
                break
            trial = schedule.copy()
            trial[i] += 1
            counts = tokens_per_layer(num_tokens, trial, protected_tokens)
            if num_tokens - counts[-1] == total - remaining + 1:
                schedule = trial
                remaining -= 1
                progressed = True
        if not progressed:
            most = num_tokens - tokens_per_layer(num_tokens, schedule, protected_tokens)[-1]
            raise ValueError(
                f"total={total} tokens cannot be removed: with {num_tokens} tokens "
                f"({protected_tokens} protected) and {num_layers} layers at most {most} can be"
            )
    return schedule
