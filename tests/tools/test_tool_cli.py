"""The `tome` command line: registry, help, error reporting."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from tome import cli

from tools_helpers import TINY_ARGS

COMMANDS = ["demo", "bench", "visualize", "eval", "tune", "train", "data"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "tools.md"


def test_every_command_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS + ["data export", "data preview"])
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    assert f"tome {command}" in capsys.readouterr().out


def test_every_command_is_described_in_the_module_and_the_docs():
    docs = DOCS.read_text()
    for command in COMMANDS:
        assert f"``{command}``" in cli.__doc__, command
        assert f"## `tome {command}`" in docs, command


def _parsers():
    """Every (sub)command parser but train's (its options belong to its owner), by name."""
    parser = cli.build_parser()
    found = {}

    def walk(prefix, node):
        for action in node._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(f"{prefix} {name}".strip(), child)
        if prefix and prefix != "train":
            found[prefix] = node

    walk("", parser)
    return found


def test_every_option_has_help_and_shows_its_default():
    parsers = _parsers()
    assert {"demo", "bench", "visualize", "eval", "tune", "data export", "data preview"} <= set(parsers)
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = f"tome {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{label} has no help"
            has_default = action.default not in (None, False) and not isinstance(action, argparse._StoreTrueAction)
            if has_default and action.option_strings:
                assert "default" in action.help, f"{label} does not show its default {action.default!r}"


def test_one_schedule_error_for_every_command(picture, image_folder, capsys):
    messages = set()
    for command in (["bench", *TINY_ARGS], ["eval", *TINY_ARGS, "--data", str(image_folder)],
                    ["visualize", str(picture), *TINY_ARGS]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "-r", "0,16d"])
        assert exit_info.value.code == 2
        messages.add(capsys.readouterr().err.splitlines()[-1].split("error: ", 1)[1])
    assert len(messages) == 1
    (message,) = messages
    assert "'16d'" in message and "16:-1" in message and "8/8/4" in message


def test_data_export_and_preview_for_real(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "shapes"
    assert cli.main(["data", "export", str(out), "--train", "10", "--val", "3", "--image-size", "32"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir())[:2] == ["00_circle", "01_ring"]
    assert len(list((out / "val").rglob("*.png"))) == 3
    with Image.open(next((out / "train" / "00_circle").iterdir())) as image:
        assert image.size == (32, 32)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "export", str(out), "--train", "5", "--val", "0"])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err and len(list((out / "train").rglob("*.png"))) == 10
    assert cli.main(["data", "export", str(out), "--train", "5", "--val", "0", "--image-size", "32",
                     "--overwrite"]) == 0
    # Only the split written is replaced; --val 0 keeps the earlier val/.
    assert len(list((out / "train").rglob("*.png"))) == 5 and len(list((out / "val").rglob("*.png"))) == 3
    assert "kept the earlier val/" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert cli.main(["data", "preview", str(grid), "--rows", "2", "--image-size", "16", "--zoom", "1"]) == 0
    with Image.open(grid) as image:
        assert image.size == (16 * 10, 16 * 2)
    assert str(grid) in capsys.readouterr().out


def test_data_export_overwrite_acts_only_on_an_earlier_export(tmp_path, capsys):
    """--overwrite once deleted any train/ and val/, export or not, and --train 0 deleted train/ for nothing."""
    import json

    mine = tmp_path / "mine"
    (mine / "train" / "cats").mkdir(parents=True)
    (mine / "train" / "cats" / "1.png").write_bytes(b"not generated")
    (mine / "val").mkdir()
    for info in (None, "{not json", json.dumps({"task": "my own data"})):
        if info is not None:
            (mine / "dataset.json").write_text(info)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["data", "export", str(mine), "--train", "0", "--val", "4", "--overwrite", "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"{str(mine)!r} is not empty and is not an earlier tome data export" in err and "Traceback" not in err
        assert (mine / "train" / "cats" / "1.png").read_bytes() == b"not generated" and (mine / "val").is_dir()

    out = tmp_path / "shapes"
    assert cli.main(["data", "export", str(out), "--train", "10", "--val", "4", "--image-size", "16",
                     "--no-progress"]) == 0
    train_files = sorted(p.relative_to(out) for p in (out / "train").rglob("*.png"))
    # --train 0 writes val/ again and keeps train/, which dataset.json goes on describing.
    assert cli.main(["data", "export", str(out), "--train", "0", "--val", "2", "--image-size", "16",
                     "--overwrite", "--no-progress"]) == 0
    assert sorted(p.relative_to(out) for p in (out / "train").rglob("*.png")) == train_files
    assert len(list((out / "val").rglob("*.png"))) == 2
    info = json.loads((out / "dataset.json").read_text())
    assert (info["train"], info["val"], info["image_size"], info["complete"]) == (10, 2, 16, True)
    # A kept split made with another seed or size would make dataset.json wrong: refused, nothing deleted.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "export", str(out), "--train", "0", "--val", "2", "--seed", "1", "--image-size", "16",
                  "--overwrite", "--no-progress"])
    assert exit_info.value.code == 2
    assert "train=0 keeps" in capsys.readouterr().err and len(list((out / "val").rglob("*.png"))) == 2


def test_data_export_into_a_file_is_named(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "export", str(blocker / "shapes"), "--train", "1", "--val", "0"])
    assert exit_info.value.code == 2
    assert f"lies under {str(blocker)!r}" in capsys.readouterr().err


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
    # Nor does the original release's tome.make_visualization: it lives in tome.vis, below the tools.
    code = "import sys, tome; print(any(m.startswith('tome.tools') for m in sys.modules)); tome.make_visualization; " \
           "print(any(m.startswith('tome.tools') for m in sys.modules), 'tome.vis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.split() == ["False", "False", "True"]
