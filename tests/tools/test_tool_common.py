"""tome.tools._common: the one schedule grammar, KEY=VALUE model arguments, output paths."""

from __future__ import annotations

import os

import pytest

from tome.tools._common import (
    SCHEDULE_GRAMMAR,
    parse_model_kwargs,
    parse_schedule,
    parse_schedules,
    prepare_output_dir,
    prepare_output_file,
    schedule_json,
    schedule_label,
)


@pytest.mark.parametrize(
    "text, schedule",
    [("16", 16), ("0", 0), ("16:-1", (16, -1.0)), ("16:0.5", (16, 0.5)), ("8/8/4", [8, 8, 4]),
     ("[8,8,4]", [8, 8, 4]), ("[4, 2]", [4, 2]), (" 8 ", 8)],
)
def test_one_schedule(text, schedule):
    assert parse_schedule(text) == schedule
    assert parse_schedules(text) == [schedule]


def test_several_schedules_split_outside_brackets():
    assert parse_schedules("0,8,16:-1,8/8/4,[2,1]") == [0, 8, (16, -1.0), [8, 8, 4], [2, 1]]


def test_labels_round_trip():
    for schedule in [16, (16, -1.0), (8, 0.5), [8, 8, 4]]:
        assert parse_schedule(schedule_label(schedule)) == schedule
    assert schedule_json([8, 4]) == [8, 4] and schedule_json((16, -1.0)) == [16, -1.0]


def test_old_comma_spelling_is_refused_with_what_to_write():
    # tome train and tome export once read "8,-1" and "16,1" as (r, inflection); a comma separates
    # schedules in every command now, so where one is expected it is refused, saying what to write.
    with pytest.raises(ValueError, match=r"'8,-1' lists 2 schedules where one is expected \(write 8:-1 for r=8 with inflection -1, the R:INFLECTION form\)"):
        parse_schedule("8,-1")
    with pytest.raises(ValueError, match=r"'16,1' lists 2 schedules where one is expected \(write 16:1 .*or 16/1 for r per block"):
        parse_schedule("16,1")
    with pytest.raises(ValueError, match="8:-1"):  # in a list of schedules "-1" is no schedule
        parse_schedules("8,-1")
    assert parse_schedules("16,1") == [16, 1]


@pytest.mark.parametrize(
    "text, quoted",
    [("16d", "16:-1"), ("-3", "'-3'"), ("16:2", "'16:2'"), ("8x", "'8x'"), ("[8,a]", "'[8,a]'"), ("[8,8", "'[8,8'"),
     ("8/-1", "'8/-1'"), ("", "no schedule")],
)
def test_bad_schedules_quote_the_value_and_the_grammar(text, quoted):
    with pytest.raises(ValueError) as error:
        parse_schedules(text)
    assert quoted in str(error.value)
    if text not in ("16:2",):
        assert SCHEDULE_GRAMMAR in str(error.value)


def test_one_schedule_expected():
    with pytest.raises(ValueError, match="lists 2 schedules where one is expected"):
        parse_schedule("8,16")


def test_duplicates_named():
    with pytest.raises(ValueError, match="repeats 16:-1"):
        parse_schedules("16:-1,16:-1.0")


def test_model_kwargs_python_json_and_bare_strings():
    assert parse_model_kwargs(["a=32", "b=True", "c=true", "d=null", "e=[8, 8]", "f=(8, 8)", "g=avg", "h='x'",
                               "i=0.5"]) == {"a": 32, "b": True, "c": True, "d": None, "e": [8, 8], "f": (8, 8),
                                             "g": "avg", "h": "x", "i": 0.5}
    with pytest.raises(ValueError, match="'img_size'"):
        parse_model_kwargs(["img_size"])
    with pytest.raises(ValueError, match="'2x=1'"):
        parse_model_kwargs(["2x=1"])


def test_output_paths_checked_with_their_names(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(ValueError, match="'.*blocker' is a file"):
        prepare_output_dir(blocker, "-o")
    with pytest.raises(ValueError, match="lies under '.*blocker', which is a file"):
        prepare_output_dir(blocker / "sub", "-o")
    with pytest.raises(ValueError, match="--json '.*blocker/x.json'"):
        prepare_output_file(blocker / "x.json", "--json")
    with pytest.raises(ValueError, match="is a directory"):
        prepare_output_file(tmp_path, "--json")
    assert prepare_output_file(tmp_path / "new" / "x.json", "--json").parent.is_dir()


def test_read_only_directory_named(tmp_path, monkeypatch):
    # Root may write anywhere, so the permission check is simulated.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="not a writable directory"):
        prepare_output_dir(tmp_path, "-o")
