"""The InternVL converter is proven against the original architecture, re-computed here from the original tensors.

A tiny checkpoint is written in the ORIGINAL remote-code layout (``InternVLChatModel``: ``config.json`` with
``llm_config`` / ``vision_config``, InternViT with fused ``attn.qkv`` and layer scales, InternLM2 with the grouped
fused ``wqkv``, ``mlp1``; a SentencePiece tokenizer trained here plus InternVL's added tokens), with the real token
geometry (448 px tiles, patch 14, pixel shuffle 0.5: 256 tokens per tile) and tiny widths. Then:

* the converted native model's logits equal an independent forward pass over the original tensors (fused-qkv
  split per group, RoPE, RMSNorm, SwiGLU, InternViT with layer scale, pixel shuffle v2, the mlp1 projector);
* the converted processor + chat template build the original prompt (``internvl2_5`` template,
  ``<img><IMG_CONTEXT>*256*tiles</img>``, ``<s>`` first) token for token, the tokens from SentencePiece itself;
* the converted model passes the engine's equivalence checks, and one lmms-eval CLI run with
  ``pretrained=<original dir>`` converts on the fly and produces POPE metrics;
* uncovered checkpoints fail with a clear error.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

import lmms_prune
import lmms_prune.convert.internvl as safe_open_module
from lmms_prune.convert import converted_dir, original_internvl_source
from lmms_prune.convert.internvl import (
    CONVERSATION_TEMPLATES,
    convert_internvl,
    split_internlm2_wqkv,
)
from lmms_prune.loading import resolve_pretrained
from lmms_prune.toy.models import internvl_num_tiles

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4
DECODE_STEPS = 8

VISION = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
          "image_size": 448, "patch_size": 14, "layer_norm_eps": 1e-6}
LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0}
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# InternLM2's SentencePiece model holds the chat tokens as unused pieces; tokenizer_config renames them.
CHAT_PIECES = {"[UNUSED_TOKEN_145]": "<|im_end|>", "[UNUSED_TOKEN_146]": "<|im_start|>"}

CORPUS = [
    *[v.system_message for v in CONVERSATION_TEMPLATES.values()],
    "Is there a cup in the image? Answer the question using a single word or phrase.",
    "Please provide the bounding box coordinate of the region this sentence describes: the red cup.",
    "system user assistant yes no the a an of in on is there image picture photo",
    "Describe the image in detail. The coffee is on the table, next to a white saucer.",
    "<box>[[12, 345, 678, 901]]</box> <ref>the man</ref> 0 1 2 3 4 5 6 7 8 9",
]


# ---------------------------------------------------------------------------------------------------------
# A tiny checkpoint in the original layout
# ---------------------------------------------------------------------------------------------------------


def train_sentencepiece(add_dummy_prefix: bool) -> bytes:
    """A tiny BPE SentencePiece model with byte fallback and InternLM2's unused chat pieces (ids 3, 4)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, user_defined_symbols=list(CHAT_PIECES), character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    return model.getvalue()


def _random_weights(llm: str, vocab: int, seed: int, vit: str = "300m") -> dict[str, torch.Tensor]:
    """Original state-dict names and shapes of an InternVL chat model. ``vit="300m"``: InternViT-300M's layer
    (LayerNorm, qkv bias); ``"6b"``: InternViT-6B's (RMSNorm, q/k RMSNorm, no qkv bias)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def norm(n):
        return 1.0 + rand(n, scale=0.1)

    c, m = VISION["hidden_size"], VISION["intermediate_size"]
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    sd = {
        "vision_model.embeddings.class_embedding": rand(1, 1, c, scale=0.5),
        "vision_model.embeddings.patch_embedding.weight": rand(c, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": rand(c),
        "vision_model.embeddings.position_embedding": rand(1, patches + 1, c, scale=0.5),
    }
    for i in range(VISION["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        sd.update({
            p + "attn.qkv.weight": rand(3 * c, c, scale=0.2),
            p + "attn.proj.weight": rand(c, c, scale=0.2), p + "attn.proj.bias": rand(c),
            p + "mlp.fc1.weight": rand(m, c, scale=0.2), p + "mlp.fc1.bias": rand(m),
            p + "mlp.fc2.weight": rand(c, m, scale=0.2), p + "mlp.fc2.bias": rand(c),
            p + "norm1.weight": norm(c), p + "norm2.weight": norm(c),
            p + "ls1": 0.5 + rand(c, scale=0.2), p + "ls2": 0.5 + rand(c, scale=0.2),
        })
        if vit == "300m":
            sd.update({p + "attn.qkv.bias": rand(3 * c), p + "norm1.bias": rand(c), p + "norm2.bias": rand(c)})
        else:
            sd.update({p + "attn.q_norm.weight": norm(c), p + "attn.k_norm.weight": norm(c)})
    h, f = LLM["hidden_size"], LLM["intermediate_size"]
    sd.update({"mlp1.0.weight": norm(4 * c), "mlp1.0.bias": rand(4 * c),
               "mlp1.1.weight": rand(h, 4 * c, scale=0.2), "mlp1.1.bias": rand(h),
               "mlp1.3.weight": rand(h, h, scale=0.2), "mlp1.3.bias": rand(h)})
    heads, kv = LLM["num_attention_heads"], LLM["num_key_value_heads"]
    d = h // heads
    if llm == "internlm2":
        sd["language_model.model.tok_embeddings.weight"] = rand(vocab, h, scale=1.0)
        sd["language_model.output.weight"] = rand(vocab, h, scale=0.3)
    else:
        sd["language_model.model.embed_tokens.weight"] = rand(vocab, h, scale=1.0)
        sd["language_model.lm_head.weight"] = rand(vocab, h, scale=0.3)
    sd["language_model.model.norm.weight"] = norm(h)
    for i in range(LLM["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        if llm == "internlm2":
            sd.update({
                p + "attention.wqkv.weight": rand((heads + 2 * kv) * d, h, scale=0.3),
                p + "attention.wo.weight": rand(h, heads * d, scale=0.2),
                p + "feed_forward.w1.weight": rand(f, h, scale=0.2),
                p + "feed_forward.w3.weight": rand(f, h, scale=0.2),
                p + "feed_forward.w2.weight": rand(h, f, scale=0.2),
                p + "attention_norm.weight": norm(h), p + "ffn_norm.weight": norm(h),
            })
        else:
            sd.update({
                p + "self_attn.q_proj.weight": rand(heads * d, h, scale=0.3), p + "self_attn.q_proj.bias": rand(heads * d),
                p + "self_attn.k_proj.weight": rand(kv * d, h, scale=0.3), p + "self_attn.k_proj.bias": rand(kv * d),
                p + "self_attn.v_proj.weight": rand(kv * d, h, scale=0.3), p + "self_attn.v_proj.bias": rand(kv * d),
                p + "self_attn.o_proj.weight": rand(h, heads * d, scale=0.2),
                p + "mlp.gate_proj.weight": rand(f, h, scale=0.2), p + "mlp.up_proj.weight": rand(f, h, scale=0.2),
                p + "mlp.down_proj.weight": rand(h, f, scale=0.2),
                p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
            })
    return sd


def _write_internlm2_tokenizer(out: Path, add_dummy_prefix: bool) -> int:
    """tokenizer.model + tokenizer_config.json as the InternVL2.5 InternLM2 checkpoints ship them; returns the
    vocabulary size (SentencePiece pieces + InternVL's added tokens)."""
    proto = train_sentencepiece(add_dummy_prefix)
    (out / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()
    added = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    added.update({str(sp.piece_to_id(piece)): name for piece, name in CHAT_PIECES.items()})
    added.update({str(n + i): tok for i, tok in enumerate(INTERNVL_TOKENS)})
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>", "model_max_length": 8192, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {i: {"content": c, "lstrip": False, "rstrip": False, "normalized": False,
                                     "single_word": False, "special": True} for i, c in added.items()},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return n + len(INTERNVL_TOKENS)


def _write_qwen2_tokenizer(out: Path) -> int:
    """A byte-level BPE saved as Qwen2's tokenizer files (tokenizer.json, tokenizer_config.json with
    ``Qwen2Tokenizer``), Qwen2.5's chat tokens then InternVL's; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS * 5, BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tok.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(tok)


def write_tiny_original_internvl(out: Path, llm: str = "internlm2", template: str = "internvl2_5",
                                 add_dummy_prefix: bool = False, seed: int = 0, vit: str = "300m") -> Path:
    """A tiny InternVL chat checkpoint in the original remote-code layout at ``out`` (two weight shards);
    ``vit`` picks the InternViT-300M or InternViT-6B layer (see :func:`_random_weights`)."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = _write_internlm2_tokenizer(out, add_dummy_prefix) if llm == "internlm2" else _write_qwen2_tokenizer(out)
    if llm == "internlm2":
        llm_config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
                      "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32768,
                      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                      "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}
    else:
        llm_config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_scaling": None,
                      "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 32768,
                      "max_window_layers": 70, "bos_token_id": 0, "eos_token_id": 2}
    llm_config.update(LLM, vocab_size=vocab, hidden_act="silu", tie_word_embeddings=False, torch_dtype="float32")
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12,
        "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1, "template": template,
        "torch_dtype": "float32", "use_thumbnail": True, "use_backbone_lora": 0, "use_llm_lora": 0,
        "llm_config": llm_config,
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "norm_type": "layer_norm" if vit == "300m" else "rms_norm",
                          "qk_normalization": vit == "6b", "qkv_bias": vit == "300m",
                          "hidden_act": "gelu", "num_channels": 3, "drop_path_rate": 0.0, **VISION},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    sd = _random_weights(llm, vocab, seed, vit)
    vision = {k: v for k, v in sd.items() if not k.startswith("language_model")}
    language = {k: v for k, v in sd.items() if k.startswith("language_model")}
    shards = {"model-00001-of-00002.safetensors": vision, "model-00002-of-00002.safetensors": language}
    for name, part in shards.items():
        save_file(part, str(out / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def original_state_dict(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for path in sorted(src.glob("*.safetensors")) for k, v in load_file(str(path)).items()}


# ---------------------------------------------------------------------------------------------------------
# The original architecture, re-computed from the original tensors
# ---------------------------------------------------------------------------------------------------------


def ref_internvit(sd: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternViT (``modeling_intern_vit.py``): patch conv + class token + position embedding, then per layer
    ``x + ls1 * attn(norm1(x))``, ``x + ls2 * mlp(norm2(x))``; fused qkv rows are [q | k | v]."""
    c, heads, eps = VISION["hidden_size"], VISION["num_attention_heads"], VISION["layer_norm_eps"]
    d = c // heads

    def norm(x, name):  # LayerNorm (300M) or RMSNorm (6B, no bias)
        if name + ".bias" in sd:
            return F.layer_norm(x, (c,), sd[name + ".weight"], sd[name + ".bias"], eps)
        return _rms(x, sd[name + ".weight"], eps)

    x = F.conv2d(pixel_values, sd["vision_model.embeddings.patch_embedding.weight"],
                 sd["vision_model.embeddings.patch_embedding.bias"], stride=VISION["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["vision_model.embeddings.class_embedding"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1) + sd["vision_model.embeddings.position_embedding"]
    for i in range(VISION["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        y = norm(x, p + "norm1")
        qkv = y @ sd[p + "attn.qkv.weight"].T + sd.get(p + "attn.qkv.bias", 0)
        q, k, v = qkv.chunk(3, -1)
        if p + "attn.q_norm.weight" in sd:  # qk_normalization: RMSNorm over all heads' channels
            q, k = _rms(q, sd[p + "attn.q_norm.weight"], eps), _rms(k, sd[p + "attn.k_norm.weight"], eps)
        q, k, v = (t.reshape(x.shape[0], x.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        att = att.transpose(1, 2).reshape(x.shape) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + sd[p + "ls1"] * att
        y = norm(x, p + "norm2")
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T
        x = x + sd[p + "ls2"] * (y + sd[p + "mlp.fc2.bias"])
    return x


def ref_pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL's ``pixel_shuffle`` with ps_version v2: ``(n, w, h, c) -> (n, w s, h s, c / s^2)``."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def ref_image_features(sd: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """``extract_feature``: ViT output without the class token, pixel shuffle, ``mlp1`` (LayerNorm, Linear,
    GELU, Linear); ``(tiles * 256, hidden)``."""
    x = ref_internvit(sd, pixel_values)[:, 1:]
    side = int(x.shape[1] ** 0.5)
    x = ref_pixel_shuffle(x.reshape(x.shape[0], side, side, -1)).reshape(x.shape[0], -1, x.shape[-1] * 4)
    x = F.layer_norm(x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    x = F.gelu(x @ sd["mlp1.1.weight"].T + sd["mlp1.1.bias"]) @ sd["mlp1.3.weight"].T + sd["mlp1.3.bias"]
    return x.reshape(-1, x.shape[-1])


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


def ref_lm_logits(sd: dict, llm: str, embeds: torch.Tensor) -> torch.Tensor:
    """The decoder over input embeddings ``(seq, hidden)`` -> logits ``(seq, vocab)``: InternLM2
    (``modeling_internlm2.py``: grouped fused ``wqkv`` = per key/value group [G query heads, key, value]) or
    Qwen2; RMSNorm, rotate-half RoPE, causal GQA attention, SwiGLU."""
    h, heads, kv, eps = LLM["hidden_size"], LLM["num_attention_heads"], LLM["num_key_value_heads"], LLM["rms_norm_eps"]
    d, groups, n = h // heads, heads // kv, embeds.shape[0]
    dtype = embeds.dtype
    inv_freq = 1.0 / (LLM["rope_theta"] ** (torch.arange(0, d, 2, dtype=dtype) / d))
    angles = torch.outer(torch.arange(n, dtype=dtype), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    x = embeds
    for i in range(LLM["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        if llm == "internlm2":
            y = _rms(x, sd[p + "attention_norm.weight"], eps)
            qkv = (y @ sd[p + "attention.wqkv.weight"].T).view(n, kv, groups + 2, d)
            q = qkv[:, :, :groups].reshape(n, heads, d)
            k, v = qkv[:, :, -2], qkv[:, :, -1]
            wo = sd[p + "attention.wo.weight"]
        else:
            y = _rms(x, sd[p + "input_layernorm.weight"], eps)

            def proj(name, y=y, p=p):
                return y @ sd[f"{p}self_attn.{name}.weight"].T + sd[f"{p}self_attn.{name}.bias"]

            q, k, v = proj("q_proj").view(n, heads, d), proj("k_proj").view(n, kv, d), proj("v_proj").view(n, kv, d)
            wo = sd[p + "self_attn.o_proj.weight"]
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        out = torch.empty(n, heads, d, dtype=dtype)
        for head in range(heads):  # query head `head` reads key/value head head // groups
            scores = (q[:, head] @ k[:, head // groups].T) / math.sqrt(d)
            out[:, head] = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v[:, head // groups]
        x = x + out.reshape(n, h) @ wo.T
        if llm == "internlm2":
            y = _rms(x, sd[p + "ffn_norm.weight"], eps)
            w1, w3, w2 = (sd[p + f"feed_forward.{w}.weight"] for w in ("w1", "w3", "w2"))
        else:
            y = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
            w1, w3, w2 = (sd[p + f"mlp.{w}.weight"] for w in ("gate_proj", "up_proj", "down_proj"))
        x = x + (F.silu(y @ w1.T) * (y @ w3.T)) @ w2.T
    x = _rms(x, sd["language_model.model.norm.weight"], eps)
    head_w = sd["language_model.output.weight" if llm == "internlm2" else "language_model.lm_head.weight"]
    return x @ head_w.T


def ref_logits(sd: dict, llm: str, input_ids: torch.Tensor, pixel_values: torch.Tensor, context_id: int
               ) -> torch.Tensor:
    """``InternVLChatModel.forward``: token embeddings with the ``<IMG_CONTEXT>`` rows replaced, in order, by the
    image features, then the LM."""
    table = sd["language_model.model.tok_embeddings.weight" if llm == "internlm2"
               else "language_model.model.embed_tokens.weight"]
    embeds = table[input_ids].clone()
    selected = input_ids == context_id
    embeds[selected] = ref_image_features(sd, pixel_values)
    return ref_lm_logits(sd, llm, embeds)


# ---------------------------------------------------------------------------------------------------------
# The original prompt, from the original template's rules and SentencePiece itself
# ---------------------------------------------------------------------------------------------------------


def original_prompt(template: str, question: str, num_patches: int, tokens_per_tile: int = 256) -> str:
    """``InternVLChatModel.chat``: ``<image>\\n`` before the question, the MPT-style conversation
    (system turn, user turn, assistant role), ``<image>`` -> ``<img><IMG_CONTEXT>*256*tiles</img>``."""
    t = CONVERSATION_TEMPLATES[template]
    query = t.system_template.format(system_message=t.system_message) + t.sep
    query += t.user_role + "<image>\n" + question + t.sep + t.assistant_role
    return query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * tokens_per_tile * num_patches + "</img>", 1)


def original_internlm2_ids(src: Path, text: str) -> list[int]:
    """``InternLM2Tokenizer(text).input_ids``: split at the added tokens, ``SentencePieceProcessor.encode`` on
    each piece in between, ``<s>`` in front."""
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    added = {v["content"]: int(k) for k, v in json.loads((src / "tokenizer_config.json").read_text())
             ["added_tokens_decoder"].items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = [sp.bos_id()]
    for piece in re.split(pattern, text):
        if piece in added:
            ids.append(added[piece])
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


def _image(size=(600, 300)) -> Image.Image:
    return Image.fromarray(skdata.coffee()).convert("RGB").resize(size)


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    """(original dir, converted dir, converted model, processor)."""
    tmp = tmp_path_factory.mktemp("internlm2")
    src = write_tiny_original_internvl(tmp / "InternVL2_5-tiny")
    dst = convert_internvl(src, tmp / "converted")
    model = transformers.AutoModelForImageTextToText.from_pretrained(dst, dtype=torch.float32,
                                                                     attn_implementation="sdpa").eval()
    processor = transformers.AutoProcessor.from_pretrained(dst)
    return src, dst, model, processor


def _assert_equals_reference(native: torch.Tensor, src: Path, llm: str, inputs, context_id: int) -> None:
    """The native logits equal the re-computation from the original tensors up to float32 rounding: their
    distance to the float64 re-computation is at most 4x that of the float32 re-computation (a wrong tensor
    would be off by orders of magnitude more)."""
    sd = original_state_dict(src)
    ids, pixels = inputs["input_ids"][0], inputs["pixel_values"]
    ref32 = ref_logits(sd, llm, ids, pixels, context_id)
    ref64 = ref_logits({k: v.double() for k, v in sd.items()}, llm, ids, pixels.double(), context_id)
    assert native.shape == ref64.shape
    rounding = (ref32.double() - ref64).abs().max().item()
    error = (native.double() - ref64).abs().max().item()
    assert rounding < 1e-4 * ref64.abs().max().item()
    assert error <= 4 * rounding, f"native logits off by {error:.3g}; float32 rounding is {rounding:.3g}"


def _inputs(processor, question="Is there a cup in the image?", image=None, **kwargs):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=[image or _image()], text=[prompt], return_tensors="pt", **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_wqkv_split_puts_each_query_head_with_its_key_value_group():
    """Rows tagged (group, slot): after the split, query head j*G+g comes from group j, k/v head j too."""
    heads, kv, d, hidden = 6, 2, 3, 5
    groups = heads // kv
    tags = torch.tensor([[j, s] for j in range(kv) for s in range(groups + 2) for _ in range(d)], dtype=torch.float32)
    wqkv = torch.cat([tags, torch.zeros(tags.shape[0], hidden - 2)], 1)
    q, k, v = split_internlm2_wqkv(wqkv, heads, kv, d)
    assert q.shape == (heads * d, hidden) and k.shape == v.shape == (kv * d, hidden)
    for head in range(heads):
        assert q[head * d:(head + 1) * d, :2].tolist() == [[head // groups, head % groups]] * d
    for j in range(kv):
        assert k[j * d:(j + 1) * d, :2].tolist() == [[j, groups]] * d
        assert v[j * d:(j + 1) * d, :2].tolist() == [[j, groups + 1]] * d
    with pytest.raises(ValueError, match="rows"):
        split_internlm2_wqkv(wqkv[1:], heads, kv, d)


def test_logits_equal_the_original_architecture_at_prefill(internlm2):
    src, _, model, processor = internlm2
    inputs = _inputs(processor)
    assert inputs["pixel_values"].shape[0] == 3  # 2x1 grid + thumbnail: several tiles, in order
    with torch.no_grad():
        native = model(**inputs).logits[0]
    _assert_equals_reference(native, src, "internlm2", inputs, processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    assert native[-1].std() > 0.1  # a real signal, not a degenerate match


def test_prompt_equals_the_original_token_for_token(internlm2):
    src, _, _, processor = internlm2
    question = "Is there a cup in the image?\nAnswer the question using a single word or phrase."
    image = _image()
    inputs = _inputs(processor, question, image)
    tiles = internvl_num_tiles(*image.size, max_num=12)
    assert inputs["pixel_values"].shape[0] == tiles
    expected = original_internlm2_ids(src, original_prompt("internvl2_5", question, tiles))
    assert inputs["input_ids"][0].tolist() == expected
    # a conversation that brings its own system message keeps it, as the original's system_message does
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nWhere?")


@pytest.mark.parametrize("add_dummy_prefix", [False, True])
@pytest.mark.parametrize("template", ["internvl2_5", "internlm2-chat"])
def test_tokenizer_and_template_match_the_original(tmp_path, add_dummy_prefix, template):
    """Every template and both SentencePiece prefix settings: same ids as SentencePiece + the template rules."""
    src = tmp_path / "src"
    src.mkdir()
    _write_internlm2_tokenizer(src, add_dummy_prefix)
    from lmms_prune.convert.internvl import build_processor, build_tokenizer

    config = json.loads(json.dumps({"force_image_size": 448, "vision_config": VISION, "max_dynamic_patch": 4}))
    processor = build_processor(config, build_tokenizer(src, "InternLM2ForCausalLM"), template)
    for question in ["What is on the table?", "  two  spaces, 你好 and\nnew lines\n", "<box>[[1, 2, 3, 4]]</box>"]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = processor(images=[_image((448, 448))], text=[text], return_tensors="pt")["input_ids"][0].tolist()
        assert ids == original_internlm2_ids(src, original_prompt(template, question, 1)), question
    # with history: chat(..., history=[(q1, a1)]) appends each past turn as role + message + sep
    t = CONVERSATION_TEMPLATES[template]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cup."}]},
                {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]}]
    expected = (t.system_template.format(system_message=t.system_message) + t.sep + t.user_role
                + "<IMG_CONTEXT>\nWhat is it?" + t.sep + t.assistant_role + "A cup." + t.sep + t.user_role
                + "Which colour?" + t.sep + t.assistant_role)
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected


def test_keep_all_equals_unpruned(internlm2):
    _, _, model, processor = internlm2
    inputs = _inputs(processor, images_kwargs={"max_patches": 2})
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        reference = model(**inputs).logits
        with lmms_prune.apply(model, "fastv", keep_ratio=1.0) as handle:
            assert torch.equal(model(**inputs).logits, reference)
        assert handle.records[0].visual_after == handle.records[0].visual_before == n


def _generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=DECODE_STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, min_new_tokens=DECODE_STEPS)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def test_prune_equals_mask_mode_prefill_and_decode(internlm2):
    _, _, model, processor = internlm2
    inputs = _inputs(processor, images_kwargs={"max_patches": 2})
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    keep = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 7].tolist())
    with torch.no_grad():
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=2, mode="mask"):
            mask_logits = model(**inputs).logits
            mask_tokens, mask_steps = _generate(model, inputs)
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=2) as handle:
            logits = model(**inputs).logits
            index = handle.state.keep_index[0]
            tokens, steps = _generate(model, inputs)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - n + len(keep)
    torch.testing.assert_close(logits[0], mask_logits[0, index], atol=ATOL, rtol=0)
    assert steps.shape[1] == DECODE_STEPS
    torch.testing.assert_close(steps, mask_steps, atol=ATOL, rtol=0)
    assert torch.equal(tokens, mask_tokens)


def test_qwen2_with_internvit_6b_converts_and_matches_the_original(tmp_path):
    """The layout of InternVL2.5-38B / 78B: InternViT-6B (RMSNorm, q/k norm, no qkv bias) + Qwen2."""
    src = write_tiny_original_internvl(tmp_path / "InternVL2_5-tiny-qwen2", llm="qwen2", seed=1, vit="6b")
    dst = convert_internvl(src, tmp_path / "converted")
    model = transformers.AutoModelForImageTextToText.from_pretrained(dst, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(dst)
    assert model.config.text_config.model_type == "qwen2"
    inputs = _inputs(processor, images_kwargs={"max_patches": 2})
    original_tok = transformers.AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    text = original_prompt("internvl2_5", "Is there a cup in the image?", inputs["pixel_values"].shape[0])
    assert inputs["input_ids"][0].tolist() == original_tok(text)["input_ids"]
    with torch.no_grad():
        native = model(**inputs).logits[0]
    _assert_equals_reference(native, src, "qwen2", inputs, processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))


@pytest.mark.parametrize("vit", ["300m", "6b"])
def test_structural_options_missing_from_the_config_are_read_off_the_weights(tmp_path, vit):
    """Older configs omit norm_type / qkv_bias / qk_normalization / bias: the weights decide, the result loads."""
    src = write_tiny_original_internvl(tmp_path / "src", vit=vit)
    config = json.loads((src / "config.json").read_text())
    for key in ("norm_type", "qkv_bias", "qk_normalization"):
        config["vision_config"].pop(key)
    config["llm_config"].pop("bias")
    (src / "config.json").write_text(json.dumps(config))
    dst = convert_internvl(src, tmp_path / "dst")
    vision = json.loads((dst / "config.json").read_text())["vision_config"]
    assert (vision["norm_type"], vision["attention_bias"], vision["use_qk_norm"]) == (
        ("layer_norm", True, False) if vit == "300m" else ("rms_norm", False, True))
    assert json.loads((dst / "config.json").read_text())["text_config"]["attention_bias"] is False


def test_uncovered_checkpoints_fail_with_a_clear_error(tmp_path):
    src = write_tiny_original_internvl(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["llm_config"]["architectures"] = ["Phi3ForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"Phi3ForCausalLM.*not covered.*InternLM2ForCausalLM, Qwen2ForCausalLM"):
        convert_internvl(src, tmp_path / "out")
    config["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    config["ps_version"] = "v1"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ps_version='v1'"):
        convert_internvl(src, tmp_path / "out")
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text(json.dumps({"architectures": ["InternVLForConditionalGeneration"],
                                                    "model_type": "internvl"}))
    with pytest.raises(ValueError, match="not an original InternVL"):
        convert_internvl(native, tmp_path / "out")


def test_pretrained_converts_an_original_once_into_the_cache(internlm2, tmp_path, monkeypatch):
    src = internlm2[0]
    monkeypatch.setenv("LMMS_PRUNE_CACHE", str(tmp_path / "cache"))
    assert original_internvl_source(str(src)) == str(src)
    first = Path(resolve_pretrained(str(src)))
    assert first.parent == tmp_path / "cache" / "converted" and first.name.startswith("InternVL2_5-tiny-")
    assert json.loads((first / "config.json").read_text())["model_type"] == "internvl"

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr("lmms_prune.convert.internvl.convert_internvl", no_second_conversion)
    assert converted_dir(src) == first
    # ordinary names pass through untouched: a native directory and an uncached hub id (offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_pretrained(str(first)) == str(first)
    assert resolve_pretrained("OpenGVLab/not-cached-anywhere-hf") == "OpenGVLab/not-cached-anywhere-hf"


def test_convert_cli_exits_nonzero_with_a_clear_message(tmp_path):
    from lmms_prune.cli.main import main

    src = write_tiny_original_internvl(tmp_path / "src")
    assert main(["convert-internvl", str(src), str(tmp_path / "dst")]) == 0
    assert (tmp_path / "dst" / "config.json").is_file()
    assert main(["convert-internvl", str(tmp_path / "nowhere"), str(tmp_path / "dst2")]) == 1
    # a hub id offline, not in the (empty) hub cache: one clear line, no traceback
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "lmms_prune.cli.main", "convert-internvl", "OpenGVLab/InternVL2_5-8B",
                           str(tmp_path / "dst3")], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 1
    assert "not in the local hub cache" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.cli
def test_cli_lmms_eval_runs_an_original_checkpoint(internlm2, tmp_path):
    src = internlm2[0]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
               LMMS_PRUNE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "internvl_fastv", "--model_args",
           f"pretrained={src},max_num=2", "--tasks", "pope_tiny", "--include_path", str(REPO / "tests" / "tasks"),
           "--limit", "2", "--gen_kwargs", "max_new_tokens=4", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))
    assert len(results) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads(Path(results[0]).read_text())["results"]["pope_tiny"]
    assert {"pope_accuracy,none", "pope_f1_score,none"} <= set(metrics)
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("InternVL2_5-tiny-")


# ---------------------------------------------------------------------------------------------------------
# Issue 31: Bad 7 and Poor 12, convert-internvl into a user's folder and from crafted folders


def test_convert_refuses_a_non_empty_folder_that_is_not_an_earlier_conversion(tmp_path, capsys):
    """Bad 7: the user's model.safetensors and config.json are left alone; an earlier conversion output, or
    --overwrite, may be converted into."""
    from lmms_prune.cli.main import main

    src = write_tiny_original_internvl(tmp_path / "src")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"my weights")
    (mine / "config.json").write_text('{"mine": true}')
    assert main(["convert-internvl", str(src), str(mine)]) == 1
    assert "not empty (config.json, model.safetensors) and not an earlier conversion output" in capsys.readouterr().err
    assert (mine / "model.safetensors").read_bytes() == b"my weights"
    assert (mine / "config.json").read_text() == '{"mine": true}'
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        convert_internvl(src, tmp_path / "afile")
    assert main(["convert-internvl", str(src), str(mine), "--overwrite"]) == 0
    assert json.loads((mine / "config.json").read_text())["model_type"] == "internvl"
    assert main(["convert-internvl", str(src), str(mine)]) == 0  # now an earlier conversion output


class PickledObject:
    """An object a pickle names by its class: a weights-only load refuses it."""


def _copy_original(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_tiny_original_internvl(tmp_path_factory.mktemp("original") / "src")


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"])
def test_an_index_naming_files_outside_the_folder_is_refused_and_never_followed(original, tmp_path, monkeypatch,
                                                                                 shard):
    src = _copy_original(original, tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard for k in index["weight_map"]}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    opened = []
    real_open = safe_open_module.safe_open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safe_open_module, "safe_open", spy)
    with pytest.raises(ValueError, match=rf"shard '{re.escape(shard)}' points outside the checkpoint folder"):
        convert_internvl(src, tmp_path / "out")
    assert opened == []


def test_a_truncated_shard_and_a_pickled_bin_give_one_clear_error_naming_the_file(original, tmp_path):
    src = _copy_original(original, tmp_path / "src")
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: weight file unreadable .*truncated"):
        convert_internvl(src, tmp_path / "out1")

    pickled = _copy_original(original, tmp_path / "pickled")
    for path in [*pickled.glob("model*.safetensors"), pickled / "model.safetensors.index.json"]:
        path.unlink()
    torch.save({"weights": PickledObject()}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: weight file refused: a pickle .* never unpickled") as err:
        convert_internvl(pickled, tmp_path / "out2")
    assert "weights_only" not in str(err.value)
