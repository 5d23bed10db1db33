"""The timm integration: exactness at r=0, agreement with the plain reference at r>0,
lifecycle, concurrency, training paths and bad input."""

from __future__ import annotations

import copy
import threading

import pytest
import timm
import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock

import tome

from conftest import trained_like_
from reference import reference_timm_vit

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)

CONFIGS = {
    "token": {},
    "layerscale": dict(init_values=0.1),
    "qk_norm": dict(qk_norm=True),
    "attn_out_norm": dict(scale_attn_norm=True),
    "gated_attn": dict(),  # gates added after construction, see make()
    "registers": dict(reg_tokens=4),
    "no_class_avg": dict(class_token=False, global_pool="avg"),
    "class_avg": dict(global_pool="avg"),
    "map": dict(global_pool="map"),
    "max": dict(global_pool="max"),
    "avgmax": dict(global_pool="avgmax"),
    "no_embed_class": dict(no_embed_class=True, init_values=0.1, reg_tokens=2),
    "res_post": dict(block_fn=ResPostBlock),
    "pool_include_prefix": dict(global_pool="avg", pool_include_prefix=True, reg_tokens=1),
}
# Configurations the plain reference forward covers.
REFERENCE_CONFIGS = ["token", "layerscale", "qk_norm", "attn_out_norm", "gated_attn", "registers",
                     "no_class_avg", "class_avg", "map", "no_embed_class"]


def make(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    kwargs = {**TINY, **CONFIGS[name], **overrides}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    if name == "gated_attn":
        # timm builds gated attention only from a class, so add the gates here.
        for block in model.blocks:
            block.attn.gate = torch.nn.Linear(TINY["embed_dim"], block.attn.attn_dim)
    return trained_like_(model, seed).eval()


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_r0_equals_unpatched(name):
    model = make(name)
    x = images()
    with torch.no_grad():
        expected = model(x)
        tome.patch.timm(model)
        assert model.r == 0
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
@pytest.mark.parametrize("prop_attn", [True, False])
def test_r_positive_matches_reference(name, prop_attn):
    model = make(name)
    x = images()
    schedule = [3, 2, 4]
    with torch.no_grad():
        unmerged = model(x)
        expected, size, source = reference_timm_vit(model, x, schedule, prop_attn=prop_attn)
        tome.patch.timm(model, trace_source=True, prop_attn=prop_attn)
        model.r = schedule
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model._tome_info["size"], size)
    torch.testing.assert_close(model._tome_info["source"], source)
    # Merging must change the answer (weights are at a trained-like scale).
    assert (out - unmerged).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["max", "avgmax", "res_post", "pool_include_prefix"])
def test_r_positive_changes_output_consistently(name):
    model = make(name)
    x = images()
    with torch.no_grad():
        base = model(x)
        tome.apply_patch(model, r=3)
        out = model(x)
        feats = model.forward_features(x)
        again = model.forward_head(feats)
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-2
    assert feats.shape[1] == 17 + model.num_prefix_tokens - 1 - 3 * 3
    torch.testing.assert_close(again, out)


def test_distilled_deit():
    from timm.models.deit import VisionTransformerDistilled

    model = trained_like_(VisionTransformerDistilled(**TINY)).eval()
    x = images()
    with torch.no_grad():
        base = model(x)
        tome.apply_patch(model, trace_source=True)
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
        model.r = 4
        feats = model.forward_features(x)
        out = model(x)
    assert model._tome_info["distill_token"] and model._tome_info["protected_tokens"] == 2
    # Class and distillation tokens stay in front, never merged.
    assert torch.all(model._tome_info["size"][:, :2] == 1)
    source = model._tome_info["source"]
    assert torch.all(source[:, 0, 0] == 1) and torch.all(source[:, 1, 1] == 1)
    assert feats.shape[1] == 18 - 3 * 4
    assert (out - base).abs().max() > 1e-2


def test_dynamic_img_size():
    model = make("token", dynamic_img_size=True)
    x = images(size=48)  # 36 patches instead of 16
    with torch.no_grad():
        base = model(x)
        tome.apply_patch(model)
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
        model.r = 5
        expected, _, _ = reference_timm_vit(model, x, [5, 5, 5])
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_explicit_attention_path():
    model = make("qk_norm")
    for block in model.blocks:
        block.attn.fused_attn = False
    x = images()
    with torch.no_grad():
        base = model(x)
        expected, _, _ = reference_timm_vit(model, x, [4, 4, 4])
        tome.apply_patch(model)
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)
        model.r = 4
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_remove_patch_is_bit_identical():
    model = make("registers")
    pristine = copy.deepcopy(model)
    x = images()
    tome.apply_patch(model, r=4, trace_source=True)
    with torch.no_grad():
        model(x)
    tome.remove_patch(model)
    assert type(model) is type(pristine)
    assert all(type(a) is type(b) for a, b in zip(model.modules(), pristine.modules()))
    assert not hasattr(model, "_tome_info") and not hasattr(model.blocks[0], "_tome_block_r")
    with torch.no_grad():
        assert torch.equal(model(x), pristine(x))
    tome.remove_patch(model)  # harmless on an unpatched model


def test_pre_hook_can_change_a_block_input():
    model = tome.apply_patch(make("token"), r=2)
    x = images()
    with torch.no_grad():
        base = model(x)
        handle = model.blocks[1].register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
        changed = model(x)
        handle.remove()
    assert not torch.allclose(base, changed)


def test_patching_twice_is_harmless():
    model = make("token")
    tome.apply_patch(model, r=3)
    cls = type(model)
    x = images()
    with torch.no_grad():
        first = model(x)
        tome.patch.timm(model, trace_source=True)
        assert type(model) is cls and model.r == 3
        assert torch.equal(model(x), first)
        assert model._tome_info["source"] is not None
    tome.remove_patch(model)
    assert type(model).__name__ == "VisionTransformer"


def test_state_dict_keys_unchanged_and_portable():
    model = make("layerscale")
    keys = list(model.state_dict())
    patched = tome.apply_patch(copy.deepcopy(model), r=2)
    assert list(patched.state_dict()) == keys
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY, init_values=0.1).eval()
    tome.apply_patch(fresh, r=2)
    fresh.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), patched(x))


def test_repr_shows_settings():
    model = tome.apply_patch(make("token"), r=(2, -1.0))
    text = repr(model)
    assert "tome: r=(2, -1.0), prop_attn=True, trace_source=False" in text
    assert "tome_r=4" in text  # first block of the decreasing schedule


def test_trace_source_partitions_original_tokens():
    model = tome.apply_patch(make("registers"), r=4, trace_source=True)
    with torch.no_grad():
        model(images(batch=3))
    source, size = model._tome_info["source"], model._tome_info["size"]
    assert source.shape == (3, 21 - 12, 21)
    assert torch.all(source.sum(dim=1) == 1)
    torch.testing.assert_close(source.sum(dim=2, keepdim=True), size)
    assert torch.equal(source[:, :5, :5], torch.eye(5).expand(3, -1, -1))  # class + 4 registers
    assert model._tome_info["r"] == [4, 4, 4]


def test_source_is_none_without_tracing_and_identity_when_nothing_merges():
    model = tome.apply_patch(make("token"), r=0)
    with torch.no_grad():
        model(images())
    assert model._tome_info["source"] is None
    assert torch.all(model._tome_info["size"] == 1)
    tome.apply_patch(model, r=0, trace_source=True)
    with torch.no_grad():
        model(images())
    assert torch.equal(model._tome_info["source"], torch.eye(17).expand(2, -1, -1))


def test_concurrent_forwards_match_serial():
    model = tome.apply_patch(make("class_avg"), r=[5, 3, 1], trace_source=True)
    inputs = [images(batch=1 + i % 3, seed=i) for i in range(6)]
    with torch.no_grad():
        serial = [model(x) for x in inputs]
    results = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(5):
                    results[i] = model(inputs[i])
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, serial):
        assert torch.equal(got, want)


def test_blocks_and_forward_features_callable_directly():
    model = tome.apply_patch(make("token"), r=3)
    x = images()
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        out = model.blocks[0](tokens)
        assert out.shape[1] == 17 - 3
        # The same block called twice gives the same answer: nothing is consumed.
        assert torch.equal(model.blocks[0](tokens), out)
        feats = model.forward_features(x)
        assert torch.equal(model.forward_features(x), feats)
        assert feats.shape[1] == 17 - 9


def test_training_gradients_and_checkpointing():
    model = make("layerscale", drop_path_rate=0.0)
    tome.apply_patch(model, r=3)
    model.train()
    x = images(batch=4)
    target = torch.tensor([0, 1, 2, 3])

    def grads(checkpointing: bool):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, plain = grads(False)
    loss_ckpt, ckpt = grads(True)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6)
    # Gradients reach the embeddings through every merge.
    assert plain["patch_embed.proj.weight"].abs().sum() > 0
    assert plain["blocks.0.attn.qkv.weight"].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    model = tome.apply_patch(make("class_avg"), r=3)
    x = images()
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=dtype):
            low = model(x)
    assert torch.isfinite(low).all()
    assert (low.float() - full).abs().max() < 0.25 * full.abs().max()


def test_half_precision_model():
    model = tome.apply_patch(make("class_avg"), r=3).to(torch.bfloat16)
    with torch.no_grad():
        out = model(images().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_r_above_cap_is_capped():
    model = tome.apply_patch(make("registers"), r=1000)
    with torch.no_grad():
        feats = model.forward_features(images())
    # 21 tokens, 5 protected: 16 -> 8 -> 4 -> 2 others left.
    assert feats.shape[1] == 5 + 2


def test_attn_mask():
    model = make("token")
    x = images()
    mask = torch.zeros(2, 1, 17, 17)
    mask[:, :, :, -3:] = -1e4
    with torch.no_grad():
        expected = model(x, attn_mask=mask)
        tome.apply_patch(model)
        torch.testing.assert_close(model(x, attn_mask=mask), expected, rtol=0, atol=1e-6)
        model.r = 2
        # A key-padding mask merges with the tokens (tests/patch/test_timm_masks.py); others are refused.
        assert model(x, attn_mask=mask).shape == expected.shape
        causal = torch.zeros(17, 17).masked_fill(torch.ones(17, 17, dtype=torch.bool).triu(1), float("-inf"))
        with pytest.raises(ValueError, match="not a key-padding mask"):
            model(x, attn_mask=causal)


@pytest.mark.parametrize(
    "bad, message", [(-1, "-1"), (2.5, "2.5"), ([1, 2, 3, 4], "4 entries"), ((4, 2.0), "2.0"), ((4, -1.5), "-1.5")]
)
def test_bad_r(bad, message):
    model = tome.apply_patch(make("token"), r=1)
    with pytest.raises(ValueError, match=message):
        model.r = bad
    assert model.r == 1  # unchanged
    fresh = make("token")
    with pytest.raises(ValueError, match=message):
        tome.apply_patch(fresh, r=bad)
    assert type(fresh).__name__ == "VisionTransformer"  # left unpatched


def test_unsupported_models_raise_type_error():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(TypeError, match=r"ResNet.*Supported families: .*timm"):
        tome.apply_patch(resnet)
    with pytest.raises(TypeError, match="ResNet"):
        tome.patch.timm(resnet)
    parallel = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY, block_fn=ParallelScalingBlock)
    with pytest.raises(TypeError, match="ParallelScalingBlock"):
        tome.patch.timm(parallel)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, num_classes=3)
    with pytest.raises(TypeError, match="Eva"):  # the timm ViT family; tome.apply_patch finds the eva family
        tome.patch.timm(eva)
    prr = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY, global_pool="prr")
    with pytest.raises(TypeError, match="'prr'"):
        tome.patch.timm(prr)
    with pytest.raises(ValueError, match="'nope'"):
        tome.apply_patch(make("token"), family="nope")


def test_unsupported_attention_class_raises():
    class MyAttention(Attention):
        pass

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY, attn_layer=MyAttention)
    with pytest.raises(TypeError, match="MyAttention"):
        tome.patch.timm(model)
    assert type(model).__name__ == "VisionTransformer"  # nothing half-patched


def test_overridden_method_message_says_what_is_wrong():
    class Custom(timm.models.vision_transformer.VisionTransformer):
        def forward_features(self, x):
            return super().forward_features(x)

    model = Custom(**{k: v for k, v in TINY.items()})
    with pytest.raises(TypeError, match="overrides VisionTransformer.forward_features") as error:
        tome.patch.timm(model)
    assert "MAE" not in str(error.value)


def test_unpatched_block_put_into_a_patched_model_is_named():
    model = tome.apply_patch(make("token"), r=2)
    donor = make("token")
    model.blocks[1] = donor.blocks[1]
    with pytest.raises(TypeError, match="block 1 is an unpatched Block.*apply_patch"):
        model(images())
    tome.apply_patch(model, r=2)  # patching again picks the new block up
    assert model(images()).shape == (2, 5)


def test_info_reports_the_r_that_ran():
    model = tome.apply_patch(make("token"), r=1000)
    model(images())
    # 17 tokens, 1 protected: each layer removes at most half of the others.
    assert model._tome_info["r"] == [8, 4, 2]
    assert model.r == 1000
