"""The ``tome`` command line: ``tome <command> --help`` for each command.

Commands: ``demo`` (offline tour), ``bench`` (throughput and FLOPs for several r),
``visualize`` (draw merged tokens), ``eval`` (accuracy on an image folder, torchrun
for several processes), ``tune`` (find r for a speed-up or FLOPs target), ``train``
(train or fine-tune with merging active), ``data`` (export or preview the generated
shape task), ``export`` (ONNX export, checked and timed in onnxruntime, optionally
int8). ``--model`` takes a timm name, a shipped model, ``hf:<id or folder>`` and, for
``bench``, ``diffusers:<folder>`` (with ``--ratio``); ``-r`` has one grammar everywhere.
See docs/tools.md and docs/deployment.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# One module per command under tome.tools, each with add_parser(subparsers).
_COMMAND_MODULES = ["demo", "benchmark", "visualize", "evaluate", "tune", "train", "data", "export", "vlm_train", "vlm_demo",
                    "lmms_eval", "video_train"]

# Errors that mean "bad input or environment": reported in one line, exit status 2.
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ConnectionError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command registered."""
    parser = argparse.ArgumentParser(
        prog="tome",
        description="Token Merging (ToMe) for Vision Transformers: faster ViTs without retraining.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(f"tome.tools.{name}").add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``tome`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _USER_ERRORS as error:
        parser.exit(2, f"tome {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
