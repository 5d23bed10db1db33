"""tome.make_visualization and `tome visualize`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tome
from tome import cli
from tome.tools.visualize import LABEL_HEIGHT, MIN_PANEL, PANEL_GAP, merge_panels, render_merges

from tools_helpers import TINY_ARGS, tiny_model


def _source(groups, prefix: int = 1) -> torch.Tensor:
    """(1, tokens, prefix + patches) 0/1 map from a group id per patch (prefix tokens stay alone)."""
    groups = torch.as_tensor(groups)
    tokens = prefix + int(groups.max()) + 1
    source = torch.zeros(1, tokens, prefix + groups.numel())
    for p in range(prefix):
        source[0, p, p] = 1
    source[0, prefix + groups, prefix + torch.arange(groups.numel())] = 1
    return source


def _quadrant_image(size: int = 32) -> Image.Image:
    """Four flat quadrants: red, green, blue, white."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    half = size // 2
    pixels[:half, :half] = (255, 0, 0)
    pixels[:half, half:] = (0, 255, 0)
    pixels[half:, :half] = (0, 0, 255)
    pixels[half:, half:] = (255, 255, 255)
    return Image.fromarray(pixels)


def test_exported_from_tome():
    from tome.tools.visualize import make_visualization

    assert tome.make_visualization is make_visualization


def test_groups_painted_in_their_mean_colour_with_outlines():
    image = _quadrant_image(32)  # 4x4 patches of 8 pixels
    # Top half (red and green patches) is one token; every bottom patch is its own.
    groups = [0] * 8 + list(range(1, 9))
    out = np.asarray(tome.make_visualization(image, _source(groups), patch_size=8))
    assert out.shape == (32, 32, 3)
    # Inside the merged top token: the mean of red and green, truncated as in the original.
    assert tuple(out[4, 4]) == (127, 127, 0) and tuple(out[4, 27]) == (127, 127, 0)
    # The interior of an unmerged bottom-left patch keeps its own (blue) colour.
    assert tuple(out[20, 4]) == (0, 0, 255)
    # Outlines: the image border and the boundary between tokens differ from the fill.
    assert tuple(out[0, 4]) != (127, 127, 0)
    assert tuple(out[15, 4]) != (127, 127, 0) and tuple(out[16, 4]) != (0, 0, 255)
    # No outline inside a token: the red/green seam inside the merged token is filled.
    assert tuple(out[4, 15]) == (127, 127, 0) and tuple(out[4, 16]) == (127, 127, 0)


def test_prefix_tokens_generalise_class_token():
    image = _quadrant_image(32)
    groups = list(range(16))
    with_class = tome.make_visualization(image, _source(groups, prefix=1), 8, class_token=True)
    no_class = tome.make_visualization(image, _source(groups, prefix=0), 8, class_token=False)
    registers = tome.make_visualization(image, _source(groups, prefix=5), 8, prefix_tokens=5)
    # Same groups of patches, so the same fill colours (outline colours follow token ids).
    fills = [np.asarray(v)[4, 4] for v in (with_class, no_class, registers)]
    assert all((fill == (255, 0, 0)).all() for fill in fills)


def test_accepts_two_dimensional_source_and_tuple_patch():
    image = _quadrant_image(32).resize((32, 16))
    source = _source(list(range(8)))[0]
    assert tome.make_visualization(image, source, patch_size=(4, 16)).size == (32, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch_size": 16}, "4 patches"),
        ({"prefix_tokens": -1}, "-1"),
    ],
)
def test_mismatch_is_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tome.make_visualization(_quadrant_image(32), _source(list(range(16))), **kwargs)


def test_batch_source_is_refused():
    source = _source(list(range(16))).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="batch of 2"):
        tome.make_visualization(_quadrant_image(32), source, 8)


@pytest.mark.parametrize(
    "overrides, prefix",
    [({}, 1), ({"reg_tokens": 4}, 5), ({"class_token": False, "global_pool": "avg"}, 0)],
    ids=["class-token", "registers", "no-class-token"],
)
def test_render_merges_for_every_prefix_layout(overrides, prefix):
    model = tiny_model(**overrides)
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    panels = merge_panels(image, model, [0, 2, 4])
    assert [label.split(":")[0] for label, _ in panels] == ["input", "r=0", "r=2", "r=4"]
    tokens = [int(label.split(": ")[1].split()[0]) for label, _ in panels[1:]]
    assert tokens == [16 + prefix, 16 + prefix - 4, 16 + prefix - 8]
    assert model.r == 0 and model._tome_info["trace_source"] is True
    canvas = render_merges(image, model, [2, 4])
    scale = -(-MIN_PANEL // 32)
    assert canvas.size == (3 * 32 * scale + 2 * PANEL_GAP, 32 * scale + LABEL_HEIGHT)


def test_render_restores_settings_of_a_patched_model():
    model = tome.apply_patch(tiny_model(), r=3)
    render_merges(Image.new("RGB", (32, 32)), model, [1])
    assert model.r == 3 and model._tome_info["trace_source"] is False


def test_visualize_command(picture, tmp_path, capsys):
    output = tmp_path / "vis" / "out.png"
    cli.main(["visualize", str(picture), *TINY_ARGS, "-r", "2,4,3:-1", "-o", str(output)])
    assert str(output) in capsys.readouterr().out
    scale = -(-MIN_PANEL // 32)
    with Image.open(output) as image:
        assert image.size == (4 * 32 * scale + 3 * PANEL_GAP, 32 * scale + LABEL_HEIGHT)


def test_visualize_default_output_dir(picture, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli.main(["visualize", str(picture), *TINY_ARGS, "-r", "2"])
    assert (tmp_path / "tome_outputs" / "picture_merges.png").is_file()


def test_visualize_uses_the_demo_model_by_default(picture, tmp_path, monkeypatch):
    import tome.tools.demo_model as demo_model

    monkeypatch.setattr(demo_model, "load_demo_model", lambda: (tiny_model(), "tiny stand-in"))
    output = tmp_path / "out.png"
    cli.main(["visualize", str(picture), "-r", "2", "-o", str(output)])
    assert output.is_file()


def test_visualize_draws_with_shapes_long_by_default(picture, tmp_path, capsys):
    output = tmp_path / "out.png"
    cli.main(["visualize", str(picture), "-r", "2", "-o", str(output)])
    assert output.is_file()
    assert "Model: shipped model shapes-long " in capsys.readouterr().out


def test_visualize_missing_image(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["visualize", str(tmp_path / "nope.png"), *TINY_ARGS])
    assert exit_info.value.code == 2
    assert "nope.png" in capsys.readouterr().err


def test_visualize_names_a_directory_as_one(tmp_path, capsys, monkeypatch):
    # It said "does not exist" of a directory that does.
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["visualize", ".", *TINY_ARGS])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'.' is a directory" in err and "pass an image file, e.g. 'cat.png'" in err and "does not exist" not in err


def test_visualize_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no image here")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["visualize", str(bad), *TINY_ARGS])
    assert exit_info.value.code == 2
    assert "bad.png" in capsys.readouterr().err


def test_visualize_reads_16_bit_images(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)  # dark left, bright right
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    out = tmp_path / "merges.png"
    cli.main(["visualize", str(tmp_path / "deep.png"), *TINY_ARGS, "-r", "2", "-o", str(out)])
    with Image.open(out) as canvas:
        scale = -(-MIN_PANEL // 32)
        panel = np.asarray(canvas.convert("L"))[LABEL_HEIGHT:, : 32 * scale]
    # PIL's own conversion clips 16-bit values: the input panel would be almost all white.
    assert panel.mean() == pytest.approx(127.5, abs=20)
    assert panel[:, :5].mean() < 40 and panel[:, -5:].mean() > 215


def test_visualize_output_checked_before_the_model_loads(picture, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    monkeypatch.setattr("tome.tools.visualize.load_model_from_args", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["visualize", str(picture), *TINY_ARGS, "-o", str(blocker / "merges.png")])
    assert exit_info.value.code == 2
    assert "blocker" in capsys.readouterr().err
