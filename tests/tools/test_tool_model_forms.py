"""`--model` in every form: timm names, shipped models, hf:<id or folder>, diffusers:<folder>; one -r grammar.

Hugging Face and diffusers models are tiny ones the tests build and save with
``save_pretrained`` into a temporary folder: nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch

from tome import cli
from tome.tools import checkpoints

from tools_helpers import write_image_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FAST = ["--runs", "1", "--min-time", "0", "--warmup", "0"]


def _hf_vit(folder, classifier=True, labels=("class_0", "class_1")):
    """A 2-block Hugging Face ViT on 32x32 images with 8x8 patches, saved to ``folder``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=len(labels),
                                    id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config) if classifier else transformers.ViTModel(config)
    model.save_pretrained(folder)
    return folder


def _unet(folder):
    """A 2-level Stable-Diffusion-layout UNet on 16x16 latents, saved to ``folder``."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    unet.save_pretrained(folder)
    return folder


def _pipeline_folder(folder):
    """A pipeline folder as save_pretrained lays it out: model_index.json and the denoiser in unet/."""
    _unet(folder / "unet")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- hf:


def test_bench_an_hf_folder(tmp_path, capsys):
    folder = _hf_vit(tmp_path / "vit")
    out = tmp_path / "bench.json"
    cli.main(["bench", "--model", f"hf:{folder}", "-r", "0,2", "--batch-size", "2", *FAST, "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [row["label"] for row in rows] == ["0", "2"]
    assert [row["tokens_left"] for row in rows] == [17, 13]  # 16 patches + class token, 2 merged in each of 2 blocks
    assert rows[1]["gflops"] < rows[0]["gflops"]
    assert f"Model: hf:{folder} (ViTForImageClassification" in capsys.readouterr().out


def test_eval_an_hf_classifier_with_its_class_names(tmp_path, capsys):
    folder = _hf_vit(tmp_path / "vit", labels=("class_1", "class_0"))  # the model's order is not the sorted one
    data = write_image_folder(tmp_path / "data", corrupt=0)
    out = tmp_path / "eval.json"
    cli.main(["eval", "--model", f"hf:{folder}", "--data", str(data), "-r", "0,2", "--workers", "0",
              "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [result["total"] for result in results] == [6, 6]
    assert "matched to the model's class names" in capsys.readouterr().out


def test_eval_refuses_an_hf_model_without_a_head(tmp_path, capsys):
    folder = _hf_vit(tmp_path / "vit", classifier=False)
    data = write_image_folder(tmp_path / "data", corrupt=0)
    err = _error(capsys, ["eval", "--model", f"hf:{folder}", "--data", str(data)])
    assert "tome eval measures classifiers" in err and "ViTModel" in err and "no classification head" in err


def test_visualize_an_hf_model(tmp_path, picture, capsys):
    folder = _hf_vit(tmp_path / "vit")
    output = tmp_path / "merges.png"
    cli.main(["visualize", str(picture), "--model", f"hf:{folder}", "-r", "2,4", "-o", str(output)])
    assert output.is_file() and "r = 2, 4" in capsys.readouterr().out


def test_export_an_hf_model(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    folder = _hf_vit(tmp_path / "vit")
    output = tmp_path / "vit.onnx"
    cli.main(["export", "--model", f"hf:{folder}", "-r", "2", "-o", str(output), "--batch-size", "2", "--runs", "1",
              "--min-time", "0", "--no-optimize"])
    text = capsys.readouterr().out
    assert output.is_file() and "fp32 r=2" in text
    assert "2/2" in text  # onnxruntime's logits give eager's top-1 for both images


def test_hf_folder_that_does_not_exist_or_is_a_file(tmp_path, capsys):
    assert "the folder './no-such-vit' does not exist" in _error(capsys, ["bench", "--model", "hf:./no-such-vit"])
    (tmp_path / "config.json").write_text("{}")
    err = _error(capsys, ["bench", "--model", f"hf:{tmp_path / 'config.json'}"])
    assert "is a file; give the folder save_pretrained wrote" in err


def test_hf_hub_id_offline_is_refused_quickly_and_clearly(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoints, "host_reachable", lambda *a, **k: False)
    err = _error(capsys, ["bench", "--model", "hf:tome-tests/no-such-model"])
    assert "'tome-tests/no-such-model' is neither a local folder nor a model in the Hugging Face cache" in err
    assert "cannot be reached" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in _error(capsys, ["bench", "--model", "hf:tome-tests/no-such-model"])


# ----------------------------------------------------------------------------- diffusers:


@pytest.mark.parametrize("layout", ["denoiser", "pipeline"])
def test_bench_a_diffusers_folder_by_ratio(layout, tmp_path, capsys):
    folder = _unet(tmp_path / "unet") if layout == "denoiser" else _pipeline_folder(tmp_path / "pipe")
    out = tmp_path / "bench.json"
    cli.main(["bench", "--model", f"diffusers:{folder}", "--ratio", "0.5", *FAST, "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [row["ratio"] for row in rows] == [0.0, 0.5] and report["batch_size"] == 2
    assert rows[0]["merging_blocks"] == 0 and rows[1]["merging_blocks"] > 0
    assert rows[1]["gflops"] < rows[0]["gflops"]  # half the tokens of the highest level merged
    text = capsys.readouterr().out
    assert "UNet2DConditionModel" in text and "samples/s" in text
    assert ("unet of the pipeline" in text) == (layout == "pipeline")


def test_diffusers_takes_ratio_not_r(tmp_path, capsys):
    folder = _unet(tmp_path / "unet")
    err = _error(capsys, ["bench", "--model", f"diffusers:{folder}", "-r", "8"])
    assert "pass --ratio (e.g. --ratio 0.5" in err and "not -r" in err
    err = _error(capsys, ["bench", "--model", "vit_tiny_patch16_224", "--ratio", "0.5"])
    assert "--ratio is the merge setting of diffusers:FOLDER models" in err and "give -r" in err
    assert "'1.5'" in _error(capsys, ["bench", "--model", f"diffusers:{folder}", "--ratio", "0.5,1.5"])


@pytest.mark.parametrize("command", [["eval", "--data", "{data}"], ["visualize", "{picture}", "-o", "{out}/v.png"],
                                     ["export", "-o", "{out}/x.onnx"], ["tune", "--max-flops-ratio", "0.5"],
                                     ["demo", "-o", "{out}"]])
def test_commands_that_do_not_take_diffusers_say_what_they_take(command, tmp_path, picture, capsys):
    data = write_image_folder(tmp_path / "data", corrupt=0)
    argv = [word.format(data=data, picture=picture, out=tmp_path / "out") for word in command]
    err = _error(capsys, [*argv, "--model", f"diffusers:{tmp_path}"])
    assert f"tome {command[0]} does not take diffusers models such as --model 'diffusers:{tmp_path}'" in err
    assert "timm, shipped, hf" in err and "tome bench --model diffusers:FOLDER --ratio" in err


def test_a_folder_without_a_denoiser_is_named(tmp_path, capsys):
    _hf_vit(tmp_path / "vit")
    err = _error(capsys, ["bench", "--model", f"diffusers:{tmp_path / 'vit'}", "--ratio", "0.5"])
    assert "UNet2DConditionModel" in err and "SD3Transformer2DModel" in err
    assert "is not a folder" in _error(capsys, ["bench", "--model", f"diffusers:{tmp_path / 'nothing'}"])


# ----------------------------------------------------------------------------- forms and grammar


@pytest.mark.parametrize("value", ["hff:google/vit", "hf:", "timm:vit_base_patch16_224", "vit_base_patch16_2244"])
def test_a_model_of_no_form_names_the_value_and_the_forms(value, capsys):
    err = _error(capsys, ["bench", "--model", value])
    assert repr(value) in err
    assert "hf:<Hugging Face model id or local folder>" in err and "diffusers:<local folder" in err


def test_export_reads_the_schedule_grammar_of_every_command(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["export", "-o", "x.onnx", "-r", "16:1"]).r == (16, 1.0)
    assert parser.parse_args(["export", "-o", "x.onnx", "-r", "8/8/4"]).r == [8, 8, 4]
    assert parser.parse_args(["bench", "-r", "16,1"]).r == [16, 1]  # a comma separates schedules everywhere
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "-o", "x.onnx", "-r", "16,1"])  # once the increasing schedule (16, 1.0)
    err = capsys.readouterr().err
    assert "'16,1' lists 2 schedules where one is expected (write 16:1" in err and "16/1 for r per block" in err


def test_train_reads_the_same_grammar(capsys):
    err = _error(capsys, ["train", "-r", "8,-1", "--no-progress"])
    assert "write 8:-1" in err
