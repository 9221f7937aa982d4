"""The engine is proven against references that do not share its code path (methods.md section 3):

* pruning nothing equals the unpruned model, and ``remove()`` restores it exactly;
* pruning a set S at layer K equals "mask mode" (full length, S's complement masked as keys from layer K on),
  at prefill and at every decode step with the KV cache;
* KV-cache decoding equals decoding by full recomputation;
* a left-padded batch equals its samples run one by one; several images prune per image;
* the last-row attention score equals eager attention's row and never builds a seq x seq matrix.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lmms_prune
from lmms_prune import conformance
from lmms_prune.engine import attention as attn_mod
from lmms_prune.families import get_adapter
from lmms_prune.toy.models import FAMILIES, build_processor, build_tiny_model

torch.set_num_threads(1)
# The equivalence proofs run on any device and dtype (scripts/gpu_check.sh runs them on CUDA in fp32 and bf16):
# LMMS_PRUNE_TEST_DEVICE=cuda LMMS_PRUNE_TEST_DTYPE=bfloat16. Tolerances per dtype: fp32 rounding; bf16 keeps 8
# mantissa bits, so the tiny models' logits (|logit| < 2) agree to a few 1e-2, and generated tokens are compared
# by argmax agreement up to a near-tie that bf16 rounding explains (see _same_tokens).
DEVICE = torch.device(os.environ.get("LMMS_PRUNE_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("LMMS_PRUNE_TEST_DTYPE", "float32"))
TOL = conformance.Tolerance(DTYPE)
ATOL = TOL.atol
EXACT = TOL.exact
# The comparisons and inputs are lmms_prune.conformance's (lmms-prune check-method runs them on any method).
_same = functools.partial(conformance.same, tol=TOL)
_steps_close = functools.partial(conformance.steps_close, tol=TOL)
_same_tokens = functools.partial(conformance.same_tokens, tol=TOL)
_image = conformance.photo
_generate = conformance.generate


@pytest.fixture(scope="module")
def toys():
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model = build_tiny_model(family, seed=0, dtype=DTYPE).to(DEVICE)
            proc = build_processor(family)
            proc.tokenizer.padding_side = "left"
            cache[family] = (model, proc)
        return cache[family]

    return get


def _inputs(family, proc, images_per_prompt, texts):
    return conformance.image_inputs(family, proc, images_per_prompt, texts, DEVICE, DTYPE)


def _one(family, proc, size=(300, 200), text="Where is the cup on the table?"):
    return _inputs(family, proc, [[_image(size)]], [text])


def _num_visual(model, inputs, row=0):
    """Visual tokens of a sample: its image placeholders minus structural ones (LLaVA-NeXT's row newlines)."""
    spans = get_adapter(model).spans(inputs["input_ids"], inputs)[row]
    placeholders = int((inputs["input_ids"][row] == model.config.image_token_id).sum())
    assert sum(s.length for s in spans) == placeholders
    return sum(s.num_visual for s in spans)


def _random_keep(n_visual, k, seed):
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_visual, generator=g)[:k].tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_unpruned_and_remove_restores(toys, family):
    model, proc = toys(family)
    inputs = _one(family, proc)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_tokens, ref_steps = _generate(model, inputs)
        n = _num_visual(model, inputs)
        for method, params in (("fastv", {"keep_ratio": 1.0}), ("fixed", {"keep_indices": list(range(n))})):
            handle = lmms_prune.apply(model, method, **params)
            assert _same(model(**inputs).logits, ref_logits)
            tokens, steps = _generate(model, inputs)
            assert _same_tokens(tokens, ref_tokens, steps, ref_steps) and _steps_close(steps, ref_steps, tokens, ref_tokens, exact=True)
            assert handle.records[0].visual_after == handle.records[0].visual_before == n
            handle.remove()
        # after remove(), a real pruning run leaves no trace
        handle = lmms_prune.apply(model, "fastv", keep_ratio=0.1)
        assert not torch.equal(model(**inputs).logits[:, -1], ref_logits[:, -1])
        handle.remove()
        assert _same(model(**inputs).logits, ref_logits)
        assert not attn_mod._OBSERVERS
        assert model.model.language_model.config._attn_implementation == "sdpa"


def _layers_to_test(model):
    return (0, 2, len(model.model.language_model.layers) - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_equals_mask_mode_prefill_and_decode(toys, family):
    model, proc = toys(family)
    inputs = _one(family, proc)
    n = _num_visual(model, inputs)
    with torch.no_grad():
        for k_layer in _layers_to_test(model):
            keep = _random_keep(n, max(1, n // 7), seed=k_layer)
            mask, pruned = conformance.mask_and_prune(model, inputs, keep, k_layer)
            assert pruned.logits.shape[1] == inputs["input_ids"].shape[1] - n + len(keep)
            conformance.equal_prefill_and_decode(pruned, mask, TOL)
            rec = pruned.records[0]
            full = inputs["input_ids"].shape[1]
            assert rec.kv_lengths == [full] * k_layer + [full - n + len(keep)] * (len(rec.kv_lengths) - k_layer)
            assert rec.kept[0].tolist() == keep


@pytest.mark.parametrize("family", FAMILIES)
def test_k0_equals_feeding_only_kept_tokens(toys, family):
    """K=0 is the LLM input without the dropped tokens, at their original RoPE positions."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    n = _num_visual(model, inputs)
    keep = _random_keep(n, 20, seed=3)
    lm = model.model.language_model
    captured = {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
    with torch.no_grad():
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=0) as handle:
            pruned = model(**inputs).logits
            index = handle.state.keep_index[0]
        hook.remove()
        embeds = captured["inputs_embeds"][:, index]
        positions = captured.get("position_ids")
        positions = index[None] if positions is None else positions[..., index]
        extra = {}
        if captured.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: DeepStack rows of the kept tokens
            extra = {"visual_pos_masks": captured["visual_pos_masks"][:, index],
                     "deepstack_visual_embeds": [e[keep] for e in captured["deepstack_visual_embeds"]]}
        hidden = lm(inputs_embeds=embeds, position_ids=positions, **extra).last_hidden_state
        direct = model.lm_head(hidden)
    torch.testing.assert_close(pruned, direct, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["internvl_qwen2", "qwen2_5_vl", "qwen3_vl", "internvl3_5", "llava_next",
                                    "llava_onevision"])
def test_kv_cache_decoding_equals_recomputation(toys, family):
    model, proc = toys(family)
    inputs = _one(family, proc)
    keep = _random_keep(_num_visual(model, inputs), 30, seed=11)
    with torch.no_grad(), lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=2):
        cached_tokens, cached_steps = _generate(model, inputs)
        full_tokens, full_steps = _generate(model, inputs, use_cache=False)
    assert _same_tokens(cached_tokens, full_tokens, cached_steps, full_steps)
    assert _steps_close(cached_steps, full_steps, cached_tokens, full_tokens)


@pytest.mark.parametrize("family", ["internvl_llama", "qwen2_5_vl", "llava", "qwen3_vl", "internvl3", "internvl3_5",
                                    "llava_next", "llava_onevision"])
def test_left_padded_batch_equals_single_samples(toys, family):
    model, proc = toys(family)
    sizes = [(300, 200), (200, 420)]  # InternVL: 1 tile vs 2 tiles + thumbnail -> unequal kept lengths
    texts = ["Where is the cup?", "Describe the picture in a few words please, with detail."]
    batch = _inputs(family, proc, [[_image(s)] for s in sizes], texts)
    singles = [_inputs(family, proc, [[_image(s)]], [t]) for s, t in zip(sizes, texts)]
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.25, prune_layer=2) as handle:
        tokens, steps = _generate(model, batch)
        batch_records = list(handle.records)
        for row, single in enumerate(singles):
            t1, s1 = _generate(model, single)
            assert handle.records[0].kept[0].tolist() == batch_records[row].kept[0].tolist()
            assert _same_tokens(tokens[row], t1[0], steps[row], s1[0])
            assert _steps_close(steps[row:row + 1], s1, tokens[row:row + 1], t1)


@pytest.mark.parametrize("family", ["internvl_qwen2", "qwen2_5_vl", "llava", "qwen3_vl", "internvl3", "internvl3_5",
                                    "llava_next", "llava_onevision"])
def test_two_images_prune_per_image(toys, family):
    model, proc = toys(family)
    inputs = _inputs(family, proc, [[_image((300, 200)), _image((240, 240), "astronaut")]], ["Compare them."])
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.1, prune_layer=2) as handle:
        model(**inputs)
        spans = handle.state.spans[0]
    rec = handle.records[0]
    assert len(rec.kept) == len(spans) == 2
    for span, kept in zip(spans, rec.kept):
        assert kept.numel() == max(1, round(0.1 * span.num_visual))
        assert kept.max() < span.num_visual
    assert rec.visual_after == sum(k.numel() for k in rec.kept)


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_row_equals_eager_and_builds_no_square_matrix(toys, family):
    model, proc = toys(family)
    inputs = _one(family, proc)
    layer = 3
    with torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            eager = model(**inputs, output_attentions=True).attentions[layer][:, :, -1, :].mean(1)
        finally:
            model.set_attn_implementation("sdpa")
        handle = lmms_prune.apply(model, "fastv", keep_ratio=0.5, prune_layer=layer + 1)
        recorder = _ShapeRecorder()
        observer = attn_mod._OBSERVERS[id(model.model.language_model.layers[layer].self_attn)]

        def recording(*args):
            with recorder:
                observer(*args)

        attn_mod._OBSERVERS[id(model.model.language_model.layers[layer].self_attn)] = recording
        model(**inputs)
        row = handle.state.attention[layer]
        handle.remove()
    torch.testing.assert_close(row, eager.float(), atol=1e-5, rtol=0)
    seq = inputs["input_ids"].shape[1]
    assert recorder.shapes, "the observer ran"
    assert all(sum(d >= seq for d in shape) <= 1 for shape in recorder.shapes), recorder.shapes


def test_eager_model_prunes_like_sdpa(toys):
    """The observing wrapper also wraps eager attention (with its float masks)."""
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    with torch.no_grad():
        with lmms_prune.apply(model, "fastv", keep_ratio=0.2):
            sdpa = model(**inputs).logits
        model.set_attn_implementation("eager")
        try:
            with lmms_prune.apply(model, "fastv", keep_ratio=0.2):
                eager = model(**inputs).logits
        finally:
            model.set_attn_implementation("sdpa")
    torch.testing.assert_close(sdpa, eager, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("nope", {}, "method='nope': unknown"),
        ("fastv", {"keep_ratio": 0.0}, "keep_ratio=0.0: must be in (0, 1]"),
        ("fastv", {"keep_ratio": 1.5}, "keep_ratio=1.5: must be in (0, 1]"),
        ("fastv", {"keep_tokens": 0}, "keep_tokens=0: must be >= 1"),
        ("fastv", {"prune_layer": 14}, "prune_layer=14: this model has 14 decoder layers"),
        ("fastv", {"prune_layer": 2, "score_layer": 2}, "score_layer=2 with prune_layer=2"),
        ("fastv", {"prune_layer": 0}, "score_layer=-1 with prune_layer=0"),
        ("fastv", {"bogus": 1}, "unknown pruning parameter(s) bogus"),
        ("d2pruner", {}, "lmms-prune calibrate"),
    ],
)
def test_bad_parameters_raise_clear_errors(toys, method, params, message):
    model, _ = toys("internvl_qwen2")
    with pytest.raises(ValueError) as err:
        lmms_prune.apply(model, method, **params)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("keep", "message"),
    [([0, 0, 1], "duplicates"), ([5000], "out of range"), ([-1], "out of range"), ([], "empty")],
)
def test_bad_keep_indices_raise_clear_errors(toys, keep, message):
    model, proc = toys("internvl_qwen2")
    inputs = _one("internvl_qwen2", proc)
    with lmms_prune.apply(model, "fixed", keep_indices=keep):
        with pytest.raises(ValueError, match=message), torch.no_grad():
            model(**inputs)


def test_unsupported_model_names_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(TypeError, match="InternVLForConditionalGeneration"):
        lmms_prune.apply(model, "fastv")


@pytest.mark.parametrize(("family", "positions"), [(f, "original") for f in FAMILIES] + [
    # with 1-D RoPE, keeping every token in order leaves the contiguous numbering unchanged
    ("internvl_llama", "contiguous"), ("llava", "contiguous")])
def test_pre_llm_keep_all_equals_unpruned(toys, family, positions):
    model, proc = toys(family)
    inputs = _one(family, proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens, ref_steps = _generate(model, inputs)
        with lmms_prune.apply(model, "divprune", keep_ratio=1.0, positions=positions):
            torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-5, rtol=0)
            tokens, steps = _generate(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(steps, ref_steps, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "method"), [("internvl_llama", "vispruner"), ("internvl_qwen2", "divprune"),
                                                ("llava", "vispruner"), ("qwen2_5_vl", "divprune"),
                                                ("qwen2_5_vl", "vispruner"), ("qwen3_vl", "vispruner"),
                                                ("qwen3_vl", "divprune"), ("internvl3_5", "vispruner"),
                                                ("llava_next", "vispruner"), ("llava_onevision", "divprune")])
def test_pre_llm_with_original_positions_equals_k0_of_the_same_set(toys, family, method):
    """Dropping tokens before the LLM at their original positions is exactly intra-LLM pruning at K=0."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    with torch.no_grad():
        with lmms_prune.apply(model, method, keep_ratio=0.1, positions="original") as handle:
            pre = model(**inputs).logits
            pre_tokens, pre_steps = _generate(model, inputs)
            kept = handle.records[0].kept[0].tolist()
            assert handle.records[0].visual_after == len(kept) == max(1, round(0.1 * _num_visual(model, inputs)))
        with lmms_prune.apply(model, "fixed", keep_indices=kept, prune_layer=0):
            k0 = model(**inputs).logits
            k0_tokens, k0_steps = _generate(model, inputs)
    torch.testing.assert_close(pre, k0, atol=ATOL, rtol=0)
    assert torch.equal(pre_tokens, k0_tokens)
    torch.testing.assert_close(pre_steps, k0_steps, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("family", "method"), [("llava", "random"), ("qwen2_5_vl", "uniform"),
                                                ("internvl_qwen2", "uniform"), ("llava_next", "random")])
def test_random_and_uniform_before_the_llm_keep_the_llm_stage_set_and_equal_k0(toys, family, method):
    """stage=pre_llm (the vLLM plug-in's setting) draws exactly the tokens the preset's default (stage=llm)
    keeps, and dropping them before the LLM at their original positions is intra-LLM pruning at K=0."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    with torch.no_grad():
        with lmms_prune.apply(model, method, keep_ratio=0.25) as handle:
            model(**inputs)
            inside = handle.records[0].kept[0].tolist()
        with lmms_prune.apply(model, method, keep_ratio=0.25, stage="pre_llm", positions="original") as handle:
            pre = model(**inputs).logits
            pre_tokens, _ = _generate(model, inputs)
            kept = handle.records[0].kept[0].tolist()
        with lmms_prune.apply(model, "fixed", keep_indices=kept, prune_layer=0):
            k0 = model(**inputs).logits
            k0_tokens, _ = _generate(model, inputs)
    assert kept == inside and len(kept) == max(1, round(0.25 * _num_visual(model, inputs)))
    torch.testing.assert_close(pre, k0, atol=ATOL, rtol=0)
    assert torch.equal(pre_tokens, k0_tokens)


@pytest.mark.parametrize("family", ["internvl_qwen2", "llava", "llava_next"])
def test_pre_llm_contiguous_positions_renumber_the_short_prompt(toys, family):
    model, proc = toys(family)
    inputs = _one(family, proc)
    lm = model.model.language_model
    captured = {}
    with torch.no_grad(), lmms_prune.apply(model, "divprune", keep_ratio=0.1) as handle:
        hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
        logits = model(**inputs).logits
        hook.remove()
        rec = handle.records[0]
        short = captured["inputs_embeds"]
        direct = model.lm_head(lm(inputs_embeds=short).last_hidden_state)
    assert short.shape[1] == inputs["input_ids"].shape[1] - rec.visual_before + rec.visual_after
    torch.testing.assert_close(logits, direct, atol=ATOL, rtol=0)


def test_vispruner_where_its_signal_is_missing_is_a_clear_error(toys):
    """Towers without [CLS] now run VisPruner (mean received attention, tests/test_vispruner_no_cls.py); a
    model that feeds the projector several vision layers has no single layer to score: the error names the
    family, the method and the reason, before anything runs."""
    model, _ = toys("llava")
    old = model.config.vision_feature_layer
    model.config.vision_feature_layer = [-2, -1]
    try:
        with pytest.raises(ValueError, match=r"llava: vispruner needs one vision_feature_layer, got \[-2, -1\]"):
            lmms_prune.apply(model, "vispruner")
    finally:
        model.config.vision_feature_layer = old


def test_text_mean_query_averages_the_text_rows_after_the_image(toys):
    model, proc = toys("internvl_qwen2")
    inputs = _one("internvl_qwen2", proc)
    layer = 2
    ids = inputs["input_ids"][0]
    image_end = int(torch.nonzero(ids == model.config.image_token_id).max()) + 1
    with torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            att = model(**inputs, output_attentions=True).attentions[layer]
        finally:
            model.set_attn_implementation("sdpa")
        expected = att[0, :, image_end:, :].mean(0).mean(0)
        with lmms_prune.apply(model, "fastv", keep_ratio=0.5, prune_layer=layer + 1, query="text_mean") as handle:
            model(**inputs)
            row = handle.state.attention[layer][0]
    torch.testing.assert_close(row, expected.float(), atol=1e-5, rtol=0)


def test_cache_is_found_under_either_transformers_name():
    """transformers 5.24 renamed the KV cache argument and output field ``past_key_values`` -> ``cache``; the
    engine's prefill/decode detection reads both (the tests above run on whichever version is installed)."""
    from types import SimpleNamespace

    from lmms_prune.engine.core import _cache_argument, _cache_output

    cache = object()
    assert _cache_argument({"cache": cache}) is cache
    assert _cache_argument({"past_key_values": cache}) is cache
    assert _cache_argument({"cache": None, "past_key_values": cache}) is cache
    assert _cache_argument({}) is None
    assert _cache_output(SimpleNamespace(cache=cache)) is cache
    assert _cache_output(SimpleNamespace(past_key_values=cache)) is cache
    assert _cache_output(SimpleNamespace(last_hidden_state=None)) is None
