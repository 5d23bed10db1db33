"""`tome eval`: accuracy and throughput per r, skipped images, torchrun sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tome
from tome import cli
from tome.tools.evaluate import evaluate
from tome.tools.evaluate import image_folder as load_folder

from tools_helpers import TINY_ARGS, tiny_model, write_image_folder


def _manual_counts(model, root, schedules):
    """Correct top-1 per setting, computed image by image without the tool."""
    dataset = load_folder(str(root), model)
    counts = []
    for schedule in schedules:
        model.r = schedule
        correct = 0
        for index in range(len(dataset)):
            image, label, _ = dataset[index]
            if image is None:
                continue
            with torch.inference_mode():
                correct += int(model(image[None]).argmax(-1).item() == label)
        counts.append(correct)
    return counts


def test_evaluate_counts_and_skips(image_folder):
    model = tome.apply_patch(tiny_model(), r=0)
    dataset = load_folder(str(image_folder), model)
    report = evaluate(model, dataset, [0, 2, (3, -1.0)], batch_size=4, workers=0, progress=False)
    assert report.images == 7 and report.skipped == 1
    assert report.skipped_examples[0].endswith("broken_0.png")
    assert [r.total for r in report.results] == [6, 6, 6]
    assert [r.correct1 for r in report.results] == _manual_counts(model, image_folder, [0, 2, (3, -1.0)])
    # 4 classes: the top-5 is the top-4, which always holds the label.
    assert all(r.correct5 == 6 and r.images_per_s > 0 for r in report.results)
    assert len(dataset) == 7


def test_eval_command_prints_one_table(image_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    cli.main(["eval", *TINY_ARGS, "--data", str(image_folder), "-r", "0,2", "--workers", "0",
              "--batch-size", "4", "--json", str(out)])
    text = capsys.readouterr().out
    assert "top-1 %" in text and "top-5 %" in text and "img/s" in text
    assert "1 skipped" in text and "broken_0.png" in text
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["results"]] == ["0", "2"]
    assert report["skipped"] == 1 and report["results"][0]["total"] == 6


def test_eval_with_workers_and_all_bad_batch(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", classes=2, per_class=1, corrupt=3)
    cli.main(["eval", *TINY_ARGS, "--data", str(root), "-r", "0", "--workers", "1", "--batch-size", "2"])
    assert "2 of 5 images evaluated" in capsys.readouterr().out


def test_eval_two_processes_match_one(tmp_path, image_folder):
    # Same weights everywhere: a checkpoint file (also exercises --checkpoint).
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": tiny_model().state_dict(), "epoch": 1}, checkpoint)
    common = [*TINY_ARGS, "--checkpoint", str(checkpoint), "--data", str(image_folder), "-r", "0,2,4",
              "--workers", "0", "--batch-size", "2", "--device", "cpu"]
    single = tmp_path / "single.json"
    cli.main(["eval", *common, "--json", str(single)])
    double = tmp_path / "double.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tome.cli", "eval", *common, "--json", str(double)],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["skipped"] == one["skipped"] == 1
    keys = ("correct1", "correct5", "total")
    assert [[r[k] for k in keys] for r in two["results"]] == [[r[k] for k in keys] for r in one["results"]]
    assert one["results"][0]["total"] == 6


def test_eval_rejects_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *TINY_ARGS, "--data", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "missing" in capsys.readouterr().err


def test_eval_rejects_folder_without_classes(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *TINY_ARGS, "--data", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "empty" in capsys.readouterr().err


def test_eval_rejects_more_classes_than_the_model(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", classes=5, per_class=1, corrupt=0)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *TINY_ARGS, "--data", str(root), "--workers", "0"])
    assert exit_info.value.code == 2
    assert "5 classes" in capsys.readouterr().err


def test_eval_fails_when_no_image_can_be_read(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", classes=1, per_class=0, corrupt=3)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *TINY_ARGS, "--data", str(root), "-r", "0", "--workers", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "none of the 3 images could be read" in err and "broken_0.png" in err


def test_eval_json_path_checked_before_the_run(image_folder, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    monkeypatch.setattr("tome.tools.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *TINY_ARGS, "--data", str(image_folder), "--json", str(blocker / "eval.json")])
    assert exit_info.value.code == 2
    assert "blocker" in capsys.readouterr().err


def test_sixteen_bit_images_read_like_eight_bit(tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "data" / "grey"
    root.mkdir(parents=True)
    ramp = np.linspace(0, 255, 40 * 40).reshape(40, 40).round().astype(np.uint8)
    Image.fromarray(ramp).save(root / "a_8bit.png")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(root / "b_16bit.png")
    dataset = load_folder(str(tmp_path / "data"), tiny_model())
    eight, sixteen = dataset[0][0], dataset[1][0]
    torch.testing.assert_close(sixteen, eight)


def test_eval_of_the_shipped_model_on_an_export(tmp_path, capsys):
    """The exported folder's labels are the shipped model's; without --model that is shapes-long."""
    from tome.data import export_image_folder

    root = export_image_folder(tmp_path / "shapes", train=0, val=60, progress=False)
    out = tmp_path / "eval.json"
    cli.main(["eval", "--data", str(root / "val"), "-r", "0", "--workers", "0", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["results"][0]["total"] == 60
    # The default shapes-long reaches ~96% on this task (the short shapes model ~65%).
    assert report["results"][0]["top1"] > 85
    text = capsys.readouterr().out
    assert "matched to the model's class names" in text and "shipped model shapes-long" in text


def test_eval_takes_the_short_shipped_model_by_name(tmp_path, capsys):
    from tome.data import export_image_folder

    root = export_image_folder(tmp_path / "shapes", train=0, val=60, progress=False)
    out = tmp_path / "eval.json"
    cli.main(["eval", "--model", "shapes", "--data", str(root / "val"), "-r", "0", "--workers", "0",
              "--json", str(out)])
    top1 = json.loads(out.read_text())["results"][0]["top1"]
    assert 40 < top1 < 85  # the short model: ~65%
    assert "shipped model shapes " in capsys.readouterr().out


def test_eval_matches_class_names_in_an_unnumbered_folder(tmp_path):
    """An older export (class directories without numbers, sorted alphabetically) still gets the model's labels."""
    from tome.data import CLASSES, export_image_folder
    from tome.tools.demo_model import load_demo_model

    root = export_image_folder(tmp_path / "shapes", train=0, val=20, progress=False) / "val"
    for directory in root.iterdir():
        directory.rename(root / directory.name.split("_", 1)[1])
    model = tome.apply_patch(load_demo_model()[0])
    dataset = load_folder(str(root), model)
    assert dataset.classes == sorted(CLASSES) and dataset.matches_model
    assert sorted(dataset[i][1] for i in range(len(dataset))) == sorted(i % 10 for i in range(20))
    assert [dataset[i][1] for i in range(len(dataset)) if "circle" in dataset[i][2]] == [0, 0]


class _LogitsAreInputs(torch.nn.Module):
    """A stand-in classifier whose logits are its inputs ``(batch, classes)``: hits are known in advance."""

    def forward(self, x):
        return x * 1.0


def test_count_correct_counts_top1_top5_and_skips():
    from tome.tools.evaluate import count_correct

    logits = torch.tensor([
        [0.0, 9.0, 1.0, 2.0, 3.0, 4.0],  # label 1: top-1
        [9.0, 0.0, 1.0, 2.0, 3.0, 4.0],  # label 1: the lowest, outside the top-5
        [9.0, 1.0, 0.0, 2.0, 3.0, 4.0],  # label 3: within the top-5 only
        [5.0, 5.0, 0.0, 0.0, 0.0, 0.0],  # label 1: tied with 0, the argmax is the first: top-5 only
    ])
    labels = torch.tensor([1, 1, 3, 1])
    batches = [(logits[:2], labels[:2], ["a.png"]), (None, torch.empty(0, dtype=torch.long), [f"{i}.png" for i in "bcdef"]),
               (logits[2:], labels[2:], [])]
    (result,), skipped, examples = count_correct(_LogitsAreInputs(), batches, device=torch.device("cpu"))
    assert result.r is None  # the model as it is: no patch needed
    assert (result.correct1, result.correct5, result.total) == (1, 3, 4)
    assert skipped == 6 and examples == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert result.seconds > 0


def test_count_correct_runs_every_setting_on_each_batch(image_folder):
    from torch.utils.data import DataLoader

    from tome.tools.evaluate import collate_skipping, count_correct

    model = tome.apply_patch(tiny_model(), r=1)
    dataset = load_folder(str(image_folder), model)
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_skipping)
    results, skipped, _ = count_correct(model, loader, [0, 4, None], device=torch.device("cpu"))
    assert model.r == 1 and skipped == 1  # each setting is undone after its forward
    assert [r.r for r in results] == [0, 4, None] and all(r.total == 6 for r in results)
    assert [r.correct1 for r in results] == _manual_counts(model, image_folder, [0, 4, 1])
