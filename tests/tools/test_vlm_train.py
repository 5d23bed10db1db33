"""Training a tiny VLM on the question task: resume is exact, runs are not overwritten, the final folder loads."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from tome.tools import vlm_train  # noqa: E402


def _argv(out, arch="qwen2_5_vl", *extra):
    size = "112" if arch == "qwen2_5_vl" else "224"
    return ["--arch", arch, "--size", "tiny", "--output-dir", str(out), "--steps", "4", "--batch-size", "2",
            "--image-size", size, "--val-samples", "5", "--val-every", "2", "--log-every", "1",
            "--checkpoint-every", "1", "--warmup", "1", "--eval-batch-size", "5", "--no-progress", *extra]


def _weights(path):
    return torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, arch, capsys):
    vlm_train.main(_argv(tmp_path / "whole", arch))
    vlm_train.main(_argv(tmp_path / "split", arch, "--stop-at-step", "2"))
    assert _weights(tmp_path / "split")["step"] == 2
    vlm_train.main(_argv(tmp_path / "split", arch, "--resume", "auto"))
    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert whole["step"] == split["step"] == 4
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    assert whole["optimizer"]["state"][0]["exp_avg"].equal(split["optimizer"]["state"][0]["exp_avg"])
    # The weights did move, and the losses of steps 3-4 are the same in both histories.
    losses = [{e["step"]: e["loss"] for e in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())
               if "loss" in e} for d in ("whole", "split")]
    assert losses[0][3] == losses[1][3] and losses[0][4] == losses[1][4]
    assert losses[0][4] != losses[0][1]


def test_final_folder_loads_offline_and_generates(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tome.data import vqa

    vlm_train.main(_argv(tmp_path, "qwen2_5_vl"))
    folder = tmp_path / "final"
    card = (folder / "README.md").read_text()
    assert "python -m tome.tools.vlm_train --arch qwen2_5_vl" in card
    assert "4 optimizer steps of 2 images, one question each" in card
    for name in vqa.SLICES:
        assert f"| {name} |" in card
    assert (folder / "model.safetensors").is_file() and (folder / "log.jsonl").is_file()
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    sample = vqa.make_sample(0, "val", image_size=112)
    inputs = processor(text=vqa.prompt_text(sample.question, "qwen2_5_vl"), images=vqa.to_pil(sample),
                       return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 2
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 16  # 112 px: 4 x 4 merged tokens
    recorded = json.loads((folder / "val_accuracy.json").read_text())
    assert recorded["step"] == 4 and set(recorded["slices"]) == set(vqa.SLICES)


def test_a_run_is_never_overwritten_by_accident(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's own file")
    vlm_train.main(_argv(tmp_path, "llava", "--steps", "1", "--val-every", "1"))
    with pytest.raises(ValueError, match="--resume auto.*--overwrite"):
        vlm_train.main(_argv(tmp_path, "llava", "--steps", "1"))
    with pytest.raises(ValueError, match="no checkpoint"):
        vlm_train.main(_argv(tmp_path, "llava", "--resume", str(tmp_path / "missing.pt")))
    vlm_train.main(_argv(tmp_path, "llava", "--steps", "1", "--val-every", "1", "--overwrite"))
    starts = [e for e in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if e.get("event") == "start"]
    assert len(starts) == 1  # the old history went with the old run
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"  # --overwrite deletes the run's files only


def test_add_parser_registers_vlm_train():
    parser = argparse.ArgumentParser()
    vlm_train.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["vlm-train", "--arch", "llava", "--output-dir", "x"])
    assert args.func == vlm_train._run and args.steps > 0  # the command's run (a bound method)


def test_resume_with_other_steps_stretches_the_schedule(tmp_path):
    vlm_train.main(_argv(tmp_path, "llava", "--stop-at-step", "2"))
    vlm_train.main(_argv(tmp_path, "llava", "--resume", "auto", "--steps", "6", "--val-every", "6"))
    history = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    resumed = [e for e in history if e.get("event") == "resume"]
    assert resumed and resumed[0]["schedule_steps"] == [4, 6] and resumed[0]["step"] == 2
    steps = [e["step"] for e in history if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]
    # At step 4 of 6 the cosine has not reached its floor (it would have, at the end of a 4-step run).
    lr = {e["step"]: e["lr"] for e in history if "lr" in e}
    assert lr[4] > lr[6] > 0


def test_history_plot_and_example_grid(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from tome.tools.vlm_demo import plot_history, save_example_grid

    vlm_train.main(_argv(tmp_path / "run", "llava", "--steps", "2", "--val-every", "1"))
    plot_history({"llava": str(tmp_path / "run" / "log.jsonl")}, str(tmp_path / "history.png"))
    save_example_grid(str(tmp_path / "grid.png"), per_slice=1, image_size=64)
    assert Image.open(tmp_path / "history.png").size[0] > 100
    assert Image.open(tmp_path / "grid.png").size == (5 * (64 + 8), 64 + 30 + 8)


def test_tome_cli_runs_vlm_train_and_vlm_demo(tmp_path, capsys):
    from tome import cli

    assert cli.main(["vlm-train", *_argv(tmp_path, "llava", "--steps", "1", "--val-every", "1")]) == 0
    start = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["args"]["arch"] == "llava" and "func" not in start["args"]
    assert (tmp_path / "final" / "val_accuracy.json").is_file()
    assert cli.main(["vlm-demo", "--model", "vqa-llava", "--count", "2"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("/2 correct")


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_more_questions_per_image_are_all_supervised(arch):
    from tome import vlm_models
    from tome.data import vqa

    processor = vlm_models.build_processor(arch, 112 if arch == "qwen2_5_vl" else 224)
    samples = [vqa.make_sample(i, "train", image_size=112 if arch == "qwen2_5_vl" else 224) for i in range(3)]
    extra = [vqa.scene_questions(s, i)[1:4] for i, s in enumerate(samples)]
    batch = vlm_train._batch(processor, arch, samples, True, extra)
    for row, (sample, more) in enumerate(zip(samples, extra)):
        tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist())
        labelled = [t for t, label in zip(tokens, batch["labels"][row].tolist()) if label != -100]
        expected = [w for answer in [sample.answer] + [a for _, _, a in more] for w in (answer, vqa.EOS)]
        assert labelled == expected
    # One question per image: the answer word and <eos>, the last two tokens (left padding).
    single = vlm_train._batch(processor, arch, samples, True)
    assert torch.equal(single["labels"] != -100, torch.arange(single["labels"].shape[1]).expand(3, -1)
                       >= single["labels"].shape[1] - 2)


def test_a_run_with_several_questions_per_image_trains(tmp_path):
    vlm_train.main(_argv(tmp_path / "run", "llava", "--questions-per-image", "4"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["args"]["questions_per_image"] == 4
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    # The card counts a step in images (a batch is images, each with its questions).
    assert "4 optimizer steps of 2 images, up to 4 questions each" in (tmp_path / "run" / "final" / "README.md").read_text()


def test_spatial_and_locate_options_reach_the_training_questions(tmp_path, monkeypatch):
    asked = []
    original = vlm_train.vqa.scene_questions

    def recording(sample, seed, max_spatial, locate):
        questions = original(sample, seed, max_spatial, locate)
        asked.append((max_spatial, locate, questions))
        return questions

    monkeypatch.setattr(vlm_train.vqa, "scene_questions", recording)
    vlm_train.main(_argv(tmp_path / "run", "llava", "--questions-per-image", "16", "--max-spatial", "3",
                         "--locate-questions"))
    assert asked and all(m == 3 and locate for m, locate, _ in asked)
    assert any(name == "locate" for *_, questions in asked for name, _, _ in questions)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["args"]["max_spatial"] == 3 and log[0]["args"]["locate_questions"] is True


def test_init_from_a_shallower_checkpoint_computes_the_same_then_trains(tmp_path):
    from tome import vlm_models
    from tome.data import vqa

    vlm_train.main(_argv(tmp_path / "old", "llava", "--steps", "2", "--scene-loss", "0.5"))
    old = vlm_models.build_model("llava", "tiny")
    old.load_state_dict(_weights(tmp_path / "old")["model"])
    deep = vlm_models.build_model("llava", "tiny", lm_layers=3)
    args = argparse.Namespace(seed=0, lr=1e-3, weight_decay=0.05, steps=4, warmup=1, scene_loss=0.5)
    scene = vlm_train.AuxiliaryLoss(lambda: vlm_train.SceneHeads(deep), args, 0.5, (0.9, 0.98), "heads")
    assert vlm_train._init_from(tmp_path / "old" / "checkpoint.pt", deep, scene) == [1, 2]
    heads = _weights(tmp_path / "old")["scene"]["heads"]
    assert all(torch.equal(v, scene.module.state_dict()[k]) for k, v in heads.items())
    processor = vlm_models.build_processor("llava", 224)
    inputs = vlm_train._batch(processor, "llava", [vqa.make_sample(i, "val") for i in range(2)], with_answers=False)
    old.eval(), deep.eval()
    with torch.no_grad():
        torch.testing.assert_close(deep(**inputs).logits, old(**inputs).logits, rtol=1e-5, atol=1e-5)
    # Through the command line: the run records the new layers, trains them, and its final config has three.
    vlm_train.main(_argv(tmp_path / "deep", "llava", "--lm-layers", "3", "--init-from",
                         str(tmp_path / "old" / "checkpoint.pt")))
    log = [json.loads(line) for line in (tmp_path / "deep" / "log.jsonl").read_text().splitlines()]
    assert log[0]["new_layers"] == [1, 2]
    trained = _weights(tmp_path / "deep")["model"]
    assert trained["model.language_model.layers.2.mlp.down_proj.weight"].abs().sum() > 0
    config = json.loads((tmp_path / "deep" / "final" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    card = (tmp_path / "deep" / "final" / "README.md").read_text()
    assert "--init-from" in card and "random weights" not in card


def test_init_from_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    from tome import vlm_models

    vlm_train.main(_argv(tmp_path / "qwen", "qwen2_5_vl", "--steps", "1"))
    with pytest.raises(ValueError, match="does not fit"):
        vlm_train._init_from(tmp_path / "qwen" / "checkpoint.pt", vlm_models.build_model("llava", "tiny"), None)
    vlm_train.main(_argv(tmp_path / "deep", "llava", "--steps", "1", "--lm-layers", "2"))
    with pytest.raises(ValueError, match="does not fit"):  # fewer layers than the checkpoint: not a trailing gap
        vlm_train._init_from(tmp_path / "deep" / "checkpoint.pt", vlm_models.build_model("llava", "tiny"), None)
    with pytest.raises(ValueError, match="no checkpoint"):
        vlm_train._init_from(tmp_path / "absent.pt", vlm_models.build_model("llava", "tiny"), None)
    with pytest.raises(ValueError, match="lm_layers"):
        vlm_models.build_config("llava", "tiny", lm_layers=0)


def test_max_spatial_must_not_be_negative(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vlm_train.main(_argv(tmp_path, "llava", "--questions-per-image", "2", "--max-spatial", "-1"))
    assert "-1" in capsys.readouterr().err


def _tower(path, prefix="model.vision_tower."):
    return {k: v for k, v in _weights(path)["model"].items() if k.startswith(prefix)}


def test_the_vision_tower_stays_frozen_for_the_first_steps_then_trains(tmp_path):
    from tome import vlm_models

    start = vlm_models.build_model("llava", "tiny", seed=0).state_dict()
    vlm_train.main(_argv(tmp_path / "run", "llava", "--freeze-vision-steps", "2", "--stop-at-step", "2"))
    init = {k: v for k, v in start.items() if k.startswith("model.vision_tower.")}
    frozen = _tower(tmp_path / "run")
    assert init.keys() == frozen.keys() and all(torch.equal(init[k], frozen[k]) for k in init)
    projector = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(_weights(tmp_path / "run")["model"][projector], start[projector])
    vlm_train.main(_argv(tmp_path / "run", "llava", "--freeze-vision-steps", "2", "--resume", "auto"))
    trained = _tower(tmp_path / "run")
    assert not torch.equal(init["model.vision_tower.embeddings.patch_embedding.weight"],
                           trained["model.vision_tower.embeddings.patch_embedding.weight"])


def test_vision_lr_scale_sets_the_towers_rate(tmp_path):
    vlm_train.main(_argv(tmp_path, "qwen2_5_vl", "--vision-lr-scale", "0.25", "--steps", "2", "--warmup", "0"))
    groups = _weights(tmp_path)["optimizer"]["param_groups"]
    assert len(groups) == 4 and groups[2]["initial_lr"] == pytest.approx(0.25 * groups[0]["initial_lr"])
    # The tower's groups hold exactly the tower's parameters (Qwen2.5-VL's `visual`, merger included).
    from tome import vlm_models

    model = vlm_models.build_model("qwen2_5_vl", "tiny")
    tower = sum(p.numel() > 0 for p in model.model.visual.parameters())
    assert len(groups[2]["params"]) + len(groups[3]["params"]) == tower


def test_llava_from_the_shipped_shapes_vit_at_patch_56(tmp_path):
    from tome import vlm_models
    from tome.tools.demo_model import load_demo_model

    vlm_train.main(_argv(tmp_path, "llava", "--vision-init", "shapes-vit", "--patch-size", "56", "--steps", "1",
                         "--freeze-vision-steps", "1", "--val-every", "1"))
    vit = load_demo_model(vlm_models.VISION_INITS["shapes-vit"])[0]
    tower = _tower(tmp_path)
    q = vit.blocks[0].attn.qkv.weight.chunk(3)[0]
    assert torch.equal(tower["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"], q)
    assert tower["model.vision_tower.embeddings.patch_embedding.weight"].shape == (128, 3, 56, 56)
    assert len({k.split(".")[4] for k in tower if ".layers." in k}) == len(vit.blocks) - 1
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["vision_config"]["patch_size"] == 56 and config["image_seq_length"] == 16
    assert "taken from the shipped `shapes-long` ViT" in (tmp_path / "final" / "README.md").read_text()


def test_tower_options_of_another_arch_are_refused(tmp_path):
    with pytest.raises(ValueError, match="llava tower"):
        vlm_train.main(_argv(tmp_path, "qwen2_5_vl", "--vision-init", "shapes-vit"))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_isolated_questions_are_computed_as_if_each_were_alone(arch):
    import dataclasses

    from tome import vlm_models
    from tome.data import vqa

    size = 112 if arch == "qwen2_5_vl" else 224
    model = vlm_models.build_model(arch, "tiny", seed=0).eval()
    processor = vlm_models.build_processor(arch, size)
    samples = [vqa.make_sample(i, "train", image_size=size) for i in range(3)]
    extra = [vqa.scene_questions(s, i)[1:2 + i] for i, s in enumerate(samples)]  # rows of 2, 3 and 4 questions
    packed = vlm_train.isolate_questions(model, processor, arch, vlm_train._batch(processor, arch, samples, True, extra))
    assert packed["attention_mask"].shape[:2] == (3, 1)
    with torch.no_grad():
        logits = model(**packed).logits
        shared = model(**vlm_train._batch(processor, arch, samples, True, extra)).logits
    checked = 0
    for row, (sample, more) in enumerate(zip(samples, extra)):
        answered = (packed["labels"][row] != -100).nonzero().flatten()
        questions = [(sample.slice, sample.question, sample.answer)] + list(more)
        assert len(answered) == 2 * len(questions)
        for j, (name, question, answer) in enumerate(questions):
            alone = dataclasses.replace(sample, slice=name, question=question, answer=answer)
            single = vlm_train._batch(processor, arch, [alone], True)
            with torch.no_grad():
                expected = model(**single).logits[0]
            wanted = (single["labels"][0] != -100).nonzero().flatten()
            # The logits that predict answer j and its <eos> are those of the question alone.
            torch.testing.assert_close(logits[row, answered[2 * j:2 * j + 2] - 1], expected[wanted - 1],
                                       rtol=1e-4, atol=1e-4)
            if j > 0:  # without isolation the earlier questions change them
                assert not torch.allclose(shared[row, answered[2 * j:2 * j + 2] - 1], expected[wanted - 1],
                                          rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == 9


def test_isolate_questions_trains_and_is_recorded(tmp_path):
    vlm_train.main(_argv(tmp_path / "run", "qwen2_5_vl", "--questions-per-image", "3", "--isolate-questions"))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["args"]["isolate_questions"] is True
    assert all(e["loss"] == e["loss"] for e in log if "loss" in e)  # no NaN from fully masked padding rows
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_scene_heads_read_the_visual_tokens_the_language_model_reads(arch):
    from tome import vlm_models
    from tome.data import vqa

    size = 112 if arch == "qwen2_5_vl" else 224
    model = vlm_models.build_model(arch, "tiny", seed=0)
    processor = vlm_models.build_processor(arch, size)
    heads = vlm_train.SceneHeads(model)
    samples = [vqa.make_sample(i, "train", image_size=size) for i in range(2)]
    inputs = vlm_train._batch(processor, arch, samples, with_answers=True)
    captured = {}
    if arch == "llava":
        model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.update(tokens=o))
    else:
        model.model.visual.register_forward_hook(lambda m, i, o: captured.update(tokens=o.pooler_output))
    model(**inputs)
    loss, accuracy = heads.loss(samples)
    # The heads saw exactly the image tokens the language model was given, one grid per image.
    tokens = captured["tokens"].reshape(2, -1, model.config.text_config.hidden_size)
    assert tokens.shape[1] == int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(
        vqa.IMAGE_TOKEN if arch == "qwen2_5_vl" else vqa.LLAVA_IMAGE_TOKEN)).sum()) // 2
    assert loss.ndim == 0 and torch.isfinite(loss) and set(accuracy) <= {"shape", "colour", "digit", "row", "col"}
    assert {"row", "col"} <= set(accuracy)  # every cell has a place
    loss.backward()
    projector = model.model.visual.merger if arch == "qwen2_5_vl" else model.model.multi_modal_projector
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    with pytest.raises(RuntimeError, match="forward with images first"):
        heads.loss(samples)  # the tokens of one forward serve one loss
    heads.remove()
    model(**inputs)
    assert heads._tokens is None


def test_scene_loss_resumes_exactly_and_leaves_the_model_alone(tmp_path):
    extra = ("--scene-loss", "0.5", "--questions-per-image", "2")
    vlm_train.main(_argv(tmp_path / "whole", "llava", *extra))
    vlm_train.main(_argv(tmp_path / "split", "llava", *extra, "--stop-at-step", "2"))
    vlm_train.main(_argv(tmp_path / "split", "llava", *extra, "--resume", "auto"))
    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    for name, tensor in whole["scene"]["heads"].items():
        assert torch.equal(tensor, split["scene"]["heads"][name]), name
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    # The heads are not part of the model: the state dict and the final folder hold the model only.
    plain = tmp_path / "plain"
    vlm_train.main(_argv(plain, "llava", "--questions-per-image", "2"))
    assert set(whole["model"]) == set(_weights(plain)["model"])
    assert not any("heads" in name for name in whole["model"])
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    scene = [e["scene_train"] for e in log if "scene_train" in e]
    assert scene and all(e["loss"] > 0 and 0 <= e["shape"] <= 1 for e in scene)
    # The answer loss alone is logged: the plain run's first step has the same data and weights.
    first = {d: next(e["loss"] for e in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())
                     if "loss" in e) for d in ("whole", "plain")}
    assert first["whole"] == first["plain"]
    assert "scene loss at weight 0.5" in (tmp_path / "whole" / "final" / "README.md").read_text()


def test_scene_loss_can_join_a_run_on_resume(tmp_path):
    run = tmp_path / "run"
    vlm_train.main(_argv(run, "llava", "--stop-at-step", "2"))
    vlm_train.main(_argv(run, "llava", "--scene-loss", "1", "--resume", "auto"))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    resume = next(e for e in log if e.get("event") == "resume")
    assert resume["scene_heads"] == "new" and "scene" in _weights(run)
    assert {"heads.row.weight", "heads.col.weight"} <= set(_weights(run)["scene"]["heads"])


def test_scene_heads_of_older_targets_start_fresh_on_resume(tmp_path):
    # A checkpoint whose heads read fewer labels (before row / col) resumes at its step with new heads.
    run = tmp_path / "run"
    vlm_train.main(_argv(run, "llava", "--scene-loss", "1", "--stop-at-step", "2"))
    state = _weights(run)
    state["scene"]["heads"] = {k: v for k, v in state["scene"]["heads"].items() if not k.startswith(("heads.row", "heads.col"))}
    torch.save(state, run / "checkpoint.pt")
    vlm_train.main(_argv(run, "llava", "--scene-loss", "1", "--resume", "auto"))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    resume = next(e for e in log if e.get("event") == "resume")
    assert resume["step"] == 2 and resume["scene_heads"] == "new"
    assert set(_weights(run)["scene"]["heads"]) > set(state["scene"]["heads"])


def test_scene_loss_must_not_be_negative(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vlm_train.main(_argv(tmp_path, "llava", "--scene-loss", "-1"))
    assert "-1" in capsys.readouterr().err
