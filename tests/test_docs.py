"""The code blocks of README.md and docs/*.md, run as a reader would run them.

Every fenced ```python block runs as written, in order, the blocks of one file
sharing one namespace. Nothing is added to that namespace: the only help is a
small prelude per file (``PRELUDES``) that swaps the calls that would download
weights for tiny models of the same family with random weights, with the input
geometry the snippet expects (a "224" model still takes 224 x 224 images). A
block that cannot run offline is marked in the markdown itself, on the line
before its fence::

    <!-- docs-test: skip (needs the ImageNet folder) -->

and is reported as skipped with that reason. For ```bash blocks the ``tome``
command lines are parsed with the real argument parser (nothing is run).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import linecache
import re
import shlex
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))

_FENCE = re.compile(r"^```(?P<language>[\w+-]*)\s*$")
_SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*-->$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown file."""

    file: str
    index: int  # among the file's blocks of the same language
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip_reason: Optional[str]


def read_blocks(file: str) -> List[Block]:
    """Every fenced block of ``file`` (relative to the repository root), in order."""
    return parse_blocks(file, (ROOT / file).read_text(encoding="utf-8"))


def parse_blocks(file: str, markdown: str) -> List[Block]:
    """Every fenced block of the ``markdown`` text of ``file``, in order."""
    lines = markdown.splitlines()
    blocks: List[Block] = []
    counts: Dict[str, int] = {}
    opened: Optional[Tuple[int, str, Optional[str]]] = None
    body: List[str] = []
    previous = ""  # last non-blank line outside a block
    for number, text in enumerate(lines, start=1):
        if opened is None:
            match = _FENCE.match(text)
            if match:
                skip = _SKIP.match(previous.strip())
                opened = (number, match["language"], skip["reason"] if skip else None)
                body = []
            elif text.strip():
                previous = text
            continue
        if text.strip() == "```":
            line, language, reason = opened
            index = counts.get(language, 0)
            counts[language] = index + 1
            blocks.append(Block(file, index, line, language, "\n".join(body) + "\n", reason))
            opened, previous = None, ""
        else:
            body.append(text)
    if opened is not None:
        raise ValueError(f"{file}:{opened[0]}: code block never closed")
    return blocks


def _blocks(language: str) -> List[Block]:
    return [block for file in DOC_FILES for block in read_blocks(file) if block.language == language]


def _block_id(block: Block) -> str:
    return f"{block.file}:{block.line}"


# ---- tiny stand-ins for downloads ----
#
# Widths are tiny; the input geometry (image size, patch size) and the depth stay
# those of the named model, so the snippets' inputs and schedules still fit.

TINY_TIMM_WIDTH = {"embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0}


def _tiny_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """``timm.create_model(name, pretrained=True, ...)``: the same architecture, 32 wide, random weights."""
    import timm

    create_model = timm.create_model

    def create_tiny(model_name: str, pretrained: bool = False, **kwargs):
        if pretrained:
            kwargs = {**kwargs, **TINY_TIMM_WIDTH}
        return create_model(model_name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_tiny)


def _tiny_shallow_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """As :func:`_tiny_timm`, and 4 blocks deep: for snippets that export (ONNX export time grows with depth)."""
    import timm

    create_model = timm.create_model

    def create_tiny(model_name: str, pretrained: bool = False, **kwargs):
        if pretrained:
            kwargs = {**kwargs, **TINY_TIMM_WIDTH, "depth": 4}
        return create_model(model_name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_tiny)


# torchvision builder name -> (image size, patch size, layers) of the real model.
_TORCHVISION_VITS = {
    "vit_b_16": (224, 16, 12),
    "vit_b_32": (224, 32, 12),
    "vit_l_16": (224, 16, 24),
    "vit_l_32": (224, 32, 24),
    "vit_h_14": (518, 14, 32),
}


def _tiny_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torchvision.models.vit_*(weights=...)``: torchvision's ``VisionTransformer``, 32 wide, random weights."""
    import torchvision

    for name, (image_size, patch_size, layers) in _TORCHVISION_VITS.items():

        def build(weights=None, progress=True, _geometry=(image_size, patch_size, layers), **kwargs):
            size, patch, depth = _geometry
            return torchvision.models.VisionTransformer(
                image_size=size, patch_size=patch, num_layers=depth, num_heads=2, hidden_dim=32, mlp_dim=64, **kwargs
            )

        monkeypatch.setattr(torchvision.models, name, build)


def _root_conftest_as_conftest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import conftest`` give tests/conftest.py (test_swag imports ``trained_like_`` from it).

    pytest keeps the conftest it loaded last under that name: after tests/tools/ ran, that one.
    """
    import importlib.util
    import sys

    path = ROOT / "tests" / "conftest.py"
    if getattr(sys.modules.get("conftest"), "__file__", None) == str(path):
        return
    spec = importlib.util.spec_from_file_location("conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "conftest", module)


def _tiny_swag(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.hub.load("facebookresearch/swag", model=...)``: the tiny SWAG-layout ViT of tests/patch/test_swag.py."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "patch"))
    _root_conftest_as_conftest(monkeypatch)
    test_swag = importlib.import_module("test_swag")  # the module name pytest itself gives that file

    def load(repo_or_dir: str, model: str, *args, **kwargs):
        if repo_or_dir != "facebookresearch/swag":
            raise AssertionError(f"docs test: no tiny stand-in for torch.hub repository {repo_or_dir!r}")
        classes = 1000 if model.endswith("_in1k") else None  # the trunks have no head
        return test_swag.ViTTiny(classifier="token", num_classes=classes)

    monkeypatch.setattr(torch.hub, "load", load)


def _tiny_transformers_configs() -> Dict[str, Callable[[], object]]:
    """Hub id -> a tiny config of the same model type and input geometry."""
    import transformers

    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    return {
        "google/vit-base-patch16-224": lambda: transformers.ViTConfig(**tiny, image_size=224, patch_size=16),
        "facebook/dinov2-base": lambda: transformers.Dinov2Config(**tiny, image_size=518, patch_size=14),
        "openai/clip-vit-base-patch16": lambda: transformers.CLIPConfig(
            text_config={**tiny, "vocab_size": 64},
            vision_config={**tiny, "image_size": 224, "patch_size": 16},
            projection_dim=16,
        ),
    }


def _tiny_transformers_processors() -> Dict[str, Callable[[], object]]:
    """Hub id -> the processor that repository ships, built locally (CLIP: a tokenizer with an empty vocabulary)."""
    import transformers

    return {
        "google/vit-base-patch16-224": lambda: transformers.ViTImageProcessor(
            size={"height": 224, "width": 224}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        "facebook/dinov2-base": lambda: transformers.BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True
        ),
        "openai/clip-vit-base-patch16": lambda: transformers.CLIPProcessor(
            image_processor=transformers.CLIPImageProcessor(), tokenizer=transformers.CLIPTokenizer()
        ),
    }


def _tiny_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``from_pretrained`` of models and processors: built from tiny configs, random weights."""
    import transformers

    configs = _tiny_transformers_configs()
    processors = _tiny_transformers_processors()

    def model_from_pretrained(cls, name: str, **kwargs):
        if name not in configs:
            raise AssertionError(f"docs test: no tiny config for {name!r}; add one to _tiny_transformers_configs")
        if kwargs:
            raise AssertionError(f"docs test: from_pretrained options {sorted(kwargs)} are not handled")
        return cls(configs[name]()).eval()

    def processor_from_pretrained(cls, name: str, **kwargs):
        if name not in processors:
            raise AssertionError(f"docs test: no processor for {name!r}; add one to _tiny_transformers_processors")
        return processors[name]()

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(model_from_pretrained))
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", classmethod(processor_from_pretrained))
    monkeypatch.setattr(transformers.ProcessorMixin, "from_pretrained", classmethod(processor_from_pretrained))


def _tiny_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DiffusionPipeline.from_pretrained``: a tiny pipeline of the asked class (SD or SDXL layout),
    random weights, a CLIP tokenizer with an empty vocabulary; dtype and device options are ignored."""
    import diffusers
    import transformers

    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=1000,
                projection_dim=32)

    def unet(sdxl: bool):
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8) if sdxl else {}
        levels = ("DownBlock2D", "CrossAttnDownBlock2D") if sdxl else ("CrossAttnDownBlock2D", "DownBlock2D")
        return diffusers.UNet2DConditionModel(
            sample_size=16, layers_per_block=1, block_out_channels=(32, 64), down_block_types=levels,
            up_block_types=tuple(t.replace("Down", "Up") for t in reversed(levels)),
            cross_attention_dim=64 if sdxl else 32, attention_head_dim=8, norm_num_groups=8, **extra)

    def from_pretrained(cls, name: str, **kwargs):
        sdxl = "XL" in cls.__name__
        parts = dict(
            vae=diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**text)),
            tokenizer=transformers.CLIPTokenizer(model_max_length=77), unet=unet(sdxl).eval(),
            scheduler=diffusers.DDIMScheduler(clip_sample=False),
        )
        if sdxl:
            parts.update(text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text)),
                         tokenizer_2=transformers.CLIPTokenizer(model_max_length=77))
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = cls(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "to", lambda self, *args, **kwargs: self)


# The downloads each file's blocks make, and nothing else.
PRELUDES: Dict[str, Tuple[Callable[[pytest.MonkeyPatch], None], ...]] = {
    "README.md": (_tiny_timm, _tiny_torchvision, _tiny_swag, _tiny_transformers, _tiny_diffusers),
    "docs/diffusion.md": (_tiny_diffusers,),
    "docs/compatibility.md": (_tiny_timm,),
    "docs/deployment.md": (_tiny_shallow_timm,),
    "docs/families.md": (_tiny_torchvision, _tiny_swag),
    "docs/huggingface.md": (_tiny_transformers,),
    "docs/tools.md": (_tiny_timm,),
}


# ---- running the python blocks ----


@dataclasses.dataclass
class _FileRun:
    """A file's shared namespace and how far through its blocks it got."""

    workdir: Path
    namespace: dict = dataclasses.field(default_factory=lambda: {"__name__": "__main__"})
    done: int = 0  # blocks 0 .. done - 1 were run (or skipped)
    failed: Optional[Block] = None


_RUNS: Dict[str, _FileRun] = {}


def _shift_lines(code: types.CodeType, offset: int) -> types.CodeType:
    consts = tuple(_shift_lines(c, offset) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_firstlineno=code.co_firstlineno + offset, co_consts=consts)


def _execute(block: Block, run: _FileRun) -> None:
    # Tracebacks name the markdown file and its line numbers, and show this block only.
    __tracebackhide__ = True
    filename = f"{block.file} (block at line {block.line})"
    padded = "\n" * block.line + block.code
    linecache.cache[filename] = (len(padded), None, padded.splitlines(keepends=True), filename)
    code = _shift_lines(compile(block.code, filename, "exec"), block.line)
    exec(code, run.namespace)


PYTHON_BLOCKS = _blocks("python")

# Files whose python blocks are known not to run yet, with why. Strict: once they
# run, the test fails until the entry is deleted.
KNOWN_FAILING: dict = {}


def _python_params() -> list:
    params = []
    for block in PYTHON_BLOCKS:
        marks = ()
        if block.file in KNOWN_FAILING:
            marks = (pytest.mark.xfail(strict=True, reason=KNOWN_FAILING[block.file]),)
        params.append(pytest.param(block, marks=marks, id=_block_id(block)))
    return params


@pytest.mark.parametrize("block", _python_params())
def test_python_block_runs(block: Block, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """The block runs as written after the file's earlier blocks, with downloads swapped for tiny models."""
    __tracebackhide__ = True
    for prelude in PRELUDES.get(block.file, ()):
        prelude(monkeypatch)
    file_blocks = [b for b in PYTHON_BLOCKS if b.file == block.file]
    run = _RUNS.get(block.file)
    if run is None or run.done > block.index:  # first block of the file, or the same test again
        run = _RUNS[block.file] = _FileRun(tmp_path_factory.mktemp("docs"))
    monkeypatch.chdir(run.workdir)
    # Blocks not run yet (this test was selected on its own) run first, as a reader would have.
    while run.done < block.index and run.failed is None:
        earlier = file_blocks[run.done]
        if earlier.skip_reason is None:
            try:
                _execute(earlier, run)
            except BaseException:
                run.failed = earlier
                raise
        run.done += 1
    if run.failed is not None:
        pytest.fail(f"not run: the earlier block at {_block_id(run.failed)} failed", pytrace=False)
    run.done = block.index + 1
    if block.skip_reason is not None:
        pytest.skip(f"{_block_id(block)} marked to skip: {block.skip_reason}")
    try:
        _execute(block, run)
    except BaseException:
        run.failed = block
        raise


# ---- shell blocks: every tome command line parses ----

_TOME_COMMAND = re.compile(r"(?:^|\s)(?:uv run )?(?:tome|python -m tome\.cli|-m tome\.cli)\s+(?P<args>.*)$")


def _tome_command_lines(block: Block) -> List[Tuple[int, str]]:
    """(line, arguments) of each ``tome ...`` command in a shell block, continuations joined."""
    commands = []
    pending, start = "", 0
    for offset, text in enumerate(block.code.splitlines(), start=1):
        if not pending:
            start = block.line + offset
        text = re.sub(r"\s#.*$|^#.*$", "", text)
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        full, pending = pending + text, ""
        match = _TOME_COMMAND.search(full)
        if match:
            commands.append((start, match["args"].strip()))
    return commands


SHELL_COMMANDS = [
    (block, line, args)
    for block in _blocks("bash")
    for line, args in _tome_command_lines(block)
]


def _parser() -> argparse.ArgumentParser:
    from tome.cli import build_parser

    return build_parser()


@pytest.mark.parametrize(
    "block, line, args", SHELL_COMMANDS, ids=[f"{b.file}:{line}" for b, line, _ in SHELL_COMMANDS]
)
def test_tome_command_line_parses(block: Block, line: int, args: str, capsys) -> None:
    """``tome COMMAND ...`` names a real command and, unless it elides arguments with ``...``, parses."""
    words = shlex.split(args)
    parser = _parser()
    with pytest.raises(SystemExit) as exit_info:  # --help exits 0 if the command exists
        parser.parse_args([words[0], "--help"])
    assert exit_info.value.code == 0, f"{block.file}:{line}: `tome {words[0]}` is not a command"
    if "..." in words:
        return
    try:
        parser.parse_args(words)
    except SystemExit as error:
        raise AssertionError(
            f"{block.file}:{line}: `tome {args}` does not parse: {capsys.readouterr().err.strip()}"
        ) from error


# ---- checks on the checks ----


def test_every_code_block_has_a_language() -> None:
    """An untagged block would escape both tests above."""
    untagged = [_block_id(b) for file in DOC_FILES for b in read_blocks(file) if not b.language]
    assert not untagged, f"code blocks without a language: {untagged}"


def test_blocks_are_found() -> None:
    """The extraction finds what the files hold, so an empty parametrization cannot pass unnoticed."""
    for file in DOC_FILES:
        fences = sum(1 for text in (ROOT / file).read_text().splitlines() if text.startswith("```"))
        assert fences == 2 * len(read_blocks(file)), file
    readme = [b for b in PYTHON_BLOCKS if b.file == "README.md"]
    assert len(readme) >= 6
    assert sum(1 for b in PYTHON_BLOCKS if b.skip_reason is None) >= 10
    assert len(SHELL_COMMANDS) >= 10


def test_skip_markers_sit_on_python_blocks() -> None:
    """A skip marker that is not right before a python block is a typo, not a skip."""
    for file in DOC_FILES:
        lines = (ROOT / file).read_text().splitlines()
        marked = {b.line for b in read_blocks(file) if b.skip_reason is not None and b.language == "python"}
        for number, text in enumerate(lines, start=1):
            if text.strip().startswith("<!-- docs-test"):
                following = next(n for n in range(number + 1, len(lines) + 2) if n > len(lines) or lines[n - 1].strip())
                assert following in marked, f"{file}:{number}: marker not followed by a python block"


def test_parse_blocks_reads_languages_lines_and_skip_markers() -> None:
    markdown = (
        "# Title\n"
        "```python\n"  # line 2
        "a = 1\n"
        "```\n"
        "<!-- docs-test: skip (needs the ImageNet folder) -->\n"
        "\n"
        "```python\n"  # line 7
        "b = 2\n"
        "```\n"
        "<!-- an ordinary comment -->\n"
        "```bash\n"  # line 11
        "tome demo\n"
        "```\n"
        "```python\n"  # line 14
        "c = 3\n"
        "```\n"
    )
    blocks = parse_blocks("example.md", markdown)
    assert [(b.language, b.index, b.line, b.code) for b in blocks] == [
        ("python", 0, 2, "a = 1\n"),
        ("python", 1, 7, "b = 2\n"),
        ("bash", 0, 11, "tome demo\n"),
        ("python", 2, 14, "c = 3\n"),
    ]
    assert [b.skip_reason for b in blocks] == [None, "needs the ImageNet folder", None, None]
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks("example.md", "```python\nx = 1\n")


def test_preludes_name_real_files() -> None:
    assert set(PRELUDES) <= set(DOC_FILES)
    assert set(KNOWN_FAILING) <= set(DOC_FILES)
