"""lmms-eval runs the library's VLM reduction through the ``tome_vlm`` entry point, offline, on an exported task.

One process imports lmms-eval once (slow: it pulls in ``datasets``, ``evaluate`` and the
transformers pipelines); each evaluation is a few questions on a small model on the CPU.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from tome import vlm_models
from tome.data import vqa
from tome.tools import lmms_eval as tle

pytest.importorskip("lmms_eval")

QUESTIONS = 10
TOKENS = 64  # visual tokens per image of the task's models (224 px)


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory):
    """No downloads: the hub and datasets are offline for the whole module."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def task(offline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tle.export_task(tmp_path_factory.mktemp("task"), split="val", count=QUESTIONS)


@pytest.fixture(scope="module")
def task_manager(task: Path):
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(task), include_defaults=False)


def _model(model_args: str, batch_size: int):
    """The model lmms-eval's registry resolves ``tome_vlm`` to, built as its CLI builds it."""
    from lmms_eval import models

    return models.get_model(tle.MODEL_NAME).create_from_arg_string(model_args, {"batch_size": batch_size,
                                                                               "device": "cpu"})


def _prefill_lengths(lm) -> List[Tuple[int, int]]:
    """Record ``(tokens given to the model, tokens entering its language model)`` of every prefill, per sample."""
    lengths: List[Tuple[int, int]] = []
    given: List[int] = []

    def outer(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            given.append(int(ids.shape[1]))

    def inner(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:
            lengths.extend([(given[-1], int(embeds.shape[1]))] * embeds.shape[0])

    lm.model.register_forward_pre_hook(outer, with_kwargs=True)
    lm.model.model.language_model.register_forward_pre_hook(inner, with_kwargs=True)
    return lengths


def _evaluate(lm, task_manager) -> Dict:
    from lmms_eval import evaluator

    return evaluator.simple_evaluate(model=lm, tasks=[tle.TASK_NAME], task_manager=task_manager, bootstrap_iters=0,
                                     log_samples=True, verbosity="WARNING")


def _answers(result: Dict) -> List[str]:
    samples = sorted(result["samples"][tle.TASK_NAME], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] for s in samples]


def _direct_answers(model, processor, arch: str) -> List[str]:
    """Greedy answers of ``model`` itself, one question at a time, from :func:`vqa.prompt_text`."""
    answers = []
    for index in range(QUESTIONS):
        sample = vqa.make_sample(index, "val")
        inputs = processor(text=vqa.prompt_text(sample.question, arch), images=vqa.to_pil(sample), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        answers.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    return answers


def _direct_answers_and_ties(model, processor, arch: str) -> Tuple[List[str], Dict[int, Tuple[str, ...]]]:
    """:func:`_direct_answers`, and for each question whose first answer token is an exact tie
    between the two highest logits, the tied words."""
    answers, tied = [], {}
    for index in range(QUESTIONS):
        sample = vqa.make_sample(index, "val")
        inputs = processor(text=vqa.prompt_text(sample.question, arch), images=vqa.to_pil(sample), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        answers.append(processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:],
                                              skip_special_tokens=True)[0])
        top = out.scores[0][0].topk(2)
        if top.values[0] == top.values[1]:
            tied[index] = tuple(processor.tokenizer.decode([int(t)]).strip() for t in top.indices)
    return answers, tied


def test_entry_point_registers_the_wrapper():
    (entry,) = [e for e in entry_points(group="lmms_eval.models") if e.name == tle.MODEL_NAME]
    assert entry.value == "tome.tools.lmms_eval:manifests"
    from lmms_eval import models
    from lmms_eval.models.chat.huggingface import Huggingface

    cls = models.get_model(tle.MODEL_NAME)
    assert cls is tle.TomeVLM and issubclass(cls, Huggingface) and not cls.is_simple


def test_export_task_writes_the_questions(task: Path):
    rows = [json.loads(line) for line in (task / f"{tle.TASK_NAME}.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(QUESTIONS))
    for row in rows:
        sample = vqa.make_sample(row["index"], "val")
        assert (row["question"], row["answer"], row["slice"]) == (sample.question, sample.answer, sample.slice)
        with vqa.Image.open(task / row["image"]) as image:
            assert (torch.from_numpy(sample.image) == torch.from_numpy(vqa.np.asarray(image))).all()
    assert (task / "utils.py").is_file() and (task / f"{tle.TASK_NAME}.yaml").is_file()


def test_shipped_model_unreduced_and_reduced(task_manager):
    """The shipped Qwen2.5-VL (trained: its answers differ from question to question) evaluated
    through ``--model tome_vlm``: unreduced it answers as the model itself does on the prompts it
    was trained with; with ``visual_tokens=16,method=pool`` every prefill is 48 tokens shorter and
    the answers are those of the model patched directly with the same budget and method."""
    path = vlm_models.SHIPPED_VLMS["vqa-qwen2_5_vl"]
    lm = _model(f"pretrained={path},visual_tokens=none", batch_size=1)
    assert lm.model.visual_tokens is None
    full = _prefill_lengths(lm)
    result = _evaluate(lm, task_manager)
    metrics = result["results"][tle.TASK_NAME]
    assert {f"accuracy_{name},none" for name in vqa.SLICES} <= set(metrics)
    answers = _answers(result)
    truth = [vqa.make_sample(i, "val").answer for i in range(QUESTIONS)]

    model, processor = vlm_models.load_demo_vlm("vqa-qwen2_5_vl")
    model = model.to(torch.bfloat16)  # lmms-eval's huggingface model loads in bfloat16
    assert answers == _direct_answers(model, processor, "qwen2_5_vl")
    assert len(set(answers)) > 1  # a model that always says the same would prove little
    assert metrics["accuracy,none"] == pytest.approx(sum(a == t for a, t in zip(answers, truth)) / QUESTIONS)
    for name in vqa.SLICES:
        chosen = [a == t for a, t, i in zip(answers, truth, range(QUESTIONS)) if vqa.SLICES[i % 5] == name]
        assert metrics[f"accuracy_{name},none"] == pytest.approx(sum(chosen) / len(chosen))

    reduced_lm = _model(f"pretrained={path},visual_tokens=16,method=pool", batch_size=1)
    assert (reduced_lm.model.visual_tokens, reduced_lm.model.tome_method) == (16, "pool")
    short = _prefill_lengths(reduced_lm)
    reduced = _answers(_evaluate(reduced_lm, task_manager))
    assert len(full) == len(short) == QUESTIONS
    assert all(before == after for before, after in full)
    assert [before for before, _ in short] == [before for before, _ in full]
    assert all(after == before - (TOKENS - 16) for before, after in short)
    import tome

    tome.apply_patch(model, visual_tokens=16, method="pool")
    direct, tied = _direct_answers_and_ties(model, processor, "qwen2_5_vl")
    # bf16 logits can tie exactly (seen: '2' and '8' both 4.5938 on one digit question), and two
    # argmax implementations may break a tie differently; elsewhere the answers must be equal.
    assert len(tied) <= 2, tied
    assert all(r == d or r in tied.get(i, ()) for i, (r, d) in enumerate(zip(reduced, direct))), (reduced, direct)


def test_tiny_llava_batched_with_a_fraction(task_manager, tmp_path: Path):
    """A random LLaVA saved with its processor, batches of 4 (left padding), a quarter of the tokens."""
    folder = tmp_path / "llava"
    vlm_models.build_model("llava", "tiny").save_pretrained(folder)
    vlm_models.build_processor("llava").save_pretrained(folder)
    lm = _model(f"pretrained={folder},visual_tokens=0.25,method=random,seed=3,positions=renumber,prop_attn=True",
                batch_size=4)
    patched = lm.model
    assert (patched.visual_tokens, patched.tome_method, patched.seed, patched.positions) == (0.25, "random", 3, "renumber")
    assert patched.prop_attn is True
    lengths = _prefill_lengths(lm)
    metrics = _evaluate(lm, task_manager)["results"][tle.TASK_NAME]  # lmms-eval frees lm's model at the end
    assert 0.0 <= metrics["accuracy,none"] <= 1.0
    assert len(lengths) == QUESTIONS
    assert all(after == before - (TOKENS - TOKENS // 4) for before, after in lengths)


@pytest.mark.parametrize(("value", "expected"), [
    (64, 64), ("64", 64), (0.25, 0.25), ("0.25", 0.25), (1.0, 1.0), (None, None), ("none", None), ("None", None),
])
def test_parse_visual_tokens(value, expected):
    assert tle.parse_visual_tokens(value) == expected


@pytest.mark.parametrize("value", [0, -3, 1.5, "lots", True, "0"])
def test_bad_visual_tokens_name_the_value(value):
    with pytest.raises(ValueError, match="visual_tokens"):
        tle.parse_visual_tokens(value)


def test_bad_model_args_fail_before_loading(offline):
    """The model is not loaded (the path does not exist) when an option is bad."""
    with pytest.raises(ValueError, match=r"visual_tokens=1\.5"):
        _model("pretrained=/nonexistent,visual_tokens=1.5", batch_size=1)
    with pytest.raises(ValueError, match=r"method='nope'.*pool"):
        _model("pretrained=/nonexistent,visual_tokens=16,method=nope", batch_size=1)
    with pytest.raises(ValueError, match=r"positions"):
        _model("pretrained=/nonexistent,visual_tokens=16,positions=sideways", batch_size=1)
    with pytest.raises(ValueError, match=r"prop_attn='maybe'"):
        _model("pretrained=/nonexistent,visual_tokens=16,prop_attn=maybe", batch_size=1)


def test_export_task_cli_and_errors(tmp_path: Path, capsys):
    from tome.cli import main

    main(["vlm-export-task", "--output", str(tmp_path / "t"), "--count", "3", "--first", "5", "--task", "mine"])
    assert "--tasks mine" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "t" / "mine.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [5, 6, 7]
    with pytest.raises(ValueError, match="count"):
        tle.export_task(tmp_path / "u", count=0)
    with pytest.raises(ValueError, match="task"):
        tle.export_task(tmp_path / "u", task="my-task")
