"""MustDrop's prefill stage, the "dual-attention filter" (``llm_selector=mustdrop_filter`` composed after the
``mustdrop`` vision stage), against a re-creation of the authors' arithmetic (github.com/liuting20/MustDrop @
909afa538bff, ``llava/model/language_model/modelling_sparse_llama.py``: ``LlamaDynamicvitModel.forward`` and
``dual_attention_filter``; written here from reading that code, nothing copied), its properties, and the engine's
equivalences (prune = mask, batch = samples) through ``check-method`` on the authors' family (LLaVA-1.5) and CI's.

The re-creation: the layer's full soft-maxed attention ``[1, H, S, S]``; the rows of the ``S - start - img``
tokens after the image, the image's ``img`` columns; heads averaged; ``attn_sum`` the column sums; dropped where
``attn_sum < attn_sum.sum() * global_thr`` and the column maximum ``< individual_thr``; the kept indices ascending.
Four such stages (after layers 2, 6, 10, 14), each on the tokens the previous one kept; between them the
authors' decoder loop (``LlamaDynamicvitModel.forward``): the pruning layer runs on every token, then the system
prompt, the kept visual tokens and the text are gathered and ``position_ids`` cut to ``0..T'-1``.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import lmms_prune
from lmms_prune import conformance
from lmms_prune import selection as sel
from lmms_prune.presets import resolve_config

torch.set_num_threads(1)

# the option as docs/methods_2025.md gives it (the authors' thresholds for 192 tokens: 0.001 / 0.001)
PREFILL = dict(llm_selector="mustdrop_filter", llm_score="none", prune_layers="auto", stage_ratio=1.0)
SCRIPTS = [(0.001, 0.001), (0.0012, 0.001), (0.011, 0.01), (0.005, 0.001)]  # their 192, 128, 64, VizWiz-64


def authors_filter(attn: torch.Tensor, start: int, img: int, global_thr: float, individual_thr: float):
    """Re-creation for one sample: ``attn`` [1, H, S, S] -> (kept image indices ascending, text length)."""
    text = attn.shape[-1] - img - start
    rows = attn[0].narrow(1, start + img, text).narrow(2, start, img).mean(0)  # [text, img]
    attn_sum = rows.sum(0)
    candidate = (attn_sum < attn_sum.sum(0) * global_thr) & (rows.max(0)[0] < individual_thr)
    return torch.arange(img)[~candidate], text


def causal_attention(seq: int, heads: int, gen: torch.Generator, peaky: torch.Tensor) -> torch.Tensor:
    """[1, H, S, S] soft-maxed causal attention whose logits favour the ``peaky`` key columns."""
    logits = torch.randn(1, heads, seq, seq, generator=gen) * 2 + peaky
    logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


@pytest.mark.parametrize(("global_thr", "individual_thr"), SCRIPTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_filter_equals_the_authors_four_stages(global_thr, individual_thr, seed):
    """Stage by stage, on the tokens each stage leaves: the same kept tokens as the authors' filter."""
    gen = torch.Generator().manual_seed(seed)
    start, img, text, heads = 5, 144, 12, 4
    original = torch.arange(img)
    for _ in range(4):  # the authors' pruning layers 2, 6, 10, 14
        seq = start + img + text
        peaky = torch.zeros(seq)
        peaky[start:start + img] = torch.rand(img, generator=gen) * 6 - 3  # some columns never attended
        attn = causal_attention(seq, heads, gen, peaky)
        expected, m = authors_filter(attn, start, img, global_thr, individual_thr)
        rows = attn[0, :, seq - text:, start:start + img].mean(0)  # the engine's text_attention signal
        kept = sel.dual_attention_filter(rows, global_thr, individual_thr)
        assert m == text and torch.equal(kept, expected)
        original, img = original[kept], kept.numel()
        if img == 0:
            break
    assert original.numel() == img


def test_default_thresholds_of_the_authors_drop_nothing():
    """``global_thr=1, individual_thr=0`` (their argparse defaults): the filter keeps every token."""
    rows = torch.rand(7, 50, generator=torch.Generator().manual_seed(2)).softmax(-1)
    assert torch.equal(sel.dual_attention_filter(rows, 1.0, 0.0), torch.arange(50))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_filter_keeps_exactly_the_tokens_attended_in_sum_or_in_one_row(seed):
    gen = torch.Generator().manual_seed(seed)
    rows = (torch.randn(9, 80, generator=gen) * 3).softmax(-1) * 0.3
    g, i = 0.01, 0.004
    kept = sel.dual_attention_filter(rows, g, i)
    col = rows.sum(0)
    wanted = (col >= g * col.sum()) | (rows.max(0).values >= i)
    assert torch.equal(kept, torch.nonzero(wanted).flatten())
    looser = sel.dual_attention_filter(rows, g / 2, i / 2)  # lower thresholds drop a subset
    assert set(kept.tolist()) <= set(looser.tolist())


def test_without_text_rows_every_token_is_kept_and_bad_shapes_are_refused():
    assert torch.equal(sel.dual_attention_filter(torch.zeros(0, 6), 0.5, 0.5), torch.arange(6))
    with pytest.raises(ValueError, match=r"rows of shape \(6,\)"):
        sel.dual_attention_filter(torch.zeros(6), 0.5, 0.5)


def test_the_option_resolves_to_the_authors_layers():
    """prune_layers='auto' is 3, 7, 11, 15 on LLaVA-1.5-7B's 32 layers (their pruning_layers 2, 6, 10, 14, each
    layer's own attention: scored at K-1); the filter reads the text rows of that layer."""
    cfg = resolve_config("mustdrop", **PREFILL)
    pre, llm = cfg.split_stages(32)
    assert llm.prune_layers == (3, 7, 11, 15) and pre.llm_selector == "none"
    stages = llm.stage_configs(32)
    assert [s.effective_score_layer for s in stages] == [2, 6, 10, 14]
    assert all(s.needs().text_attention == (s.effective_score_layer,) for s in stages)
    assert cfg.mustdrop_global_thr == cfg.mustdrop_individual_thr == 0.001


@pytest.mark.parametrize(("method", "params", "message"), [
    ("fastv", {"decode_cache": "final"}, "'fastv'.*does not use decode_cache"),
    ("mustdrop", {"decode_cache": "final"}, "'mustdrop'.*does not use decode_cache"),  # without an LLM stage
    ("pyramiddrop", {"decode_cache": "last"}, r"decode_cache='last': must be one of \('stage', 'final'\)"),
    ("mustdrop", {**PREFILL, "mustdrop_global_thr": 2}, r"mustdrop_global_thr=2: must be in \[0, 1\]"),
])
def test_bad_settings_are_refused_before_any_model(method, params, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(method, **params)


@pytest.mark.parametrize(("family", "global_thr"), [("llava", 0.015626), ("internvl_llama", 0.01787)])
def test_check_method_passes_for_the_prefill_stage(family, global_thr):
    """prune = mask (the LLM stage on the shortened prompt, dropped keys masked), batch = samples, the budgets and
    determinism, on the tiny models; 'cache = recompute' is n/a for every composed method (prune = mask covers
    its cached decoding). The tiny random models attend almost uniformly (each of the M tokens about 1/M of the
    total): ``global_thr`` near 1/M drops about half of them at the first stage, none where it is far from it."""
    params = {**PREFILL, "mustdrop_global_thr": global_thr, "mustdrop_individual_thr": 1.0}
    checks = ("prune = mask", "batch = samples", "budget N", "deterministic")
    results = conformance.check_family("mustdrop", family, params=params, decode=3, checks=checks)
    assert [r.status for r in results] == ["pass"] * len(checks), [(r.check, r.reason) for r in results]


def _layer_step(lm, layer, h, pos, cache):
    """One Llama decoder layer (pre-norm attention + MLP, as the authors' ``LlamaDynamicvitDecoderLayer``) on ``h``
    ``[1, q, D]`` at positions ``pos`` ``[1, q]`` after this layer's cache ``(k, v)`` (or None): the new ``h``,
    the cache with the ``q`` tokens appended, and the soft-maxed causal attention ``[1, H, q, S]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    b, q_len, _ = x.shape
    q, k, v = (proj(x).view(b, q_len, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = apply_rotary_pos_emb(q, k, *lm.rotary_emb(h, pos))
    if cache is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    s = k.shape[2]
    logits = q @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2) * attn.scaling
    probs = logits.masked_fill(~torch.ones(q_len, s, dtype=torch.bool).tril(s - q_len), float("-inf")).softmax(-1)
    out = (probs @ repeat_kv(v, attn.num_key_value_groups)).transpose(1, 2).reshape(b, q_len, -1)
    h = h + attn.o_proj(out)
    return h + layer.mlp(layer.post_attention_layernorm(h)), (k, v), probs


def authors_generate(model, embeds, start, img, layers, global_thr, individual_thr, steps):
    """Re-creation of the authors' greedy generation on a Llama LLM from its input ``embeds`` ``[1, T, D]``:
    prefill with the filter after each of ``layers`` (the kept rows gathered, positions cut to ``0..T'-1``); then
    the decode-stage cache cut (the stages' indices chained into the final set, in the coordinates of the
    sequence each layer saw; layers ``layers[0]..layers[-1]`` cut, the others as they are); each decoded token at
    its layer's cache length. Returns the logits of every generated token ``[steps, V]`` and the image's kept
    tokens (indices among the ``img`` that entered the LLM)."""
    lm = model.model.language_model
    h, kept = embeds, torch.arange(img)
    pos = torch.arange(h.shape[1])[None]
    caches, stages = [], []
    for idx, layer in enumerate(lm.layers):
        h, cache, probs = _layer_step(lm, layer, h, pos, None)
        caches.append(cache)
        if idx in layers:
            vis, text = authors_filter(probs, start, img, global_thr, individual_thr)
            rows = torch.cat([torch.arange(start), vis + start, torch.arange(start + img, start + img + text)])
            stages.append(rows)
            h, img, kept = h[:, rows], vis.numel(), kept[vis]
            pos = torch.arange(h.shape[1])[None]  # the authors' position_ids.narrow(1, 0, T')
    out = [model.lm_head(lm.norm(h))[0, -1]]
    for s in range(len(stages) - 1, 0, -1):
        stages[s - 1] = stages[s - 1][stages[s]]
    stage = 0
    for idx in range(layers[0], layers[-1] + 1):
        k, v = caches[idx]
        caches[idx] = (k[:, :, stages[stage]], v[:, :, stages[stage]])
        stage += idx == layers[stage]
    for _ in range(steps - 1):
        h = lm.embed_tokens(out[-1].argmax())[None, None]
        for idx, layer in enumerate(lm.layers):
            pos = torch.tensor([[caches[idx][0].shape[2]]])  # get_usable_length of the layer's own cache
            h, caches[idx], _ = _layer_step(lm, layer, h, pos, caches[idx])
        out.append(model.lm_head(lm.norm(h))[0, -1])
    return torch.stack(out), kept


@pytest.mark.parametrize(("family", "global_thr"), [("llava", 0.015626), ("internvl_llama", 0.01787)])
def test_engine_equals_the_authors_prefill_and_decode(toys, family, global_thr):
    """On the prompt the vision stage shortened (the same LLM input): with ``decode_cache='final'`` the engine's
    kept tokens and the logits of 4 greedy tokens equal the re-created authors' prefill loop and decode-stage
    cache cut (their layers: ours - 1); the default ``decode_cache='stage'`` (each layer keeps its stage's
    tokens) gives the same first token and other later ones, so the comparison sees the cut."""
    model, proc = toys(family)
    inputs = conformance.image_inputs(family, proc, [[conformance.photo()]], ["What is in the image?"])
    grab = {}

    def first_input(module, args, kwargs):
        grab.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(first_input, with_kwargs=True)
    params = {**PREFILL, "mustdrop_global_thr": global_thr, "mustdrop_individual_thr": 1.0}
    logits = {}
    try:
        for cache in ("final", "stage"):
            grab.clear()
            with torch.no_grad(), lmms_prune.apply(model, "mustdrop", decode_cache=cache, **params) as handle:
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
                logits[cache] = torch.stack([step[0] for step in out.logits])
                span = handle.pre.records[0].spans_after[0]
                ours = handle.llm.state.stage_kept[-1][0][0]
                layers = [k - 1 for k in handle.llm.stage_layers]
    finally:
        hook.remove()
    with torch.no_grad():
        expected_logits, expected = authors_generate(model, grab["embeds"], span.start, span.length, layers,
                                                     global_thr, 1.0, steps=4)
    assert 0 < ours.numel() < span.length  # the filter dropped some of the tokens that entered the LLM
    assert torch.equal(ours, expected)
    torch.testing.assert_close(logits["final"], expected_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["stage"][0], expected_logits[0], atol=1e-5, rtol=1e-5)
    assert (logits["stage"][1:] - expected_logits[1:]).abs().amax() > 1e-3


@pytest.mark.parametrize("preset", ["mustdrop", "pyramiddrop"])
def test_final_decode_cache_is_proven_by_prune_equals_mask(preset):
    """``decode_cache='final'`` (a generic multi-stage option): prune mode (each stage's gathered cache, its
    columns outside the last stage's set masked at decode) equals mask mode (the full cache, the same columns
    masked) at prefill and every decode step, and a batch equals its samples; PyramidDrop's two stages exercise
    a stage whose cache is neither the full one nor the last."""
    params = ({**PREFILL, "mustdrop_global_thr": 0.01787, "mustdrop_individual_thr": 1.0} if preset == "mustdrop"
              else {"prune_layers": "3,6"})
    checks = ("prune = mask", "batch = samples")
    results = conformance.check_family(preset, "internvl_llama", params={**params, "decode_cache": "final"},
                                       decode=3, checks=checks)
    assert [r.status for r in results] == ["pass"] * len(checks), [(r.check, r.reason) for r in results]


@pytest.mark.cli
def test_the_authors_llm_stages_run_through_lmms_eval(tmp_path):
    """``--model qwen2_5_vl_mustdrop`` with the prefill filter and the decode cut: the options reach the engine
    through ``--model_args`` (``/``-separated layers not needed: ``auto``). ``mustdrop_global_thr=0.5`` with
    ``mustdrop_individual_thr=1``: no token holds half of its image's text attention, so the first stage drops
    every visual token that entered the LLM (the tiny model's 14 layers: at layer 1, ``auto`` of 3/32 ... 15/32),
    and no later stage changes the sequence (``tokens_per_layer``: the sequence length of each layer)."""
    from cli_runs import run_lmms_eval

    from lmms_prune.toy.models import tiny_model_dir

    args = ("keep_ratio=1,mustdrop_threshold=0.8,llm_selector=mustdrop_filter,llm_score=none,prune_layers=auto,"
            "stage_ratio=1,mustdrop_global_thr=0.5,mustdrop_individual_thr=1,decode_cache=final")
    run = run_lmms_eval(tmp_path, "qwen2_5_vl_mustdrop", f"pretrained={tiny_model_dir('qwen2_5_vl')},{args}", limit=2)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    samples = run.efficiency["samples"]
    assert len(samples) == 2
    for s in samples:
        per_layer = s["tokens_per_layer"]
        assert s["visual_after"] == 0 < s["visual_before"]
        assert per_layer[0] > per_layer[1] and set(per_layer[1:]) == {per_layer[-1]}
