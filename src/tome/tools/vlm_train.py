"""Train a small VLM (:mod:`tome.vlm_models`) on the generated question task (:mod:`tome.data.vqa`).

``python -m tome.tools.vlm_train --arch qwen2_5_vl --output-dir DIR --steps N`` trains with
AdamW and a warm-up + cosine schedule (``timm.scheduler.CosineLRScheduler``), the loss on the
answer word and ``<eos>`` only (teacher forcing), validation accuracy per slice every
``--val-every`` steps, checkpoints that resume exactly (``--resume auto``), a tqdm progress bar
and a ``log.jsonl`` history. At the end ``DIR/final`` is a ``save_pretrained`` folder
(safetensors, config, tokenizer and processor files, and a model card ``README.md`` with the
command and the accuracy per slice) that ``from_pretrained`` loads offline.

``--scene-loss W`` adds a dense auxiliary loss on the visual tokens the language model reads
(:class:`SceneHeads`): per token, the shape and colour of the object under it, the digit of
the number plate it covers and its own row and column in the image, from the scene record
(:func:`tome.data.vqa.scene_labels`). It stands in for what a real VLM's tower brings from
pretraining (CLIP knows shapes, glyphs and where its patches are; a tower trained by one answer
word per question learns "bright blob" long before any of them).

Training batch ``s`` holds samples ``s * batch_size ... (s + 1) * batch_size - 1`` of the
train split, so the data order is a function of the step alone and a resumed run sees the
samples the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import vlm_models
from ..data import vqa
from ..patch._vlm_fastv import language_layers
from ._common import non_negative_float, non_negative_int, positive_int
from ._run_dir import (
    AuxiliaryLoss,
    TrainerCommand,
    add_loop_arguments,
    add_session_arguments,
    append_log,
    decay_groups,
    prepare_run_dir,
    train_loop,
    warmup_cosine,
)

__all__ = ["train", "evaluate", "isolate_questions", "SceneHeads", "add_parser", "main"]

_CHECKPOINT = "checkpoint.pt"


def _batch(processor: Any, arch: str, samples: Sequence[vqa.VQASample], with_answers: bool,
           extra: Optional[Sequence[Sequence[Tuple[str, str, str]]]] = None) -> Dict[str, torch.Tensor]:
    """Processor inputs for ``samples``; with answers, ``labels`` are -100 except each answer word and its ``<eos>``.

    ``extra[i]`` (optional) holds more ``(slice, question, answer)`` about sample ``i``'s image,
    appended after its own answer as ``question answer <eos>`` each (denser supervision).
    """
    texts = [vqa.prompt_text(s.question, arch, s.answer if with_answers else None) for s in samples]
    if extra is not None:
        texts = [text + "".join(f" {q} {a} {vqa.EOS}" for _, q, a in more) for text, more in zip(texts, extra)]
    inputs = processor(text=texts, images=[vqa.to_pil(s) for s in samples], return_tensors="pt", padding=True)
    if with_answers:
        ids = inputs["input_ids"]
        vocab = processor.tokenizer.get_vocab()
        # Every question ends with "?": the token after it is an answer, and every <eos> ends one.
        answer = torch.zeros_like(ids, dtype=torch.bool)
        answer[:, 1:] = ids[:, :-1] == vocab["?"]
        answer |= ids == vocab[vqa.EOS]
        inputs["labels"] = torch.where(answer, ids, torch.full_like(ids, -100))
    return dict(inputs)


def isolate_questions(model: Any, processor: Any, arch: str, inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Make every question of a multi-question training sequence see the image and itself only.

    :func:`_batch` with ``extra`` packs ``image q1 a1 <eos> q2 a2 <eos> ...`` into one sequence,
    so a later answer can follow from earlier text (the colour question of the shape an
    existence question asks about gives its answer away) instead of the image. This returns
    the inputs with a 4-D additive attention mask, ``(batch, 1, tokens, tokens)``, in which each
    question's tokens attend causally to the image prefix (everything up to the last image
    token) and to their own question only, and with position ids in which every question
    starts where the first one does, so each question is computed exactly as if it were the
    only one after the image (the inference layout) while the tower runs once per image.
    Qwen2.5-VL's 3-D rotary positions come from its own ``get_rope_index``; LLaVA's count the
    row's tokens from its first one after the (left) padding, as ``get_rope_index`` does.

    Args:
        model: The :mod:`tome.vlm_models` model the inputs are for.
        processor: Its processor (for the token ids).
        arch: ``"qwen2_5_vl"`` or ``"llava"``.
        inputs: :func:`_batch` output; ``attention_mask`` is the processor's 2-D padding mask.

    Returns:
        A new dict: ``attention_mask`` 4-D (0 where attended, the dtype's minimum elsewhere),
        ``position_ids`` ``(3, batch, tokens)`` for Qwen2.5-VL or ``(batch, tokens)`` for LLaVA.

    Raises:
        ValueError: for a row without an image token.
    """
    vocab = processor.tokenizer.get_vocab()
    ids, keep = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, length = ids.shape
    image_end = vocab[vqa.VISION_END] if arch == "qwen2_5_vl" else vocab[vqa.LLAVA_IMAGE_TOKEN]
    index = torch.arange(length).expand(batch, length)
    is_image_end = ids == image_end
    if not bool(is_image_end.any(1).all()):
        raise ValueError("every row must hold an image for isolate_questions")
    prefix = index <= torch.where(is_image_end, index, -1).amax(1, keepdim=True)
    eos = (ids == vocab[vqa.EOS]).long()
    # Question j of a row: its tokens after the prefix with j <eos> before them.
    question = torch.where(prefix, -1, eos.cumsum(1) - eos)
    causal = index[:, None, :] <= index[:, :, None]
    same = (question[:, :, None] == question[:, None, :]) | prefix[:, None, :]
    allowed = causal & same & keep[:, None, :]
    dtype = model.dtype
    mask = torch.zeros(batch, 1, length, length, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    # Shift question j back by the distance from question 0's first token to its own first token.
    first = torch.full((batch, int(question.max()) + 2), length, dtype=torch.long)
    first.scatter_reduce_(1, question + 1, index, reduce="amin")
    offset = torch.where(prefix, 0, first.gather(1, question + 1) - first[:, 1:2])
    if arch == "qwen2_5_vl":
        positions, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=inputs.get("mm_token_type_ids"), image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"])
        positions = positions - offset[None]
    else:
        positions = (keep.long().cumsum(1) - 1).clamp(min=0) - offset
    return {**inputs, "attention_mask": mask, "position_ids": positions}


class SceneHeads(torch.nn.Module):
    """Linear read-outs of the scene from the visual tokens a VLM's language model reads (the ``--scene-loss``).

    A LayerNorm, then one linear head per label of :func:`tome.data.vqa.scene_labels` (shape:
    7 classes with "none", colour: 7, digit: 10, row and column: 8 bins each), applied to every
    visual token: LLaVA's projector outputs, Qwen2.5-VL's merged tokens
    (``visual(...).pooler_output``). A forward hook on that module keeps its output of the
    current forward, so the one model forward of a training step serves both losses. The heads
    are dropped when training ends; what they leave is visual tokens from which shape, colour,
    digit and place are linearly decodable.

    Args:
        model: A :mod:`tome.vlm_models` model (LLaVA or Qwen2.5-VL).
    """

    KINDS: Tuple[Tuple[str, int], ...] = (("shape", len(vqa.SHAPES) + 1), ("colour", len(vqa.COLOURS) + 1),
                                            ("digit", 10), ("row", vqa.POSITION_BINS),
                                            ("col", vqa.POSITION_BINS))

    def __init__(self, model: Any) -> None:
        super().__init__()
        width = model.config.text_config.hidden_size
        self.norm = torch.nn.LayerNorm(width)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, n) for name, n in self.KINDS})
        inner = model.model
        self._qwen = not hasattr(inner, "multi_modal_projector")
        source = inner.visual if self._qwen else inner.multi_modal_projector
        self._tokens: Optional[torch.Tensor] = None
        # Not a submodule: the hook is the only link, so the heads' state dict is their own.
        self._handle = source.register_forward_hook(self._keep)

    def _keep(self, module: Any, inputs: Any, output: Any) -> None:
        self._tokens = output.pooler_output if self._qwen else output

    def remove(self) -> None:
        """Detach the hook from the model."""
        self._handle.remove()

    def loss(self, samples: Sequence[vqa.VQASample]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The three heads' cross-entropies (each a mean over its supervised tokens), summed, on
        the visual tokens of the last forward.

        Args:
            samples: The forward's images' samples, one per image, in batch order.

        Returns:
            ``(loss, accuracy)``: the summed cross-entropies (a scalar tensor) and each head's
            accuracy where it is supervised (objects' cells for shape and colour, plate cells
            for the digit), as floats.

        Raises:
            RuntimeError: if no forward reached the visual tokens since the last call.
        """
        if self._tokens is None:
            raise RuntimeError("SceneHeads.loss needs a model forward with images first")
        tokens = self._tokens.reshape(len(samples), -1, self._tokens.shape[-1])
        self._tokens = None
        grid = int(round(tokens.shape[1] ** 0.5))
        labels = [vqa.scene_labels(sample, grid) for sample in samples]
        hidden = self.norm(tokens)
        total = hidden.new_zeros(())
        accuracy = {}
        for name, _ in self.KINDS:
            target = torch.as_tensor(np.stack([label[name] for label in labels])).reshape(-1)
            logits = self.heads[name](hidden).reshape(target.shape[0], -1)
            total = total + torch.nn.functional.cross_entropy(logits, target, ignore_index=-100)
            scored = target >= 0 if name in ("digit", "row", "col") else target > 0
            if bool(scored.any()):
                accuracy[name] = float((logits.argmax(-1)[scored] == target[scored]).float().mean())
        return total, accuracy


@torch.no_grad()
def evaluate(model: Any, processor: Any, arch: str, samples: Sequence[vqa.VQASample], batch_size: int = 32,
             generate: bool = False) -> Dict[str, Any]:
    """Accuracy per slice on ``samples``: the greedy first answer token against the answer.

    Args:
        model: A model of :mod:`tome.vlm_models`.
        processor: Its processor.
        arch: ``"qwen2_5_vl"`` or ``"llava"``.
        samples: Questions of the task.
        batch_size: Questions per forward.
        generate: Answer through ``model.generate`` (2 new tokens, greedy) instead of one
            forward's last logits (the same first token; slower, the real path).

    Returns:
        ``{"overall": accuracy, "slices": {slice: accuracy}, "count": {slice: questions}}``.
    """
    was_training = model.training
    model.eval()
    correct: Dict[str, int] = {}
    total: Dict[str, int] = {}
    tokenizer = processor.tokenizer
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        inputs = _batch(processor, arch, chunk, with_answers=False)
        if generate:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            predicted = [tokenizer.decode(row[inputs["input_ids"].shape[1]:][:1]).strip() for row in out]
        else:
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
            predicted = tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for sample, answer in zip(chunk, predicted):
            total[sample.slice] = total.get(sample.slice, 0) + 1
            correct[sample.slice] = correct.get(sample.slice, 0) + int(answer == sample.answer)
    model.train(was_training)
    slices = {name: correct[name] / total[name] for name in vqa.SLICES if name in total}
    overall = sum(correct.values()) / max(1, sum(total.values()))
    return {"overall": overall, "slices": slices, "count": {name: total[name] for name in slices}}


def _rng_state() -> Dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state()}


def _model_card(args: argparse.Namespace, history: List[Dict[str, Any]], final: Dict[str, Any],
                command: str) -> str:
    rows = "\n".join(f"| {name} | {100 * final['slices'][name]:.1f} | {100 / len(vqa.ANSWERS[name]):.1f} | "
                     f"{final['count'][name]} |" for name in final["slices"])
    steps = max((entry["step"] for entry in history if "loss" in entry), default=0)
    arch_name = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "llava": "LlavaForConditionalGeneration"}
    start = "random weights" if args.vision_init is None else (
        f"random weights but the vision tower, taken from the shipped `{vlm_models.VISION_INITS[args.vision_init]}` "
        "ViT (tome.vlm_models.init_llava_tower_from_vit)")
    if args.init_from:
        start = (f"the weights of the vlm-train checkpoint `{args.init_from}` (`--init-from`: a new run, its steps "
                 "counted from 0, with a fresh optimizer and schedule)")
    questions = "one question each" if args.questions_per_image == 1 else f"up to {args.questions_per_image} questions each"
    scene = "" if not args.scene_loss else (
        f", with the dense scene loss at weight {args.scene_loss} (tome.tools.vlm_train.SceneHeads; its heads are "
        "not part of this model)")
    return f"""# {args.arch} on the tome generated question task

A `{arch_name[args.arch]}` of size `{args.size}` (tome.vlm_models.SIZES), trained from {start}
on CPU on `tome.data.vqa` (seed {args.seed}, {args.image_size} px images), by:

```
{command}
```

{steps} optimizer steps of {args.batch_size} images, {questions} (the run's history is `log.jsonl`){scene}.
Validation: {sum(final['count'].values())} questions of the val split, greedy answer through `model.generate`.

Overall accuracy: **{100 * final['overall']:.1f} %**

| slice | accuracy % | chance % | questions |
|---|---|---|---|
{rows}

Load offline with `tome.vlm_models.load_demo_vlm(...)` or `from_pretrained(this folder)`;
prompts are `tome.data.vqa.prompt_text(question, "{args.arch}")`.
"""


_NOT_SETTINGS = ("argv", "func", "command")
"""Namespace entries that are not training settings (the tome CLI adds ``func`` and ``command``)."""

_RUN_FILES = (_CHECKPOINT, "log.jsonl", "final")
"""What a run writes into its output directory: all that ``--overwrite`` deletes."""


def _pretrained_tower(name: Optional[str]) -> Optional[torch.nn.Module]:
    """The shipped ViT ``--vision-init`` names (a key of ``vlm_models.VISION_INITS``), or None."""
    if name is None:
        return None
    from .demo_model import load_demo_model

    return load_demo_model(vlm_models.VISION_INITS[name])[0]


def _optimizer(model: torch.nn.Module, args: argparse.Namespace) -> Tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on vectors and embeddings; the vision tower at ``--vision-lr-scale``
    times the learning rate) and timm's cosine schedule with warmup."""
    # Two groups (decay, no decay); four (the same for the tower apart) when the tower's rate
    # differs, so checkpoints of runs without --vision-lr-scale keep resuming.
    tower = {id(p) for p in _vision_tower(model).parameters()} if args.vision_lr_scale != 1.0 else set()
    groups = []
    for in_tower, lr in ((False, args.lr), (True, args.lr * args.vision_lr_scale))[:1 + bool(tower)]:
        params = [(n, p) for n, p in model.named_parameters() if (id(p) in tower) == in_tower]
        groups += decay_groups(params, lambda n, p: p.ndim >= 2 and "embed" not in n, args.weight_decay, lr)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    return optimizer, warmup_cosine(optimizer, args)


def _vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The model's vision tower: LLaVA's CLIP ``vision_tower`` or Qwen2.5-VL's ``visual`` (with its merger)."""
    inner = model.model
    return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual


def _restore(resume: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             scene: Optional[AuxiliaryLoss]) -> Tuple[int, bool]:
    """Load a checkpoint (weights only) into the run; returns its step and whether it restored scene
    heads. A run may add ``--scene-loss`` on resume, or resume one whose heads read fewer labels
    (before ``row`` / ``col``): its heads then start fresh."""
    state = torch.load(resume, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    same_heads = _heads_fit(state, scene)
    if same_heads:
        scene.load_state_dict(state["scene"])
    return int(state["step"]), same_heads


def _init_from(path: Path, model: torch.nn.Module, scene: Optional[AuxiliaryLoss]) -> List[int]:
    """Start a new run from the weights of a vlm-train checkpoint (``--init-from``); returns the
    language-model layers it adds.

    The model may have more language-model layers than the checkpoint's (``--lm-layers``): the
    new ones, after the old, start with their attention output and MLP down projections at zero,
    so each adds nothing to the residual stream and the model computes what the checkpoint
    computed (a zero-initialised residual branch). Scene heads come along when their labels
    match. The optimizer and the schedule start fresh.

    Raises:
        ValueError: for a checkpoint that is not there, or whose weights fit the model in any
            other way than missing whole trailing layers.
    """
    if not path.is_file():
        raise ValueError(f"--init-from: no checkpoint at {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights, own = state["model"], model.state_dict()
    layer = re.compile(r"language_model\.layers\.(\d+)\.")
    old = {int(m.group(1)) for k in weights if (m := layer.search(k))}
    missing = sorted(set(own) - set(weights))
    new = sorted({int(m.group(1)) for k in missing if (m := layer.search(k))})
    bad = [k for k in missing if not ((m := layer.search(k)) and int(m.group(1)) > max(old, default=-1))]
    bad += sorted(set(weights) - set(own))
    bad += [k for k in set(weights) & set(own) if weights[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"--init-from: {str(path)!r} does not fit this model (only trailing language-model layers "
                         f"may be new): {bad[:5]}")
    model.load_state_dict(weights, strict=False)
    with torch.no_grad():
        for i in new:
            block = language_layers(model.model)[i]
            for linear in (block.self_attn.o_proj, block.mlp.down_proj):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
    if _heads_fit(state, scene):
        scene.module.load_state_dict(state["scene"]["heads"])
    return new


def _heads_fit(state: Dict[str, Any], scene: Optional[AuxiliaryLoss]) -> bool:
    """Whether checkpoint ``state`` holds scene heads that read the labels ``scene``'s heads read."""
    return scene is not None and "scene" in state and set(state["scene"]["heads"]) == set(scene.module.state_dict())


def _save_final(out: Path, args: argparse.Namespace, model: Any, processor: Any, final: Dict[str, Any],
                step: int, command: str) -> None:
    """The ``final/`` folder: save_pretrained weights and processor, model card, history, accuracy."""
    folder = out / "final"
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    log_path = out / "log.jsonl"
    history = [json.loads(line) for line in log_path.read_text().splitlines()]
    (folder / "README.md").write_text(_model_card(args, history, final, command))
    shutil.copy(log_path, folder / "log.jsonl")
    (folder / "val_accuracy.json").write_text(json.dumps({"step": step, **final}, indent=2) + "\n")


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run (or resume) one training run as ``args`` (from :func:`add_parser`'s options) says.

    Returns:
        The final validation result (:func:`evaluate`, through ``generate``).

    Raises:
        ValueError: for an output directory that holds a run, without ``--resume`` or
            ``--overwrite``; for ``--resume`` of a checkpoint that is not there.
    """
    torch.set_num_threads(args.threads)
    out, resume = prepare_run_dir(args, _CHECKPOINT, _RUN_FILES)
    model = vlm_models.build_model(args.arch, args.size, seed=args.seed, patch_size=args.patch_size,
                                   vision_tower=_pretrained_tower(args.vision_init), lm_layers=args.lm_layers)
    processor = vlm_models.build_processor(args.arch, args.image_size, args.patch_size)
    optimizer, scheduler = _optimizer(model, args)
    # The heads have an optimizer of their own (_run_dir.AuxiliaryLoss); "heads" is their checkpoint entry.
    scene = AuxiliaryLoss(lambda: SceneHeads(model), args, args.scene_loss, (0.9, 0.98), "heads") if args.scene_loss else None
    step, had_scene = (0, False) if resume is None else _restore(resume, model, optimizer, scheduler, scene)
    new_layers = _init_from(Path(args.init_from), model, scene) if resume is None and args.init_from else None
    # A resume with another --steps keeps the weights and the optimizer but stretches (or
    # shortens) the cosine to the new length; the same --steps continues the run exactly.
    rescheduled = resume is not None and scheduler.t_initial != args.steps
    old_steps = scheduler.t_initial
    scheduler.t_initial = args.steps
    scheduler.step_update(step)

    val = [vqa.make_sample(i, "val", args.seed, args.image_size) for i in range(args.val_samples)]
    command = "python -m tome.tools.vlm_train " + " ".join(shlex.quote(a) for a in args.argv)
    log = functools.partial(append_log, out / "log.jsonl")
    if resume is None:
        log({"event": "start", "command": command, "args": {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS},
             "parameters": sum(p.numel() for p in model.parameters()),
             **({"new_layers": new_layers} if new_layers is not None else {})})
    else:
        log({"event": "resume", "step": step, "command": command,
             **({"schedule_steps": [old_steps, args.steps]} if rescheduled else {}),
             **({"scene_heads": "new"} if scene is not None and not had_scene else {})})
    if scene is not None:
        scene.scheduler.step_update(step)
    run = _Run(args, model, processor, optimizer, scheduler, out / _CHECKPOINT, val, log, scene)
    step, stopped_early = run.loop(step)
    final = evaluate(model, processor, args.arch, val, args.eval_batch_size, generate=True)
    if scene is not None:
        scene.module.remove()
    log({"event": "final", "step": step, "val_generate": final, "stopped_early": stopped_early,
         "time": time.time()})
    _save_final(out, args, model, processor, final, step, command)
    return final


@dataclasses.dataclass
class _Run:
    """What the training loop works on."""

    args: argparse.Namespace
    model: Any
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpoint_path: Path
    val: List[Any]
    log: Callable[[Dict[str, Any]], None]
    scene: Optional[AuxiliaryLoss] = None

    def save(self, step: int) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "step": step}
        if self.scene is not None:
            state["scene"] = self.scene.state_dict()
        torch.save(state, self.checkpoint_path.with_suffix(".tmp"))
        self.checkpoint_path.with_suffix(".tmp").replace(self.checkpoint_path)

    def step(self, step: int) -> float:
        """One optimizer step on the batch of training questions at ``step``; returns the loss."""
        args = self.args
        first = step * args.batch_size
        samples = [vqa.make_sample(first + i, "train", args.seed, args.image_size) for i in range(args.batch_size)]
        extra = None
        if args.questions_per_image > 1:  # more questions about the same image, after its own one
            extra = [vqa.scene_questions(s, first + i, args.max_spatial, args.locate_questions)[1:args.questions_per_image]
                     for i, s in enumerate(samples)]
        # The tower stays frozen for the first --freeze-vision-steps (LLaVA's projector stage):
        # without gradients AdamW leaves its weights and moments alone.
        for p in _vision_tower(self.model).parameters():
            p.requires_grad_(step >= args.freeze_vision_steps)
        inputs = _batch(self.processor, args.arch, samples, with_answers=True, extra=extra)
        if args.isolate_questions:
            inputs = isolate_questions(self.model, self.processor, args.arch, inputs)
        loss = self.model(**inputs).loss
        total = loss
        if self.scene is not None:
            scene_loss, accuracy = self.scene.module.loss(samples)
            total = loss + self.scene.weight * scene_loss
            self.scene.record({"loss": scene_loss.item(), **accuracy})
            self.scene.optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        self.optimizer.step()
        self.scheduler.step_update(step + 1)
        if self.scene is not None:
            self.scene.step(step, args.clip_grad)
        return loss.item()  # the answer loss alone, comparable across runs with and without --scene-loss

    def loop(self, step: int) -> Tuple[int, bool]:
        """Train from ``step`` on (:func:`tome.tools._run_dir.train_loop`)."""
        return train_loop(self, step, f"train {self.args.arch}", "samples_per_s", self.validate)

    def validate(self, step: int, bar: Any) -> None:
        result = evaluate(self.model, self.processor, self.args.arch, self.val, self.args.eval_batch_size)
        scene = {"scene_train": self.scene.summary()} if self.scene is not None else {}
        self.log({"step": step, "val": result, **scene, "time": time.time()})
        bar.write(f"step {step}: val {100 * result['overall']:.1f}% "
                  + " ".join(f"{k} {100 * v:.0f}" for k, v in result["slices"].items()))


def _build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--arch", choices=vlm_models.ARCHS, required=True, help="model architecture")
    parser.add_argument("--output-dir", required=True, help="run directory (checkpoint, log.jsonl, final/)")
    parser.add_argument("--size", choices=tuple(vlm_models.SIZES), default="small",
                        help="model widths (default: %(default)s; tiny is for tests)")
    parser.add_argument("--steps", type=positive_int, default=3000, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="questions per step (default: %(default)s)")
    parser.add_argument("--questions-per-image", type=positive_int, default=1,
                        help="training questions per image: its own, then more of tome.data.vqa.scene_questions "
                             "in one sequence (default: %(default)s)")
    parser.add_argument("--isolate-questions", action="store_true",
                        help="with --questions-per-image > 1: each question attends to the image and itself only, "
                             "at the first question's positions, so no answer follows from the text of another "
                             "(tome.tools.vlm_train.isolate_questions)")
    parser.add_argument("--lm-layers", type=positive_int, default=None,
                        help="decoder layers of the language model (default: the --size's)")
    parser.add_argument("--init-from", default=None,
                        help="start a new run from this vlm-train checkpoint's weights (fresh optimizer and "
                             "schedule); with more --lm-layers the new trailing layers start as identities (a run that "
                             "--resume continues from its own checkpoint does not use it)")
    parser.add_argument("--max-spatial", type=non_negative_int, default=2,
                        help="with --questions-per-image > 1: at most this many spatial questions among an image's "
                             "extra questions (default: %(default)s)")
    parser.add_argument("--locate-questions", action="store_true",
                        help="with --questions-per-image > 1: add 'where is the star ?' (the object's side of the "
                             "image centre) for every object, a step towards the spatial slice (training only)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: %(default)s)")
    parser.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clip (default: %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=224,
                        help="image side in px; a multiple of 28 for qwen2_5_vl, 224 for llava (default: %(default)s)")
    parser.add_argument("--patch-size", type=positive_int, default=None,
                        help="llava only: the CLIP tower's patch size at 224 px (default: "
                             f"{vlm_models.LLAVA_PATCH}, 64 visual tokens; 14 gives 256)")
    parser.add_argument("--vision-init", choices=tuple(vlm_models.VISION_INITS), default=None,
                        help="llava only: start the tower from this shipped ViT (its shape and weights, the patch "
                             "embedding resampled to --patch-size) instead of random weights")
    parser.add_argument("--freeze-vision-steps", type=int, default=0,
                        help="keep the vision tower frozen for the first N steps, training projector and language "
                             "model only (default: %(default)s)")
    parser.add_argument("--vision-lr-scale", type=float, default=1.0,
                        help="the vision tower's learning rate as a multiple of --lr (default: %(default)s)")
    parser.add_argument("--scene-loss", type=non_negative_float, default=0.0,
                        help="weight of the dense auxiliary loss that teaches every visual token the shape, colour "
                             "and digit under it and its place (tome.tools.vlm_train.SceneHeads; 0: none, the default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task and the initial weights")
    parser.add_argument("--val-samples", type=positive_int, default=250,
                        help="validation questions (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=50, help="questions per validation forward (default: %(default)s)")
    add_loop_arguments(parser, log_every=25, val_every=250, checkpoint_every=100)
    add_session_arguments(parser)
    return parser


_COMMAND = TrainerCommand(name="vlm-train", module="tome.tools.vlm_train", help="train a small VLM on the generated question task",
                          description=__doc__.split("\n\n")[0], build=_build_parser, train=lambda args: train(args))
_run = _COMMAND.run
add_parser = _COMMAND.add_parser
main = _COMMAND.main


if __name__ == "__main__":
    raise SystemExit(main())
