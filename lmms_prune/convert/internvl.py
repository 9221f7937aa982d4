"""Original InternVL2 / InternVL2.5 checkpoints -> transformers-native ``InternVLForConditionalGeneration``.

The originals (``OpenGVLab/InternVL2_5-8B``, ...) are ``InternVLChatModel`` checkpoints that need
``trust_remote_code``: an InternViT vision tower, an MLP projector ``mlp1`` and a language model that is
InternLM2 (fused ``wqkv``), Qwen2 or Llama. :func:`convert_internvl` writes a directory that
``AutoModelForImageTextToText`` / ``AutoProcessor`` load with no remote code:

* weights renamed to the native names, InternViT's fused ``attn.qkv`` and InternLM2's grouped ``wqkv`` split
  into ``q_proj`` / ``k_proj`` / ``v_proj`` (InternLM2 -> the native Llama text model);
  shard by shard, so converting needs one shard's memory, not the whole model's;
* ``config.json`` mapped from ``InternVLChatConfig`` (``vision_config``, ``llm_config``, ``select_layer``,
  ``downsample_ratio``, ``force_image_size``, ``ps_version``, ``max_dynamic_patch``, ``template``);
* the tokenizer with the original ids (InternLM2's SentencePiece model becomes a ``tokenizers`` BPE that
  encodes like ``SentencePieceProcessor.encode`` per chunk between added tokens, as the original slow
  ``InternLM2Tokenizer`` does; Qwen2 / Llama tokenizers load natively) and the conversation template as a chat
  template that reproduces the original prompt token for token;
* an ``InternVLProcessor`` (``GotOcr2ImageProcessor``: 448 px tiles, ``max_patches = max_dynamic_patch``,
  thumbnail, ImageNet normalisation).

Names and layouts follow the published architecture (OpenGVLab's ``modeling_internvl_chat.py``,
``modeling_intern_vit.py``, ``modeling_internlm2.py``, ``conversation.py``) and transformers'
``modeling_internvl.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from lmms_prune.convert import fetch_checkpoint, is_original_internvl

# llm_config.architectures[0] -> the native text model it converts to.
COVERED_LMS: dict[str, str] = {
    "InternLM2ForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

START_IMAGE_TOKEN = "<img>"
END_IMAGE_TOKEN = "</img>"
CONTEXT_IMAGE_TOKEN = "<IMG_CONTEXT>"
# transformers' InternVLProcessor also needs a video placeholder; the originals have none.
VIDEO_TOKEN = "<video>"
END_OF_TURN = "<|im_end|>"


@dataclass(frozen=True)
class ConversationTemplate:
    """One of InternVL's ``conversation.py`` templates of separator style MPT: the prompt is
    ``system_template.format(system_message) + sep``, then ``role + message + sep`` per turn, then the
    assistant role for the generation prompt."""

    system_message: str
    sep: str
    system_template: str = "<|im_start|>system\n{system_message}"
    user_role: str = "<|im_start|>user\n"
    assistant_role: str = "<|im_start|>assistant\n"


_OLD_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
CONVERSATION_TEMPLATES: dict[str, ConversationTemplate] = {
    # InternVL2.5 (every size)
    "internvl2_5": ConversationTemplate(
        system_message="你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
        sep="<|im_end|>\n",
    ),
    # InternVL2 with an InternLM2 LM (2B, 8B, 26B) and with Qwen2 / Yi / Llama LMs (1B, 40B, 76B)
    "internlm2-chat": ConversationTemplate(system_message=_OLD_SYSTEM, sep="<|im_end|>"),
    "Hermes-2": ConversationTemplate(system_message=_OLD_SYSTEM, sep="<|im_end|>"),
}


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def chat_template(name: str) -> str:
    """The Jinja chat template of InternVL's conversation template ``name`` (see
    :class:`ConversationTemplate`), in the message format of transformers processors.

    The system turn is always there (the template's own message unless the conversation starts with a system
    message). Each image part becomes ``<IMG_CONTEXT>\\n``, which the processor expands to
    ``<img><IMG_CONTEXT>*256*tiles</img>``: the original ``chat()`` puts ``<image>\\n`` before the question and
    replaces it by the same string.
    """
    if name not in CONVERSATION_TEMPLATES:
        raise ValueError(f"template={name!r}: conversation template not covered; covered: "
                         f"{', '.join(CONVERSATION_TEMPLATES)}")
    t = CONVERSATION_TEMPLATES[name]
    prefix, suffix = t.system_template.split("{system_message}")
    content = (
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- " + _jinja_string(CONTEXT_IMAGE_TOKEN + "\n") + " -}}"
        "{%- elif part['type'] == 'video' -%}{{- " + _jinja_string(VIDEO_TOKEN + "\n") + " -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
    )
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string else "
        "messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system = " + _jinja_string(t.system_message) + " -%}"
        "{%- set turns = messages -%}"
        "{%- endif -%}"
        "{{- " + _jinja_string(prefix) + " + system + " + _jinja_string(suffix + t.sep) + " -}}"
        "{%- for message in turns -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}" + content + "{{- " + _jinja_string(t.sep) + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + _jinja_string(t.assistant_role) + " -}}{%- endif -%}"
    )


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


def lm_kind(original: dict[str, Any]) -> str:
    """``llm_config.architectures[0]`` of an original config, checked against :data:`COVERED_LMS`."""
    arch = (original.get("llm_config", {}).get("architectures") or [None])[0]
    if arch not in COVERED_LMS:
        raise ValueError(
            f"llm_config.architectures={arch!r}: this language model is not covered by the InternVL converter "
            f"(covered: {', '.join(COVERED_LMS)}; e.g. InternVL2-4B's Phi3ForCausalLM is not). Use a checkpoint "
            "with one of those LMs, or its transformers-native -hf copy if one exists"
        )
    return arch


def _rope_parameters(llm: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """``rope_parameters`` of the native config from an original ``rope_theta`` / ``rope_scaling``."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", default_theta))}
    scaling = llm.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        params["rope_type"] = scaling.pop("rope_type", None) or scaling.pop("type", "default")
        scaling.pop("type", None)
        params.update(scaling)
    return params


def text_config(original: dict[str, Any], pad_token_id: int | None) -> transformers.PretrainedConfig:
    """The native text config of an original ``llm_config``: InternLM2 and Llama -> ``LlamaConfig``
    (InternLM2's ``bias`` -> ``attention_bias``: it has biases on ``wqkv`` / ``wo`` only), Qwen2 ->
    ``Qwen2Config``. Defaults of absent keys are the original config classes' own."""
    llm = original["llm_config"]
    arch = lm_kind(original)
    heads = llm.get("num_attention_heads", 32)
    common = {
        "vocab_size": llm["vocab_size"],
        "hidden_size": llm["hidden_size"],
        "intermediate_size": llm["intermediate_size"],
        "num_hidden_layers": llm["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": llm.get("num_key_value_heads") or heads,
        "hidden_act": llm.get("hidden_act", "silu"),
        "max_position_embeddings": llm.get("max_position_embeddings", 2048),
        "rms_norm_eps": llm.get("rms_norm_eps", 1e-6),
        "bos_token_id": llm.get("bos_token_id", 1),
        "eos_token_id": llm.get("eos_token_id", 2),
        "pad_token_id": pad_token_id if pad_token_id is not None else llm.get("pad_token_id"),
        # InternVLChatConfig forces untied embeddings for every size
        "tie_word_embeddings": False,
    }
    if arch == "InternLM2ForCausalLM":
        return transformers.LlamaConfig(
            **common, rope_parameters=_rope_parameters(llm, 10000.0),
            attention_bias=bool(llm.get("bias", True)), mlp_bias=False,
        )
    if arch == "LlamaForCausalLM":
        return transformers.LlamaConfig(
            **common, rope_parameters=_rope_parameters(llm, 10000.0),
            attention_bias=bool(llm.get("attention_bias", False)), mlp_bias=bool(llm.get("mlp_bias", False)),
            head_dim=llm.get("head_dim") or llm["hidden_size"] // heads,
        )
    return transformers.Qwen2Config(
        **common, rope_parameters=_rope_parameters(llm, 1_000_000.0),
        use_sliding_window=bool(llm.get("use_sliding_window", False)),
        sliding_window=llm.get("sliding_window"), max_window_layers=llm.get("max_window_layers", 28),
    )


def vision_config(original: dict[str, Any]) -> transformers.InternVLVisionConfig:
    """The native InternViT config of an original ``vision_config`` (``InternVisionConfig``)."""
    vision = original["vision_config"]
    image_size = original.get("force_image_size") or vision.get("image_size", 224)
    if vision.get("image_size", image_size) != image_size:
        raise ValueError(f"force_image_size={image_size} differs from vision_config.image_size="
                         f"{vision['image_size']}: the converter needs both equal (no position-embedding resize)")
    eps = vision.get("layer_norm_eps", 1e-6)
    qk_norm = bool(vision.get("qk_normalization", True))
    if qk_norm and eps != 1e-6:
        raise ValueError(f"vision_config.layer_norm_eps={eps} with qk_normalization: the native q/k norms use "
                         "eps 1e-6; this checkpoint is not covered")
    return transformers.InternVLVisionConfig(
        hidden_size=vision.get("hidden_size", 3200),
        num_hidden_layers=vision.get("num_hidden_layers", 48),
        num_attention_heads=vision.get("num_attention_heads", 25),
        intermediate_size=vision.get("intermediate_size", 12800),
        hidden_act=vision.get("hidden_act", "gelu"),
        layer_norm_eps=eps,
        norm_type=vision.get("norm_type", "rms_norm"),
        use_qk_norm=qk_norm,
        attention_bias=bool(vision.get("qkv_bias", False)),
        image_size=image_size,
        patch_size=vision.get("patch_size", 14),
        num_channels=vision.get("num_channels", 3),
        use_absolute_position_embeddings=True,
        use_mean_pooling=True,  # no final LayerNorm: InternViT has none
        use_mask_token=False,
        attention_dropout=0.0,
        projection_dropout=0.0,
        hidden_dropout_prob=0.0,
    )


def fill_structural_defaults(original: dict[str, Any], weight_names: set[str]) -> dict[str, Any]:
    """A copy of ``original`` whose structural options that ``config.json`` leaves out are read off the weights
    (``weight_names``: the original state-dict keys): InternViT's ``norm_type`` (a LayerNorm has a bias, an
    RMSNorm none), ``qkv_bias``, ``qk_normalization``, and InternLM2's ``bias``. Options the config states are
    kept; the weight check then reports any disagreement."""
    if not weight_names:
        return original
    filled = json.loads(json.dumps(original))
    vision, llm = filled.setdefault("vision_config", {}), filled.setdefault("llm_config", {})
    layer = "vision_model.encoder.layers.0."
    vision.setdefault("norm_type", "layer_norm" if layer + "norm1.bias" in weight_names else "rms_norm")
    vision.setdefault("qkv_bias", layer + "attn.qkv.bias" in weight_names)
    vision.setdefault("qk_normalization", layer + "attn.q_norm.weight" in weight_names)
    if (llm.get("architectures") or [None])[0] == "InternLM2ForCausalLM":
        llm.setdefault("bias", "language_model.model.layers.0.attention.wqkv.bias" in weight_names)
    return filled


def tokens_per_tile(original: dict[str, Any]) -> int:
    """Visual tokens per tile: ``(image_size / patch_size)^2 * downsample_ratio^2`` (256 for 448 px, patch 14,
    pixel shuffle 0.5)."""
    vision_config(original)  # checks the sizes agree
    size = original.get("force_image_size") or original["vision_config"].get("image_size", 224)
    patch = original["vision_config"].get("patch_size", 14)
    ratio = original.get("downsample_ratio", 0.5)
    return int((size // patch) ** 2 * ratio**2)


def native_config(original: dict[str, Any], image_token_id: int, pad_token_id: int | None = None
                  ) -> transformers.InternVLConfig:
    """``InternVLConfig`` of an original ``InternVLChatConfig`` dict.

    Raises ``ValueError`` for what the native model cannot express: pixel shuffle other than ``ps_version``
    v2 (the native model implements v2 only) and an uncovered LM (:func:`lm_kind`).
    """
    if not is_original_internvl(original):
        raise ValueError(f"config architectures={original.get('architectures')!r}, model_type="
                         f"{original.get('model_type')!r}: not an original InternVL chat checkpoint "
                         "(InternVLChatModel / internvl_chat)")
    lm_kind(original)
    ps_version = original.get("ps_version", "v1")
    if ps_version != "v2":
        raise ValueError(f"ps_version={ps_version!r}: the native InternVL model implements pixel shuffle v2 only "
                         "(InternVL2 and InternVL2.5 use v2)")
    config = transformers.InternVLConfig(
        vision_config=vision_config(original),
        text_config=text_config(original, pad_token_id),
        image_token_id=image_token_id,
        image_seq_length=tokens_per_tile(original),
        downsample_ratio=original.get("downsample_ratio", 0.5),
        projector_hidden_act="gelu",
        vision_feature_layer=original.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    dtype = original.get("torch_dtype") or original.get("llm_config", {}).get("torch_dtype")
    if dtype:
        config.dtype = dtype
    return config


# ---------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------


def split_internlm2_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's fused ``attention.wqkv`` weight ``((H + 2 KV) d, hidden)`` (or bias ``((H + 2 KV) d,)``)
    -> ``q ((H d), ...)``, ``k (KV d, ...)``, ``v (KV d, ...)`` in the head order of separate projections.

    InternLM2 stores the rows per key/value group: for each of the ``KV`` groups, its ``G = H / KV`` query
    heads, then its key head, then its value head (``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=G + 2)``
    in ``modeling_internlm2.py``). Query head ``g`` of group ``j`` is query head ``j G + g`` of the split model,
    which is the head that GQA pairs with key/value head ``j``.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    groups = num_heads // num_kv_heads
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    if wqkv.shape[0] != rows:
        raise ValueError(f"wqkv has {wqkv.shape[0]} rows; (heads {num_heads} + 2 x kv heads {num_kv_heads}) x "
                         f"head_dim {head_dim} = {rows} expected")
    grouped = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *wqkv.shape[1:])
    q = grouped[:, :groups].reshape(num_heads * head_dim, *wqkv.shape[1:])
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *wqkv.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def split_internvit_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternViT's fused ``attn.qkv`` weight ``(3 C, C)`` (or bias ``(3 C,)``) -> q, k, v: the first, second and
    third ``C`` rows (``qkv.reshape(B, N, 3, heads, d)`` in ``modeling_intern_vit.py``)."""
    if qkv.shape[0] % 3:
        raise ValueError(f"attn.qkv has {qkv.shape[0]} rows, not a multiple of 3")
    q, k, v = qkv.chunk(3, dim=0)
    return q.contiguous(), k.contiguous(), v.contiguous()


_VISION_RENAMES = [
    (r"vision_model\.embeddings\.class_embedding", "model.vision_tower.embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
     r"model.vision_tower.embeddings.patch_embeddings.projection.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
     r"model.vision_tower.encoder.layer.\1.attention.projection_layer.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight",
     r"model.vision_tower.encoder.layer.\1.attention.\2.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls1", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls2", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     r"model.vision_tower.encoder.layer.\1.layernorm_before.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
     r"model.vision_tower.encoder.layer.\1.layernorm_after.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
     r"model.vision_tower.encoder.layer.\1.mlp.\2.\3"),
    # mlp1 = Sequential(LayerNorm, Linear, GELU, Linear)
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
]
_INTERNLM2_RENAMES = [
    (r"language_model\.model\.tok_embeddings\.weight", "model.language_model.embed_tokens.weight"),
    (r"language_model\.model\.norm\.weight", "model.language_model.norm.weight"),
    (r"language_model\.output\.weight", "lm_head.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.(weight|bias)",
     r"model.language_model.layers.\1.self_attn.o_proj.\2"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.weight",
     r"model.language_model.layers.\1.mlp.gate_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.weight",
     r"model.language_model.layers.\1.mlp.up_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.weight",
     r"model.language_model.layers.\1.mlp.down_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.weight",
     r"model.language_model.layers.\1.input_layernorm.weight"),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.weight",
     r"model.language_model.layers.\1.post_attention_layernorm.weight"),
]
# Qwen2 and Llama LMs already use the native names below language_model.model
_HF_LM_RENAMES = [
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
]
_COMPILED: dict[str, list[tuple[re.Pattern, str]]] = {
    arch: [(re.compile(p), r) for p, r in _VISION_RENAMES + (_INTERNLM2_RENAMES if arch == "InternLM2ForCausalLM"
                                                           else _HF_LM_RENAMES)]
    for arch in COVERED_LMS
}
_VIT_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")
_WQKV = re.compile(r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)")


def convert_tensor(key: str, tensor: torch.Tensor, arch: str, text: transformers.PretrainedConfig
                   ) -> list[tuple[str, torch.Tensor]]:
    """The native ``(name, tensor)`` pairs of one original state-dict entry (three for a fused qkv).

    ``arch`` is the original ``llm_config.architectures[0]``, ``text`` the native text config (head counts of
    the ``wqkv`` split). Raises ``ValueError`` for a key the converter does not know.
    """
    match = _VIT_QKV.fullmatch(key)
    if match:
        layer, kind = match.groups()
        base = f"model.vision_tower.encoder.layer.{layer}.attention"
        return [(f"{base}.{name}_proj.{kind}", part) for name, part in zip("qkv", split_internvit_qkv(tensor))]
    match = _WQKV.fullmatch(key) if arch == "InternLM2ForCausalLM" else None
    if match:
        layer, kind = match.groups()
        base = f"model.language_model.layers.{layer}.self_attn"
        head_dim = text.hidden_size // text.num_attention_heads
        parts = split_internlm2_wqkv(tensor, text.num_attention_heads, text.num_key_value_heads, head_dim)
        return [(f"{base}.{name}_proj.{kind}", part) for name, part in zip("qkv", parts)]
    for pattern, replacement in _COMPILED[arch]:
        if pattern.fullmatch(key):
            return [(pattern.sub(replacement, key), tensor)]
    raise ValueError(f"state-dict key {key!r}: not a known tensor of an original InternVL checkpoint with a "
                     f"{arch} LM; the converter does not know where it goes")


def _index_entries(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a shard index, every file name checked to stay
    inside the checkpoint folder: an absolute name or one with ``..`` is refused, never opened."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a shard index with a weight_map ({type(err).__name__}: {err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
    for name in dict.fromkeys(weight_map.values()):
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or "\\" in name or ".." in parts:
            raise ValueError(f"{index}: shard {name!r} points outside the checkpoint folder; an index names files "
                             "inside it (model-00001-of-00002.safetensors); this one was not followed")
    return weight_map


def _weight_files(src_dir: Path) -> list[Path]:
    """The checkpoint's weight files in order: safetensors (sharded or not), else PyTorch ``.bin``."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = src_dir / index_name
        if index.is_file():
            return [src_dir / name for name in dict.fromkeys(_index_entries(index).values())]
        if (src_dir / single).is_file():
            return [src_dir / single]
    raise ValueError(f"{src_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found")


def weight_names(src_dir: Path) -> set[str]:
    """The original state-dict keys, from the index or the safetensors header (no tensor is read); empty for a
    single PyTorch ``.bin`` file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src_dir / index_name).is_file():
            return set(_index_entries(src_dir / index_name))
    if (src_dir / "model.safetensors").is_file():
        with _readable(src_dir / "model.safetensors"), safe_open(str(src_dir / "model.safetensors"),
                                                                  framework="pt") as handle:
            return set(handle.keys())
    return set()


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn a failure to read weight file ``path`` into a ``ValueError`` naming it: a truncated or corrupt
    shard, or a ``.bin`` pickle holding objects other than tensors (refused by ``weights_only`` loading without
    running anything). torch's advice to load with ``weights_only=False`` is not repeated: that would run the
    code the pickle names."""
    import pickle

    try:
        yield
    except ValueError:
        raise
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: weight file refused: a pickle holding Python objects other than tensors; such "
                         "objects are never unpickled (unpickling can run code); save the weights as safetensors "
                         "where they were made") from None
    except Exception as error:  # safetensors, torch's zip reader and the OS raise their own types
        first = (str(error).strip().splitlines() or [""])[0]
        why = f"{type(error).__name__}: {first}" if "weights_only" not in first else type(error).__name__
        raise ValueError(f"{path}: weight file unreadable ({why}); it is truncated or corrupt: download it "
                         "again") from None


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if not path.is_file():
        raise ValueError(f"{path}: weight file named by the checkpoint's index is missing")
    with _readable(path):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{path}: not a state dict of tensors")
            yield from state.items()


def _expected_shapes(config: transformers.InternVLConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = transformers.InternVLForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_weights(src_dir: Path, dst: Path, config: transformers.InternVLConfig, arch: str) -> dict[str, Any]:
    """Convert the weights of ``src_dir`` into ``dst`` one source shard at a time (one output shard per input
    shard, plus ``model.safetensors.index.json`` when there are several). Checks that the result has exactly
    the native model's tensor names and shapes; returns the index."""
    expected = _expected_shapes(config)
    files = _weight_files(src_dir)
    for stale in [*dst.glob("model*.safetensors"), *dst.glob("model.safetensors.index.json")]:
        stale.unlink()  # a previous conversion's shards would shadow or contradict the new index
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    weight_map: dict[str, str] = {}
    total = 0
    problems: list[str] = []
    for path, name in zip(files, names):
        shard: dict[str, torch.Tensor] = {}
        for key, tensor in _read_tensors(path):
            for new_key, new_tensor in convert_tensor(key, tensor, arch, config.text_config):
                if new_key not in expected:
                    problems.append(f"unexpected {new_key} (from {key})")
                elif tuple(new_tensor.shape) != expected[new_key]:
                    problems.append(f"{new_key} (from {key}) has shape {tuple(new_tensor.shape)}, the config "
                                    f"says {expected[new_key]}")
                shard[new_key] = new_tensor
                weight_map[new_key] = name
                total += new_tensor.numel() * new_tensor.element_size()
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        del shard
    problems += [f"missing {key}" for key in expected if key not in weight_map]
    if problems:
        raise ValueError(f"{src_dir}: the converted weights do not fit the native model ({len(problems)} "
                         f"problems): " + "; ".join(problems[:10]))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and processor
# ---------------------------------------------------------------------------------------------------------


def _tokenizer_config(src_dir: Path) -> dict[str, Any]:
    path = src_dir / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _added_tokens(src_dir: Path, tok_config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """``{id: AddedToken fields}`` from ``tokenizer_config.json``'s ``added_tokens_decoder`` and
    ``added_tokens.json`` (content -> id)."""
    added = {int(i): dict(v) for i, v in tok_config.get("added_tokens_decoder", {}).items()}
    path = src_dir / "added_tokens.json"
    if path.is_file():
        for content, i in json.loads(path.read_text(encoding="utf-8")).items():
            added.setdefault(int(i), {"content": content, "special": True})
    return added


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def internlm2_tokenizer(src_dir: Path) -> transformers.PreTrainedTokenizerFast:
    """InternLM2's SentencePiece ``tokenizer.model`` plus its added tokens as a fast tokenizer with the same ids.

    The original ``InternLM2Tokenizer`` (a slow tokenizer) splits the text at its added tokens and runs
    ``SentencePieceProcessor.encode`` on each piece in between, then puts ``<s>`` in front (``add_bos_token``).
    The BPE here comes from transformers' ``SpmConverter.build_tokenizer_from_spm_proto`` with ``legacy=True``
    (the dummy prefix, if the model has one, on every such piece); vocabulary entries renamed by
    ``added_tokens_decoder`` (InternLM2 names ``[UNUSED_TOKEN_146]`` ``<|im_start|>``) take their new names.
    """
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    # transformers' own copy of the proto schema: sentencepiece's may be generated for a newer protobuf
    from transformers.utils import sentencepiece_model_pb2_new as sentencepiece_model_pb2

    model_file = src_dir / "tokenizer.model"
    if not model_file.is_file():
        raise ValueError(f"{src_dir}: no tokenizer.model (InternLM2's SentencePiece model)")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != 2:
        raise ValueError(f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type}; InternLM2's is "
                         "BPE (2)")
    tok_config = _tokenizer_config(src_dir)
    added = _added_tokens(src_dir, tok_config)
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    for i, fields in added.items():
        if i < len(proto.pieces):
            vocab.pop(proto.pieces[i].piece, None)
            vocab[fields["content"]] = i
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    for i in sorted(added):
        fields = added[i]
        token = AddedToken(fields["content"], special=bool(fields.get("special", True)),
                           lstrip=bool(fields.get("lstrip", False)), rstrip=bool(fields.get("rstrip", False)),
                           normalized=bool(fields.get("normalized", False)),
                           single_word=bool(fields.get("single_word", False)))
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(fields["content"]) != i:
            raise ValueError(f"{src_dir}: added token {fields['content']!r} should have id {i} but lands on "
                             f"{backend.token_to_id(fields['content'])}: its ids are not contiguous after the "
                             "SentencePiece vocabulary")
    bos = _token_text(tok_config.get("bos_token")) or "<s>"
    eos = _token_text(tok_config.get("eos_token")) or "</s>"
    if tok_config.get("add_bos_token", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=_token_text(tok_config.get("unk_token")) or "<unk>",
        pad_token=_token_text(tok_config.get("pad_token")) or "</s>",
        model_max_length=tok_config.get("model_max_length", 8192),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer(src_dir: Path, arch: str) -> transformers.PreTrainedTokenizerFast:
    """The checkpoint's tokenizer as a native fast tokenizer with InternVL's named tokens
    (``start_image_token``, ``end_image_token``, ``context_image_token``, ``video_token``) that the processor
    reads. InternLM2: :func:`internlm2_tokenizer`; Qwen2 / Llama: their own tokenizer files, loaded natively."""
    if arch == "InternLM2ForCausalLM":
        tokenizer = internlm2_tokenizer(src_dir)
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(src_dir), trust_remote_code=False)
        except Exception as err:
            raise ValueError(f"{src_dir}: its tokenizer does not load without remote code ({type(err).__name__}: "
                             f"{err})") from err
    vocab = tokenizer.get_vocab()
    missing = [t for t in (START_IMAGE_TOKEN, END_IMAGE_TOKEN, CONTEXT_IMAGE_TOKEN, END_OF_TURN) if t not in vocab]
    if missing:
        raise ValueError(f"{src_dir}: the tokenizer lacks InternVL's token(s) {', '.join(missing)}")
    if VIDEO_TOKEN not in vocab:
        # Only the processor's placeholder: it expands "<video>" into image tokens before tokenising.
        tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]},
                                     replace_extra_special_tokens=False)
    named = {"start_image_token": START_IMAGE_TOKEN, "end_image_token": END_IMAGE_TOKEN,
             "context_image_token": CONTEXT_IMAGE_TOKEN, "video_token": VIDEO_TOKEN}
    tokenizer.padding_side = "left"
    return _with_named_tokens(tokenizer, named)


def _with_named_tokens(tokenizer: transformers.PreTrainedTokenizerFast, named: dict[str, str]
                       ) -> transformers.PreTrainedTokenizerFast:
    """``tokenizer`` rebuilt with ``named`` as its named extra special tokens (``tokenizer.start_image_token``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp, extra_special_tokens=named)


def build_processor(original: dict[str, Any], tokenizer: transformers.PreTrainedTokenizerFast,
                    template: str) -> transformers.InternVLProcessor:
    """``InternVLProcessor`` with InternVL's dynamic preprocessing: ``GotOcr2ImageProcessor`` cutting each image
    into ``min_dynamic_patch..max_dynamic_patch`` tiles of ``force_image_size`` px plus a thumbnail (when tiled),
    ImageNet normalisation, and the chat template of the checkpoint's conversation template."""
    vision_config(original)  # checks the sizes agree
    size = original.get("force_image_size") or original["vision_config"].get("image_size", 224)
    if original.get("dynamic_image_size", True) and not original.get("use_thumbnail", True):
        raise ValueError("use_thumbnail=False with dynamic tiling: GotOcr2ImageProcessor always adds the "
                         "thumbnail; this checkpoint is not covered")
    image_processor = transformers.GotOcr2ImageProcessor(
        size={"height": size, "width": size},
        crop_to_patches=bool(original.get("dynamic_image_size", True)),
        min_patches=int(original.get("min_dynamic_patch", 1)),
        max_patches=int(original.get("max_dynamic_patch", 12)),
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    video_processor = transformers.InternVLVideoProcessor(
        size={"height": size, "width": size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return transformers.InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=tokens_per_tile(original),
        chat_template=chat_template(template),
    )


# ---------------------------------------------------------------------------------------------------------
# The whole conversion
# ---------------------------------------------------------------------------------------------------------


def read_original_config(src_dir: Path) -> dict[str, Any]:
    """The original ``config.json`` of ``src_dir``, checked to be an InternVL chat checkpoint with a covered LM
    and conversation template."""
    path = src_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{src_dir}: no config.json")
    original = json.loads(path.read_text(encoding="utf-8"))
    if not is_original_internvl(original):
        raise ValueError(f"{path}: architectures={original.get('architectures')!r}, model_type="
                         f"{original.get('model_type')!r}; not an original InternVL chat checkpoint "
                         "(InternVLChatModel). A transformers-native checkpoint needs no conversion")
    lm_kind(original)
    template = original.get("template")
    if template not in CONVERSATION_TEMPLATES:
        raise ValueError(f"{path}: template={template!r} is not covered; covered: "
                         f"{', '.join(CONVERSATION_TEMPLATES)}")
    return original


CONVERSION_MARKER = "lmms_prune_conversion.json"
"""Written first into every conversion output: a folder holding it may be converted into again."""


def check_destination(dst: Path, overwrite: bool = False) -> None:
    """Refuse to convert into ``dst`` when it is a file, or a non-empty folder that is not an earlier conversion
    output (no `CONVERSION_MARKER`) and ``overwrite`` is False: the conversion replaces ``config.json`` and the
    ``model*.safetensors`` files there, which may be a user's own model."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: exists and is not a folder; name a new or empty output folder")
    if overwrite or not dst.is_dir() or (dst / CONVERSION_MARKER).is_file():
        return
    present = sorted(p.name for p in dst.iterdir())
    if present:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise ValueError(f"{dst}: not empty ({shown}) and not an earlier conversion output; its config.json and "
                         "model*.safetensors would be replaced. Name a new or empty folder, or pass --overwrite")


def convert_internvl(src: str | os.PathLike, dst: str | os.PathLike,
                     log: Callable[[str], None] | None = None, overwrite: bool = False) -> Path:
    """Convert the original InternVL2 / InternVL2.5 checkpoint ``src`` (a local directory or a hub id) into a
    transformers-native directory ``dst``. Returns ``dst``.

    ``dst`` must be new, empty or an earlier conversion output (`check_destination`) unless ``overwrite``.
    Raises ``ValueError`` naming what is not covered (LM type, template, pixel-shuffle version), what does not
    fit (unknown tensor names, shapes) or what cannot be read (a shard index naming files outside the folder, a
    truncated shard, a pickle of objects other than tensors).
    """
    log = log or (lambda message: None)
    dst = Path(dst)
    check_destination(dst, overwrite)
    src_dir = fetch_checkpoint(src)
    original = fill_structural_defaults(read_original_config(src_dir), weight_names(src_dir))
    arch = lm_kind(original)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / CONVERSION_MARKER).write_text(json.dumps({"source": str(src)}) + "\n")
    log(f"tokenizer of {src_dir}")
    tokenizer = build_tokenizer(src_dir, arch)
    config = native_config(original, image_token_id=tokenizer.convert_tokens_to_ids(CONTEXT_IMAGE_TOKEN),
                           pad_token_id=tokenizer.pad_token_id)
    log(f"weights of {src_dir} ({arch} -> {config.text_config.model_type})")
    write_weights(src_dir, dst, config, arch)
    config.save_pretrained(dst)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    eos = [end_of_turn] + [e for e in [config.text_config.eos_token_id] if e is not None and e != end_of_turn]
    transformers.GenerationConfig(bos_token_id=config.text_config.bos_token_id, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id).save_pretrained(dst)
    build_processor(original, tokenizer, original["template"]).save_pretrained(dst)
    log(f"wrote {dst}")
    return dst
