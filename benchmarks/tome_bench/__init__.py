"""Benchmark suite for ToMe: unmerged timm ViTs against patched ones, side by side.

Run it with ``uv run python benchmarks/run.py`` (see ``--help`` and
``docs/benchmarks.md``). The modules here use the public ``tome`` API like a user
would; the only internals they touch are wrapped for *measurement* (timing the
merge step, emulating a dense source map), never to change what the library does.
"""
