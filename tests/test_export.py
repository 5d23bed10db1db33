"""tome.export: every family exports with merging on, and onnxruntime reproduces eager outputs.

Each model is a tiny random one (trained-like weights, see conftest): every model of
every registered family that declares it exports (``FamilySpec.exports``), patched with
merging on, exported once with a dynamic batch (torch.export, then torch.onnx dynamo) and
run in onnxruntime at batch sizes other than the example's. Matching is a discrete
decision, so outputs are compared per sample; with these inputs no sample sits on a
near-tie, and every sample must agree to rounding.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import tome  # noqa: E402
from tome.export import (  # noqa: E402
    compare_outputs,
    export_onnx,
    export_program,
    main_output,
    onnx_session,
    quantize_onnx,
    run_onnx,
)

# The tiny models of the registered families, and the builders of the family tests. They
# import trained_like_ from `conftest`, a name tests/tools/conftest.py also has: when pytest
# loaded that one first (both directories on one command line), point the name back at
# tests/conftest.py.
_TESTS = Path(__file__).resolve().parent
if not hasattr(sys.modules.get("conftest"), "trained_like_"):
    _spec = importlib.util.spec_from_file_location("conftest", _TESTS / "conftest.py")
    sys.modules["conftest"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["conftest"])
sys.path.insert(0, str(_TESTS / "patch"))
import registry_cases  # noqa: E402
import test_hf as hf_models  # noqa: E402
import test_timm as timm_models  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _registered(family: str, name: str) -> Tuple[Callable[[], torch.nn.Module], Callable[[int, int], Any]]:
    example = next(e for e in tome.patch.family_spec(family).examples() if e.name == name)
    return (lambda: registry_cases.build(example)), example.inputs


def _hf(name: str) -> Tuple[Callable[[], torch.nn.Module], Callable[[int, int], Dict[str, torch.Tensor]]]:
    def inputs(batch: int, seed: int) -> Dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {k: torch.randn(v.shape, generator=generator) for k, v in hf_models.inputs_for(name, batch).items()}

    return (lambda: hf_models.make(name)), inputs


# Models of the tests below that are about one model, not every family.
MODELS: Dict[str, Tuple[Callable[[], torch.nn.Module], Callable[[int, int], Any]]] = {
    "timm": _registered("timm", "registers"),
    "Dinov2ForImageClassification": _hf("Dinov2ForImageClassification"),
    "ASTForAudioClassification": _hf("ASTForAudioClassification"),
}


def _call(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**inputs) if isinstance(inputs, dict) else model(inputs))


@pytest.mark.parametrize("spec, example", registry_cases.cases(exports=True))
def test_family_exports_with_dynamic_batch_and_onnxruntime_agrees(spec, example, tmp_path):
    model = registry_cases.patch(spec, example, registry_cases.build(example))
    path = export_onnx(model, example.inputs(2, 1), tmp_path / "model.onnx")
    session = onnx_session(path, threads=1)
    for batch in (1, 5):
        inputs = example.inputs(batch, 10 + batch)
        expected = _call(model, inputs)
        agreement = compare_outputs(expected, run_onnx(session, inputs), atol=1e-4)
        assert all(agreement.matching), agreement.summary()
    # Merging happened in the exported graph: the unmerged model computes something else.
    inputs = example.inputs(5, 15)
    with tome.merging(model, **spec.no_merging):
        unmerged = _call(model, inputs)
    assert not torch.allclose(unmerged, run_onnx(session, inputs), atol=1e-3)


@pytest.mark.parametrize("family", ["timm", "Dinov2ForImageClassification", "ASTForAudioClassification"])
def test_torch_export_program_runs_at_other_batch_sizes(family):
    build, make_inputs = MODELS[family]
    model = tome.apply_patch(build(), r=(3, -1.0))  # decreasing schedule
    program = export_program(model, make_inputs(2, 1)).module()
    for batch in (1, 3):
        inputs = make_inputs(batch, 20 + batch)
        tensors = tuple(inputs.values()) if isinstance(inputs, dict) else (inputs,)
        with torch.no_grad():
            torch.testing.assert_close(program(*tensors), _call(model, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["timm", "Dinov2ForImageClassification"])
def test_a_batch_of_one_exports_with_a_dynamic_batch(family, tmp_path):
    # torch.export fixes a dimension it traces at size 1; the example is traced as two copies of itself.
    build, make_inputs = MODELS[family]
    model = tome.apply_patch(build(), r=3)
    example = make_inputs(1, 1)
    program = export_program(model, example).module()
    session = onnx_session(export_onnx(model, example, tmp_path / "model.onnx"), threads=1)
    for batch in (1, 3):
        inputs = make_inputs(batch, 30 + batch)
        expected = _call(model, inputs)
        tensors = tuple(inputs.values()) if isinstance(inputs, dict) else (inputs,)
        with torch.no_grad():
            torch.testing.assert_close(program(*tensors), expected, atol=1e-5, rtol=0)
        agreement = compare_outputs(expected, run_onnx(session, inputs), atol=1e-4)
        assert all(agreement.matching), agreement.summary()


@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_merge_methods_export(method, tmp_path):
    build, make_inputs = MODELS["timm"]
    model = tome.apply_patch(build(), r=3, method=method)
    session = onnx_session(export_onnx(model, make_inputs(2, 1), tmp_path / "model.onnx"), threads=1)
    for batch in (1, 3):
        inputs = make_inputs(batch, 40 + batch)
        agreement = compare_outputs(_call(model, inputs), run_onnx(session, inputs), atol=1e-4)
        assert all(agreement.matching), agreement.summary()
    inputs = make_inputs(3, 43)
    with tome.merging(model, 3, method="tome"):  # the file merges by this method, not by ToMe's rule
        assert not torch.allclose(_call(model, inputs), run_onnx(session, inputs), atol=1e-3)


class _StableArgsort(torch.nn.Module):
    def __init__(self, descending: bool) -> None:
        super().__init__()
        self.descending = descending

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argsort(dim=1, descending=self.descending, stable=True)


@pytest.mark.parametrize("descending", [True, False])
def test_stable_sort_keeps_its_tie_order_in_onnx(descending, tmp_path):
    # PiToMe ranks equal energies by position; ONNX TopK gives ties to the lower index too.
    generator = torch.Generator().manual_seed(0)
    module = _StableArgsort(descending).eval()
    path = export_onnx(module, torch.randint(0, 3, (2, 300), generator=generator).float(), tmp_path / "sort.onnx")
    session = onnx_session(path, threads=1)
    for batch in (1, 4):
        x = torch.randint(0, 3, (batch, 300), generator=generator).float()  # about 100 ties of each value
        assert torch.equal(run_onnx(session, x), module(x))


def test_what_cannot_be_exported_is_refused_up_front(tmp_path, monkeypatch):
    def traced(*args, **kwargs):
        raise AssertionError("torch.export was reached")

    monkeypatch.setattr(torch.export, "export", traced)
    model = tome.apply_patch(timm_models.make("token", depth=1), r=2,
                             method=tome.MergeMethod("ablation", match="random"))
    with pytest.raises(ValueError, match="random tokens in every forward.*method='tome', 'pitome' or 'tofu'"):
        export_onnx(model, _images(2), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got str"):
        export_program("vit", _images(2))


def test_a_diffusers_model_is_refused_with_what_is_supported(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from test_diffusers import make_unet

    def traced(*args, **kwargs):
        raise AssertionError("torch.export was reached")

    monkeypatch.setattr(torch.export, "export", traced)
    unet = tome.apply_patch(make_unet())

    class Denoise(torch.nn.Module):  # a user's wrapper that returns a tensor
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.unet(x, torch.tensor(500), context).sample

    for model, inputs in ((unet, torch.randn(2, 4, 16, 16)),
                          (Denoise(), {"x": torch.randn(2, 4, 16, 16), "context": torch.randn(2, 7, 32)})):
        with pytest.raises(TypeError, match=r"holds a diffusers model \(UNet2DConditionModel\).*timm, MAE, "
                                            r"torchvision, SWAG, Hugging Face transformers"):
            export_onnx(model, inputs, tmp_path / "unet.onnx")


def test_int8_quantization_keeps_the_matching_in_fp32(tmp_path):
    import onnx
    from onnx import numpy_helper

    build, make_inputs = MODELS["timm"]
    model = tome.apply_patch(build(), r=3)
    fp32 = export_onnx(model, make_inputs(2, 1), tmp_path / "model.onnx")
    # The default opset (20) writes GELU as one operator, not as erf and four elementwise ones.
    fp32_ops = {node.op_type for node in onnx.load(str(fp32)).graph.node}
    assert "Gelu" in fp32_ops and "Erf" not in fp32_ops, sorted(fp32_ops)
    inputs = make_inputs(8, 3)
    expected = _call(model, inputs)
    dynamic = quantize_onnx(fp32, tmp_path / "dynamic.onnx")
    static = quantize_onnx(fp32, tmp_path / "static.onnx", mode="static",
                           calibration=[make_inputs(4, seed) for seed in range(4)])
    for path, quantized_op in ((dynamic, "MatMulInteger"), (static, "QuantizeLinear")):
        ops = [node.op_type for node in onnx.load(str(path)).graph.node]
        assert quantized_op in ops and "TopK" in ops, sorted(set(ops))
        got = run_onnx(onnx_session(path, threads=1), inputs)
        agreement = compare_outputs(expected, got, atol=1e-4)
        # Quantized: close to the fp32 model, but not equal to it.
        assert 1e-4 < max(agreement.max_abs_diff) < 0.5 * expected.abs().max(), agreement.summary()
    graph = onnx.load(str(dynamic)).graph
    # Dynamic mode leaves the patch embedding's Conv in fp32 (ConvInteger is slower than Conv).
    assert "Conv" in {n.op_type for n in graph.node} and "ConvInteger" not in {n.op_type for n in graph.node}
    quantized_matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # Only products with a constant weight are quantized: the similarity product (two activations) never is;
    # and the weights are quantized per output channel (one zero point per column).
    assert quantized_matmuls and all(n.input[1] in initializers for n in quantized_matmuls)
    for node in quantized_matmuls:
        weight, zero_point = initializers[node.input[1]], initializers[node.input[3]]
        assert zero_point.shape == (weight.shape[1],), (node.name, zero_point.shape, weight.shape)
    # reduce_range: 7-bit weights (onnxruntime's remedy for CPUs without VNNI); the default uses all 8 bits.
    reduced = quantize_onnx(fp32, tmp_path / "reduced.onnx", reduce_range=True)
    reduced_graph = onnx.load(str(reduced)).graph
    reduced_weights = {i.name: numpy_helper.to_array(i) for i in reduced_graph.initializer}
    reduced_matmuls = [n for n in reduced_graph.node if n.op_type == "MatMulInteger"]
    assert len(reduced_matmuls) == len(quantized_matmuls)
    assert max(abs(int(initializers[n.input[1]].min())) for n in quantized_matmuls) > 64
    assert all(abs(reduced_weights[n.input[1]].astype(int)).max() <= 64 for n in reduced_matmuls)
    got = run_onnx(onnx_session(reduced, threads=1), inputs)
    assert max(compare_outputs(expected, got).max_abs_diff) < 0.5 * expected.abs().max()


def test_compare_outputs_reports_per_sample():
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.4]])
    got = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.5, 0.40001]])
    agreement = compare_outputs(expected, got, atol=1e-3)
    assert agreement.matching == [True, False, True]
    assert agreement.same_top1 == [True, False, True]
    assert agreement.max_abs_diff[1] == 1.0
    assert "2/3 samples within" in agreement.summary()
    with pytest.raises(ValueError, match=r"shape: expected \(3, 2\), got \(2, 2\)"):
        compare_outputs(expected, got[:2])


def test_bad_arguments_raise_value_error(tmp_path):
    model = tome.apply_patch(timm_models.make("token", depth=1), r=2)
    with pytest.raises(ValueError, match="opset=13"):
        export_onnx(model, _images(2), tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="inputs must be a tensor or a non-empty dict"):
        export_onnx(model, [_images(2)], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="mode='int4'"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", mode="int4")
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", mode="static")
    with pytest.raises(FileNotFoundError, match="m.onnx"):
        onnx_session(tmp_path / "m.onnx")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        export_program(model, _images(2))


@pytest.mark.parametrize("name", ["ASTForAudioClassification", "Dinov2ForImageClassification"])
def test_padding_mask_exports_as_an_input(name, tmp_path):
    # Batched inputs of different lengths: the key-padding mask is an ONNX input too.
    build, make_inputs = MODELS[name]
    model = tome.apply_patch(build(), r=2)
    tokens = hf_models.NUM_TOKENS[hf_models.family(name)]

    def with_mask(batch: int, seed: int) -> Dict[str, torch.Tensor]:
        mask = torch.ones(batch, tokens, dtype=torch.long)
        for i in range(batch):
            mask[i, tokens - (i % 4):] = 0  # 0 to 3 padding tokens at the end
        return {**make_inputs(batch, seed), "attention_mask": mask}

    session = onnx_session(export_onnx(model, with_mask(2, 1), tmp_path / "model.onnx"), threads=1)
    inputs = with_mask(5, 7)
    agreement = compare_outputs(_call(model, inputs), run_onnx(session, inputs), atol=1e-4)
    assert all(agreement.matching), agreement.summary()
    unmasked = {k: v for k, v in inputs.items() if k != "attention_mask"}
    assert not torch.allclose(_call(model, unmasked)[1:4], run_onnx(session, inputs)[1:4], atol=1e-3)


def test_openvino_runs_the_exported_file(tmp_path):
    ov = pytest.importorskip("openvino", reason="openvino is not installed (it is not in the lock): "
                             "pip install openvino to run the exported file there too")
    build, make_inputs = MODELS["timm"]
    model = tome.apply_patch(build(), r=3)
    path = export_onnx(model, make_inputs(2, 1), tmp_path / "model.onnx")
    compiled = ov.Core().compile_model(str(path), "CPU")
    inputs = make_inputs(5, 4)
    got = torch.from_numpy(compiled({0: inputs.numpy()})[0])
    agreement = compare_outputs(_call(model, inputs), got, atol=1e-4)
    assert all(agreement.matching), agreement.summary()
