"""PyramidDrop runs the authors' arithmetic (github.com/Cooperx521/PyramidDrop @ 6444f304, read in
``llava/model/modeling_llama_pdrop.py: pdrop_forward, pdrop_rank_drop``; nothing copied): a re-creation of it,
written here from reading that code, is run layer by layer on the tiny Llama decoder and compared with the
``pyramiddrop`` preset on the same inputs -- kept sets at every stage, prefill logits and cached decode steps.

What the re-creation does (the authors' rule): before layer ``K_s`` of ``layer_list``, layer ``K_s``'s own
``input_layernorm``, ``q_proj``/``k_proj`` and RoPE (at the current, renumbered positions) are applied to its
input; the last prompt token's row is soft-maxed over the whole causal row in float32, heads averaged, and the
image columns ranked; ``topk(int(N * ratio_list[s + 1]))`` of the ORIGINAL count ``N`` is kept in order; the
shorter sequence is renumbered ``arange(0, cur_len)``. A decoded token takes, at every layer, the full length
minus the tokens dropped before that layer (the authors' decode branch), i.e. it continues the renumbered
sequence, which is what appending it to the re-created prompt does.
"""

from __future__ import annotations

import sys

import pytest
import torch
from test_engine import ATOL, _one

import lmms_prune
from lmms_prune import selection as sel
from lmms_prune.families import get_adapter
from lmms_prune.toy.models import build_processor, build_tiny_model

torch.set_num_threads(1)


def _generate(model, inputs, steps=3):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


@pytest.fixture(scope="module")
def llama():
    model = build_tiny_model("internvl_llama", seed=0)
    proc = build_processor("internvl_llama")
    proc.tokenizer.padding_side = "left"
    return model, proc


def _causal(length: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def authors_pyramiddrop(lm, embeds, start, n, layer_list, ratio, extra=0):
    """Re-creation of ``pdrop_forward`` + ``pdrop_rank_drop`` for one sample of 1-D RoPE (batch 1, no padding).

    ``embeds`` [1, T, D]: the prompt (an image of ``n`` tokens from ``start``) followed by ``extra`` decoded
    tokens; the ranking query is the last PROMPT token. Returns the final-normed hidden states and the kept image
    indices (within the original ``n``) after each stage."""
    rope = sys.modules[type(lm.layers[0].self_attn).__module__]
    ratio_list = [1.0] + [ratio ** (s + 1) for s in range(len(layer_list))]
    h, cur, present, kept = embeds, n, torch.arange(n), []
    for i, layer in enumerate(lm.layers):
        if i in layer_list:
            s = layer_list.index(i)
            keep = int(n * ratio_list[s + 1])
            attn, length = layer.self_attn, h.shape[1]
            hd = attn.head_dim
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, length, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(1, length, -1, hd).transpose(1, 2)
            cos, sin = lm.rotary_emb(x, torch.arange(length)[None])
            q, k = rope.apply_rotary_pos_emb(q, k, cos, sin)
            k = rope.repeat_kv(k, q.shape[1] // k.shape[1])
            query = length - extra - 1
            logits = torch.einsum("hd,hsd->hs", q[0, :, query], k[0, :, : query + 1]) / hd**0.5  # the causal row
            row = torch.softmax(logits.float(), dim=-1).mean(0)
            top = row[start: start + cur].topk(keep).indices.sort().values
            present = present[top]
            kept.append(present.clone())
            h = torch.cat([h[:, :start], h[:, start + top], h[:, start + cur:]], 1)
            cur = keep
        pos = torch.arange(h.shape[1])[None]  # renumbered after every stage
        out = layer(h, attention_mask=_causal(h.shape[1], h.dtype), position_ids=pos,
                    position_embeddings=lm.rotary_emb(h, pos))
        h = out[0] if isinstance(out, tuple) else out
    return lm.norm(h), kept


def test_pyramiddrop_equals_a_recreation_of_the_authors_code_at_prefill_and_decode(llama):
    model, proc = llama
    inputs = _one("internvl_llama", proc)
    adapter = get_adapter(model)
    lm, head = adapter.language_model, model.get_output_embeddings()
    captured = {}
    def grab(module, args, kwargs):
        captured["x"] = kwargs["inputs_embeds"]

    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    (span,) = adapter.spans(inputs["input_ids"], inputs)[0]
    assert span.num_visual == span.length  # one contiguous image, as the authors' LLaVA prompt
    with torch.no_grad(), lmms_prune.apply(model, "pyramiddrop") as handle:
        logits = model(**inputs).logits
        kept = [k[0][0] for k in handle.state.stage_kept]
        layers = list(handle.stage_layers)
        tokens, steps = _generate(model, inputs)
    with torch.no_grad():
        hidden, expected = authors_pyramiddrop(lm, captured["x"], span.start, span.num_visual, layers, 0.5)
        assert [k.tolist() for k in kept] == [e.tolist() for e in expected]
        assert [len(k) for k in kept] == [int(span.num_visual * 0.5 ** s) for s in (1, 2, 3)]
        torch.testing.assert_close(logits[0, -1], head(hidden)[0, -1], atol=ATOL, rtol=0)
        for j in range(1, tokens.shape[1]):  # decode step j: the prompt plus the j tokens generated so far
            x = torch.cat([captured["x"], lm.embed_tokens(tokens[:, :j])], 1)
            hidden, _ = authors_pyramiddrop(lm, x, span.start, span.num_visual, layers, 0.5, extra=j)
            torch.testing.assert_close(steps[0, j], head(hidden)[0, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["internvl_llama", "qwen2_5_vl"])
def test_renumbered_stages_give_each_layer_contiguous_positions_and_decode_continues(family):
    """positions='contiguous' (the preset): a layer of stage s receives position ids 0..n_s-1 (Qwen2.5-VL's text
    row likewise) and the k-th decoded token n_s + k; positions='original' keeps the gathered original ids."""
    model, proc = build_tiny_model(family, seed=0), build_processor(family)
    inputs = _one(family, proc)
    length = inputs["input_ids"].shape[1]
    for positions in ("contiguous", "original"):
        seen: dict[int, list[torch.Tensor]] = {}
        with torch.no_grad(), lmms_prune.apply(model, "pyramiddrop", positions=positions) as handle:
            hooks = [get_adapter(model).layers[k].register_forward_pre_hook(
                lambda m, a, kw, k=k, seen=seen: seen.setdefault(k, []).append(kw["position_ids"].reshape(-1)),
                with_kwargs=True) for k in handle.stage_layers]
            _generate(model, inputs)
            index = [i[0] for i in handle.state.stage_index]
            for h in hooks:
                h.remove()
        for s, k in enumerate(handle.stage_layers):
            prefill, *decode = seen[k]
            n = index[s].numel()
            if positions == "contiguous":
                assert prefill.tolist() == list(range(n))
                assert [d.tolist() for d in decode] == [[n + j] for j in range(len(decode))]
            else:
                assert prefill.tolist() == index[s].tolist()
                assert [d.tolist() for d in decode] == [[length + j] for j in range(len(decode))]


def test_pyramiddrop_stage_budgets_are_the_authors_int_of_the_original_count():
    """int(N * ratio^s) of the original N (authors), at least 1; budget_rounding='round' keeps our rule."""
    assert sel.stage_budgets(7, 0.5, 3, rounding="int") == [3, 1, 1]  # int gives 0 at stage 3: one is kept
    assert sel.stage_budgets(7, 0.5, 3, rounding="round") == [4, 2, 1]
    assert sel.stage_budgets(576, 0.5, 3, rounding="int") == [288, 144, 72]
    for n in range(1, 200):
        assert sel.stage_budgets(n, 0.3, 3, rounding="int") == [max(1, int(n * 0.3 ** s)) for s in (1, 2, 3)]
    with pytest.raises(ValueError, match="budget_rounding='floor'"):
        sel.stage_budgets(7, 0.5, 3, rounding="floor")


def test_pyramiddrop_options_give_back_our_earlier_reading():
    from lmms_prune.presets import resolve_config

    cfg = resolve_config("pyramiddrop")
    assert (cfg.score_at, cfg.budget_rounding, cfg.positions) == ("K", "int", "contiguous")
    old = resolve_config("pyramiddrop", score_at="K-1", budget_rounding="round", positions="original")
    assert [c.effective_score_layer for c in old.stage_configs(32)] == [7, 15, 23]
    assert [c.effective_score_layer for c in cfg.stage_configs(32)] == [8, 16, 24]
    with pytest.raises(ValueError, match="query='text_mean', query_rows=1 with score_at='K'"):
        resolve_config("pyramiddrop", query="text_mean")
    assert resolve_config("pyramiddrop", query="text_mean", score_at="K-1").query == "text_mean"
