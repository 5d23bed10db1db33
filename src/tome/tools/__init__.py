"""Tools built on the public API: benchmark, demo, visualisation, evaluation, CLI commands.

Nothing in ``tome.merge`` or ``tome.patch`` imports from here.
"""
