"""transformers' common model tests (``ModelTesterMixin``) for the vision families ToMe patches.

transformers ships ``tests/test_modeling_common.py`` in its source distribution but
not the per-model test files, so these testers supply what a per-model file would:
a small config and inputs for each family. ``run.py`` copies this file next to
``test_modeling_common.py`` and runs it with ``plugin.py``, which patches every
model the tests create. Written for this project; sizes follow the usual tiny
test configs (2 layers, width 32, 30x30 images of 2x2 patches: 225 patch tokens).
"""

import unittest

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from .test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor


class _Tester:
    """Config and inputs for one family; ``prefix`` tokens precede the patch tokens."""

    def __init__(self, parent, config_class, prefix, batch_size=4, image_size=30, patch_size=2, num_labels=10):
        self.parent, self.config_class, self.prefix = parent, config_class, prefix
        self.batch_size, self.image_size, self.patch_size = batch_size, image_size, patch_size
        self.num_channels, self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 3, 32, 2, 4
        self.num_labels, self.is_training = num_labels, True
        self.seq_length = (image_size // patch_size) ** 2 + prefix
        # bool_masked_pos for the models that take it: half the patches masked
        self.mask_length = (image_size // patch_size) ** 2
        self.num_masks = self.mask_length // 2

    def get_config(self):
        return self.config_class(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=37, hidden_act="gelu",
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}

    def prepare_labels(self):
        return ids_tensor([self.batch_size], self.num_labels)


class _Common(ModelTesterMixin):
    config_class = None
    prefix = 1
    test_resize_embeddings = False
    test_torch_exportable = False  # ExportTesterMixin is not in transformers' source distribution

    def setUp(self):
        self.model_tester = _Tester(self, self.config_class, self.prefix)

    def test_model_get_set_embeddings(self):
        # Vision models embed patches with a convolution, not an nn.Embedding lookup.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsInstance(model.get_input_embeddings().projection, torch.nn.Conv2d)

    def test_config(self):
        config = self.model_tester.get_config()
        self.assertEqual(self.config_class.from_dict(config.to_dict()).hidden_size, config.hidden_size)

    @torch.no_grad()
    def test_classifier_logits(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            if "ForImageClassification" in model_class.__name__:
                model = model_class(config).eval()
                out = model(**inputs)
                self.assertEqual(tuple(out.logits.shape), (self.model_tester.batch_size, self.model_tester.num_labels))


class ViTCommonTest(_Common, unittest.TestCase):
    config_class = ViTConfig
    all_model_classes = (ViTModel, ViTForImageClassification)


class DeiTCommonTest(_Common, unittest.TestCase):
    config_class = DeiTConfig
    prefix = 2  # class and distillation tokens
    all_model_classes = (DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher)


class Dinov2CommonTest(_Common, unittest.TestCase):
    config_class = Dinov2Config
    all_model_classes = (Dinov2Model, Dinov2ForImageClassification)
