"""Prefill and vision FLOPs and KV-cache bytes against values computed by hand (methods.md section 8) and
against torch's own FLOP counter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lmms_prune.efficiency import (
    DecoderDims,
    EncoderDims,
    encoder_flops,
    encoder_layer_flops,
    end_to_end_ratio,
    kv_cache_bytes,
    layer_prefill_flops,
    mlp_flops,
    prefill_flops,
    pruned_prefill_flops,
)

# d=8, m=16, L=3 layers, 2 query heads and 1 key/value head of size 4 (GQA).
GQA = DecoderDims(hidden_size=8, intermediate_size=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=4)


def test_layer_flops_by_hand_with_gqa():
    # n=10: projections 10*8*(2*2*4 + 2*1*4) = 1920; attention 2*100*2*4 = 1600; FFN 2*10*8*16 = 2560.
    assert layer_prefill_flops(GQA, 10) == 1920 + 1600 + 2560
    # n=4: 4*8*24 = 768; 2*16*8 = 256; 2*4*8*16 = 1024.
    assert layer_prefill_flops(GQA, 4) == 768 + 256 + 1024


def test_without_gqa_equals_the_papers_formula():
    d, m, n = 8, 16, 10
    mha = DecoderDims(hidden_size=d, intermediate_size=m, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4)
    assert layer_prefill_flops(mha, n) == 4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m


def test_pruned_total_is_k_full_layers_plus_the_rest_pruned():
    # K=1: one layer at 10 tokens, two at 4: 6080 + 2*2048.
    assert pruned_prefill_flops(GQA, 10, 4, prune_layer=1) == 10176
    assert pruned_prefill_flops(GQA, 10, 4, prune_layer=1) == prefill_flops(GQA, [10, 4, 4])
    assert pruned_prefill_flops(GQA, 10, 4, prune_layer=0) == 3 * 2048
    assert pruned_prefill_flops(GQA, 10, 4, prune_layer=3) == prefill_flops(GQA, [10] * 3) == 3 * 6080


def test_swiglu_counts_three_ffn_matrices():
    swiglu = DecoderDims(8, 16, 3, 2, 1, 4, ffn_matrices=3)
    assert layer_prefill_flops(swiglu, 10) - layer_prefill_flops(GQA, 10) == 10 * 8 * 16


def test_kv_bytes_by_hand():
    # per token and layer: 2 (K and V) * 1 head * 4 dims * 2 bytes = 16; 10 + 4 + 4 tokens.
    assert kv_cache_bytes(GQA, [10, 4, 4], bytes_per_element=2) == 16 * 18
    assert kv_cache_bytes(GQA, [10, 10, 10], bytes_per_element=4) == 32 * 30


def test_from_config_reads_gqa_and_head_dim():
    cfg = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=14, num_attention_heads=4,
                          num_key_value_heads=2)
    dims = DecoderDims.from_config(cfg)
    assert (dims.head_dim, dims.num_kv_heads, dims.num_layers) == (16, 2, 14)
    cfg.head_dim = 32  # explicit head size (Qwen3-style) wins over hidden / heads
    assert DecoderDims.from_config(cfg).head_dim == 32


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="tokens_per_layer has 2 entries"):
        prefill_flops(GQA, [10, 4])
    with pytest.raises(ValueError, match="prune_layer=4"):
        pruned_prefill_flops(GQA, 10, 4, prune_layer=4)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        DecoderDims(8, 16, 3, 4, 3, 2)
    with pytest.raises(ValueError, match="bytes_per_element=0"):
        kv_cache_bytes(GQA, [1, 1, 1], 0)


def test_summary_line_of_a_run_without_visual_tokens_reads_n_a():
    """A run whose samples carry no visual tokens (text-only prompts) has no kept-ratio denominator: the
    end-of-run log line says n/a instead of crashing the evaluation after every sample was answered."""
    from lmms_prune.models.base import format_summary, summarize

    record = {key: 0 for key in ("visual_before", "visual_after", "seq_len_before", "seq_len_after",
                                 "llm_prefill_seconds", "select_seconds", "decode_seconds", "end_to_end_seconds",
                                 "prefill_flops", "prefill_flops_unpruned", "kv_cache_bytes",
                                 "kv_cache_bytes_unpruned", "output_tokens")}
    record.update(seq_len_before=12, seq_len_after=12, prefill_flops=5.0, prefill_flops_unpruned=5.0,
                  kv_cache_bytes=8, kv_cache_bytes_unpruned=8)
    summary = summarize([record, record])
    assert summary["visual_kept_ratio"] is None and summary["prefill_flops_ratio"] == 1.0
    line = format_summary(summary)
    assert line.startswith("2 samples (0 skipped): visual tokens 0.0 -> 0.0 (xn/a)"), line
    assert "prefill FLOPs x1.000" in line


# A ViT of width 8, FFN 16, 2 blocks, 12 input values per patch.
VIT = EncoderDims(hidden_size=8, intermediate_size=16, num_layers=2, patch_dim=12)


def test_encoder_flops_by_hand():
    # one block over sequences of 5 and 3 tokens (n=8): projections 4*8*64 = 2048; attention 2*8*(25+9) = 544;
    # FFN 2*8*8*16 = 2048.
    assert encoder_layer_flops(VIT, [5, 3]) == 2048 + 544 + 2048
    # 6 patches embedded (6*12*8 = 576; the [CLS] of each sequence is not a patch) + 2 blocks
    assert encoder_flops(VIT, 6, [5, 3]) == 576 + 2 * 4640
    # windowed blocks (Qwen2.5-VL): block 1 attends over the whole sequences, block 0 within windows of 2, 2, 1, 3
    assert encoder_flops(VIT, 8, [5, 3], window_sequences=[2, 2, 1, 3], full_layers=[1]) == (
        8 * 12 * 8 + 4640 + (2048 + 2 * 8 * (4 + 4 + 1 + 9) + 2048))
    # a projector 8 -> 16 -> 2 over 4 rows: 4 * (128 + 32)
    assert mlp_flops(4, (8, 16, 2)) == 640


def test_end_to_end_ratio_is_capped_by_the_unpruned_tower():
    prefill, pruned = 1000.0, 200.0
    assert end_to_end_ratio(0.0, prefill, pruned) == prefill / pruned  # no vision cost: the LLM's ratio
    ratios = [end_to_end_ratio(v, prefill, pruned) for v in (10.0, 100.0, 1000.0, 10000.0)]
    assert all(1 < r < prefill / pruned for r in ratios) and ratios == sorted(ratios, reverse=True)
    with pytest.raises(ValueError, match="prefill=0"):
        end_to_end_ratio(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="patch_dim=0"):
        EncoderDims(8, 16, 2, 0)


@pytest.mark.parametrize("family,tokens", [("llava", 576), ("internvl_qwen2", 512), ("qwen2_5_vl", 60),
                                           ("qwen2_vl", 64), ("qwen3_vl", 64), ("llava_next", 320),
                                           ("llava_onevision", 98)])
def test_vision_flops_equal_torch_flop_counter(family, tokens):
    """Each family's vision-FLOPs formula equals torch's FlopCounterMode over the real encode (tower, patch
    embedding, projector / merger; eager attention so that its matmuls are counted; the counter counts a
    multiply-add as 2). Qwen2.5-VL at 6 x 10 merged tokens has full and edge windows."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lmms_prune.bench import synthetic_inputs
    from lmms_prune.families import get_adapter
    from lmms_prune.toy.models import build_tiny_model

    model = build_tiny_model(family)
    model.set_attn_implementation("eager")
    adapter = get_adapter(model)
    inputs = synthetic_inputs(model, tokens)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.encode_images(inputs)
    assert type(adapter).vision_flops(model.config, inputs) == counter.get_total_flops() // 2 > 0
