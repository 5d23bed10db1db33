"""Mask-free proportional attention: the key bias folded into a query/key channel
(tome._attention), the kernel switch (tome.set_prop_attn_kernel), and its use in the
ViT families and the diffusion ``kv`` mode."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import tome
from tome._attention import fold_key_bias, is_key_bias, key_bias_attention
from tome.patch._shared import ToMeState, attention, finite_key_bias, is_finite_key_bias


def _trained_like():
    """tests/conftest.py's trained_like_, loaded by path (the module name "conftest" is also tests/tools')."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("_root_conftest", pathlib.Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.trained_like_


trained_like_ = _trained_like()


class RecordSDPA(TorchFunctionMode):
    """Records the ``attn_mask`` and head size of every ``scaled_dot_product_attention`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.masks = []
        self.head_dims = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.masks.append(mask)
            self.head_dims.append(args[0].shape[-1])
        return func(*args, **kwargs)


def _qkv(batch, heads, queries, keys, head_dim, value_dim=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=gen)
    k = torch.randn(batch, heads, keys, head_dim, generator=gen)
    v = torch.randn(batch, heads, keys, value_dim or head_dim, generator=gen)
    size = torch.randint(1, 40, (batch, keys, 1), generator=gen).float()  # merged tokens: sizes up to 39
    return q, k, v, size.log().transpose(1, 2).unsqueeze(1)  # (batch, 1, 1, keys)


@pytest.mark.parametrize("head_dim", [7, 8, 13, 32, 64, 100])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_channel_form_equals_the_mask_in_fp32(head_dim, scale):
    q, k, v, bias = _qkv(3, 4, 29, 23, head_dim)
    assert bias.max() > 3  # sizes > 1: the bias matters
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    without_bias = F.scaled_dot_product_attention(q, k, v, scale=scale)
    got = key_bias_attention(q, k, v, bias, scale=scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - without_bias).abs().max() > 0.1


def test_folded_head_size_is_a_multiple_of_8_and_the_logits_carry_the_bias():
    q, k, v, bias = _qkv(2, 3, 11, 11, 13)
    qf, kf, vf = fold_key_bias(q, k, v, bias, 0.25)
    assert qf.shape[-1] == kf.shape[-1] == vf.shape[-1] == 16
    torch.testing.assert_close(0.25 * qf @ kf.transpose(-1, -2), 0.25 * q @ k.transpose(-1, -2) + bias)
    assert (vf[..., 13:] == 0).all() and torch.equal(vf[..., :13], v)


def test_per_head_bias_other_value_size_and_gradients():
    q, k, v, _ = _qkv(2, 3, 9, 17, 24, value_dim=40)
    bias = torch.randn(2, 3, 1, 17)  # a key bias per head
    for t in (q, k, v):
        t.requires_grad_(True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    grads_expected = torch.autograd.grad(expected.square().sum(), (q, k, v))
    got = key_bias_attention(q, k, v, bias)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_only_key_biases_fold():
    q, k, _, bias = _qkv(2, 3, 5, 7, 8)
    assert is_key_bias(bias, q, k) and is_key_bias(bias[0, 0, 0], q, k)
    assert not is_key_bias(torch.zeros(2, 1, 5, 7), q, k)  # a bias per query
    with pytest.raises(ValueError, match="not a key-only bias"):
        key_bias_attention(q, k, k, torch.zeros(2, 1, 5, 7))
    with pytest.raises(ValueError, match="scale=0"):
        key_bias_attention(q, k, k, bias, scale=0.0)


def test_kernel_switch_validates_and_restores():
    assert tome.get_prop_attn_kernel() == "auto"
    with pytest.raises(ValueError, match="'flash'.*'auto', 'mask', 'channel'"):
        tome.set_prop_attn_kernel("flash")
    with tome.prop_attn_kernel("channel"):
        assert tome.get_prop_attn_kernel() == "channel"
        with pytest.raises(RuntimeError), tome.prop_attn_kernel("mask"):
            raise RuntimeError
        assert tome.get_prop_attn_kernel() == "channel"
    assert tome.get_prop_attn_kernel() == "auto"


def test_attention_routes_by_kernel_and_never_folds_padding():
    q, k, v, bias = _qkv(2, 3, 7, 7, 16)
    marked = finite_key_bias(bias.clone())
    for kernel, folded in (("mask", False), ("channel", True), ("auto", False)):  # auto: mask on CPU
        with tome.prop_attn_kernel(kernel), RecordSDPA() as record:
            out = attention(q, k, v, marked)
        assert (record.masks[0] is None) == folded and record.head_dims[0] == (24 if folded else 16)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=1e-5, rtol=1e-5)
    # An unmarked bias (e.g. padding, -inf) keeps the mask whatever the kernel.
    padding = bias.clone()
    padding[..., -2:] = -torch.inf
    with tome.prop_attn_kernel("channel"), RecordSDPA() as record:
        out = attention(q, k, v, padding)
    assert record.masks[0] is padding and torch.isfinite(out).all()
    # No bias: scaled_dot_product_attention itself, bit for bit.
    with tome.prop_attn_kernel("channel"):
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_state_marks_its_bias_finite_unless_padded():
    size = torch.tensor([[[1.0], [3.0], [2.0], [0.0]]])
    state = ToMeState(size, None, 4, 1, True, False)
    assert is_finite_key_bias(state.attn_bias(torch.float32))
    padded = ToMeState(size, None, 4, 1, True, False, padded=True)
    assert not is_finite_key_bias(padded.attn_bias(torch.float32))
    assert not is_finite_key_bias(ToMeState(size, None, 4, 1, False, False, padded=True).attn_bias(torch.float32))


def _vit():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, depth=4)
    return trained_like_(model).eval()


def test_vit_on_the_channel_path_calls_sdpa_without_a_mask_and_matches_the_mask_path():
    model = _vit()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        unpatched = model(x)
        tome.apply_patch(model, r=0)
        with tome.prop_attn_kernel("channel"):
            assert torch.equal(model(x), unpatched)  # r = 0: unchanged, bit for bit
        model.r = 6
        with tome.prop_attn_kernel("mask"), RecordSDPA() as record:
            masked = model(x)
        assert sum(m is not None for m in record.masks) == 3  # blocks 1-3 see merged tokens
        with tome.prop_attn_kernel("channel"), RecordSDPA() as record:
            folded = model(x)
        assert len(record.masks) == 4 and all(m is None for m in record.masks)
        assert record.head_dims == [64, 72, 72, 72]
    torch.testing.assert_close(folded, masked, atol=1e-5, rtol=1e-5)
    assert (masked - unpatched).abs().max() > 1e-2


def test_channel_path_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = tome.apply_patch(_vit(), r=6)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), tome.prop_attn_kernel("channel"):
        expected = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


def test_diffusers_kv_mode_folds_the_bias_too():
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    gen = torch.Generator().manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.dim() > 1 else 10))
    ids = torch.zeros(6, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(6)[:, None], torch.arange(4)[None]
    inputs = dict(hidden_states=torch.randn(2, 24, 8, generator=gen), encoder_hidden_states=torch.randn(2, 5, 16, generator=gen),
                  pooled_projections=torch.randn(2, 16, generator=gen), timestep=torch.tensor([0.5, 0.5]),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3))
    tome.patch.diffusers(model, ratio=0.5, mode="kv", use_rand=False)
    with torch.no_grad():
        with tome.prop_attn_kernel("mask"), RecordSDPA() as record:
            masked = model(**inputs).sample
        assert len(record.masks) == 2 and all(m is not None for m in record.masks)
        with tome.prop_attn_kernel("channel"), RecordSDPA() as record:
            folded = model(**inputs).sample
        assert len(record.masks) == 2 and all(m is None for m in record.masks)
        assert record.head_dims == [16, 16]  # 8 channels + 1, rounded up to 16
    torch.testing.assert_close(folded, masked, atol=1e-5, rtol=1e-5)


def test_the_algorithm_module_imports_torch_only():
    import ast
    import pathlib

    import tome._attention as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in names} <= {"torch", "__future__", "typing"}
