"""The `tome` command line: registry, help, error reporting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tome import cli

COMMANDS = ["demo", "bench", "visualize", "eval", "tune"]


def test_every_command_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"tome {command}" in capsys.readouterr().out


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fly"])
    assert exit_info.value.code == 2
    assert "fly" in capsys.readouterr().err


def test_unknown_model_names_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "vit_tny_patch16_224"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "vit_tny_patch16_224" in err and "vit_tiny_patch16_224" in err


def test_bad_model_kwargs_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", "img_size"])
    assert exit_info.value.code == 2
    assert "'img_size'" in capsys.readouterr().err


def test_model_required_without_known_checkpoint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench"])
    assert exit_info.value.code == 2
    assert "--model is required" in capsys.readouterr().err


def test_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "tome.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "bench" in result.stdout


def test_importing_tome_does_not_load_tools():
    code = "import sys, tome; print(any(m.startswith('tome.tools') for m in sys.modules)); tome.make_visualization; " \
           "print('tome.tools.visualize' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.split() == ["False", "True"]
