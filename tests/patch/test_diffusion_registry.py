"""The diffusion block registry (tome.patch._diffusion_blocks): every transformer of the
installed diffusers is either registered and merges, or refused with a TypeError naming it;
patched blocks stay known to diffusers' own block registry, so its caches and layer skip
work on a patched model."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import tome

diffusers = pytest.importorskip("diffusers")

from diffusers.hooks import FirstBlockCacheConfig, LayerSkipConfig, apply_first_block_cache, apply_layer_skip  # noqa: E402
from diffusers.hooks.hooks import CacheContext, _set_cache_context  # noqa: E402

from tome.patch import _diffusion_blocks as rows  # noqa: E402

# Default configs that do not build as they are: the fewest arguments that make them build.
_CONFIG = {
    "DreamLiteTransformer2DModel": dict(in_channels=32),
    "EasyAnimateTransformer3DModel": dict(in_channels=4, out_channels=4, patch_size=2, text_embed_dim_t5=4096),
    "HiDreamImageTransformer2DModel": dict(patch_size=2, out_channels=4, caption_channels=[4096, 4096],
                                           llama_layers=list(range(48))),
    "LatteTransformer3DModel": dict(in_channels=4, out_channels=4, patch_size=2, caption_channels=4096,
                                    num_embeds_ada_norm=1000, cross_attention_dim=1152, sample_size=16),
    "OmniGenTransformer2DModel": dict(rope_scaling={"short_factor": [1.0] * 48, "long_factor": [1.0] * 48}),
    "Transformer2DModel": dict(in_channels=32),
    "TransformerTemporalModel": dict(in_channels=32),
}
_TRANSFORMERS = sorted(name for name in dir(diffusers) if re.fullmatch(r".*Transformer.*Model", name))


@pytest.mark.parametrize("name", _TRANSFORMERS)
def test_every_diffusers_transformer_is_registered_or_refused(name):
    """Built on the meta device from its default config (real sizes, no memory): a registered
    model merges in at least one block, any other is refused naming itself and the supported ones."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(diffusers, name)(**_CONFIG.get(name, {}))
    if rows.model_row(model) is not None:
        tome.patch.diffusers(model, ratio=0.5)
        assert model._tome_info["merging_blocks"] > 0
        return
    with pytest.raises(TypeError) as refused:
        tome.patch.diffusers(model, ratio=0.5)
    assert name in str(refused.value) and "WanTransformer3DModel" in str(refused.value)
    assert not any("_tome_parent" in type(m).__dict__ for m in model.modules())  # nothing was swapped


def test_the_registered_transformers_are_the_supported_list():
    registered = {name for name in _TRANSFORMERS if name in rows.supported_models()}
    assert registered == {"CogVideoXTransformer3DModel", "DiTTransformer2DModel", "FluxTransformer2DModel", "PixArtTransformer2DModel",
                          "HunyuanVideoTransformer3DModel", "LTXVideoTransformer3DModel", "QwenImageTransformer2DModel", "MochiTransformer3DModel", "SD3Transformer2DModel", "SanaTransformer2DModel", "Transformer2DModel", "WanTransformer3DModel",
                          "WanVACETransformer3DModel", "Flux2Transformer2DModel", "ZImageTransformer2DModel",
                          "HunyuanVideo15Transformer3DModel", "WanAnimateTransformer3DModel"}


@pytest.mark.parametrize("name", sorted(rows.REFUSED))
def test_models_refused_for_a_stated_reason_say_it(name):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(diffusers, name)(**_CONFIG.get(name, {}))
    with pytest.raises(TypeError, match=re.escape(f"{name} is not supported: {rows.REFUSED[name]}")):
        tome.patch.diffusers(model)


def test_a_model_row_must_name_registered_blocks():
    with pytest.raises(ValueError, match="NoSuchBlock"):
        rows.register_model(rows.ModelRow("SomeModel", ("NoSuchBlock",)))
    assert "SomeModel" not in rows.supported_models()


def test_a_model_without_a_row_is_refused_even_with_known_blocks():
    """Latte holds BasicTransformerBlocks (spatial and temporal) but has no row: it is refused
    rather than patched with a grid it cannot read."""
    from diffusers import LatteTransformer3DModel

    with torch.device("meta"):
        model = LatteTransformer3DModel(**_CONFIG["LatteTransformer3DModel"])
    assert any(type(m).__name__ == "BasicTransformerBlock" for m in model.modules())
    with pytest.raises(TypeError, match="LatteTransformer3DModel has no transformer block"):
        tome.patch.diffusers(model)


# --- diffusers' own block registry: caches and layer skip on patched blocks ------------------


def make_pixart():
    from diffusers import PixArtTransformer2DModel
    from test_diffusers import _trained_scale

    return _trained_scale(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16,
    ))


def pixart_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=gen),), dict(
        encoder_hidden_states=torch.randn(2, 5, 16, generator=gen), timestep=torch.tensor([10, 10]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def make_flux():
    from test_diffusers import make_flux

    return make_flux()


def flux_inputs(seed):
    from test_diffusers import flux_inputs

    args, kwargs = flux_inputs()
    gen = torch.Generator().manual_seed(seed)
    return (args[0] + 0.1 * torch.randn(args[0].shape, generator=gen),), kwargs


def _with_first_block_cache(model):
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.05))
    _set_cache_context(model, CacheContext("cond"))  # what CacheMixin.cache_context does (PixArt has none)
    return model


def _with_layer_skip(model):
    apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn="transformer_blocks"))  # the whole block: by its registry row
    return model


def _steps(model, inputs):
    """Three denoiser calls with inputs that change a little, as in sampling."""
    with torch.no_grad():
        return torch.stack([model(*args, **kwargs).sample for args, kwargs in map(inputs, range(3))])


@pytest.mark.parametrize("make,inputs", [(make_pixart, pixart_inputs), (make_flux, flux_inputs)], ids=["pixart", "flux"])
@pytest.mark.parametrize("hook", [_with_first_block_cache, _with_layer_skip], ids=["first_block_cache", "layer_skip"])
def test_diffusers_block_hooks_work_on_patched_blocks(make, inputs, hook):
    want = _steps(hook(make()), inputs)
    model = make()
    tome.patch.diffusers(model, ratio=0.0)
    assert torch.equal(_steps(hook(model), inputs), want)  # ratio 0: the unpatched model with the same hook
    model.ratio = 0.5
    merged = _steps(model, inputs)
    assert merged.shape == want.shape and not torch.equal(merged, want)


def test_swapped_blocks_are_registered_under_their_parents_metadata():
    from diffusers.hooks._helpers import TransformerBlockRegistry
    from diffusers.models.attention import BasicTransformerBlock

    model = make_pixart()
    tome.patch.diffusers(model, ratio=0.5)
    swapped = type(model.transformer_blocks[0])
    assert swapped is not BasicTransformerBlock
    metadata = TransformerBlockRegistry.get(swapped)
    parent = TransformerBlockRegistry.get(BasicTransformerBlock)
    assert metadata.return_hidden_states_index == parent.return_hidden_states_index
    assert metadata._cls is BasicTransformerBlock  # arguments are found by the parent's signature
