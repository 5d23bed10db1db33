"""tome.patch.hf on tiny Hugging Face transformers vision models.

Every supported class is built from a tiny random config (no downloads), its
weights re-drawn at a trained-like scale, and checked under both the eager and
the sdpa attention implementation: r=0 is bit-identical to the unpatched model,
r>0 agrees with a plain reference forward written from ``tests/reference.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import transformers
from torch import nn
from transformers import (  # noqa: F401  (imported up front: the lazy import is slow)
    ASTForAudioClassification,
    CLIPModel,
    Dinov2Model,
    SiglipModel,
    SwinModel,
    VideoMAEModel,
    ViTModel,
)

import tome
from tome._schedule import tokens_per_layer
from tome.patch._hf import SUPPORTED_MODELS, ToMeHFLayer

from conftest import trained_like_
from reference import reference_attention, reference_compose_sources, reference_match, reference_merge

IMPLS = ["eager", "sdpa"]
LAYERS = 2
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2)
VISION = dict(image_size=32, patch_size=8, **TINY)
TEXT = dict(vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1, **TINY)


def _vit(cls: str, impl: str, **extra: Any) -> nn.Module:
    return getattr(transformers, cls)(transformers.ViTConfig(num_labels=5, attn_implementation=impl, **VISION, **extra))


def _deit(cls: str, impl: str) -> nn.Module:
    return getattr(transformers, cls)(transformers.DeiTConfig(num_labels=5, attn_implementation=impl, **VISION))


def _dinov2(cls: str, impl: str) -> nn.Module:
    config = transformers.Dinov2Config(num_labels=5, attn_implementation=impl, mlp_ratio=2, layerscale_value=0.5, **VISION)
    return getattr(transformers, cls)(config)


def _dinov2_reg(cls: str, impl: str) -> nn.Module:
    config = transformers.Dinov2WithRegistersConfig(
        num_labels=5, attn_implementation=impl, mlp_ratio=2, num_register_tokens=2, layerscale_value=0.5, **VISION
    )
    return getattr(transformers, cls)(config)


def _clip(cls: str, impl: str) -> nn.Module:
    if cls in ("CLIPVisionModel", "CLIPVisionModelWithProjection"):
        return getattr(transformers, cls)(
            transformers.CLIPVisionConfig(projection_dim=16, attn_implementation=impl, **VISION)
        )
    config = transformers.CLIPConfig(
        text_config=TEXT, vision_config=VISION, projection_dim=16, num_labels=5, attn_implementation=impl
    )
    return getattr(transformers, cls)(config)


def _siglip(cls: str, impl: str) -> nn.Module:
    if cls == "SiglipVisionModel":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(attn_implementation=impl, **VISION))
    config = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION, num_labels=5, attn_implementation=impl)
    return getattr(transformers, cls)(config)


def _videomae(cls: str, impl: str, use_mean_pooling: bool = True) -> nn.Module:
    config = transformers.VideoMAEConfig(
        num_frames=4, tubelet_size=2, num_labels=5, use_mean_pooling=use_mean_pooling, attn_implementation=impl, **VISION
    )
    return getattr(transformers, cls)(config)


def _ast(cls: str, impl: str) -> nn.Module:
    config = transformers.ASTConfig(
        patch_size=8, frequency_stride=8, time_stride=8, num_mel_bins=32, max_length=32, num_labels=5,
        attn_implementation=impl, **TINY,
    )
    return getattr(transformers, cls)(config)


BUILDERS: Dict[str, Callable[[str, str], nn.Module]] = {
    "ViTModel": _vit,
    "ViTForImageClassification": _vit,
    "DeiTModel": _deit,
    "DeiTForImageClassification": _deit,
    "DeiTForImageClassificationWithTeacher": _deit,
    "Dinov2Model": _dinov2,
    "Dinov2ForImageClassification": _dinov2,
    "Dinov2WithRegistersModel": _dinov2_reg,
    "Dinov2WithRegistersForImageClassification": _dinov2_reg,
    "CLIPVisionModel": _clip,
    "CLIPVisionModelWithProjection": _clip,
    "CLIPModel": _clip,
    "CLIPForImageClassification": _clip,
    "SiglipVisionModel": _siglip,
    "SiglipModel": _siglip,
    "SiglipForImageClassification": _siglip,
    "VideoMAEModel": _videomae,
    "VideoMAEForVideoClassification": _videomae,
    "ASTModel": _ast,
    "ASTForAudioClassification": _ast,
}
MODELS = list(BUILDERS)

# Tokens entering the first layer (prefix tokens included).
NUM_TOKENS = {"vit": 17, "deit": 18, "dinov2": 17, "dinov2_reg": 19, "clip": 17, "siglip": 16, "videomae": 32, "ast": 18}
PROTECTED = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_reg": 3, "clip": 1, "siglip": 0, "videomae": 0, "ast": 2}


def family(name: str) -> str:
    if name.startswith("Dinov2WithRegisters"):
        return "dinov2_reg"
    for prefix, key in (("ViT", "vit"), ("DeiT", "deit"), ("Dinov2", "dinov2"), ("CLIP", "clip"),
                        ("Siglip", "siglip"), ("VideoMAE", "videomae"), ("AST", "ast")):
        if name.startswith(prefix):
            return key
    raise KeyError(name)


def make(name: str, impl: str = "sdpa", seed: int = 0, **extra: Any) -> nn.Module:
    model = BUILDERS[name](name, impl, **extra)
    return trained_like_(model, seed).eval()


def inputs_for(name: str, batch: int = 2) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    fam = family(name)
    if fam == "videomae":
        return {"pixel_values": torch.randn(batch, 4, 3, 32, 32, generator=generator)}
    if fam == "ast":
        return {"input_values": torch.randn(batch, 32, 32, generator=generator)}
    inputs = {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}
    if name in ("CLIPModel", "SiglipModel"):
        inputs["input_ids"] = torch.randint(3, 99, (batch, 7), generator=generator)
    return inputs


def main_output(name: str, out: Any) -> torch.Tensor:
    """The output a user reads: logits, pooled features or image embeddings."""
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if getattr(out, "image_embeds", None) is not None:
        return out.image_embeds
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    return out.last_hidden_state


def vision_tokens(name: str, out: Any) -> torch.Tensor:
    if name in ("CLIPModel", "SiglipModel"):
        return out.vision_model_output.last_hidden_state
    return out.last_hidden_state


def flatten(value: Any) -> List[Any]:
    """Every tensor (and None) in a nested model output, in order."""
    if isinstance(value, torch.Tensor) or value is None:
        return [value]
    if isinstance(value, dict):  # ModelOutput
        return [item for key in value.keys() for item in flatten(value[key])]
    if isinstance(value, (tuple, list)):
        return [item for v in value for item in flatten(v)]
    return []


def assert_identical(a: Any, b: Any) -> None:
    left, right = flatten(a), flatten(b)
    assert len(left) == len(right) and len(left) > 0
    for x, y in zip(left, right):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert torch.equal(x, y)


def layers_of(model: nn.Module) -> List[nn.Module]:
    return list(model._tome_blocks())


# ---------------------------------------------------------------------------------------------
# Plain reference forward (tests/reference.py helpers, no tome code).
# ---------------------------------------------------------------------------------------------


def _layer_parts(layer: nn.Module) -> Tuple:
    """(norm1, q, k, v, out, heads, scale, ls1, norm2, mlp, ls2) of any supported layer."""
    ident = nn.Identity()
    if hasattr(layer, "self_attn"):  # CLIP, SigLIP
        a = layer.self_attn
        return (layer.layer_norm1, a.q_proj, a.k_proj, a.v_proj, a.out_proj, a.num_heads, a.scale, ident,
                layer.layer_norm2, layer.mlp, ident)
    if hasattr(layer, "layer_scale1"):  # DINOv2
        a = layer.attention
        return (layer.norm1, a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.num_attention_heads, a.scaling,
                layer.layer_scale1, layer.norm2, layer.mlp, layer.layer_scale2)
    if hasattr(layer, "intermediate"):  # VideoMAE
        a, o = layer.attention.attention, layer.attention.output
        return (layer.layernorm_before, a.query, a.key, a.value, o.dense, a.num_attention_heads, a.scaling, ident,
                layer.layernorm_after, lambda h: layer.output.dense(layer.intermediate(h)), ident)
    a = layer.attention  # ViT, DeiT, AST
    return (layer.layernorm_before, a.q_proj, a.k_proj, a.v_proj, a.o_proj, a.num_attention_heads, a.scaling, ident,
            layer.layernorm_after, layer.mlp, ident)


def reference_encoder(layers, x: torch.Tensor, schedule: List[int], protected: int, prop_attn: bool = True):
    """ToMe through the layers, explicitly; returns (tokens, size, source)."""
    batch, n, _ = x.shape
    size = torch.ones(batch, n, 1)
    source = torch.eye(n).expand(batch, -1, -1)
    for layer, r in zip(layers, schedule):
        norm1, qp, kp, vp, op, heads, scale, ls1, norm2, mlp, ls2 = _layer_parts(layer)
        tokens = x.shape[1]
        h = norm1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, heads, -1).transpose(1, 2)

        q, k, v = split(qp(h)), split(kp(h)), split(vp(h))
        o = reference_attention(q, k, v, size if prop_attn else None, scale)
        x = x + ls1(op(o.transpose(1, 2).reshape(batch, tokens, -1)))
        groups, _ = reference_match(k.mean(1), r, protected)
        x, size = reference_merge(x, size, groups)
        source = reference_compose_sources(source, groups)
        x = x + ls2(mlp(norm2(x)))
    return x, size, source


def reference_siglip_head(head: nn.Module, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention pooling, explicitly, with log(size) on the key logits."""
    mha = head.attention
    width, heads = x.shape[-1], mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    probe = head.probe.expand(x.shape[0], -1, -1)
    q, k, v = probe @ w[:width].T + b[:width], x @ w[width:2 * width].T + b[width:2 * width], x @ w[2 * width:].T + b[2 * width:]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    o = reference_attention(split(q), split(k), split(v), size, (width // heads) ** -0.5)
    o = mha.out_proj(o.transpose(1, 2).reshape(x.shape[0], 1, width))
    return (o + head.mlp(head.layernorm(o)))[:, 0]


def wmean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    return (x * size).sum(1) / size.sum(1)


def reference_forward(name: str, model: nn.Module, inputs: Dict[str, torch.Tensor], schedule: List[int], prop_attn: bool = True):
    """(main output, size, source) of a plain ToMe forward of ``model``."""
    fam = family(name)
    protected = PROTECTED[fam]
    if fam in ("vit", "deit"):
        base = model if name.endswith("Model") else getattr(model, fam)
        x, size, source = reference_encoder(base.layers, base.embeddings(inputs["pixel_values"]), schedule, protected, prop_attn)
        h = base.layernorm(x)
        if name == "DeiTForImageClassificationWithTeacher":
            out = (model.cls_classifier(h[:, 0]) + model.distillation_classifier(h[:, 1])) / 2
        elif name.endswith("Model"):
            out = base.pooler(h)
        else:
            out = model.classifier(h[:, 0])
        return out, size, source
    if fam in ("dinov2", "dinov2_reg"):
        base = model if name.endswith("Model") else getattr(model, "dinov2" if fam == "dinov2" else "dinov2_with_registers")
        x, size, source = reference_encoder(base.encoder.layer, base.embeddings(inputs["pixel_values"]), schedule, protected, prop_attn)
        h = base.layernorm(x)
        if name.endswith("Model"):
            return h[:, 0], size, source
        pooled = torch.cat([h[:, 0], wmean(h[:, protected:], size[:, protected:])], dim=1)
        return model.classifier(pooled), size, source
    if fam == "clip":
        vision = model if name == "CLIPVisionModel" else model.vision_model
        x = vision.pre_layrnorm(vision.embeddings(inputs["pixel_values"]))
        x, size, source = reference_encoder(vision.encoder.layers, x, schedule, protected, prop_attn)
        if name == "CLIPForImageClassification":
            return model.classifier(wmean(x[:, 1:], size[:, 1:])), size, source
        pooled = vision.post_layernorm(x[:, 0])
        if name == "CLIPVisionModelWithProjection":
            pooled = model.visual_projection(pooled)
        if name == "CLIPModel":
            pooled = model.visual_projection(pooled)
            pooled = pooled / pooled.norm(dim=-1, keepdim=True)
        return pooled, size, source
    if fam == "siglip":
        vision = model if name == "SiglipVisionModel" else model.vision_model
        x, size, source = reference_encoder(vision.encoder.layers, vision.embeddings(inputs["pixel_values"]), schedule, 0, prop_attn)
        x = vision.post_layernorm(x)
        if name == "SiglipForImageClassification":
            return model.classifier(wmean(x, size)), size, source
        pooled = reference_siglip_head(vision.head, x, size)
        if name == "SiglipModel":
            pooled = pooled / pooled.norm(dim=-1, keepdim=True)
        return pooled, size, source
    if fam == "videomae":
        base = model if name == "VideoMAEModel" else model.videomae
        x, size, source = reference_encoder(base.encoder.layer, base.embeddings(inputs["pixel_values"], None), schedule, 0, prop_attn)
        if name == "VideoMAEModel":
            return x, size, source
        return model.classifier(model.fc_norm(wmean(x, size))), size, source
    if fam == "ast":
        base = model if name == "ASTModel" else model.audio_spectrogram_transformer
        x, size, source = reference_encoder(base.layers, base.embeddings(inputs["input_values"]), schedule, 2, prop_attn)
        h = base.layernorm(x)
        pooled = (h[:, 0] + h[:, 1]) / 2
        return (pooled if name == "ASTModel" else model.classifier(pooled)), size, source
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------


# Classes whose NaFlex inputs need their own builders and tests.
TESTED_ELSEWHERE = {"Siglip2VisionModel": "test_hf_siglip2.py", "Siglip2Model": "test_hf_siglip2.py"}


def test_every_supported_class_is_tested():
    assert set(SUPPORTED_MODELS) == set(BUILDERS) | set(TESTED_ELSEWHERE)
    for name, file in TESTED_ELSEWHERE.items():
        assert name in (Path(__file__).parent / file).read_text(), (name, file)


@pytest.mark.parametrize("name", MODELS)
def test_detected_and_patched_by_apply_patch(name):
    model = make(name)
    assert tome.patch.family_of(model) == "hf"
    tome.apply_patch(model, r=2)
    assert model.r == 2
    layers = layers_of(model)
    assert len(layers) == LAYERS and all(isinstance(layer, ToMeHFLayer) for layer in layers)
    assert all(layer._tome_block_r == 2 for layer in layers)
    assert "tome: r=2" in repr(model)
    assert model._tome_info["protected_tokens"] == PROTECTED[family(name)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_r0_is_bit_identical(name, impl):
    model = make(name, impl)
    inputs = inputs_for(name)
    expected = model(**inputs, output_hidden_states=True)
    patched = tome.patch.hf(copy.deepcopy(model), trace_source=True)
    out = patched(**inputs, output_hidden_states=True)
    assert_identical(out, expected)
    # A forward that merged nothing still reports sizes and sources (identity).
    source = patched._tome_info["source"]
    assert torch.equal(source[0], torch.eye(NUM_TOKENS[family(name)]))


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2ForImageClassification", "SiglipVisionModel"])
@torch.no_grad()
def test_r0_keeps_attention_maps(name):
    model = make(name, "eager")
    inputs = inputs_for(name)
    expected = model(**inputs, output_attentions=True)
    patched = tome.patch.hf(copy.deepcopy(model))
    out = patched(**inputs, output_attentions=True)
    assert len(out.attentions) == LAYERS
    assert_identical(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_matches_reference(name, impl):
    model = make(name, impl)
    inputs = inputs_for(name)
    schedule = [3, 2]
    expected, size, source = reference_forward(name, model, inputs, schedule)
    unpatched = main_output(name, model(**inputs))
    tome.apply_patch(model, r=schedule, trace_source=True)
    out = model(**inputs)
    got = main_output(name, out)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert torch.equal(model._tome_info["size"], size)
    assert torch.equal(model._tome_info["source"], source)
    if got.shape != unpatched.shape:  # VideoMAEModel's output is its tokens: compare them per original token
        got = tome.unmerge_tokens(got, source)
    # A wrong merge would not be caught if merging barely moved the output.
    assert got.shape == unpatched.shape
    assert (got - unpatched).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2WithRegistersForImageClassification", "SiglipForImageClassification"])
@torch.no_grad()
def test_matches_reference_without_prop_attn(name):
    model = make(name)
    inputs = inputs_for(name)
    expected, _, _ = reference_forward(name, model, inputs, [3, 3], prop_attn=False)
    tome.apply_patch(model, r=3, prop_attn=False)
    out = main_output(name, model(**inputs))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    tome.patch.hf(model, prop_attn=True)  # re-patching updates the setting
    assert (main_output(name, model(**inputs)) - out).abs().max() > 1e-4


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_token_counts_and_sizes(name):
    model = make(name)
    inputs = inputs_for(name)
    fam = family(name)
    tome.apply_patch(model, r=4)
    out = model(**inputs, output_hidden_states=True)
    counts = tokens_per_layer(NUM_TOKENS[fam], [4] * LAYERS, PROTECTED[fam])
    if hasattr(out, "last_hidden_state") or name in ("CLIPModel", "SiglipModel"):
        assert vision_tokens(name, out).shape[:2] == (2, counts[-1])
    size = model._tome_info["size"]
    assert size.shape == (2, counts[-1], 1)
    assert torch.equal(size.sum(dim=(1, 2)), torch.full((2,), float(NUM_TOKENS[fam])))
    assert torch.equal(size[:, : PROTECTED[fam]], torch.ones(2, PROTECTED[fam], 1))
    hidden = out.vision_model_output.hidden_states if name in ("CLIPModel", "SiglipModel") else out.hidden_states
    assert [h.shape[1] for h in hidden] == counts
    assert model._tome_info["r"] == [4] * LAYERS


@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model", "CLIPModel"])
@torch.no_grad()
def test_hidden_state_selection(name):
    model = tome.apply_patch(make(name), r=2)
    inputs = inputs_for(name)
    out = model(**inputs, output_hidden_states=[-1])
    hidden = out.vision_model_output.hidden_states if name == "CLIPModel" else out.hidden_states
    assert len(hidden) == LAYERS + 1 and hidden[0] is None and hidden[-1] is not None


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2ForImageClassification", "SiglipModel", "VideoMAEForVideoClassification"])
@torch.no_grad()
def test_return_dict_false(name):
    model = tome.apply_patch(make(name), r=3)
    inputs = inputs_for(name)
    as_dict = model(**inputs)
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert_identical(as_tuple, as_dict.to_tuple())


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2Model", "SiglipVisionModel", "ASTForAudioClassification"])
@torch.no_grad()
def test_attention_maps_refused_while_merging(name):
    model = tome.apply_patch(make(name, "eager"), r=2)
    inputs = inputs_for(name)
    with pytest.raises(ValueError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    model.r = 0
    assert len(model(**inputs, output_attentions=True).attentions) == LAYERS


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2ForImageClassification", "ASTForAudioClassification"])
@torch.no_grad()
def test_padding_masks_merge_with_tokens(name):
    model = tome.apply_patch(make(name), r=2)
    inputs = inputs_for(name)
    num_tokens = NUM_TOKENS[family(name)]
    expected = main_output(name, model(**inputs))
    # An all-ones mask masks nothing.
    mask = torch.ones(2, num_tokens, dtype=torch.long)
    torch.testing.assert_close(main_output(name, model(**inputs, attention_mask=mask)), expected, atol=1e-5, rtol=0)
    # Sample 0 has its last 3 tokens padded: they count for nothing, whatever they hold.
    mask[0, -3:] = 0
    padded = main_output(name, model(**inputs, attention_mask=mask))
    sizes = model._tome_info["size"].sum(dim=(1, 2))
    torch.testing.assert_close(sizes, torch.tensor([num_tokens - 3.0, num_tokens]))
    torch.testing.assert_close(padded[1], expected[1], atol=1e-5, rtol=0)
    assert not torch.allclose(padded[0], expected[0], atol=1e-3)
    embeddings = next(m for n, m in model.named_modules() if n.endswith("embeddings"))

    def scramble_padding(module, args, out):
        out = out.clone()
        out[0, -3:] = 10 * torch.randn(3, out.shape[-1], generator=torch.Generator().manual_seed(7))
        return out

    handle = embeddings.register_forward_hook(scramble_padding)
    try:
        scrambled = main_output(name, model(**inputs, attention_mask=mask))
    finally:
        handle.remove()
    torch.testing.assert_close(scrambled, padded, atol=1e-5, rtol=0)
    # Masks that are not (batch, tokens) over the first layer's tokens are refused.
    with pytest.raises(ValueError, match="attention_mask covers"):
        model(**inputs, attention_mask=mask[:, 1:])


@pytest.mark.parametrize("name", ["ViTForImageClassification", "CLIPModel", "Dinov2WithRegistersForImageClassification", "VideoMAEForVideoClassification"])
@torch.no_grad()
def test_remove_patch_round_trip(name):
    model = make(name)
    inputs = inputs_for(name)
    expected = model(**inputs, output_hidden_states=True)
    classes = {n: type(m) for n, m in model.named_modules()}
    tome.apply_patch(model, r=3, trace_source=True)
    model(**inputs)
    tome.remove_patch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(k.startswith("_tome") for m in model.modules() for k in vars(m))
    assert_identical(model(**inputs, output_hidden_states=True), expected)


@pytest.mark.parametrize("name", ["ViTModel", "DeiTForImageClassificationWithTeacher", "SiglipModel", "Dinov2ForImageClassification"])
@torch.no_grad()
def test_patching_twice_is_harmless(name):
    model = make(name)
    inputs = inputs_for(name)
    tome.patch.hf(model)
    model.r = 3
    first = model(**inputs)
    tome.patch.hf(model)
    tome.apply_patch(model, r=3)
    assert model.r == 3
    assert_identical(model(**inputs), first)
    assert all(type(layer).__mro__.count(ToMeHFLayer) == 1 for layer in layers_of(model))


@pytest.mark.parametrize("name", ["ViTForImageClassification", "CLIPModel", "SiglipForImageClassification"])
def test_state_dict_unchanged(name):
    model = make(name)
    before = model.state_dict()
    tome.apply_patch(model, r=2)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    make(name, seed=1).load_state_dict(after)  # loads into an unpatched model


@torch.no_grad()
def test_text_tower_untouched():
    model = make("CLIPModel")
    inputs = inputs_for("CLIPModel")
    expected = model(**inputs)
    tome.apply_patch(model, r=3)
    out = model(**inputs)
    assert not any(tome.patch.is_patched(m) for m in model.text_model.modules())
    assert torch.equal(out.text_embeds, expected.text_embeds)
    assert (out.image_embeds - expected.image_embeds).abs().max() > 1e-3


@torch.no_grad()
def test_videomae_without_mean_pooling_keeps_first_token():
    model = make("VideoMAEForVideoClassification", use_mean_pooling=False)
    tome.apply_patch(model, r=8, trace_source=True)
    assert model._tome_info["protected_tokens"] == 1
    model(**inputs_for("VideoMAEForVideoClassification"))
    source = model._tome_info["source"]
    assert torch.equal(source[:, 0, 0], torch.ones(2)) and torch.equal(source[:, 0].sum(-1), torch.ones(2))


@torch.no_grad()
def test_videomae_masked_tubelets():
    model = tome.apply_patch(make("VideoMAEModel"), r=3, trace_source=True)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, ::4] = True  # the same number masked per video
    out = model(**inputs_for("VideoMAEModel"), bool_masked_pos=mask)
    assert out.last_hidden_state.shape[1] == tokens_per_layer(24, [3, 3], 0)[-1]
    assert model._tome_info["source"].shape == (2, out.last_hidden_state.shape[1], 24)


def test_gradient_checkpointing_matches_plain_backward():
    inputs = inputs_for("Dinov2ForImageClassification")
    labels = torch.tensor([1, 3])
    grads = []
    for checkpointing in (False, True):
        model = tome.apply_patch(make("Dinov2ForImageClassification"), r=3)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**inputs, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_layer_called_directly_merges_its_own_r():
    model = tome.apply_patch(make("ViTModel"), r=4)
    x = torch.randn(2, 17, 32)
    layer = model.layers[0]
    assert layer(x).shape == (2, 13, 32)
    model.r = 0
    assert layer(x).shape == (2, 17, 32)


@pytest.mark.parametrize("r", [-1, 2.5, "3", (2, 1.5)])
def test_bad_r_raises_value_error(r):
    model = make("ViTForImageClassification")
    with pytest.raises(ValueError):
        tome.apply_patch(model, r=r)
    assert not tome.patch.is_patched(model)
    tome.patch.hf(model)
    with pytest.raises(ValueError):
        model.r = r
    with pytest.raises(ValueError, match="layers"):
        model.r = [1, 2, 3]  # longer than the model is deep


def test_unsupported_models_raise_type_error():
    swin = transformers.SwinModel(
        transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=2)
    )
    for unsupported in (
        swin,
        transformers.ViTForMaskedImageModeling(transformers.ViTConfig(encoder_stride=8, **VISION)),
        transformers.Dinov2Backbone(transformers.Dinov2Config(mlp_ratio=2, **VISION)),
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)),
    ):
        name = type(unsupported).__name__
        with pytest.raises(TypeError, match=name):
            tome.patch.hf(unsupported)
        with pytest.raises(TypeError, match=name):
            tome.apply_patch(unsupported, r=2)
        assert not any(tome.patch.is_patched(m) for m in unsupported.modules())


def test_vision_tower_of_patched_model_is_not_repatched_on_its_own():
    model = tome.apply_patch(make("CLIPModel"), r=2)
    with pytest.raises(TypeError, match="already patched"):
        tome.patch.hf(model.vision_model)


def test_save_pretrained_names_the_original_class(tmp_path):
    model = tome.apply_patch(make("ViTForImageClassification"), r=2)
    model.save_pretrained(tmp_path)
    assert model.config.architectures == ["ViTForImageClassification"]
    assert tome.patch.is_patched(model) and model.r == 2
    loaded = transformers.ViTForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is transformers.ViTForImageClassification


@torch.no_grad()
def test_concurrent_forwards_keep_their_own_sizes():
    import threading

    model = tome.apply_patch(make("Dinov2ForImageClassification"), r=3)
    batches = [inputs_for("Dinov2ForImageClassification", batch) for batch in (1, 2, 3, 4)]
    expected = [model(**inputs).logits for inputs in batches]
    results: Dict[int, torch.Tensor] = {}

    def run(index: int) -> None:
        for _ in range(5):
            results[index] = model(**batches[index]).logits

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, logits in enumerate(expected):
        assert torch.equal(results[index], logits)


@pytest.mark.parametrize("module_name", ["tome.patch._hf", "tome.patch._hf_layers"])
def test_transformers_is_imported_lazily(module_name):
    import ast
    import importlib
    from pathlib import Path

    tree = ast.parse(Path(importlib.import_module(module_name).__file__).read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top_level for alias in node.names] + [
        node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)
    ]
    assert not any("transformers" in name for name in names)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "DeiTModel", "Dinov2ForImageClassification"])
def test_patched_class_round_trips_through_from_pretrained(tmp_path, name):
    model = tome.apply_patch(make(name), r=0)
    inputs = inputs_for(name)
    model.save_pretrained(tmp_path)
    # transformers sees its own class (not custom code), so no weight goes missing.
    assert type(model).__name__ == name and type(model).__module__.startswith("transformers.")
    assert not type(model).is_custom_code()
    loaded, report = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert all(not keys for keys in report.values() if isinstance(keys, (list, set))), report
    assert tome.patch.is_patched(loaded) and loaded.r == 0
    with torch.no_grad():
        torch.testing.assert_close(main_output(name, loaded(**inputs)), main_output(name, model(**inputs)), atol=0, rtol=0)
        model.r = loaded.r = 2
        torch.testing.assert_close(main_output(name, loaded(**inputs)), main_output(name, model(**inputs)), atol=0, rtol=0)


def test_pipeline_recognises_a_patched_model():
    import logging

    from PIL import Image

    model = tome.apply_patch(make("ViTForImageClassification"), r=2)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    library_logger = logging.getLogger("transformers")  # it does not propagate to the root logger
    library_logger.addHandler(handler)
    try:
        classify = transformers.pipeline("image-classification", model=model, image_processor=processor)
        result = classify(Image.new("RGB", (40, 40), "red"))
    finally:
        library_logger.removeHandler(handler)
    assert len(result) == 5
    assert not [m for m in messages if "not supported" in m], messages


def test_gradient_checkpointing_uses_the_layers_own_function():
    model = tome.apply_patch(make("ViTForImageClassification"), r=2).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    calls = []
    for layer in model.vit.layers:
        original = layer._gradient_checkpointing_func

        def spy(*args, _original=original, **kwargs):
            calls.append(1)
            return _original(*args, **kwargs)

        layer._gradient_checkpointing_func = spy
    inputs = inputs_for("ViTForImageClassification")
    inputs["pixel_values"].requires_grad_(True)
    model(**inputs).logits.sum().backward()
    assert len(calls) == LAYERS
    assert all(p.grad is not None for p in model.classifier.parameters())


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
@torch.no_grad()
def test_get_image_features_merges_like_the_forward(name):
    model = tome.apply_patch(make(name), r=3)
    inputs = inputs_for(name)
    embeds = model(**inputs).image_embeds
    features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = getattr(features, "pooler_output", features)
    if name == "CLIPModel":
        features = features / features.norm(dim=-1, keepdim=True)
    else:
        features = features / features.norm(p=2, dim=-1, keepdim=True)
    torch.testing.assert_close(features, embeds, atol=1e-5, rtol=0)
    assert model._tome_info["size"].shape[1] < NUM_TOKENS[family(name)]
    model.r = 0
    assert not torch.allclose(model(**inputs).image_embeds, embeds, atol=1e-3)


@torch.no_grad()
def test_torch_export_of_a_merging_model():
    # Under torch.export transformers builds an attention mask of ones although none was
    # passed; it masks nothing, so merging must not refuse it.
    model = tome.apply_patch(make("Dinov2Model"), r=3)
    inputs = inputs_for("Dinov2Model")
    expected = model(**inputs).last_hidden_state
    exported = torch.export.export(model, (), kwargs=inputs)
    got = exported.module()(**inputs).last_hidden_state
    assert got.shape == expected.shape == (2, NUM_TOKENS["dinov2"] - 3 - 3, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["CLIPVisionModel"])  # ViT's runner: test_conformance.py
@torch.no_grad()
def test_compiles_without_graph_breaks(name):
    torch._dynamo.reset()
    model = tome.apply_patch(make(name), r=3)
    inputs = inputs_for(name)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(main_output(name, compiled(**inputs)), main_output(name, model(**inputs)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["CLIPModel", "SiglipModel"])
def test_text_padding_mask_of_a_dual_tower_model_is_not_the_vision_towers(name):
    """Beside input_ids, attention_mask pads the text; the merging vision tower never sees it."""
    model = make(name)
    inputs = inputs_for(name)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][:, 5:] = 0
    with torch.no_grad():
        tome.apply_patch(model, r=2)
        out = model(**inputs)
        model.r = 0
        unmerged = model(**inputs)
    # the text side is untouched by merging; the image side merged
    torch.testing.assert_close(out.text_embeds, unmerged.text_embeds)
    assert out.vision_model_output.last_hidden_state.shape[1] < unmerged.vision_model_output.last_hidden_state.shape[1]


@pytest.mark.parametrize("name", MODELS)
def test_forward_reports_the_original_signature(name):
    # transformers reads inspect.signature(model.forward): Trainer keeps only the dataset
    # columns named there, its model tests ask whether output_attentions is accepted.
    import inspect

    model = make(name)
    expected = inspect.signature(model.forward)
    tome.apply_patch(model, r=2)
    assert inspect.signature(model.forward) == expected
    assert "pixel_values" in expected.parameters or "input_values" in expected.parameters
