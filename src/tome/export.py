"""Deploying a ToMe model: ONNX export with a dynamic batch, int8 quantization, checks.

A patched model (any family, ``model.r > 0``) goes through ``torch.export.export``
with the batch dimension dynamic, then through ``torch.onnx.export(..., dynamo=True)``;
onnxruntime runs the file. Merging is part of the graph: the bipartite matching
(``TopK``, ``ArgMax``), the scatter that merges and the ``log(size)`` bias of
proportional attention are ONNX operators, so the file needs nothing from this
package at run time. The token counts are fixed by the input size the model was
exported at (one file per input size and schedule); the batch is free, whatever
the example's batch (a batch-1 example is traced as two copies of itself). The
merge methods ``"tome"``, ``"pitome"`` (its stable sort becomes ONNX ``TopK``, whose
ties go to the lower index, as torch's stable sort) and ``"tofu"`` export; random
matchings and diffusers models are refused up front.

Matching is a discrete decision: when two candidate partners of a token score
within rounding error of each other, onnxruntime's kernels (which sum in a
different order) may pick the other one, and that one sample's outputs then differ
by more than rounding. :func:`compare_outputs` therefore reports agreement per sample.

Needs the ``export`` extra: ``pip install token-merging[export]`` (onnx, onnxscript,
onnxruntime). Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "Agreement",
    "DEFAULT_OPSET",
    "Inputs",
    "compare_outputs",
    "export_onnx",
    "export_program",
    "main_output",
    "onnx_session",
    "quantize_onnx",
    "run_onnx",
]

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]
"""Model inputs: one tensor (timm, torchvision, SWAG: ``(batch, channels, height, width)``)
or keyword tensors (Hugging Face: ``{"pixel_values": ...}``, ``{"input_values": ...}``),
each with the batch first."""

INT8_MODES = ("dynamic", "static")
"""What :func:`quantize_onnx` accepts as ``mode``."""

# Operator types quantize_onnx's dynamic mode hands to onnxruntime's quantizer. Conv (the patch
# embedding) is left out: its dynamic form, ConvInteger, ran 2-4x slower than the fp32 Conv
# in onnxruntime 1.32 on an AVX2 CPU (docs/deployment.md). Gemm is only the classifier head.
_DYNAMIC_OPS = ("MatMul",)
_STATIC_OPS = ("MatMul", "Gemm", "Conv")

DEFAULT_OPSET = 20
"""The opset :func:`export_onnx` writes by default: from opset 20 GELU is one ``Gelu``
operator (onnxruntime fuses it with the bias into ``BiasGelu``) instead of the five
elementwise operators of the ``erf`` formula at opset 18."""

_TENSOR_INPUT_NAME = "input"
_OUTPUT_NAME = "output"


def main_output(out: Any) -> torch.Tensor:
    """The tensor a user reads from a model's output.

    A tensor is itself; a tuple gives its first element; a Hugging Face
    ``ModelOutput`` gives ``logits``, else ``image_embeds``, else ``pooler_output``,
    else ``last_hidden_state``.

    Raises:
        TypeError: naming the output's type when none of these is there.
    """
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot tell the main output of a {type(out).__name__}; wrap the model so it returns a tensor")


class _MainOutput(nn.Module):
    """A model called with positional tensors (keyword inputs in a fixed order) that returns one tensor."""

    def __init__(self, model: nn.Module, names: Optional[Sequence[str]]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names) if names is not None else None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.names is None:
            return main_output(self.model(*inputs))
        return main_output(self.model(**dict(zip(self.names, inputs))))


def _split(inputs: Inputs) -> tuple:
    """``(names or None, tensors)`` of ``inputs``; ValueError for anything else."""
    if isinstance(inputs, torch.Tensor):
        return None, (inputs,)
    if isinstance(inputs, Mapping) and inputs and all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return list(inputs), tuple(inputs.values())
    raise ValueError(
        f"inputs must be a tensor or a non-empty dict of tensors (e.g. {{'pixel_values': ...}}), "
        f"got {type(inputs).__name__}"
    )


def _check_exportable(model: Any) -> None:
    """Refuse, before any tracing, what :func:`export_program` cannot turn into a faithful program.

    Raises:
        TypeError: for something that is not an ``nn.Module``, or a diffusers model.
        ValueError: for a model in training mode, or one merging with a random matching.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    diffusers = next((m for m in model.modules()
                      if any(c.__module__.split(".")[0] == "diffusers" for c in type(m).__mro__)), None)
    if diffusers is not None:
        raise TypeError(
            f"{type(model).__name__} holds a diffusers model ({type(diffusers).__name__}), which tome.export does not "
            "export: it exports image, video and audio encoders and classifiers (timm, MAE, torchvision, SWAG, "
            "Hugging Face transformers); run a patched denoiser in PyTorch")
    if model.training:
        raise ValueError("model is in training mode; call model.eval() before exporting")
    for module in model.modules():
        info = module.__dict__.get("_tome_info")
        method = info.get("method") if isinstance(info, Mapping) else None
        if getattr(method, "match", None) in ("random", "random_drop"):
            raise ValueError(
                f"method={method!r} draws random tokens in every forward, which an exported file cannot "
                "reproduce; export with a deterministic method (method='tome', 'pitome' or 'tofu')")


def _batch_of_two(tensors: tuple) -> tuple:
    """``tensors`` with a batch of 1 repeated to 2 (torch.export fixes a dimension traced at size 1)."""
    if all(t.dim() > 0 and t.shape[0] == 1 for t in tensors):
        return tuple(torch.cat([t, t]) for t in tensors)
    return tensors


def export_program(model: nn.Module, inputs: Inputs, *, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` returning its main output, with a dynamic batch.

    Args:
        model: A model in eval mode, patched with ToMe or not (``model.r`` is read now:
            the schedule is part of the program).
        inputs: Example inputs (see :data:`Inputs`); their shapes other than the batch
            are fixed in the program. A batch of 1 is traced as two copies of itself
            (torch.export would fix a dimension it sees at size 1), so the program still
            takes any batch.
        dynamic_batch: Leave the batch dimension (dim 0 of every input) free.

    Returns:
        The exported program; it takes the inputs positionally (dict inputs in their
        order) and returns the tensor :func:`main_output` picks.

    Raises:
        ValueError: if ``inputs`` is not a tensor or a dict of tensors, the model is in
            training mode, or it merges with a random matching (``MergeMethod("ablation",
            match="random")``, ``"random_drop"``: no file can reproduce its draws).
        TypeError: for a diffusers model or pipeline (denoisers are not exported).
    """
    _check_exportable(model)
    names, tensors = _split(inputs)
    if dynamic_batch:
        tensors = _batch_of_two(tensors)
    wrapper = _MainOutput(model, names).eval()
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic_shapes = (tuple({0: batch} for _ in tensors),)  # one spec for the *inputs tuple
    with torch.no_grad():
        return torch.export.export(wrapper, tensors, dynamic_shapes=dynamic_shapes)


def export_onnx(
    model: nn.Module,
    inputs: Inputs,
    path: Union[str, os.PathLike],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    optimize: bool = True,
) -> Path:
    """Write ``model`` as an ONNX file: ``torch.export`` then ``torch.onnx.export(dynamo=True)``.

    Args:
        model: A model in eval mode, patched with ToMe (any family, any schedule) or not.
        inputs: Example inputs (see :data:`Inputs`), batch first. The ONNX inputs are
            named ``input`` for a single tensor, else after the dict's keys; the output
            is ``output``, the tensor :func:`main_output` picks (logits, embeddings, ...).
        path: The ``.onnx`` file to write (replaced if it exists).
        opset: ONNX opset version (18 or later; default 20, where GELU is one operator).
        dynamic_batch: Leave the batch dimension free (one file for every batch size).
        optimize: Let ``torch.onnx`` run onnxscript's optimizer (constant folding,
            pattern rewrites, dead nodes). Its pattern matcher takes time that grows with
            the square of the node count, so a merging model, with about 3.5 times the
            nodes, spends the largest part of its export there (ViT-B/16 r=16: 19 s of 47);
            ``False`` skips it, and onnxruntime, which optimizes the graph itself when
            it loads it, runs both files equally fast.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: for bad ``inputs``, a model in training mode, a random matching
            (see :func:`export_program`), or ``opset`` < 18.
        TypeError: for a diffusers model or pipeline.
        ImportError: if onnx or onnxscript is missing (install ``token-merging[export]``).
    """
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset={opset!r} is not supported; torch.onnx's exporter needs opset 18 or later")
    _require("onnx", "onnxscript")
    program = export_program(model, inputs, dynamic_batch=dynamic_batch)
    names, tensors = _split(inputs)
    input_names = names if names is not None else [_TENSOR_INPUT_NAME]
    onnx_program = torch.onnx.export(
        program, dynamo=True, opset_version=opset, input_names=input_names, output_names=[_OUTPUT_NAME],
        optimize=optimize, verbose=False, custom_translation_table={torch.ops.aten.sort.stable: _stable_sort},
    )
    path = Path(path)
    onnx_program.save(str(path))
    return path


def _stable_sort(self: Any, stable: Optional[bool] = None, dim: int = -1, descending: bool = False) -> Any:
    """ONNX for ``aten.sort.stable`` (PiToMe ranks tokens by energy with it), which torch.onnx lacks.

    ``TopK`` with ``k`` the whole dimension is a sort; ONNX defines its ties to go to
    the lower index, for the largest and for the smallest values alike, which is the
    order of a stable sort (ascending or descending).
    """
    from onnxscript import opset18 as op

    length = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim)), op.Constant(value_ints=[1]))
    values, indices = op.TopK(self, length, axis=dim, largest=int(bool(descending)), sorted=1)
    return values, indices


def _require(*modules: str) -> None:
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed; install the export extra: pip install 'token-merging[export]'")


def onnx_session(path: Union[str, os.PathLike], *, threads: int = 0) -> Any:
    """An onnxruntime CPU ``InferenceSession`` for the file at ``path``.

    Args:
        path: An ``.onnx`` file.
        threads: Intra-op threads (0: onnxruntime's default, one per physical core).

    Raises:
        ValueError: for negative ``threads``.
        FileNotFoundError: if ``path`` does not exist.
    """
    _require("onnxruntime")
    import onnxruntime

    if threads < 0:
        raise ValueError(f"threads={threads!r} must be 0 (onnxruntime's default) or more")
    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session: Any, inputs: Inputs) -> Dict[str, Any]:
    names, tensors = _split(inputs)
    expected = [i.name for i in session.get_inputs()]
    given = names if names is not None else expected[:1]
    if sorted(given) != sorted(expected):
        raise ValueError(f"inputs {given} do not match the ONNX file's inputs {expected}")
    return {name: t.detach().cpu().numpy() for name, t in zip(given, tensors)}


def run_onnx(session: Any, inputs: Inputs) -> torch.Tensor:
    """Run an onnxruntime session made by :func:`onnx_session` on torch inputs.

    Args:
        session: The session.
        inputs: As given to :func:`export_onnx` (any batch size).

    Returns:
        The ``output`` tensor (CPU).

    Raises:
        ValueError: if the inputs' names do not match the file's.
    """
    return torch.from_numpy(session.run([_OUTPUT_NAME], _feeds(session, inputs))[0])


@dataclass
class Agreement:
    """How a deployed model's outputs agree with the eager model's, per sample.

    Attributes:
        max_abs_diff: Per sample, the largest absolute difference of the outputs.
        same_top1: Per sample, whether the arg-max of the last dimension agrees
            (for logits: the predicted class).
        atol: The tolerance :attr:`matching` uses.
    """

    max_abs_diff: List[float]
    same_top1: List[bool]
    atol: float

    @property
    def matching(self) -> List[bool]:
        """Per sample, whether every output lies within ``atol`` of the eager one."""
        return [d <= self.atol for d in self.max_abs_diff]

    @property
    def top1_agreement(self) -> float:
        """Fraction of samples with the same arg-max."""
        return sum(self.same_top1) / len(self.same_top1)

    def summary(self) -> str:
        """One line: samples within ``atol``, largest difference, top-1 agreement."""
        within = sum(self.matching)
        n = len(self.max_abs_diff)
        return (f"{within}/{n} samples within {self.atol:g} (max |diff| {max(self.max_abs_diff):.3g}), "
                f"top-1 agreement {sum(self.same_top1)}/{n}")


def compare_outputs(expected: torch.Tensor, got: torch.Tensor, *, atol: float = 1e-4) -> Agreement:
    """Per-sample agreement of ``got`` with ``expected``, both ``(batch, ...)``.

    Raises:
        ValueError: if the shapes differ or ``atol`` is negative.
    """
    if expected.shape != got.shape:
        raise ValueError(f"outputs differ in shape: expected {tuple(expected.shape)}, got {tuple(got.shape)}")
    if atol < 0:
        raise ValueError(f"atol={atol!r} must not be negative")
    expected, got = expected.detach().float().cpu(), got.detach().float().cpu()
    diff = (expected - got).abs().reshape(expected.shape[0], -1).amax(dim=1)
    same = (expected.argmax(dim=-1) == got.argmax(dim=-1)).reshape(expected.shape[0], -1).all(dim=1)
    return Agreement([float(d) for d in diff], [bool(s) for s in same], atol)


def quantize_onnx(
    source: Union[str, os.PathLike],
    target: Union[str, os.PathLike],
    *,
    mode: str = "dynamic",
    calibration: Optional[Iterable[Inputs]] = None,
    reduce_range: bool = False,
) -> Path:
    """int8-quantize an ONNX file with ``onnxruntime.quantization``.

    Only products with a constant weight are quantized, with one int8 scale per output
    channel of the weight; the products between activations (the matching's cosine
    similarities, which decide what merges, and attention) stay fp32.

    ``"dynamic"`` is ``quantize_dynamic`` of the ``MatMul`` weights: activations are
    quantized on the fly per tensor (onnxruntime runs each product as one
    ``DynamicQuantizeMatMul``). The patch embedding's ``Conv`` stays fp32: its dynamic
    form ``ConvInteger`` is slower on the CPU than the fp32 ``Conv``
    (docs/deployment.md). ``"static"`` is ``quantize_static`` in QDQ format of the
    ``MatMul``, ``Gemm`` and ``Conv`` weights, with activation ranges calibrated on
    ``calibration`` batches (int8 activations too).

    Args:
        source: The fp32 ``.onnx`` file.
        target: Where to write the quantized file.
        mode: ``"dynamic"`` or ``"static"``.
        calibration: For ``"static"``: batches of inputs (as given to :func:`export_onnx`).
        reduce_range: Quantize the weights to 7 bits (-64..64), onnxruntime's remedy for
            CPUs without VNNI, whose int8 products sum pairs in 16 bits that full-range
            weights can saturate. On such a CPU (AVX2) it kept the shipped model's int8
            predictions closer to fp32 (99.3-99.7% the same against 98.3-99.0%) at the
            same speed (docs/deployment.md); with VNNI it only costs precision.

    Returns:
        ``target`` as a ``Path``.

    Raises:
        ValueError: for an unknown ``mode``, or ``"static"`` without calibration batches.
    """
    if mode not in INT8_MODES:
        raise ValueError(f"mode={mode!r} is not an int8 mode; expected one of {INT8_MODES}")
    _require("onnx", "onnxruntime")
    target = Path(target)
    if mode == "dynamic":
        _quantize_dynamic(source, target, reduce_range)
        return target
    if calibration is None:
        raise ValueError("mode='static' needs calibration batches (calibration=[inputs, ...])")
    session = onnx_session(source)
    batches = [_feeds(session, inputs) for inputs in calibration]
    if not batches:
        raise ValueError("calibration holds no batches; give at least one")
    _quantize_static(source, target, batches, reduce_range)
    return target


def _quantize_dynamic(source: Union[str, os.PathLike], target: Path, reduce_range: bool) -> None:
    """``quantize_dynamic`` of the ``MatMul`` weights, per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=reduce_range, op_types_to_quantize=list(_DYNAMIC_OPS))


def _quantize_static(source: Union[str, os.PathLike], target: Path, batches: List[Dict[str, Any]],
                     reduce_range: bool) -> None:
    """``quantize_static`` in QDQ format, activation ranges calibrated on ``batches`` (onnxruntime feeds)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(batches)

        def get_next(self) -> Optional[Dict[str, Any]]:
            return next(self._items, None)

        def rewind(self) -> None:
            self._items = iter(batches)

    # As in dynamic mode, only products with a constant weight are quantized (MatMulConstBOnly):
    # the matching's cosine similarities decide which tokens merge and must not be rounded to 8 bits.
    with _quiet_root_logger():
        quantize_static(
            str(source), str(target), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
            op_types_to_quantize=list(_STATIC_OPS), extra_options={"MatMulConstBOnly": True},
        )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # onnxruntime.quantization logs a warning per tensor it leaves alone (the matching's
    # integer tensors, for one) through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
