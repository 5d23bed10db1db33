"""Tiny Gemma 3, SmolVLM, Idefics3, InternVL and LLaVA-OneVision models, and a plain reference
for each: what the language model computes when only some visual tokens reach it.

Facts per family (transformers 5.23, read from ``models/<name>/modeling_*.py``):

- **Gemma 3** (``Gemma3ForConditionalGeneration``): SigLIP tower -> ``Gemma3MultiModalProjector``
  (2-D average pool of the ``p x p`` patch grid to ``sqrt(mm_tokens_per_image)`` per side,
  RMS norm, matmul). ``get_image_features(pixel_values).pooler_output`` is ``(images,
  mm_tokens_per_image, C)``, row-major over the pooled grid; it is ``masked_scatter``-ed into
  the ``image_token_id`` placeholders (``<boi> <image>*mm_tokens <eoi>`` in the prompt). The
  language model uses 1-D positions (``arange`` when none are given). ``token_type_ids``
  (1 on image tokens) makes every contiguous run of image tokens attend to itself
  bidirectionally (``get_block_sequence_ids_for_mask`` -> ``create_masks_for_vision_model``);
  only the prefill gets them (``prepare_inputs_for_generation``).
- **SmolVLM / Idefics3**: SigLIP-like tower per *crop* -> connector (pixel shuffle by
  ``scale_factor``, then a linear projection): ``(image_size / patch_size / scale_factor)^2``
  tokens per crop, row-major over the shuffled grid. ``pixel_values`` is ``(batch, crops,
  3, H, W)``; all-zero crops are padding and dropped. An image split into ``r x c`` crops is
  laid out as ``<fake><row_i_col_j><image>*n`` per crop (a newline after each row) and then
  ``<fake><global-img><image>*n<fake>`` for the global view: each crop is its own contiguous
  run of placeholders, separated by text tokens. 1-D positions.
- **InternVL**: InternViT tower per tile (class token dropped with the "default" strategy)
  -> pixel shuffle by ``downsample_ratio`` -> MLP projector: ``image_seq_length`` tokens per
  tile, row-major. ``pixel_values`` is ``(tiles, 3, H, W)`` for all images; one image is
  ``<img> <IMG_CONTEXT>*(tiles * image_seq_length) </img>``: one run per image (tiles then
  the thumbnail); a unit here is a tile. 1-D positions.
- **LLaVA-OneVision**: SigLIP tower -> MLP projector. ``pack_image_features`` lays out one
  image as the base view (``s*s`` tokens) followed by the unpadded any-res grid of its crops,
  each grid row ended by the learned ``image_newline`` (a multi-image sample's images are one
  crop each: ``s*s`` tokens and one newline). A video (``get_video_features``): per frame a
  bilinear 2x downsample of the grid, frames concatenated, one ``image_newline`` at the end.
  Images fill the ``image_token_id`` placeholders, videos the ``video_token_id`` ones. 1-D
  positions.

The reference (:func:`reference_logits`) uses only the model's own modules: the full input
embeddings as the model builds them, then the kept rows of each visual unit (optionally
replaced by given features), the language model on the shorter sequence at either the
original 1-D positions or consecutive ones, then the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from conftest import trained_like_

HIDDEN = 64
VOCAB = 128
PAD = 0

# Token ids shared by the tiny models (all inside the vocabulary).
IMAGE = 100
VIDEO = 101
BOI = 102
EOI = 103
FAKE = 104
GLOBAL = 105
NEWLINE = 106
ROW_COL = 110  # <row_i_col_j> = ROW_COL + 3 * (i - 1) + (j - 1)


@dataclass
class Unit:
    """One visual unit: a contiguous stretch of the placeholders of ``token_id``, in the
    order ``masked_scatter`` fills them (row-major over the batch)."""

    token_id: int
    length: int
    grid: Optional[Tuple[int, int, int]] = None
    # Indices (into the unit) of tokens that are not visual tokens but structure the model
    # inserts among them (LLaVA-OneVision's image_newline).
    separators: Tuple[int, ...] = ()


@dataclass
class FamilyCase:
    """A tiny model with one batch of inputs for ``model(**inputs)``."""

    name: str
    model: nn.Module
    inputs: Dict[str, torch.Tensor]
    units: List[Unit]
    visual_embeds: Callable[["FamilyCase", Dict[str, torch.Tensor]], Dict[int, torch.Tensor]]
    language_model: Callable[..., torch.Tensor]
    extra: Dict[str, object] = field(default_factory=dict)


def _finish(model: nn.Module, seed: int) -> nn.Module:
    trained_like_(model, seed=seed)
    return model.eval()


def _left_pad(rows: Sequence[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def _text(generator: torch.Generator, n: int) -> List[int]:
    return torch.randint(1, IMAGE, (n,), generator=generator).tolist()


def _pixels(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


# --- Gemma 3 -------------------------------------------------------------------------------

def gemma3(seed: int = 0, images_per_sample: Sequence[int] = (1, 2), text_lengths: Sequence[int] = (5, 3),
           sliding_window: int = 8) -> FamilyCase:
    """Gemma 3: 32 px images, 4 px patches (8 x 8), pooled to 16 tokens (4 x 4) per image; layer 0
    is a sliding-window layer (``sliding_window`` tokens, counted in sequence indices), layer 1
    global."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
                         layer_types=["sliding_attention", "full_attention"], pad_token_id=PAD,
                         max_position_embeddings=512),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=4),
        mm_tokens_per_image=16, image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI,
        tie_word_embeddings=False,  # tied, a random model mostly repeats its last token
    )
    torch.manual_seed(seed)
    model = _finish(Gemma3ForConditionalGeneration(config), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    rows = []
    for count, length in zip(images_per_sample, text_lengths):
        row = _text(generator, 2)
        for _ in range(count):
            row += [BOI] + [IMAGE] * 16 + [EOI] + _text(generator, 1)
        rows.append(row + _text(generator, length))
    input_ids, attention_mask = _left_pad(rows)
    num_images = sum(images_per_sample)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  token_type_ids=(input_ids == IMAGE).long(),
                  pixel_values=_pixels(generator, num_images, 3, 32, 32))
    units = [Unit(IMAGE, 16, (1, 4, 4)) for _ in range(num_images)]
    return FamilyCase("gemma3", model, inputs, units, _gemma3_visual, _gemma3_language_model)


def _gemma3_visual(case: FamilyCase, inputs: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    features = case.model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    return {IMAGE: features.flatten(0, 1)}


def _gemma3_language_model(case: FamilyCase, inputs_embeds, attention_mask, position_ids, input_ids):
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    inner = case.model.model
    block_ids = get_block_sequence_ids_for_mask((input_ids == IMAGE).long(), device=inputs_embeds.device)
    masks = create_masks_for_vision_model(config=inner.config.get_text_config(), inputs_embeds=inputs_embeds,
                                          attention_mask=attention_mask, past_key_values=None,
                                          position_ids=position_ids, block_sequence_ids=block_ids)
    out = inner.language_model(attention_mask=masks, position_ids=position_ids, inputs_embeds=inputs_embeds,
                               use_cache=False, return_dict=True)
    return case.model.lm_head(out.last_hidden_state)


# --- SmolVLM / Idefics3 ----------------------------------------------------------------------

def _crop_rows(split: Tuple[int, int], generator: torch.Generator) -> List[int]:
    """The prompt of one image split into ``rows x cols`` crops plus its global view
    (``(0, 0)``: the global view alone), 16 placeholders per crop."""
    rows, cols = split
    out: List[int] = []
    for i in range(rows):
        for j in range(cols):
            out += [FAKE, ROW_COL + 3 * i + j] + [IMAGE] * 16
        out.append(NEWLINE)
    if rows:
        out.append(NEWLINE)
    return out + [FAKE, GLOBAL] + [IMAGE] * 16 + [FAKE]


def _idefics(cls_name: str, seed: int, splits_per_sample: Sequence[Sequence[Tuple[int, int]]],
             text_lengths: Sequence[int]) -> FamilyCase:
    import transformers

    config_cls = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))
    config = config_cls(
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                         max_position_embeddings=512),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=4),
        scale_factor=2, image_token_id=IMAGE,
    )
    torch.manual_seed(seed)
    model = _finish(getattr(transformers, cls_name)(config), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    rows, crops = [], []
    for splits, length in zip(splits_per_sample, text_lengths):
        row = _text(generator, 2)
        count = 0
        for split in splits:
            row += _crop_rows(split, generator) + _text(generator, 1)
            count += split[0] * split[1] + 1
        rows.append(row + _text(generator, length))
        crops.append(count)
    input_ids, attention_mask = _left_pad(rows)
    pixel_values = torch.zeros(len(rows), max(crops), 3, 32, 32)
    for i, count in enumerate(crops):
        pixel_values[i, :count] = _pixels(generator, count, 3, 32, 32)
    units = [Unit(IMAGE, 16, (1, 4, 4)) for _ in range(sum(crops))]
    # as the processor gives it: 1 on real pixels, 0 on the padding crops
    pixel_attention_mask = (pixel_values != 0).any(2)
    case = FamilyCase(cls_name.replace("ForConditionalGeneration", "").lower(), model,
                      dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                           pixel_attention_mask=pixel_attention_mask),
                      units, _idefics_visual, _plain_language_model)
    case.extra["splits"] = [list(s) for s in splits_per_sample]
    return case


def smolvlm(seed: int = 0, splits_per_sample=(((2, 2),), ((0, 0), (1, 2))), text_lengths=(5, 3)) -> FamilyCase:
    """SmolVLM: 32 px crops, 4 px patches, pixel shuffle 2 -> 16 tokens (4 x 4) per crop;
    sample 0 has one image split 2 x 2 (+ global), sample 1 an unsplit and a 1 x 2 image."""
    return _idefics("SmolVLMForConditionalGeneration", seed, splits_per_sample, text_lengths)


def idefics3(seed: int = 0, splits_per_sample=(((2, 2),), ((0, 0), (1, 2))), text_lengths=(5, 3)) -> FamilyCase:
    """Idefics3: the same layout as :func:`smolvlm`."""
    return _idefics("Idefics3ForConditionalGeneration", seed, splits_per_sample, text_lengths)


def _idefics_visual(case: FamilyCase, inputs: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    features = case.model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"),
                                                   return_dict=True).pooler_output
    return {IMAGE: torch.cat(list(features), dim=0)}


def _inner_language_model(model: nn.Module) -> nn.Module:
    inner = model.model
    return inner.text_model if hasattr(inner, "text_model") else inner.language_model


def _plain_language_model(case: FamilyCase, inputs_embeds, attention_mask, position_ids, input_ids):
    out = _inner_language_model(case.model)(attention_mask=attention_mask, position_ids=position_ids,
                                            inputs_embeds=inputs_embeds, use_cache=False, return_dict=True)
    return case.model.lm_head(out.last_hidden_state)


# --- InternVL --------------------------------------------------------------------------------

def internvl(seed: int = 0, tiles_per_sample: Sequence[Sequence[int]] = ((3,), (1, 2)),
             text_lengths: Sequence[int] = (5, 3)) -> FamilyCase:
    """InternVL: 32 px tiles, 4 px patches (8 x 8), pixel shuffle 0.5 -> 16 tokens (4 x 4) per
    tile; sample 0 has one image of 3 tiles, sample 1 images of 1 and 2 tiles."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                         max_position_embeddings=512),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[32, 32], patch_size=[4, 4]),
        image_token_id=IMAGE, image_seq_length=16, downsample_ratio=0.5, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = _finish(InternVLForConditionalGeneration(config), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    rows, units = [], []
    for tiles, length in zip(tiles_per_sample, text_lengths):
        row = _text(generator, 2)
        for count in tiles:
            row += [BOI] + [IMAGE] * (16 * count) + [EOI] + _text(generator, 1)
            units += [Unit(IMAGE, 16, (1, 4, 4)) for _ in range(count)]  # one unit per tile
        rows.append(row + _text(generator, length))
    input_ids, attention_mask = _left_pad(rows)
    total = sum(sum(t) for t in tiles_per_sample)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=_pixels(generator, total, 3, 32, 32))
    return FamilyCase("internvl", model, inputs, units, _internvl_visual, _plain_language_model)


def _internvl_visual(case: FamilyCase, inputs: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    features = case.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    return {IMAGE: features.flatten(0, 1)}


# --- LLaVA-OneVision -------------------------------------------------------------------------

def llava_onevision(seed: int = 0, image_sizes: Sequence[Tuple[int, int]] = ((40, 60), (32, 32)),
                    video_frames: int = 0, text_lengths: Sequence[int] = (5, 3),
                    images_per_sample: Optional[Sequence[int]] = None) -> FamilyCase:
    """LLaVA-OneVision: 32 px crops, 4 px patches (8 x 8 per crop); one image per sample at the
    given ``(height, width)`` (any-res crops from pinpoints up to 64 x 64), and with
    ``video_frames`` a video of that many frames in every sample (4 x 4 per frame after the
    2x pooling). With ``images_per_sample`` (a multi-image prompt: ``batch_num_images``),
    the images are shared out in order and a sample of several has no any-res crops."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                         max_position_embeddings=512),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4),
        image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = _finish(LlavaOnevisionForConditionalGeneration(config), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    sizes = torch.tensor(image_sizes)
    patches = [image_size_to_num_patches(s, pinpoints, 32) for s in sizes.tolist()]
    pixel_values = torch.zeros(len(image_sizes), max(patches), 3, 32, 32)
    for i, count in enumerate(patches):
        pixel_values[i, :count] = _pixels(generator, count, 3, 32, 32)
    inputs = dict(pixel_values=pixel_values, image_sizes=sizes)
    counts = [1] * len(text_lengths) if images_per_sample is None else list(images_per_sample)
    if images_per_sample is not None:
        inputs["batch_num_images"] = torch.tensor(counts)
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values, sizes, batch_num_images=inputs.get("batch_num_images"),
                                                return_dict=True).pooler_output
    units = [_onevision_image_unit(model, f.shape[0], s) for f, s in zip(packed, sizes.tolist())]
    if video_frames:
        inputs["pixel_values_videos"] = _pixels(generator, len(image_sizes), video_frames, 3, 32, 32)
    rows = []
    images = iter(units)
    for i, length in enumerate(text_lengths):
        row = _text(generator, 2)
        for _ in range(counts[i]):
            row += [IMAGE] * next(images).length + _text(generator, 1)
        if video_frames:
            row += [VIDEO] * (16 * video_frames + 1) + _text(generator, 1)
        rows.append(row + _text(generator, length))
    if video_frames:
        units += [Unit(VIDEO, 16 * video_frames + 1, None, (16 * video_frames,)) for _ in text_lengths]
    input_ids, attention_mask = _left_pad(rows)
    inputs.update(input_ids=input_ids, attention_mask=attention_mask)
    return FamilyCase("llava_onevision", model, inputs, units, _onevision_visual, _plain_language_model)


def _onevision_image_unit(model: nn.Module, length: int, size: List[int]) -> Unit:
    """Where the ``image_newline`` tokens sit in one packed image: after the ``s*s`` base
    tokens, every ``width + 1``-th token of the any-res grid (``width`` from the count)."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    base = side * side
    if length == base + 1:
        return Unit(IMAGE, length, None, (base,))
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    rows, cols = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    grid = unpad_image(torch.zeros(1, rows * side, cols * side), torch.tensor(size))
    height, width = grid.shape[1:]
    if base + height * (width + 1) != length:
        raise AssertionError("interpolated any-res grids are not modelled by this tiny case")
    return Unit(IMAGE, length, None, tuple(base + r * (width + 1) + width for r in range(height)))


def _onevision_visual(case: FamilyCase, inputs: Dict[str, torch.Tensor]) -> Dict[int, torch.Tensor]:
    inner = case.model.model
    images = inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                      batch_num_images=inputs.get("batch_num_images"), return_dict=True)
    out = {IMAGE: torch.cat(list(images.pooler_output), dim=0)}
    if inputs.get("pixel_values_videos") is not None:
        video = inner.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
        out[VIDEO] = video.flatten(0, 1)
    return out


FAMILIES: Dict[str, Callable[..., FamilyCase]] = {
    "gemma3": gemma3, "smolvlm": smolvlm, "idefics3": idefics3, "internvl": internvl,
    "llava_onevision": llava_onevision,
}


# --- the plain reference ---------------------------------------------------------------------

def full_embeds(case: FamilyCase, inputs: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """``(B, L, C)`` the language model's input embeddings as the unpatched model builds them:
    the token embeddings with each placeholder replaced by its visual token (``masked_scatter``
    in row-major batch order)."""
    inputs = case.inputs if inputs is None else inputs
    input_ids = inputs["input_ids"]
    embeds = case.model.get_input_embeddings()(input_ids)
    for token_id, features in case.visual_embeds(case, inputs).items():
        mask = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    return embeds


def unit_positions(case: FamilyCase, input_ids: Optional[torch.Tensor] = None) -> List[Tuple[int, torch.Tensor]]:
    """For each unit, ``(sample, positions)``: the sequence positions of its tokens."""
    input_ids = case.inputs["input_ids"] if input_ids is None else input_ids
    out: List[Tuple[int, torch.Tensor]] = []
    cursor: Dict[int, int] = {}
    for unit in case.units:
        flat = (input_ids == unit.token_id).nonzero()  # row-major (sample, position)
        start = cursor.get(unit.token_id, 0)
        rows = flat[start:start + unit.length]
        if rows.shape[0] != unit.length or not (rows[:, 0] == rows[0, 0]).all():
            raise AssertionError("a unit's placeholders must lie in one sample")
        cursor[unit.token_id] = start + unit.length
        out.append((int(rows[0, 0]), rows[:, 1]))
    return out


def reference_logits(case: FamilyCase, kept: Optional[Sequence[torch.Tensor]] = None,
                     features: Optional[Sequence[Optional[torch.Tensor]]] = None, positions: str = "original",
                     position_values: Optional[Sequence[Optional[torch.Tensor]]] = None,
                     drop_padding: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits of the language model on the shorter sequence.

    Args:
        case: the model and its inputs.
        kept: per unit, the indices (into the unit) of the tokens passed on, ascending;
            None keeps every token.
        features: per unit, ``(len(kept[u]), C)`` values for the passed-on tokens (merged
            tokens); None (or a None entry) keeps the model's own rows.
        positions: ``"original"``: each kept token keeps the 1-D position it had in the full
            sequence (``arange`` over the padded length, what the unpatched forward uses);
            ``"consecutive"``: renumbered ``0, 1, ...`` over each sample's remaining tokens
            (its own left padding included, as in the full sequence).
        position_values: per unit, float positions of the passed-on tokens (a merged
            token's mean position) instead of their slots' (with ``"original"``).
        drop_padding: leave each sample's own left padding out too and pad the shorter
            sequences anew (as the patched model does); False keeps it where it was (the
            unpatched model's layout: exact at keep-all).

    Returns:
        ``(logits (B, L', V), real (B, L') bool)``: the shorter sequences are left-padded to
        the longest one; ``real`` marks the tokens that are not padding added here.
    """
    if positions not in ("original", "consecutive"):
        raise ValueError(f"positions={positions!r}; expected 'original' or 'consecutive'")
    inputs = case.inputs
    input_ids = inputs["input_ids"]
    batch, length = input_ids.shape
    embeds = full_embeds(case)
    keep = torch.ones(batch, length, dtype=torch.bool)
    original = torch.arange(length, dtype=torch.float32).expand(batch, length).clone()
    for u, (sample, pos) in enumerate(unit_positions(case)):
        index = torch.arange(pos.shape[0]) if kept is None else kept[u]
        keep[sample, pos] = False
        keep[sample, pos[index]] = True
        if features is not None and features[u] is not None:
            embeds[sample, pos[index]] = features[u].to(embeds.dtype)
        if position_values is not None and position_values[u] is not None:
            original[sample, pos[index]] = position_values[u].to(torch.float32)
    attention_mask = inputs.get("attention_mask")
    rank = keep.long().cumsum(-1) - 1  # renumbered over the remaining tokens, padding included
    if drop_padding and attention_mask is not None:
        keep &= attention_mask.bool()
    short = int(keep.sum(-1).max())
    new_embeds = embeds.new_zeros(batch, short, embeds.shape[-1])
    new_ids = input_ids.new_full((batch, short), PAD)
    new_mask = torch.zeros(batch, short, dtype=torch.long)
    new_pos = torch.zeros(batch, short, dtype=torch.float32)
    real = torch.zeros(batch, short, dtype=torch.bool)
    for b in range(batch):
        where = keep[b].nonzero().squeeze(-1)
        n = where.shape[0]
        new_embeds[b, short - n:] = embeds[b, where]
        new_ids[b, short - n:] = input_ids[b, where]
        new_mask[b, short - n:] = 1 if attention_mask is None else attention_mask[b, where]
        new_pos[b, short - n:] = original[b, where] if positions == "original" else rank[b, where]
        real[b, short - n:] = True
    if position_values is None or all(v is None for v in position_values):
        new_pos = new_pos.long()
    # With gaps in the positions, an attention mask must be passed, or transformers reads the
    # gaps as packed sequences (masking_utils.find_packed_sequence_indices).
    mask_arg = None if (bool(keep.all()) and attention_mask is None) else new_mask
    logits = case.language_model(case, new_embeds, mask_arg, new_pos, new_ids)
    return logits, real


def sample_inputs(case: FamilyCase, sample: int) -> Dict[str, torch.Tensor]:
    """The inputs of one sample of the batch alone (its left padding removed)."""
    inputs = case.inputs
    real = inputs["attention_mask"][sample].bool()
    out = {"input_ids": inputs["input_ids"][sample][real][None]}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if "token_type_ids" in inputs:
        out["token_type_ids"] = inputs["token_type_ids"][sample][real][None]
    if "batch_num_images" in inputs:
        raise NotImplementedError("one sample of a multi-image batch")
    samples = [s for s, _ in unit_positions(case)]
    if case.name in ("gemma3", "internvl"):
        start = sum(1 for s in samples if s < sample)  # one pixel row per unit: an image, a tile
        count = sum(1 for s in samples if s == sample)
        out["pixel_values"] = inputs["pixel_values"][start:start + count]
    else:
        for key in ("pixel_values", "pixel_attention_mask", "image_sizes", "pixel_values_videos"):
            if key in inputs:
                out[key] = inputs[key][sample:sample + 1]
    return out


def extended(case: FamilyCase, tokens: torch.Tensor) -> FamilyCase:
    """The case with ``tokens`` (B, T) appended to every sample as text (what decoding adds)."""
    inputs = dict(case.inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], tokens], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], dim=1)
    if "token_type_ids" in inputs:
        inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(tokens)], dim=1)
    return FamilyCase(case.name, case.model, inputs, case.units, case.visual_embeds, case.language_model,
                      dict(case.extra))


# --- the core's items ------------------------------------------------------------------------

def core_items(case: FamilyCase):
    """Per item the core reduces, in its order: ``(sample, positions, grid, separators)``, the
    positions of its tokens in the sequence, the grid of its content tokens and the indices
    (into the item) of its separators. An item is a unit, except a LLaVA-OneVision any-res image:
    its base view, then its grid ended by newlines."""
    for unit, (sample, pos) in zip(case.units, unit_positions(case)):
        if case.name != "llava_onevision":
            yield sample, pos, unit.grid, []
        elif unit.token_id == VIDEO:
            yield sample, pos, ((unit.length - 1) // 16, 4, 4), [unit.length - 1]
        elif unit.length == 65:  # an image of a multi-image prompt: base view and newline
            yield sample, pos, (1, 8, 8), [64]
        else:  # an any-res image: the base view, then the grid ended by newlines
            yield sample, pos[:64], (1, 8, 8), []
            rows = [i - 64 for i in unit.separators]
            yield sample, pos[64:], (1, len(rows), rows[0]), rows


def unit_sources(case: FamilyCase, sources):
    """Per unit, its ``(K, N)`` source: the core's items of one unit (SmolVLM: one per crop;
    LLaVA-OneVision: an any-res image's base view and grid) are consecutive."""
    out, items = [], iter(sources)
    for unit in case.units:
        blocks, columns = [], 0
        while columns < unit.length:
            blocks.append(next(items))
            columns += blocks[-1].shape[1]
        assert columns == unit.length
        out.append(torch.block_diag(*blocks))
    assert next(items, None) is None
    return out


def reference_for_sources(case, sources, positions="original"):
    """The reference for ``sources`` (per core item, ``(passed, tokens)``: what the patched
    model reports it passed on, or what a reference reduction chose)."""
    per_unit = unit_sources(case, sources)
    kept = [s.argmax(-1) for s in per_unit]  # the slot of a token: its first member's
    if all(bool((s.sum(-1) == 1).all()) for s in per_unit):
        return reference_logits(case, kept, positions=positions)
    embeds = full_embeds(case)
    features, values = [], []
    for s, (sample, pos) in zip(per_unit, unit_positions(case)):
        weights = s.to(torch.float32)
        size = weights.sum(-1, keepdim=True)
        features.append(weights @ embeds[sample, pos] / size)
        values.append((weights @ pos.to(torch.float32)[:, None] / size)[:, 0])
    return reference_logits(case, kept, features=features, positions=positions, position_values=values)
