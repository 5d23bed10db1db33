"""Pieces shared by the ``tome`` commands: argument parsing, model loading, tables.

Everything here uses the public API (``tome.apply_patch``, ``model.r``,
``model._tome_info``) the way a user script would.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

import tome

__all__ = [
    "add_method_argument",
    "expand_settings",
    "parse_methods",
    "format_table",
    "SCHEDULE_GRAMMAR",
    "SCHEDULE_HELP",
    "parse_dtype",
    "parse_model_kwarg",
    "prepare_output_dir",
    "prepare_output_file",
    "progress_bar",
    "parse_model_kwargs",
    "parse_schedule",
    "parse_schedules",
    "schedule_label",
    "schedule_json",
]

Schedule = Union[int, Tuple[int, float], List[int]]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- schedules

SCHEDULE_GRAMMAR = (
    "a merge schedule is R (e.g. 16: R tokens merged in every block), R:INFLECTION (e.g. 16:-1, "
    "the paper's decreasing schedule: 2R in the first block down to 0 in the last; INFLECTION in [-1, 1]) "
    "or R/R/R... (e.g. 8/8/4: R per block, later blocks 0); several schedules are separated by commas "
    "(e.g. 0,8,16:-1,8/8/4)"
)
"""The one description of the ``-r`` grammar, quoted in every error."""

SCHEDULE_HELP = (
    "merge schedules, comma-separated; each is R (tokens merged per block, e.g. 16), R:INFLECTION "
    "(16:-1 is the paper's decreasing schedule, 2R down to 0; INFLECTION in [-1, 1]) or R/R/R (r per block, "
    "e.g. 8/8/4)"
)
"""``--help`` text of ``-r`` for the commands that take several schedules."""

_INT = r"\d+"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_SCHEDULE_ITEM = re.compile(r"\s*(\[[^\]]*\]|[^,\[]+)\s*(?:,|$)")


def parse_schedule(text: str) -> Schedule:
    """One merge schedule from the command line (see :data:`SCHEDULE_GRAMMAR`).

    ``"16"`` -> ``16``; ``"16:-1"`` -> ``(16, -1.0)``; ``"8/8/4"`` -> ``[8, 8, 4]``; a
    bracketed list as in Python, ``"[8,8,4]"``, is read too. A comma separates
    schedules in every command, so ``"8,-1"`` (once ``tome train``'s and ``tome export``'s
    spelling of ``(8, -1.0)``) is two schedules, refused here with what to write.

    Raises:
        ValueError: quoting ``text`` and the grammar when it is no schedule, or
            several of them, or its values are out of range.
    """
    items = _split_schedules(text)
    if len(items) != 1:
        hint = ""
        if len(items) == 2 and re.fullmatch(_INT, items[0]) and re.fullmatch(_NUMBER, items[1]):
            first, second = items
            per_block = f", or {first}/{second} for r per block" if re.fullmatch(_INT, second) else ""
            hint = f" (write {first}:{second} for r={first} with inflection {second}, the R:INFLECTION form{per_block})"
        raise ValueError(f"r {text!r} lists {len(items)} schedules where one is expected{hint}; {SCHEDULE_GRAMMAR}")
    return _parse_one(items[0], text)


def parse_schedules(text: str) -> List[Schedule]:
    """Comma-separated merge schedules, e.g. ``"0,8,13,16"`` or ``"0,16:-1,8/8/4"``.

    Raises:
        ValueError: quoting the bad entry and the grammar; also for an empty list or duplicates.
    """
    items = _split_schedules(text)
    if not items:
        raise ValueError(f"r {text!r} lists no schedule; {SCHEDULE_GRAMMAR}")
    schedules = [_parse_one(item, text) for item in items]
    labels = [schedule_label(s) for s in schedules]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"r {text!r} repeats {', '.join(duplicates)}")
    return schedules


def _split_schedules(text: str) -> List[str]:
    """Split at commas outside brackets; empty entries are dropped."""
    if not isinstance(text, str):
        raise ValueError(f"r {text!r} is not text; {SCHEDULE_GRAMMAR}")
    items, position = [], 0
    while position < len(text):
        match = _SCHEDULE_ITEM.match(text, position)
        if match is None:  # an unclosed bracket
            raise ValueError(f"r {text!r} is not a schedule; {SCHEDULE_GRAMMAR}")
        items.append(match.group(1).strip())
        position = match.end()
    return [item for item in items if item]


def _parse_one(item: str, whole: str) -> Schedule:
    """One entry of :func:`parse_schedules`; errors quote the entry (and the whole text if different)."""
    quoted = repr(item) if item == whole.strip() else f"{item!r} (in {whole!r})"
    schedule: Schedule
    if re.fullmatch(_INT, item):
        schedule = int(item)
    elif ":" in item:
        base, _, inflection = item.partition(":")
        if not (re.fullmatch(_INT, base.strip()) and re.fullmatch(_NUMBER, inflection.strip())):
            raise ValueError(f"r {quoted} is not R:INFLECTION (e.g. 16:-1); {SCHEDULE_GRAMMAR}")
        schedule = (int(base), float(inflection))
    elif "/" in item or item.startswith("["):
        body = item[1:-1] if item.startswith("[") and item.endswith("]") else item
        parts = [part.strip() for part in body.split("/" if "/" in item else ",")]
        if not all(re.fullmatch(_INT, part) for part in parts):
            raise ValueError(f"r {quoted} is not a per-block list of non-negative integers (e.g. 8/8/4); "
                             f"{SCHEDULE_GRAMMAR}")
        schedule = [int(part) for part in parts]
    else:
        hint = ""
        if re.fullmatch(r"\d+d", item):
            hint = f" (for the decreasing schedule write {item[:-1]}:-1)"
        elif re.fullmatch(r"-\d+", item):
            hint = " (r cannot be negative; R:INFLECTION takes a colon, e.g. 8:-1)"
        raise ValueError(f"r {quoted} is not a schedule{hint}; {SCHEDULE_GRAMMAR}")
    try:
        tome.parse_r(len(schedule) if isinstance(schedule, list) else 1, schedule)  # depth is checked later
    except ValueError as error:
        raise ValueError(f"r {quoted}: {error}") from None
    return schedule


def _argparse_type(parser_fn):
    """Wrap a ValueError-raising parser so argparse prints its message and exits with 2."""

    def convert(text: str):
        try:
            return parser_fn(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parser_fn.__name__
    return convert


schedules_arg = _argparse_type(parse_schedules)
"""argparse type for ``-r`` of the commands that take several schedules (bench, eval, visualize)."""
schedule_arg = _argparse_type(parse_schedule)
"""argparse type for an option that takes one schedule."""


def schedule_label(schedule: Schedule) -> str:
    """``16`` -> ``"16"``, ``(16, -1.0)`` -> ``"16:-1"``, ``[8, 8, 4]`` -> ``"8/8/4"`` (the command-line spelling)."""
    if isinstance(schedule, tuple):
        return f"{schedule[0]}:{schedule[1]:g}"
    if isinstance(schedule, list):
        return "/".join(str(r) for r in schedule)
    return str(schedule)


def schedule_json(schedule: Schedule) -> Union[int, List[float], List[int]]:
    """JSON form of a merge setting: an int, ``[r, inflection]`` or the per-block list (the label tells them apart)."""
    if isinstance(schedule, tuple):
        return [schedule[0], schedule[1]]
    return list(schedule) if isinstance(schedule, list) else schedule


def _int_at_least(text: str, minimum: int, requirement: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} {requirement}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "must be at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "must not be negative")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


# ----------------------------------------------------------------------------- dtypes, devices


def parse_dtype(name: str) -> torch.dtype:
    """``"fp32"`` / ``"fp16"`` / ``"bf16"`` -> torch dtype.

    Raises:
        ValueError: quoting an unknown name.
    """
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is unknown; expected one of {list(_DTYPES)}")
    return _DTYPES[name]


# ----------------------------------------------------------------------------- model kwargs


def parse_model_kwarg(item: str) -> Tuple[str, Any]:
    """``"img_size=32"`` -> ``("img_size", 32)``: one ``KEY=VALUE`` model argument.

    The value is read as a Python literal when it is one (``32``, ``0.5``, ``True``,
    ``None``, ``(8, 8)``, ``'avg'``), else as JSON (``true``, ``null``, ``[8, 8]``),
    else kept as the bare string (``global_pool=avg``).

    Raises:
        ValueError: quoting an item without ``=`` or whose key is not a Python name.
    """
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"model argument {item!r} is not KEY=VALUE (e.g. img_size=32 or global_pool=avg)")
    try:
        return key, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``["img_size=32", "depth=2", "global_pool=avg"]`` -> keyword arguments (see :func:`parse_model_kwarg`).

    Raises:
        ValueError: quoting an item that is not ``KEY=VALUE``.
    """
    return dict(parse_model_kwarg(item) for item in items or ())


model_kwarg_arg = _argparse_type(parse_model_kwarg)
"""argparse type for one ``KEY=VALUE`` model argument."""


# ----------------------------------------------------------------------------- merge methods


def parse_methods(text: str) -> List[str]:
    """Merge methods from ``--method``: ``"tome"``, ``"pitome,tofu"`` or ``"all"``.

    Raises:
        ValueError: for an unknown name (the valid ones are listed) or a repeated one.
    """
    names = list(tome.METHODS) if text.strip() == "all" else [part.strip() for part in text.split(",")]
    for name in names:
        if name not in tome.METHODS:
            raise ValueError(f"--method {name!r} is not a merge method; expected one of {list(tome.METHODS)} or 'all'")
    if len(set(names)) != len(names):
        raise ValueError(f"--method {text!r} names a method twice")
    return names


def add_method_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--method`` on a command: one or several merge methods, comma-separated."""
    parser.add_argument(
        "--method", type=_argparse_type(parse_methods), default=["tome"], metavar="NAMES",
        help=f"merge method(s), comma-separated or 'all': {', '.join(tome.METHODS)} (default: tome); {what}. "
        "See docs/methods.md",
    )


def expand_settings(
    schedules: Sequence[Schedule], methods: Sequence[str]
) -> Tuple[List[Schedule], List[Optional[str]]]:
    """Every schedule with every method, r=0 once (it is the same model for every method).

    Returns:
        Parallel lists ``(schedules, methods)``; the method of r=0 is None (the model's own).
    """
    out_schedules: List[Schedule] = []
    out_methods: List[Optional[str]] = []
    for schedule in schedules:
        for method in ([None] if schedule == 0 else methods):
            out_schedules.append(schedule)
            out_methods.append(method)
    return out_schedules, out_methods


# ----------------------------------------------------------------------------- output


def prepare_output_dir(path: Union[str, Path], option: str) -> Path:
    """Create the directory ``path`` (and its parents) and check it is writable, before any work.

    Args:
        path: The directory.
        option: The option that named it (``"-o"``), quoted in the error.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: naming the path when it is a file, lies under a file, cannot be
            created or is not writable.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{option} {str(path)!r} is a file, not a directory") from None
    except NotADirectoryError:
        raise ValueError(f"{option} {str(path)!r} lies under {str(_first_file_above(path))!r}, which is a file") from None
    except OSError as error:
        raise ValueError(f"{option} {str(path)!r} cannot be created: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(path)!r} is not a writable directory")
    return path


def prepare_output_file(path: Union[str, Path], option: str) -> Path:
    """Create the parent directories of the file ``path`` and check it can be written, before any work.

    Args:
        path: The file to be written later (replaced if it exists).
        option: The option that named it (``"--json"``), quoted in the error.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: naming the path when it is a directory, its directory cannot be
            created or is not writable, or the file exists and is read-only.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a directory; give a file name")
    prepare_output_dir(path.parent, f"{option} {str(path)!r}: directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {str(path)!r} exists and is not writable")
    return path


def _first_file_above(path: Path) -> Path:
    """The nearest ancestor of ``path`` (or ``path`` itself) that exists and is not a directory."""
    for candidate in [path, *path.parents]:
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return path


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, only when stderr is a terminal; stdout is flushed first.

    Without a terminal (a log file, a pipe, CI) the bar is off, so nothing it draws
    lands in the middle of the printed tables.
    """
    import sys

    from tqdm import tqdm

    sys.stdout.flush()
    enabled = kwargs.pop("enabled", True) and sys.stderr.isatty()
    return tqdm(iterable, file=sys.stderr, disable=not enabled, **kwargs)



def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A right-aligned plain-text table."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and abs(value) < 0.1:
            return f"{value:.3g}"
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
