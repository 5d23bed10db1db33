"""What the small-model trainers (``tome vlm-train``, ``tome video-train``) share: the run
directory with its resume / overwrite rules, the ``log.jsonl`` history and the session options."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from ._common import positive_int


def prepare_run_dir(args: argparse.Namespace, checkpoint: str, run_files: Sequence[str]) -> Tuple[Path, Optional[Path]]:
    """The output directory ``args.output_dir`` (created) and the checkpoint to resume from, if any.

    Args:
        args: with ``output_dir``, ``resume`` (None, ``"auto"`` or a path) and ``overwrite``.
        checkpoint: the checkpoint's file name inside the directory (``--resume auto``).
        run_files: the names a run writes there; ``--overwrite`` deletes only these.

    Raises:
        ValueError: for a directory that holds a run without ``--resume``/``--overwrite``,
            or a ``--resume`` path that is not a file.
    """
    out = Path(args.output_dir)
    checkpoint_path = out / checkpoint
    resume: Optional[Path] = None
    if args.resume == "auto":
        resume = checkpoint_path if checkpoint_path.is_file() else None
    elif args.resume:
        resume = Path(args.resume)
        if not resume.is_file():
            raise ValueError(f"--resume {args.resume!r}: no checkpoint file there")
    found = [name for name in run_files if (out / name).exists()]
    if resume is None and found:
        if not args.overwrite:
            raise ValueError(f"output directory {str(out)!r} already holds a run ({', '.join(found)}); pass "
                             "--resume auto to continue it or --overwrite to start over")
        for name in found:  # only the run's own files: anything else in the directory stays
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out, resume


def append_log(path: Path, entry: Dict[str, Any]) -> None:
    """Append ``entry`` as one JSON line to ``path`` (the run's ``log.jsonl``)."""
    with path.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of one training session: threads, time limit, early stop, resume, overwrite, progress."""
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="minutes after which training stops and the final folder is written (0: none)")
    parser.add_argument("--stop-at-step", type=int, default=0,
                        help="stop this session at this step, as --time-limit does (0: run to --steps)")
    parser.add_argument("--resume", default=None, help="'auto' (DIR/checkpoint.pt if present) or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true", help="delete a run already in --output-dir")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (default: a bar on a terminal)")
