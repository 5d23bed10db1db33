"""The support checks the families share (``tome/patch/_checks.py``): each refusal names
the class, where it sits and what is supported, and nothing is patched half-way."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import tome
from tome.patch._checks import has_class


class VisionTransformer(nn.Module):  # same name as timm's, another module
    pass


def test_class_detector_reads_the_mro_by_name_and_module():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)

    class Subclass(type(vit)):
        pass

    subclass = Subclass(img_size=32, patch_size=8, depth=1)
    assert has_class(vit, "VisionTransformer", "timm.models.vision_transformer")
    assert has_class(subclass, "VisionTransformer", "timm.models.vision_transformer")
    assert has_class(subclass, "VisionTransformer", "timm")  # a package covers its modules
    assert not has_class(VisionTransformer(), "VisionTransformer", "timm.models.vision_transformer")
    assert not has_class(vit, "VisionTransformer", "timm.models.vision")  # a prefix of a name is not a module


def test_overridden_forward_names_the_method_the_class_and_its_module():
    base = timm.models.eva.Eva

    class Custom(base):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x, pre_logits)

    model = Custom(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    with pytest.raises(TypeError, match=rf"Custom overrides Eva.forward_head \(defined in {__name__}\)"):
        tome.patch.eva(model)
    assert not tome.patch.is_patched(model)


def test_attention_pool_with_position_embedding_is_refused_by_every_timm_family():
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5, global_pool="map")
    for name, patch in (("vit_tiny_patch16_224", tome.patch.timm), ("vit_small_patch16_rope_224", tome.patch.eva)):
        model = timm.create_model(name, pretrained=False, **kwargs)
        model.attn_pool.pos_embed = nn.Parameter(torch.zeros(1, 17, 32))
        with pytest.raises(TypeError, match=r"AttentionPoolLatent \(with position embedding: True\)"):
            patch(model)
        assert not tome.patch.is_patched(model)


def test_transformers_layer_of_another_class_is_named_with_its_module():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2)
    model = transformers.ViTModel(config)
    model.layers[1] = nn.Identity()
    with pytest.raises(TypeError, match=r"ViTModel.layers\[1\] is a Identity \(torch.nn.modules.linear\); ToMe expects ViTLayer"):
        tome.patch.hf(model)
    assert not any(tome.patch.is_patched(m) for m in model.modules())


def test_unsupported_model_names_its_class_module_and_the_families():
    with pytest.raises(TypeError, match=r"tome.patch.eva expects a timm Eva .*got Linear \(torch.nn.modules.linear\)"
                                        r"\. Supported families: .*naflexvit"):
        tome.patch.eva(nn.Linear(2, 2))
