"""`tome export`: ONNX files written, checked against eager and timed in onnxruntime."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tome import cli  # noqa: E402
from tome.tools.export import export_and_measure, generated_images  # noqa: E402

from tools_helpers import TINY_ARGS, tiny_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def test_export_command_with_int8_writes_checks_and_times(tmp_path, capsys):
    output = tmp_path / "out" / "vit.onnx"
    status = cli.main(["export", *TINY_ARGS, "-r", "4", "-o", str(output), "--int8", "--batch-size", "4",
                     "--runs", "2", "--min-time", "0", "--threads", "1"])
    assert status == 0
    text = capsys.readouterr().out
    for name in ("vit.onnx", "vit.r0.onnx", "vit.int8.onnx", "vit.r0.int8.onnx"):
        assert (output.parent / name).is_file()
        assert f"Wrote {output.parent / name}" in text
    for label in ("fp32 r=0", "fp32 r=4", "int8 r=0 (dynamic)", "int8 r=4 (dynamic)", "FLOP ceiling"):
        assert label in text


def test_export_and_measure_rows(tmp_path):
    import tome

    model = tome.apply_patch(tiny_model(), r=0)
    rows = export_and_measure(model, (2, -1.0), tmp_path / "m.onnx", input_size=(3, 32, 32), batch_size=4,
                              int8="static", calibration_batches=2, rounds=2)
    assert [row.label for row in rows] == ["fp32 r=0", "fp32 r=2:-1", "int8 r=0 (static)", "int8 r=2:-1 (static)"]
    # fp32 files reproduce the eager model per sample; merging lowers the FLOPs.
    for row in rows[:2]:
        assert all(row.agreement.matching), row.agreement.summary()
    assert rows[0].flop_ceiling == pytest.approx(1.0)
    assert rows[1].flop_ceiling > 1.05
    assert rows[0].speedup[0] == pytest.approx(1.0)
    assert rows[2].speedup_same_precision == pytest.approx(1.0)
    # int8 files differ from eager by more than rounding.
    assert max(rows[3].agreement.max_abs_diff) > 1e-4
    assert model.r == 0  # restored


def test_export_without_the_optimizer(tmp_path):
    import onnx

    import tome

    model = tome.apply_patch(tiny_model(), r=0)
    kwargs = dict(input_size=(3, 32, 32), batch_size=2, rounds=1)
    optimized = export_and_measure(model, 4, tmp_path / "a.onnx", **kwargs)
    plain = export_and_measure(model, 4, tmp_path / "b.onnx", optimize=False, **kwargs)
    for before, after in zip(optimized, plain):
        # The unoptimized graph keeps the nodes the optimizer folds away, and still matches eager per sample.
        assert len(onnx.load(str(after.path)).graph.node) > len(onnx.load(str(before.path)).graph.node)
        assert all(after.agreement.matching), after.agreement.summary()
    args = cli.build_parser().parse_args(["export", "-o", "m.onnx", "--no-optimize"])
    assert args.optimize is False
    assert cli.build_parser().parse_args(["export", "-o", "m.onnx"]).optimize is True


def test_generated_images_are_the_shape_task():
    x = generated_images(3, (3, 32, 32))
    assert x.shape == (3, 3, 32, 32)
    assert not (x[0] == x[1]).all()
    assert generated_images(2, (1, 32, 16)).shape == (2, 1, 32, 16)


@pytest.mark.parametrize("argv, message", [
    (["-o", "m.txt"], "must end in .onnx"),
    (["-o", "m.onnx", "--opset", "13"], "opset=13"),
])
def test_export_command_rejects_bad_values(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", *TINY_ARGS, *argv, "--runs", "1"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_export_command_rejects_bad_input_size(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "-o", "m.onnx", "--input-size", "big"])
    assert "'big' is not an input size" in capsys.readouterr().err


def test_export_command_names_an_input_size_the_model_rejects(tmp_path, capsys):
    # The tiny model is built for 32x32 without dynamic_img_size: 48 is refused before exporting.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", *TINY_ARGS, "-o", str(tmp_path / "m.onnx"), "--input-size", "48", "--runs", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--input-size 48x48 is not a size this model takes" in err and "built for 32x32" in err
    assert "Traceback" not in err and not (tmp_path / "m.onnx").exists()


def test_export_command_with_a_batch_of_one(tmp_path, capsys):
    # The example is then a batch of one (torch.export used to fix the batch at 1); the files take any batch.
    from tome.export import onnx_session, run_onnx

    output = tmp_path / "vit.onnx"
    assert cli.main(["export", *TINY_ARGS, "-r", "4", "-o", str(output), "--batch-size", "1", "--runs", "1",
                     "--min-time", "0", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "fp32 r=4" in text and "1/1" in text  # checked against eager on its one image
    x = generated_images(3, (3, 32, 32))
    for path in (output, tmp_path / "vit.r0.onnx"):
        assert run_onnx(onnx_session(path, threads=1), x).shape == (3, 4)
