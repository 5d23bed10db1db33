"""Tools built on the public API: benchmark, demo, visualisation, evaluation, tuning, training, export.

One module per ``tome`` command (``tome.tools.train`` is a package); ``_common`` and
``_models`` hold what the commands share. Nothing outside ``tome.tools`` but the command
line (``tome.cli``) imports from here: the original release's ``tome.utils.benchmark``
and ``tome.vis.make_visualization`` live below, in ``tome._benchmark`` and ``tome.vis``.
"""
