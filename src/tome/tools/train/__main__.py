"""``python -m tome.tools.train ...``, e.g. under torchrun: the same as ``tome train ...``."""

import sys

from tome.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
