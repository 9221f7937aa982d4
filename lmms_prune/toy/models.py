"""Tiny random-weight models of the real VLM architectures, for offline tests and demos.

Each family is the transformers-native class of a real checkpoint, with the real visual-token geometry
(image sizes, patch sizes, pixel shuffle / spatial merge, dynamic tiling, M-RoPE) and the real special-token
layout, but with widths small enough that a model builds in well under a second on one CPU core:

* ``internvl_llama``: ``InternVLForConditionalGeneration`` with a Llama text model (InternVL2.5-8B-MPO-hf);
  256 tokens per 448 px tile, dynamic tiling plus a thumbnail (:func:`internvl_num_tiles`).
* ``internvl_qwen2``: the same with a Qwen2 text model (InternVL2.5-1B / InternVL3-hf).
* ``qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration``; ``(h / 28) * (w / 28)`` tokens for an image
  smart-resized to ``h x w``, 3-D M-RoPE.
* ``llava``: ``LlavaForConditionalGeneration`` (LLaVA-1.5-hf: CLIP ViT at 336 px, patch 14, Llama); 576 tokens.
* ``qwen3_vl``: ``Qwen3VLForConditionalGeneration`` (Qwen3-VL-8B-Instruct): patch 16, merge 2, so
  ``(h / 32) * (w / 32)`` tokens; interleaved M-RoPE; DeepStack features of three vision layers added to the
  outputs of decoder layers 0, 1, 2 (the real model: vision layers 8, 16, 24 of 27).
* ``internvl3``: InternVL3-8B-hf's layout (InternViT, Qwen2.5 text model: Qwen2 config, untied head).
* ``internvl3_5``: InternVL3.5-8B-HF's layout (InternViT, Qwen3 text model: ``Qwen3Config``, q/k RMSNorm).
* ``llava_next``: ``LlavaNextForConditionalGeneration`` (LLaVA-1.6-hf) at a third of the real scale: CLIP ViT at
  112 px, patch 14 (an 8x8 base grid for the real 24x24), the 1.6 grid pinpoints divided by 3 (at most 4 tiles),
  the unpadded mosaic with one newline token per row, Llama text model and the Vicuna conversation.
* ``llava_onevision``: ``LlavaOnevisionForConditionalGeneration`` (OneVision-hf) at a quarter-ish of the real
  scale: SigLIP at 98 px, patch 14 (7x7 base grid for 27x27), no [CLS], pinpoints ``(98 a, 98 b)`` for
  ``a, b in 1..6`` (the real ``384 a``), anyres_max_9, newline tokens, Qwen2 text model with the real Qwen2
  vocabulary; the image placeholder is ``<|image_pad|>`` (the real checkpoints add ``<image>``).

Text models have ``num_layers`` decoder layers (default 14, so that the usual prune layer 12 exists),
hidden size 64, 4 query heads and 2 key/value heads (GQA), MLP width 128. Vision towers have 2 layers of width
32. Tokenizers are built offline (see :mod:`lmms_prune.toy.tokenizers`): the Qwen2 families use the real
Qwen2 vocabulary, the Llama families a small byte-level BPE trained in process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3VLConfig,
    SiglipVisionConfig,
)

from lmms_prune.families.internvl import num_tiles, tile_grid
from lmms_prune.loading import build_once
from lmms_prune.toy import tokenizers as toy_tok

TEXT_HIDDEN = 64
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
VISION_HIDDEN = 32
VISION_HEADS = 2
VISION_INTERMEDIATE = 64
VISION_LAYERS = 2
MAX_POSITIONS = 8192

INTERNVL_IMAGE_SIZE = 448
INTERNVL_PATCH_SIZE = 14
INTERNVL_DOWNSAMPLE_RATIO = 0.5
# (448 / 14)^2 patches, pixel shuffle with ratio 0.5 folds each 2x2 block into one token.
INTERNVL_TOKENS_PER_TILE = int((INTERNVL_IMAGE_SIZE // INTERNVL_PATCH_SIZE) ** 2 * INTERNVL_DOWNSAMPLE_RATIO**2)
INTERNVL_MAX_TILES = 6

QWEN_PATCH_SIZE = 14
QWEN_MERGE_SIZE = 2
# M-RoPE splits the rotary half of each head (head_dim / 2 = 8 frequencies here) into temporal, height and
# width sections; the real checkpoints use [16, 24, 24] for head_dim 128, this is the same 2:3:3 split.
QWEN_MROPE_SECTION = [2, 3, 3]
# Pixel budget of the resized image (smart_resize). The real default max is 28*28*1280; 256 merged tokens keeps
# tests fast and matches a common lmms-eval setting.
QWEN_MIN_PIXELS = 4 * 28 * 28
QWEN_MAX_PIXELS = 256 * 28 * 28

LLAVA_IMAGE_SIZE = 336
LLAVA_PATCH_SIZE = 14
LLAVA_IMAGE_TOKENS = (LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2

# LLaVA-NeXT at 1/3 scale: 112 px tiles of 8x8 patches (real: 336 px, 24x24); pinpoints = LLaVA-1.6's / 3.
LLAVA_NEXT_IMAGE_SIZE = 112
LLAVA_NEXT_PINPOINTS = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]
# LLaVA-OneVision scaled: 98 px tiles of 7x7 patches (real: 384 px, 27x27), pinpoints (98 a, 98 b), a, b <= 6.
ONEVISION_IMAGE_SIZE = 98
ONEVISION_PINPOINTS = [[ONEVISION_IMAGE_SIZE * a, ONEVISION_IMAGE_SIZE * b] for a in range(1, 7) for b in range(1, 7)]
ONEVISION_IMAGE_TOKENS = (ONEVISION_IMAGE_SIZE // 14) ** 2
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: must be one of {FAMILIES}")


def _check_num_layers(num_layers: int) -> None:
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r}: must be a positive int (default 14)")


def _llama_text_config(num_layers: int) -> LlamaConfig:
    ids = toy_tok.LLAMA_SPECIAL_IDS
    return LlamaConfig(
        vocab_size=toy_tok.llama_vocab_size(),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )


def _qwen_text_kwargs(num_layers: int, rope_theta: float, **extra) -> dict:
    """The toys' Qwen-vocabulary text model (Qwen2 / Qwen2.5 / Qwen3 widths scaled down), ``extra`` added or
    overriding (``rope_parameters`` entries go through ``rope``)."""
    ids = toy_tok.QWEN_SPECIAL_IDS
    rope = {"rope_type": "default", "rope_theta": rope_theta, **extra.pop("rope", {})}
    return {
        "vocab_size": toy_tok.QWEN_VOCAB_SIZE,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": TEXT_INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_parameters": rope,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": True,
        **extra,
    }


def _qwen2_text_config(num_layers: int) -> Qwen2Config:
    return Qwen2Config(**_qwen_text_kwargs(num_layers, 1_000_000.0, use_sliding_window=False))


def internvl_config(
    text_config: transformers.PretrainedConfig,
    image_token_id: int,
    vision_hidden: int = VISION_HIDDEN,
    vision_layers: int = VISION_LAYERS,
    vision_heads: int = VISION_HEADS,
    vision_intermediate: int = VISION_INTERMEDIATE,
) -> InternVLConfig:
    """An InternVL config with the real token geometry (448 px tiles, patch 14, pixel shuffle 0.5) around
    ``text_config``; the vision tower's widths are the toys' unless given."""
    vision = InternVLVisionConfig(
        hidden_size=vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        intermediate_size=vision_intermediate,
        image_size=INTERNVL_IMAGE_SIZE,
        patch_size=INTERNVL_PATCH_SIZE,
        norm_type="layer_norm",
        use_qk_norm=False,
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        downsample_ratio=INTERNVL_DOWNSAMPLE_RATIO,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def _qwen2_5_vl_config(num_layers: int) -> Qwen2_5_VLConfig:
    ids = toy_tok.QWEN_SPECIAL_IDS
    vision = {
        "depth": VISION_LAYERS,
        "hidden_size": VISION_HIDDEN,
        "num_heads": VISION_HEADS,
        "intermediate_size": VISION_INTERMEDIATE,
        "out_hidden_size": TEXT_HIDDEN,
        "patch_size": QWEN_PATCH_SIZE,
        "spatial_merge_size": QWEN_MERGE_SIZE,
        "temporal_patch_size": 2,
        "window_size": 112,
        # The real tower alternates windowed attention with a few full-attention blocks; keep one of each.
        "fullatt_block_indexes": [VISION_LAYERS - 1],
    }
    text = _qwen_text_kwargs(num_layers, 1_000_000.0, rope={"mrope_section": list(QWEN_MROPE_SECTION)})
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _qwen2_vl_config(num_layers: int) -> transformers.Qwen2VLConfig:
    """Qwen2-VL: Qwen2.5-VL's text model and token geometry; a full-attention vision tower whose ``hidden_size``
    is the merger's output (the LM width) and ``embed_dim`` its own width."""
    qwen25 = _qwen2_5_vl_config(num_layers)
    vision = {"depth": VISION_LAYERS, "embed_dim": VISION_HIDDEN, "hidden_size": TEXT_HIDDEN, "mlp_ratio": 2,
              "num_heads": VISION_HEADS, "patch_size": QWEN_PATCH_SIZE, "spatial_merge_size": QWEN_MERGE_SIZE,
              "temporal_patch_size": 2}
    return transformers.Qwen2VLConfig(
        vision_config=vision, text_config=qwen25.text_config.to_dict(), image_token_id=qwen25.image_token_id,
        video_token_id=qwen25.video_token_id, vision_start_token_id=qwen25.vision_start_token_id,
        vision_end_token_id=qwen25.vision_end_token_id, tie_word_embeddings=True)


# Qwen3-VL: patch 16 (merge 2: 32 px per token); interleaved M-RoPE over head_dim / 2 = 8 frequencies with
# the real [24, 20, 20] split of 64 scaled to [3, 3, 2]; the real learned position grid is 48x48, here 8x8.
QWEN3_PATCH_SIZE = 16
QWEN3_MROPE_SECTION = [3, 3, 2]
QWEN3_VISION_LAYERS = 4
QWEN3_DEEPSTACK_INDEXES = [0, 1, 2]  # the real tower: [8, 16, 24] of 27 layers; three injections either way
QWEN3_MIN_PIXELS = 4 * 32 * 32
QWEN3_MAX_PIXELS = 256 * 32 * 32


def _qwen3_vl_config(num_layers: int) -> Qwen3VLConfig:
    ids = toy_tok.QWEN_SPECIAL_IDS
    vision = {
        "depth": QWEN3_VISION_LAYERS,
        "hidden_size": VISION_HIDDEN,
        "num_heads": VISION_HEADS,
        "intermediate_size": VISION_INTERMEDIATE,
        "out_hidden_size": TEXT_HIDDEN,
        "patch_size": QWEN3_PATCH_SIZE,
        "spatial_merge_size": QWEN_MERGE_SIZE,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": list(QWEN3_DEEPSTACK_INDEXES),
    }
    text = _qwen_text_kwargs(num_layers, 5_000_000.0, head_dim=TEXT_HIDDEN // TEXT_HEADS,
                             rope={"mrope_section": list(QWEN3_MROPE_SECTION), "mrope_interleaved": True})
    return Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _internvl3_text_config(num_layers: int) -> Qwen2Config:
    """InternVL3-8B-hf's text model: Qwen2.5-7B (a Qwen2 config; untied LM head, rope theta 1e6)."""
    config = _qwen2_text_config(num_layers)
    config.tie_word_embeddings = False
    return config


def _internvl3_5_text_config(num_layers: int) -> Qwen3Config:
    """InternVL3.5-8B-HF's text model: Qwen3-8B (q/k RMSNorm per head, explicit head_dim, no qkv bias)."""
    return Qwen3Config(**_qwen_text_kwargs(num_layers, 1_000_000.0, head_dim=TEXT_HIDDEN // TEXT_HEADS,
                                           attention_bias=False, use_sliding_window=False,
                                           tie_word_embeddings=False))


def _toy_clip_vision(image_size: int) -> CLIPVisionConfig:
    """The toys' CLIP tower (widths scaled down, LLaVA's patch 14) at ``image_size``."""
    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=LLAVA_PATCH_SIZE,
        projection_dim=TEXT_HIDDEN,
        hidden_act="quick_gelu",
    )


def _llava_kwargs(num_layers: int) -> dict:
    """What LLaVA-1.5 and LLaVA-NeXT toys share: the Llama text model, the projector, the feature layer."""
    return {
        "text_config": _llama_text_config(num_layers),
        "image_token_index": toy_tok.LLAMA_SPECIAL_IDS["<image>"],
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "tie_word_embeddings": False,
    }


def _llava_config(num_layers: int) -> LlavaConfig:
    return LlavaConfig(vision_config=_toy_clip_vision(LLAVA_IMAGE_SIZE), image_seq_length=LLAVA_IMAGE_TOKENS,
                       **_llava_kwargs(num_layers))


def _llava_next_config(num_layers: int) -> LlavaNextConfig:
    return LlavaNextConfig(vision_config=_toy_clip_vision(LLAVA_NEXT_IMAGE_SIZE),
                           image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, **_llava_kwargs(num_layers))


def _llava_onevision_config(num_layers: int) -> LlavaOnevisionConfig:
    ids = toy_tok.QWEN_SPECIAL_IDS
    vision = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=ONEVISION_IMAGE_SIZE,
        patch_size=14,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_qwen2_text_config(num_layers),
        image_token_index=ids["<|image_pad|>"],
        video_token_index=ids["<|video_pad|>"],
        image_grid_pinpoints=ONEVISION_PINPOINTS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )


def tiny_config(family: str, num_layers: int = 14) -> transformers.PretrainedConfig:
    """The configuration of a tiny model of ``family`` with ``num_layers`` text decoder layers.

    Token ids in the config (image token, bos/eos/pad) agree with the tokenizer that
    :func:`save_tiny_model` writes next to it.
    """
    _check_family(family)
    _check_num_layers(num_layers)
    config = RECIPES[family].config(num_layers)
    config._attn_implementation = "sdpa"
    return config


def _qwen_generation_ids() -> dict[str, int | list[int]]:
    """bos/eos/pad ids for generation: chat models stop at the end-of-turn token as well as end-of-text."""
    ids = toy_tok.QWEN_SPECIAL_IDS
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _llama_generation_ids(chat: bool) -> dict[str, int | list[int]]:
    ids = toy_tok.LLAMA_SPECIAL_IDS
    eos = [ids["<|im_end|>"], ids["</s>"]] if chat else [ids["</s>"]]
    return {"bos_token_id": ids["<s>"], "eos_token_id": eos, "pad_token_id": ids["<pad>"]}


def build_tiny_model(
    family: str, seed: int = 0, num_layers: int = 14, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """A randomly initialised tiny ``family`` model in eval mode with SDPA attention.

    The weights depend only on ``(family, seed, num_layers)``: the caller's global RNG state is left untouched.
    """
    config = tiny_config(family, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, RECIPES[family].model_class)._from_config(
            config, attn_implementation="sdpa", dtype=dtype)
    for key, value in RECIPES[family].generation().items():
        setattr(model.generation_config, key, value)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Dynamic tiling (InternVL)
# ---------------------------------------------------------------------------------------------------------


# The rule itself is production code: lmms_prune.families.internvl (transformers' get_optimal_tiled_canvas).
internvl_tile_grid = tile_grid
internvl_num_tiles = num_tiles


# ---------------------------------------------------------------------------------------------------------
# Processors and chat templates
# ---------------------------------------------------------------------------------------------------------

# ChatML as the InternVL ``-hf`` checkpoints write it: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n",
# images become the processor's <IMG_CONTEXT> placeholder on their own line, and there is no default system
# turn (pass one to get one).
INTERNVL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2.5-VL's ChatML: a default system turn unless the conversation starts with one; each image is
# <|vision_start|><|image_pad|><|vision_end|> and the processor expands <|image_pad|> to the merged patch count.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen3-VL's ChatML: as Qwen2.5-VL's but without a default system turn.
QWEN3_VL_CHAT_TEMPLATE = QWEN2_5_VL_CHAT_TEMPLATE[QWEN2_5_VL_CHAT_TEMPLATE.index("{%- for message"):]

# LLaVA-1.5's Vicuna-v1 conversation: "[system ]USER: <image>\n{question} ASSISTANT: {answer}</s>", with the
# images of a user turn placed before its text and the generation prompt "ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- text + ' ' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'USER: ' + '<image>\\n' * n_images + text + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + text + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_processor(family: str, tokenizer: transformers.PreTrainedTokenizerBase | None = None
                    ) -> transformers.ProcessorMixin:
    """The processor (tokenizer, image processor, chat template) that goes with the tiny ``family`` model.

    InternVL: GotOcr2 image processor cropping to 448 px tiles (at most :data:`INTERNVL_MAX_TILES`, override
    per call with ``images_kwargs={"max_patches": n}``) plus a thumbnail, ImageNet normalisation, 256 tokens
    per tile. Qwen2.5-VL / Qwen2-VL: smart-resize to multiples of 28 within [:data:`QWEN_MIN_PIXELS`,
    :data:`QWEN_MAX_PIXELS`]. LLaVA-1.5: CLIP resize + centre crop to 336 px, 576 tokens. ``tokenizer``
    replaces the family's tokenizer (the grounding model's, :func:`lmms_prune.toy.grounder.grounder_tokenizer`).
    """
    _check_family(family)
    recipe = RECIPES[family]
    return recipe.processor(tokenizer if tokenizer is not None else recipe.tokenizer())


def _internvl_processor(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.ProcessorMixin:
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": INTERNVL_IMAGE_SIZE, "width": INTERNVL_IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=INTERNVL_MAX_TILES,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    video_processor = transformers.InternVLVideoProcessor(
        size={"height": INTERNVL_IMAGE_SIZE, "width": INTERNVL_IMAGE_SIZE},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return transformers.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


QWEN_PIXEL_KWARGS = {
    "min_pixels": QWEN_MIN_PIXELS,
    "max_pixels": QWEN_MAX_PIXELS,
    "patch_size": QWEN_PATCH_SIZE,
    "merge_size": QWEN_MERGE_SIZE,
    "temporal_patch_size": 2,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}


def _qwen2_5_vl_processor(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.ProcessorMixin:
    return transformers.Qwen2_5_VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**QWEN_PIXEL_KWARGS),
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(**QWEN_PIXEL_KWARGS),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def _qwen2_vl_processor(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.ProcessorMixin:
    return transformers.Qwen2VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**QWEN_PIXEL_KWARGS),
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(**QWEN_PIXEL_KWARGS),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


QWEN3_PIXEL_KWARGS = {
    "min_pixels": QWEN3_MIN_PIXELS,
    "max_pixels": QWEN3_MAX_PIXELS,
    "patch_size": QWEN3_PATCH_SIZE,
    "merge_size": QWEN_MERGE_SIZE,
    "temporal_patch_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def _qwen3_vl_processor(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.ProcessorMixin:
    return transformers.Qwen3VLProcessor(
        image_processor=transformers.Qwen2VLImageProcessor(**QWEN3_PIXEL_KWARGS),
        tokenizer=tokenizer,
        video_processor=transformers.Qwen3VLVideoProcessor(**QWEN3_PIXEL_KWARGS),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def _llava_processor(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.ProcessorMixin:
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _llava_next_processor(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.ProcessorMixin:
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": LLAVA_NEXT_IMAGE_SIZE},
        crop_size={"height": LLAVA_NEXT_IMAGE_SIZE, "width": LLAVA_NEXT_IMAGE_SIZE},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


# LLaVA-OneVision's Qwen ChatML: "<|im_start|>user <image>\n{text}<|im_end|>\n<|im_start|>assistant\n" (the
# checkpoint's template writes the image placeholder before the text and adds no default system turn).
ONEVISION_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + ' ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|image_pad|>\n' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|video_pad|>\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


def _llava_onevision_processor(tokenizer: transformers.PreTrainedTokenizerBase) -> transformers.ProcessorMixin:
    size = {"height": ONEVISION_IMAGE_SIZE, "width": ONEVISION_IMAGE_SIZE}
    image_processor = transformers.LlavaOnevisionImageProcessor(
        size=size, image_grid_pinpoints=ONEVISION_PINPOINTS, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    video_processor = transformers.LlavaOnevisionVideoProcessor(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    return transformers.LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=ONEVISION_IMAGE_TOKENS,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class ToyRecipe:
    """How to build one toy family: its config (of ``num_layers``), transformers class, tokenizer, processor
    and generation ids."""

    config: Callable[[int], transformers.PretrainedConfig]
    model_class: str
    tokenizer: Callable[[], transformers.PreTrainedTokenizerBase]
    processor: Callable[[transformers.PreTrainedTokenizerBase], transformers.ProcessorMixin]
    generation: Callable[[], dict[str, int | list[int]]]


# One row per toy family (the production family each belongs to: lmms_prune.families.family_of(name)).
RECIPES: dict[str, ToyRecipe] = {
    "internvl_llama": ToyRecipe(
        lambda n: internvl_config(_llama_text_config(n), toy_tok.LLAMA_SPECIAL_IDS["<IMG_CONTEXT>"]),
        "InternVLForConditionalGeneration", lambda: toy_tok.llama_tokenizer("internvl_llama"), _internvl_processor,
        lambda: _llama_generation_ids(chat=True)),
    "internvl_qwen2": ToyRecipe(
        lambda n: internvl_config(_qwen2_text_config(n), toy_tok.QWEN_SPECIAL_IDS["<IMG_CONTEXT>"]),
        "InternVLForConditionalGeneration", lambda: toy_tok.qwen2_tokenizer("internvl_qwen2"), _internvl_processor,
        _qwen_generation_ids),
    "qwen2_5_vl": ToyRecipe(_qwen2_5_vl_config, "Qwen2_5_VLForConditionalGeneration",
                            lambda: toy_tok.qwen2_tokenizer("qwen2_5_vl"), _qwen2_5_vl_processor, _qwen_generation_ids),
    "qwen2_vl": ToyRecipe(_qwen2_vl_config, "Qwen2VLForConditionalGeneration",
                          lambda: toy_tok.qwen2_tokenizer("qwen2_5_vl"), _qwen2_vl_processor, _qwen_generation_ids),
    "llava": ToyRecipe(_llava_config, "LlavaForConditionalGeneration", lambda: toy_tok.llama_tokenizer("llava"),
                       _llava_processor, lambda: _llama_generation_ids(chat=False)),
    "qwen3_vl": ToyRecipe(_qwen3_vl_config, "Qwen3VLForConditionalGeneration",
                          lambda: toy_tok.qwen2_tokenizer("qwen2_5_vl"), _qwen3_vl_processor, _qwen_generation_ids),
    "internvl3": ToyRecipe(
        lambda n: internvl_config(_internvl3_text_config(n), toy_tok.QWEN_SPECIAL_IDS["<IMG_CONTEXT>"]),
        "InternVLForConditionalGeneration", lambda: toy_tok.qwen2_tokenizer("internvl_qwen2"), _internvl_processor,
        _qwen_generation_ids),
    "internvl3_5": ToyRecipe(
        lambda n: internvl_config(_internvl3_5_text_config(n), toy_tok.QWEN_SPECIAL_IDS["<IMG_CONTEXT>"]),
        "InternVLForConditionalGeneration", lambda: toy_tok.qwen2_tokenizer("internvl_qwen2"), _internvl_processor,
        _qwen_generation_ids),
    "llava_next": ToyRecipe(_llava_next_config, "LlavaNextForConditionalGeneration",
                            lambda: toy_tok.llama_tokenizer("llava"), _llava_next_processor,
                            lambda: _llama_generation_ids(chat=False)),
    "llava_onevision": ToyRecipe(_llava_onevision_config, "LlavaOnevisionForConditionalGeneration",
                                 lambda: toy_tok.qwen2_tokenizer("qwen2_5_vl"), _llava_onevision_processor,
                                 _qwen_generation_ids),
}
FAMILIES = tuple(RECIPES)


# ---------------------------------------------------------------------------------------------------------
# Saving and the on-disk cache
# ---------------------------------------------------------------------------------------------------------


def save_tiny_model(family: str, out_dir: str | Path, seed: int = 0, num_layers: int = 14) -> Path:
    """Write the tiny ``family`` model (safetensors, config, generation config) and its processor to
    ``out_dir`` with ``save_pretrained``, so that ``AutoModelForImageTextToText.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir)`` load them offline. Returns ``out_dir`` as a ``Path``."""
    out_dir = Path(out_dir)
    model = build_tiny_model(family, seed=seed, num_layers=num_layers)
    processor = build_processor(family)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def toy_cache_root() -> Path:
    """``$LMMS_PRUNE_CACHE/toy`` if the variable is set, else ``~/.cache/lmms_prune/toy``."""
    root = os.environ.get("LMMS_PRUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "lmms_prune"
    return base / "toy"


def toy_code_version() -> str:
    """Short hash of the source of this module and :mod:`lmms_prune.toy.tokenizers`, plus the transformers
    version: it keys the cache of :func:`tiny_model_dir`, so any change to what would be saved rebuilds."""
    digest = hashlib.sha256(transformers.__version__.encode())
    for source in (Path(__file__), Path(toy_tok.__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def tiny_model_dir(family: str, seed: int = 0) -> Path:
    """Directory of the saved tiny ``family`` model (14 layers) and its processor, built by
    :func:`save_tiny_model` once per ``(family, seed, code version)`` under :func:`toy_cache_root` and reused.

    Written through :func:`lmms_prune.loading.build_once`, so concurrent callers never see a half-written
    directory.
    """
    _check_family(family)
    final = toy_cache_root() / f"{family}-seed{seed}-{toy_code_version()}"
    return build_once(final, lambda staging: save_tiny_model(family, staging, seed=seed))
