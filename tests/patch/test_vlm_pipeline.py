"""A reduced VLM inside transformers' own ``pipeline("image-text-to-text")``, and in bf16.

Uses the shipped small Qwen2.5-VL and its offline processor (nothing is downloaded).
"""

import pytest
import torch

import tome

pytest.importorskip("transformers")

from transformers import pipeline  # noqa: E402

from tome.data import vqa  # noqa: E402
from tome.vlm_models import load_demo_vlm  # noqa: E402


def _question(index: int):
    sample = vqa.make_sample(index, "val", seed=0, image_size=224)
    return vqa.to_pil(sample), vqa.prompt_text(sample.question, "qwen2_5_vl")


def test_the_image_text_to_text_pipeline_runs_the_reduced_model():
    model, processor = load_demo_vlm("vqa-qwen2_5_vl")
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    tome.apply_patch(model, visual_tokens=16, method="pool")
    for index in range(3):
        image, text = _question(index)
        answer = pipe(images=image, text=text, max_new_tokens=2, return_full_text=False)[0]["generated_text"]
        items = model._tome_info["items"]
        assert [(item["tokens"], item["passed"], item["reduced"]) for item in items] == [(64, 16, True)]
        assert model._tome_info["length"][0] - model._tome_info["length"][1] == 48
        # The pipeline's answer is the patched model's own greedy answer on the processor's inputs.
        inputs = processor(text=text, images=image, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        direct = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        assert answer.strip() == direct.strip()


def test_bf16_reduced_and_unreduced():
    model, processor = load_demo_vlm("vqa-qwen2_5_vl")
    model = model.to(torch.bfloat16)
    image, text = _question(1)
    inputs = processor(text=text, images=image, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        plain = model(**inputs).logits
        tome.apply_patch(model, visual_tokens=None)
        same = model(**inputs).logits
        model.visual_tokens = 8
        reduced = model(**inputs).logits
    assert torch.equal(plain, same)
    assert reduced.dtype == torch.bfloat16 and reduced.shape[1] == plain.shape[1] - 56
    assert torch.isfinite(reduced).all()
    assert not torch.equal(reduced[:, -1], plain[:, -1])
