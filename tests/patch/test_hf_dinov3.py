"""Hugging Face DINOv3 (``DINOv3ViTModel``): exactness at r=0, a plain RoPE reference at
r>0, dense features on the patch grid, lifecycle and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import tome

from conftest import trained_like_
from reference import reference_attention, reference_compose_sources, reference_match, reference_merge

transformers = pytest.importorskip("transformers")
from transformers import DINOv3ViTConfig, DINOv3ViTModel  # noqa: E402


def make(seed: int = 0, **overrides) -> torch.nn.Module:
    config = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=3, patch_size=8,
                  image_size=32, num_register_tokens=4)
    config.update(overrides)
    return trained_like_(DINOv3ViTModel(DINOv3ViTConfig(**config)), seed).eval()


def images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def reference_dinov3(model, x, schedule, position="mean", metric="plain", prop_attn=True):
    """Plain ToMe forward of DINOv3ViTModel: returns (last_hidden_state, size, source)."""
    protected = 1 + model.config.num_register_tokens
    patch = model.config.patch_size
    height, width = x.shape[-2] // patch, x.shape[-1] // patch
    h = model.embeddings(x)
    batch, n, _ = h.shape
    size = torch.ones(batch, n, 1)
    source = torch.eye(n).expand(batch, -1, -1)
    rows = (torch.arange(height) + 0.5) / height * 2 - 1
    cols = (torch.arange(width) + 0.5) / width * 2 - 1
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    coords = torch.cat([torch.zeros(protected, 2), coords]).expand(batch, -1, -1)
    freqs = 2 * math.pi * model.rope_embeddings.inv_freq

    def rotate(t, c):  # pairs (i, i + d/2), angle of pair i = its axis' coordinate times its frequency
        angles = (c[..., None] * freqs).flatten(-2)[:, None]
        first, second = t.chunk(2, dim=-1)
        return torch.cat([first * angles.cos() - second * angles.sin(),
                          first * angles.sin() + second * angles.cos()], dim=-1)

    for layer, layer_r in zip(model.model.layer, schedule):
        attn = layer.attention
        y = layer.norm1(h)
        split = lambda t: t.view(batch, y.shape[1], attn.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.q_proj(y)), split(attn.k_proj(y)), split(attn.v_proj(y))
        plain_k = k
        q = torch.cat([q[:, :, :protected], rotate(q[:, :, protected:], coords[:, protected:])], 2)
        k = torch.cat([k[:, :, :protected], rotate(k[:, :, protected:], coords[:, protected:])], 2)
        o = reference_attention(q, k, v, size if prop_attn else None, attn.scaling)
        h = h + layer.layer_scale1(attn.o_proj(o.transpose(1, 2).reshape(batch, y.shape[1], -1)))
        groups, _ = reference_match((k if metric == "rotated" else plain_k).mean(1), layer_r, protected)
        if position == "mean":
            coords, _ = reference_merge(coords, size, groups)
        else:
            coords = torch.stack([
                torch.stack([coords[b, [i for i in g if i % 2 == 1][0] if len(g) > 1 else g[0]] for g in token_groups])
                for b, token_groups in enumerate(groups)
            ])
        h, size = reference_merge(h, size, groups)
        source = reference_compose_sources(source, groups)
        h = h + layer.layer_scale2(layer.mlp(layer.norm2(h)))
    return model.norm(h), size, source


def test_r0_equals_unpatched_bit_for_bit():
    model = make()
    x = images(width=48)
    with torch.no_grad():
        expected = model(x, output_hidden_states=True)
        tome.apply_patch(model)
        assert tome.patch.family_of(model) == "hf_dinov3" and type(model).__name__ == "DINOv3ViTModel"
        out = model(x, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    for got, want in zip(out.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("position", ["mean", "destination"])
@pytest.mark.parametrize("metric", ["plain", "rotated"])
def test_r_positive_matches_reference(position, metric):
    model = make()
    x = images(height=32, width=48)
    schedule = [3, 2, 4]
    with torch.no_grad():
        unmerged = model(x).last_hidden_state
        expected, size, source = reference_dinov3(model, x, schedule, position, metric)
        tome.patch.hf_dinov3(model, trace_source=True, rope_position=position, rope_metric=metric)
        model.r = schedule
        out = model(x)
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model._tome_info["size"], size)
    torch.testing.assert_close(model._tome_info["source"], source)
    assert (out.pooler_output - unmerged[:, 0]).abs().max() > 1e-2


def test_dense_features_on_the_patch_grid():
    model = tome.apply_patch(make(), r=3, trace_source=True)
    x = images()
    with torch.no_grad():
        out = model(x)
    dense = tome.unmerge_tokens(out.last_hidden_state, model._tome_info["source"])[:, 5:]
    grid = dense.transpose(1, 2).reshape(2, 32, 4, 4)
    assert grid.shape == (2, 32, 4, 4)
    # Every patch carries the features of the merged token that holds it.
    groups = model._tome_info["source"].argmax(1)[:, 5:]
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), out.last_hidden_state.gather(
        1, groups.unsqueeze(-1).expand(-1, -1, 32)))


def test_gradient_checkpointing_matches():
    # Training with merging needs DINOv3's random coordinate augmentation off (see test_bad_input).
    model = tome.apply_patch(make(pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None), r=3)
    model.train()
    x = images()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.zero_grad()
        model(x).last_hidden_state.square().mean().backward()
        grads.append(model.model.layer[0].attention.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_bad_input():
    with pytest.raises(ValueError, match="'centre'"):
        tome.patch.hf_dinov3(make(), rope_position="centre")
    with pytest.raises(ValueError, match="'values'"):
        tome.patch.hf_dinov3(make(), rope_metric="values")
    model = tome.apply_patch(make(), r=2)
    with pytest.raises(ValueError, match="output_attentions"):
        model(images(), output_attentions=True)
    augmented = tome.apply_patch(make(pos_embed_shift=0.1), r=2)
    augmented.train()
    with pytest.raises(ValueError, match="augmentation"):
        augmented(images())


def test_patched_class_from_pretrained_gives_a_patched_model(tmp_path):
    model = tome.patch.hf_dinov3(make())
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert tome.patch.is_patched(loaded) and loaded.r == 0 and type(loaded).__name__ == "DINOv3ViTModel"
    loaded.r = model.r = 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()).last_hidden_state, model(images()).last_hidden_state)


def test_encoder_run_on_its_own_says_to_call_the_whole_model():
    # The model's forward starts the rotary positions merged tokens carry; its encoder alone cannot.
    model = tome.apply_patch(make(), r=2)
    x = images()
    with torch.no_grad():
        hidden, pair = model.embeddings(x), model.rope_embeddings(x)
        with pytest.raises(RuntimeError, match="call the whole model"):
            model.model(hidden, position_embeddings=pair)
