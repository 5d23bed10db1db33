"""Merge schedules: parse_r, per-layer caps and total-token schedules."""

from __future__ import annotations

import pytest

from tome.utils import parse_r, schedule_for_total, tokens_per_layer


def test_int_schedule():
    assert parse_r(12, 16) == [16] * 12
    assert parse_r(3, 0) == [0, 0, 0]


def test_list_schedule_padded():
    assert parse_r(5, [4, 3]) == [4, 3, 0, 0, 0]
    assert parse_r(2, [1, 2]) == [1, 2]


def test_decreasing_schedule_matches_published_example():
    assert parse_r(12, (16, -1.0)) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]


def test_inflection_zero_is_constant_and_positive_increases():
    assert parse_r(6, (8, 0.0)) == [8] * 6
    increasing = parse_r(4, (8, 1.0))
    assert increasing == sorted(increasing) and increasing[0] == 0 and increasing[-1] == 16


def test_single_layer_tuple():
    assert parse_r(1, (8, -1.0)) == [16]


@pytest.mark.parametrize(
    "bad, message",
    [
        (-1, "-1"),
        (2.5, "2.5"),
        ("16", "'16'"),
        (True, "True"),
        ([1, -2], "-2"),
        ([1] * 13, "13 entries"),
        ((16, 1.5), "1.5"),
        ((16, -2), "-2"),
        ((16,), r"\(16,\)"),
        ((16, "a"), "'a'"),
        ((-4, 0.0), "-4"),
        (None, "None"),
        (float("inf"), "inf"),
        (float("nan"), "nan"),
    ],
)
def test_bad_schedules_raise_value_error_quoting_value(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_r(12, bad)


def test_integral_float_is_accepted():
    assert parse_r(2, 4.0) == [4, 4]


def test_tokens_per_layer_caps():
    # 197 tokens, class token protected, r=100 per layer: capped at half the others each time.
    counts = tokens_per_layer(197, [100, 100, 100], protected_tokens=1)
    assert counts == [197, 99, 50, 26]


def test_schedule_for_total():
    schedule = schedule_for_total(12, 197, 180, protected_tokens=1)
    assert schedule == [15] * 12
    uneven = schedule_for_total(12, 197, 100, protected_tokens=1)
    assert sum(uneven) == 100 and max(uneven) - min(uneven) <= 1
    assert uneven == sorted(uneven, reverse=True)  # remainder goes to early layers


def test_schedule_for_total_too_many():
    with pytest.raises(ValueError, match="total=500"):
        schedule_for_total(2, 197, 500, protected_tokens=1)
    with pytest.raises(ValueError, match="-3"):
        schedule_for_total(2, 197, -3)
