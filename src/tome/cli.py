"""The ``tome`` command line: ``tome <command> --help`` for each command."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# One module per command under tome.tools, each with add_parser(subparsers).
_COMMAND_MODULES = ["demo"]


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
    except (ValueError, TypeError, FileNotFoundError) as error:
        parser.exit(2, f"tome {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
