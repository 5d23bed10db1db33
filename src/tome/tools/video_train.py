"""Train the small class-conditional video diffusion transformer (:mod:`tome.video_models`) on the generated clips.

``python -m tome.tools.video_train --output-dir DIR --steps N`` trains a pixel-space
``WanTransformer3DModel`` by flow matching on :mod:`tome.data.clips` with AdamW and a warm-up
+ cosine schedule (``timm.scheduler.CosineLRScheduler``). The class label is dropped (the
"no class" entry) for a fraction of the samples so classifier-free guidance works. Every
``--val-every`` steps it logs the validation loss (fixed clips, noise and noise levels), samples
one clip per class from fixed noise, saves them as a PNG strip (``samples/step_NNNNNN.png``: a
row per class, a column per frame) and logs how often the shipped shapes classifier recognises
the requested class in the sampled frames. Checkpoints resume exactly (``--resume auto``);
``log.jsonl`` keeps the history. At the end (``--steps`` or ``--time-limit``) ``DIR/final``
holds the model (:func:`tome.video_models.save_model`: safetensors and config), a model card
``README.md`` with the command, the history, the last sample strip and the training curve.

``--repa W`` adds representation alignment (REPA: Yu et al., ICLR 2025, "Representation
Alignment for Generation: Training Diffusion Transformers Is Easier Than You Think", Sec. 3):
an MLP maps the transformer's tokens after block ``--repa-block`` (noisy input) to the shipped
shapes classifier's patch features of the clean frames, and ``W`` times their negative cosine
similarity joins the loss (:class:`RepresentationAlignment`). The paper reports generation
quality reached 17.5x sooner on ImageNet; here it hands the small denoiser what the classifier
knows about shape, which the flow-matching loss alone teaches slowly (docs/video.md).

Training batch ``s`` holds clips ``s * batch_size ... (s + 1) * batch_size - 1`` of the train
split, and its noise comes from a generator seeded with ``(seed, s)``, so a resumed run sees
the batches the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import video_models
from ..data import clips
from ..data.synthetic import CLASSES
from ._common import non_negative_float, positive_int
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

__all__ = ["train", "RepresentationAlignment", "classifier_accuracy", "load_classifier", "sample_strip", "plot_history", "add_parser", "main"]

_CHECKPOINT = "checkpoint.pt"
_NOT_SETTINGS = ("argv", "func", "command")
_RUN_FILES = (_CHECKPOINT, "log.jsonl", "final", "samples")


def load_classifier() -> torch.nn.Module:
    """The shipped shapes classifier (``shapes-long``, 64 px) in eval mode."""
    from .demo_model import load_demo_model

    return load_demo_model("shapes-long")[0].eval()


@torch.no_grad()
def classifier_accuracy(classifier: torch.nn.Module, videos: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of frames in which ``classifier`` finds the clip's class.

    Args:
        classifier: An image classifier over the 10 shape classes at 64 px, inputs normalised
            as :mod:`tome.data.synthetic` does (the shipped one: :func:`load_classifier`).
        videos: ``(batch, 3, frames, height, width)`` in ``[-1, 1]``; frames are resized
            (bilinear) to 64 px.
        labels: ``(batch,)`` class indices.

    Returns:
        Correct frames over all frames, in ``[0, 1]``.
    """
    batch, _, frames, height, width = videos.shape
    images = videos.permute(0, 2, 1, 3, 4).reshape(batch * frames, 3, height, width)
    images = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    predicted = torch.cat([classifier(chunk).argmax(-1) for chunk in images.split(256)])
    return float((predicted == labels.repeat_interleave(frames)).float().mean())


def sample_strip(videos: torch.Tensor, path: Path, scale: int = 2) -> Path:
    """Save clips ``(batch, 3, frames, H, W)`` in ``[-1, 1]`` as one PNG: a row per clip, a column per frame."""
    from PIL import Image

    batch, _, frames, height, width = videos.shape
    pixels = ((videos.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = pixels.permute(0, 3, 2, 4, 1).reshape(batch * height, frames * width, 3).numpy()
    image = Image.fromarray(np.ascontiguousarray(grid)).resize((frames * width * scale, batch * height * scale),
                                                               Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def plot_history(history: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Plot a run's ``log.jsonl`` entries: training and validation loss, and the classifier's
    accuracy on the validation samples, against the step. Needs matplotlib (the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_points = [(e["step"], e["loss"]) for e in history if "loss" in e]
    vals = [e for e in history if "val_loss" in e]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    if train_points:
        left.plot(*zip(*train_points), label="train (window mean)", lw=1)
    if vals:
        left.plot([e["step"] for e in vals], [e["val_loss"] for e in vals], "o-", label="val (fixed noise)")
        right.plot([e["step"] for e in vals], [100 * e["sample_accuracy"] for e in vals], "o-")
    left.set(xlabel="step", ylabel="flow-matching loss", yscale="log")
    left.legend()
    right.set(xlabel="step", ylabel="%", ylim=(0, 100), title="classifier finds the class in samples")
    right.axhline(10, color="grey", ls=":", lw=1)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class RepresentationAlignment(torch.nn.Module):
    """REPA for :class:`tome.video_models.ClassConditionedWan` (Yu et al., ICLR 2025, Sec. 3).

    A forward hook keeps the output of transformer block ``block`` (``(batch, tokens, width)``,
    tokens in ``frames x height x width`` order); a three-layer MLP (SiLU) maps each token to the
    classifier's width, and :meth:`loss` is minus its mean cosine similarity with the frozen
    classifier's patch tokens (the output of its second-to-last block, as a class-token
    classifier's last block trains only its class token) of the clean frames, resized to the
    classifier's input size. The denoiser's patch grid per frame must be the classifier's
    (48 px frames at patch 6 and the 64 px classifier at patch 8: both 8 x 8).

    Args:
        model: The denoiser.
        classifier: A timm ``VisionTransformer`` (the shipped one: :func:`load_classifier`), frozen.
        block: Index of the transformer block whose output is aligned.

    Raises:
        ValueError: for a ``block`` the transformer lacks.
    """

    def __init__(self, model: video_models.ClassConditionedWan, classifier: torch.nn.Module, block: int) -> None:
        super().__init__()
        blocks = model.transformer.blocks
        if not 0 <= block < len(blocks):
            raise ValueError(f"repa block must be in [0, {len(blocks) - 1}], got {block}")
        width = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
        target = classifier.embed_dim
        self.projector = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.SiLU(),
                                             torch.nn.Linear(2 * width, 2 * width), torch.nn.SiLU(),
                                             torch.nn.Linear(2 * width, target))
        self._classifier = [classifier.eval().requires_grad_(False)]  # a list: not a submodule, not saved
        self._patch = model.transformer.config.patch_size
        self._tokens: Optional[torch.Tensor] = None
        self._handle = blocks[block].register_forward_hook(self._keep)

    def _keep(self, module: Any, inputs: Any, output: Any) -> None:
        self._tokens = output

    def remove(self) -> None:
        """Detach the hook from the transformer."""
        self._handle.remove()

    @torch.no_grad()
    def targets(self, videos: torch.Tensor) -> torch.Tensor:
        """The classifier's patch tokens of clean clips ``(batch, 3, frames, H, W)`` normalised as
        :func:`tome.data.clips.clip_batch` gives them (the classifier's own normalisation):
        ``(batch, frames * grid * grid, width)``, in the transformer's token order."""
        classifier = self._classifier[0]
        batch, _, frames, height, width = videos.shape
        side = classifier.patch_embed.img_size
        images = videos.permute(0, 2, 1, 3, 4).reshape(batch * frames, 3, height, width)
        images = torch.nn.functional.interpolate(images, size=tuple(side), mode="bilinear", align_corners=False)
        tokens = classifier.forward_intermediates(images, indices=[len(classifier.blocks) - 2], output_fmt="NLC",
                                                  intermediates_only=True)[0]
        grid = (height // self._patch[1]) * (width // self._patch[2])
        if tokens.shape[1] != grid:
            raise ValueError(f"the classifier's {tokens.shape[1]} patches per frame are not the denoiser's {grid}")
        return tokens.reshape(batch, frames * grid, -1)

    def loss(self, videos: torch.Tensor) -> torch.Tensor:
        """Minus the mean cosine similarity of the projected tokens of the last forward with :meth:`targets`.

        Raises:
            RuntimeError: if no forward ran since the last call.
        """
        if self._tokens is None:
            raise RuntimeError("RepresentationAlignment.loss needs a model forward first")
        tokens, self._tokens = self._tokens, None
        target = self.targets(videos)
        return -torch.nn.functional.cosine_similarity(self.projector(tokens), target, dim=-1).mean()


def _noisy(videos: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The flow-matching input ``(1 - s) x + s noise`` and its velocity target ``noise - x``."""
    s = sigmas.view(-1, 1, 1, 1, 1)
    return (1 - s) * videos + s * noise, noise - videos


def _sigmas(generator: torch.Generator, count: int, location: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Noise levels from a logit-normal (SD3, Esser et al., 2024, section 3.1): ``sigmoid(location + scale * z)``.

    ``(0, 1)`` is SD3's; JiT (Li & He, 2025) uses ``(0.8, 0.8)`` in this convention (1 is pure
    noise): mostly noisy inputs, made for 256 px and up, which left this 48 px model's
    low-noise regime (the last sampling steps: the fine detail) undertrained (docs/video.md)."""
    return torch.sigmoid(location + scale * torch.randn(count, generator=generator))


def _model_card(args: argparse.Namespace, history: List[Dict[str, Any]], step: int, command: str) -> str:
    vals = [entry for entry in history if "val_loss" in entry]
    rows = "\n".join(f"| {e['step']} | {e['val_loss']:.4f} | {100 * e['sample_accuracy']:.1f} |" for e in vals)
    settings = json.dumps(video_models.SIZES[args.size])
    repa = "" if not args.repa else (
        f", with representation alignment (REPA) of block {args.repa_block} to the shapes classifier at weight "
        f"{args.repa} (its projector is not part of this model)")
    return f"""# A class-conditional Wan video diffusion transformer on the tome generated clips

A diffusers `WanTransformer3DModel` of size `{args.size}` ({settings}), pixel space (3 channels,
no VAE), conditioned on the class through a learned table of text tokens
(`tome.video_models.ClassConditionedWan`), trained from random weights by flow matching on
`tome.data.clips` ({args.frames} frames of {args.size_px} px, {args.background} background, seed {args.seed})
on CPU, by:

```
{command}
```

{step} optimizer steps of {args.batch_size} clips{repa} (the history is `log.jsonl`; `samples.png`
is the last validation's samples, a row per class, a column per frame).

| step | val loss | classifier accuracy on samples % |
|---|---|---|
{rows}

Load with `tome.video_models.load_model(this folder)`; sample with
`tome.video_models.sample(model, labels, noise)`.
"""


def _optimizer(model: torch.nn.Module, args: argparse.Namespace) -> Tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on vectors and embeddings) and timm's cosine schedule with warmup."""

    def decays(name: str, parameter: torch.Tensor) -> bool:
        return parameter.ndim >= 2 and "embed" not in name and "scale_shift_table" not in name

    optimizer = torch.optim.AdamW(decay_groups(model.named_parameters(), decays, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.99))
    return optimizer, warmup_cosine(optimizer, args)


class _Run:
    """What the training loop works on."""

    def __init__(self, args: argparse.Namespace, model: video_models.ClassConditionedWan, out: Path,
                 log: Callable[[Dict[str, Any]], None]) -> None:
        self.args, self.model, self.out, self.log = args, model, out, log
        self.optimizer, self.scheduler = _optimizer(model, args)
        self.classifier: Optional[torch.nn.Module] = None
        # Fixed validation material: clips, their noise and noise levels, and the sampling noise.
        generator = torch.Generator().manual_seed(args.seed + 1)
        self.val_videos, self.val_labels = clips.clip_batch(range(args.val_clips), "val", args.seed, args.frames,
                                                            args.size_px, args.background)
        self.val_noise = torch.randn(self.val_videos.shape, generator=generator)
        # Fixed noise levels, drawn once from logit-normal(0.8, 0.8) whatever the training's:
        # a validation loss comparable across runs and resumes (the first shipped run changed
        # the training's distribution mid-run).
        self.val_sigmas = _sigmas(generator, args.val_clips, 0.8, 0.8)
        self.sample_labels = torch.arange(len(CLASSES))
        self.sample_noise = torch.randn((len(CLASSES), 3, args.frames, args.size_px, args.size_px), generator=generator)
        self.repa: Optional[AuxiliaryLoss] = None
        if args.repa:
            # The projector has an optimizer of its own (_run_dir.AuxiliaryLoss), so runs without
            # REPA and their checkpoints stay as they were; "projector" is its checkpoint entry.
            classifier = self.classifier = load_classifier()
            self.repa = AuxiliaryLoss(lambda: RepresentationAlignment(model, classifier, args.repa_block), args,
                                      args.repa, (0.9, 0.99), "projector")

    def save(self, step: int) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": step}
        if self.repa is not None:
            state["repa"] = self.repa.state_dict()
        path = self.out / _CHECKPOINT
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    def restore(self, path: Path) -> Tuple[int, bool]:
        """Load a checkpoint; returns its step and whether it held a REPA projector (a run may add
        ``--repa`` on resume: the projector then starts fresh)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.repa is not None and "repa" in state:
            self.repa.load_state_dict(state["repa"])
        return int(state["step"]), "repa" in state

    def set_schedule_step(self, step: int) -> None:
        """Put the learning-rate schedules at ``step``."""
        self.scheduler.step_update(step)
        if self.repa is not None:  # built for --steps already: a stretched run needs no change here
            self.repa.scheduler.step_update(step)

    def step(self, step: int) -> float:
        """One optimizer step on training batch ``step``; returns its loss."""
        args = self.args
        first = step * args.batch_size
        videos, labels = clips.clip_batch(range(first, first + args.batch_size), "train", args.seed, args.frames,
                                          args.size_px, args.background)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(videos.shape, generator=generator)
        sigmas = _sigmas(generator, args.batch_size, args.noise_location, args.noise_scale)
        dropped = torch.rand(args.batch_size, generator=generator) < args.label_dropout
        labels = torch.where(dropped, torch.full_like(labels, self.model.null_class), labels)
        inputs, target = _noisy(videos, sigmas, noise)
        loss = torch.nn.functional.mse_loss(self.model(inputs, sigmas, labels), target)
        total = loss
        if self.repa is not None:
            alignment = self.repa.module.loss(videos)
            total = loss + self.repa.weight * alignment
            self.repa.record({"alignment": alignment.item()})
            self.repa.optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        self.optimizer.step()
        self.scheduler.step_update(step + 1)
        if self.repa is not None:
            self.repa.step(step, args.clip_grad)
        return loss.item()  # the flow-matching loss alone, comparable with runs without --repa

    @torch.no_grad()
    def validate(self, step: int) -> Dict[str, Any]:
        """Validation loss, samples (saved as a PNG strip) and the classifier's accuracy on them."""
        args = self.args
        self.model.eval()
        inputs, target = _noisy(self.val_videos, self.val_sigmas, self.val_noise)
        repa = {}
        if self.repa is not None:  # the mean alignment of the training steps since the last validation
            window = self.repa.summary()
            repa = {"repa_train": window["alignment"]} if window else {}
        losses = [torch.nn.functional.mse_loss(self.model(i, s, y), t).item() * len(y) for i, s, y, t in
                  zip(inputs.split(16), self.val_sigmas.split(16), self.val_labels.split(16), target.split(16))]
        val_loss = sum(losses) / len(self.val_labels)
        samples = video_models.sample(self.model, self.sample_labels, self.sample_noise, args.sample_steps,
                                      args.guidance)
        if self.classifier is None:
            self.classifier = load_classifier()
        accuracy = classifier_accuracy(self.classifier, samples, self.sample_labels)
        sample_strip(samples, self.out / "samples" / f"step_{step:06d}.png")
        if self.repa is not None:
            self.repa.module._tokens = None  # validation forwards are not aligned
        self.model.train()
        entry = {"step": step, "val_loss": val_loss, "sample_accuracy": accuracy, **repa, "time": time.time()}
        self.log(entry)
        return entry

    def _validate_and_report(self, step: int, bar: Any) -> None:
        result = self.validate(step)
        bar.write(f"step {step}: val loss {result['val_loss']:.4f}, "
                  f"classifier on samples {100 * result['sample_accuracy']:.1f}%")

    def loop(self, step: int) -> Tuple[int, bool]:
        """Train from ``step`` on (:func:`tome.tools._run_dir.train_loop`)."""
        return train_loop(self, step, "train video", "clips_per_s", self._validate_and_report)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run (or resume) one training run as ``args`` (from :func:`add_parser`'s options) says.

    Returns:
        The last validation entry (``val_loss``, ``sample_accuracy``, ``step``).

    Raises:
        ValueError: for an output directory that holds a run, without ``--resume`` or
            ``--overwrite``; for ``--resume`` of a checkpoint that is not there.
    """
    torch.set_num_threads(args.threads)
    out, resume = prepare_run_dir(args, _CHECKPOINT, _RUN_FILES)
    model = video_models.build_model(args.size, seed=args.seed)
    log = functools.partial(append_log, out / "log.jsonl")
    run = _Run(args, model, out, log)
    step, had_repa = (0, False) if resume is None else run.restore(resume)
    # A resume with another --steps keeps the weights and the optimizer but stretches (or
    # shortens) the cosine to the new length; the same --steps continues the run exactly.
    old_steps = run.scheduler.t_initial
    run.scheduler.t_initial = args.steps
    run.set_schedule_step(step)
    command = "python -m tome.tools.video_train " + " ".join(shlex.quote(a) for a in args.argv)
    if resume is None:
        log({"event": "start", "command": command, "args": {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS},
             "parameters": sum(p.numel() for p in model.parameters()), "time": time.time()})
    else:
        log({"event": "resume", "step": step, "command": command, "time": time.time(),
             **({"schedule_steps": [old_steps, args.steps]} if old_steps != args.steps else {}),
             **({"repa_projector": "new"} if run.repa is not None and not had_repa else {})})
    step, stopped_early = run.loop(step)
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = [entry for entry in history if "val_loss" in entry]
    final = last[-1] if last and last[-1]["step"] == step else run.validate(step)
    if run.repa is not None:
        run.repa.module.remove()
    log({"event": "final", "step": step, "stopped_early": stopped_early, "time": time.time()})
    _save_final(out, args, model, step, command)
    return final


def _save_final(out: Path, args: argparse.Namespace, model: video_models.ClassConditionedWan, step: int,
                command: str) -> None:
    """The ``final/`` folder: the model, the model card, the history and the last samples."""
    folder = out / "final"
    if folder.exists():
        shutil.rmtree(folder)
    video_models.save_model(model, folder)
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (folder / "README.md").write_text(_model_card(args, history, step, command))
    shutil.copy(out / "log.jsonl", folder / "log.jsonl")
    strips = sorted((out / "samples").glob("step_*.png"))
    if strips:
        shutil.copy(strips[-1], folder / "samples.png")
    try:
        plot_history(history, folder / "training.png")
    except ImportError:  # matplotlib is optional (the plot extra)
        pass


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--output-dir", required=True, help="run directory (checkpoint, log.jsonl, samples/, final/)")
    parser.add_argument("--size", choices=tuple(video_models.SIZES), default="small",
                        help="model widths (default: %(default)s; tiny is for tests)")
    parser.add_argument("--frames", type=positive_int, default=8, help="frames per clip (default: %(default)s)")
    parser.add_argument("--size-px", type=positive_int, default=48, help="frame side in px (default: %(default)s)")
    parser.add_argument("--background", choices=clips.BACKGROUNDS, default="cluttered",
                        help="what the clips' object moves over (tome.data.clips.BACKGROUNDS; default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="clips per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: %(default)s)")
    parser.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clip (default: %(default)s)")
    parser.add_argument("--label-dropout", type=_fraction, default=0.1,
                        help="fraction of clips trained without their class, for guidance (default: %(default)s)")
    parser.add_argument("--noise-location", type=float, default=0.0,
                        help="mean of the logit of the training noise level (default: %(default)s)")
    parser.add_argument("--noise-scale", type=float, default=1.0,
                        help="standard deviation of the logit of the training noise level (default: %(default)s)")
    parser.add_argument("--repa", type=non_negative_float, default=0.0,
                        help="weight of the representation-alignment loss to the shapes classifier's patch features "
                             "(REPA, Yu et al. 2025; tome.tools.video_train.RepresentationAlignment; 0: none, the "
                             "default; the paper's is 0.5)")
    parser.add_argument("--repa-block", type=int, default=1,
                        help="transformer block whose output --repa aligns (default: %(default)s, the second of "
                             "four: REPA aligns an early block)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clips, the noise and the initial weights")
    parser.add_argument("--val-clips", type=positive_int, default=32, help="validation clips (default: %(default)s)")
    parser.add_argument("--sample-steps", type=positive_int, default=20,
                        help="Euler steps when sampling at validation (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=2.0,
                        help="classifier-free guidance scale at validation (default: %(default)s)")
    add_loop_arguments(parser, log_every=20, val_every=200, checkpoint_every=50,
                       val_help="steps between validations and sample strips")
    add_session_arguments(parser)
    return parser


_COMMAND = TrainerCommand(name="video-train", module="tome.tools.video_train", help="train a small class-conditional video diffusion transformer",
                          description=__doc__.split("\n\n")[0], build=_build_parser, train=lambda args: train(args))
_run = _COMMAND.run
add_parser = _COMMAND.add_parser
main = _COMMAND.main


if __name__ == "__main__":
    raise SystemExit(main())
