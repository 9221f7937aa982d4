"""VScan (``vscan``) runs the authors' arithmetic (github.com/Tencent/SelfEvolvingAgent @ a82450e1, folder ``VScan``,
read in ``qwen/model/qwen2_5_vl_utils.py``: ``window_selection``, ``token_merging``;
``qwen/model/qwen2_5_vl_custom.py``: ``Qwen2_5_VLForConditionalGeneration_X.forward``, ``layer_prune``;
``llava/model/llava_arch.py``: ``window_cls_selection``, ``token_merging``, ``encode_images``;
``llava/model/modeling_llama_x.py``: ``forward_x``, ``layer_prune``; nothing copied).

Re-creations written here from reading that code are compared with ours on identical inputs: the scans and the
merge (pure tensors), and the whole LLaVA pipeline on the tiny LLaVA model (vision attention -> scans -> merge of
the projected tokens -> middle-layer pruning by that layer's own query/key), prefill and decode. Then the
selection's properties, and the composed engine path's equivalences (prune = mask of the LLM stage on the shrunk
inputs at prefill and every cached decode step, cached decoding = recomputation, batch = samples, nothing pruned
= unpruned).

The authors' rules re-created: local scan (Qwen ``window_selection``): tokens in descending attention, taken while
their ``ws x ws`` window (index // ws, clamped to the last window) holds fewer than ``ceil(n / windows)``; LLaVA's
``window_cls_selection``: the top ``n // 16`` of each of the 16 ``6 x 6`` windows. Global scan: the deep layer's
attention with the local picks zeroed, ``topk(n - n // 2)``. Merge: every other token joins the kept token of
highest cosine similarity (``argmax``), each kept token becomes ``(x + sum joined) / (1 + count)``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import lmms_prune
from lmms_prune import selection as sel
from lmms_prune.conformance import (
    Tolerance,
    equal_prefill_and_decode,
    generate,
    image_inputs,
    photo,
    run,
    same_tokens,
    steps_close,
)
from lmms_prune.families import get_adapter
from lmms_prune.presets import resolve_config
from lmms_prune.toy.models import build_processor, build_tiny_model

torch.set_num_threads(1)
TOL = Tolerance(torch.float32)


# ------------------------------------------------------------------------------------- authors' re-creations
def authors_window_selection(attn: torch.Tensor, num_keep: int, h: int, w: int, ws: int = 4) -> torch.Tensor:
    """VScan's Qwen ``window_selection`` on an ``h x w`` merged-token grid."""
    nh, nw = math.floor(h / ws), math.floor(w / ws)
    limit = math.ceil(num_keep / (nh * nw))
    counter = torch.zeros(nh, nw, dtype=torch.int)
    keep = []
    for index in torch.argsort(attn, descending=True).tolist():
        x, y = (index // w) // ws, (index % w) // ws
        x, y = (nh - 1 if x == nh else x), (nw - 1 if y == nw else y)
        if counter[x, y] < limit:
            counter[x, y] += 1
            keep.append(index)
        if len(keep) >= num_keep:
            break
    return torch.tensor(keep)


def authors_window_cls_selection(attn: torch.Tensor, num_keep: int, ws: int = 6) -> torch.Tensor:
    """VScan's LLaVA ``window_cls_selection`` on the 24 x 24 grid: the top ``num_keep // 16`` of each window."""
    grid = attn.view(24, 24)
    k = num_keep // ((24 // ws) ** 2)
    out = []
    for i in range(24 // ws):
        for j in range(24 // ws):
            top = grid[i * ws:(i + 1) * ws, j * ws:(j + 1) * ws].reshape(-1).topk(k).indices
            out += [(i * ws + t // ws) * 24 + j * ws + t % ws for t in top.tolist()]
    return torch.tensor(out)


def authors_scans(local: torch.Tensor, deep: torch.Tensor, n: int, h: int, w: int, llava: bool) -> torch.Tensor:
    """The kept indices of ``encode_images`` (LLaVA) / the Qwen ``forward``: local half, global rest, sorted."""
    picks = (authors_window_cls_selection(local, int(n * 0.5)) if llava
             else authors_window_selection(local, n // 2, h, w))
    deep = deep.clone()
    deep[picks] = 0
    return torch.cat([picks, deep.topk(n - picks.numel()).indices]).sort().values


def authors_token_merging(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """VScan's ``token_merging`` (scaling 1): ``[k, D]`` merged kept tokens in ascending order."""
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[keep] = True
    kept, rest = x[mask], x[~mask]
    nearest = F.cosine_similarity(rest.unsqueeze(1), kept.unsqueeze(0), dim=2).argmax(1)
    out = kept.clone().scatter_add_(0, nearest[:, None].expand(-1, x.shape[1]), rest)
    count = torch.zeros(kept.shape[0]).scatter_add_(0, nearest, torch.ones(nearest.numel()))
    return out / (1 + count[:, None])


# ------------------------------------------------------------------------------------- selection vs authors
@pytest.mark.parametrize(("h", "w", "n"), [(24, 24, 53), (13, 18, 39), (9, 7, 10), (16, 16, 40)])
def test_local_scan_equals_the_authors_window_selection(h, w, n):
    gen = torch.Generator().manual_seed(h * w + n)
    attn = torch.rand(h * w, generator=gen)
    ours = sel.local_scan(attn, [(h, w)], n, window=4)
    assert ours.tolist() == authors_window_selection(attn, n, h, w).sort().values.tolist()


@pytest.mark.parametrize("n", [32, 48, 96])
def test_local_scan_equals_the_authors_llava_windows_where_16_divides_the_budget(n):
    attn = torch.rand(576, generator=torch.Generator().manual_seed(n))
    ours = sel.local_scan(attn, [(24, 24)], n, window=6)
    assert ours.tolist() == authors_window_cls_selection(attn, n).sort().values.tolist()


@pytest.mark.parametrize(("h", "w", "n", "llava"), [(24, 24, 64, True), (24, 24, 96, True), (24, 24, 192, True),
                                                     (13, 18, int(0.167 * 234), False), (30, 22, 110, False)])
def test_vscan_select_equals_the_authors_global_and_local_scans(h, w, n, llava):
    gen = torch.Generator().manual_seed(n)
    local, deep = torch.rand(h * w, generator=gen), torch.rand(h * w, generator=gen)
    ours = sel.vscan_select(local, deep, [(h, w)], n, window=6 if llava else 4)
    assert ours.tolist() == authors_scans(local, deep, n, h, w, llava).tolist()


@pytest.mark.parametrize(("n_tokens", "k"), [(576, 96), (234, 39), (50, 1)])
def test_nearest_merge_equals_the_authors_token_merging(n_tokens, k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(n_tokens, 12, generator=gen)
    keep = torch.randperm(n_tokens, generator=gen)[:k].sort().values
    merge = sel.nearest_merge(x, keep)
    assert merge.slots.tolist() == keep.tolist() and merge.index.numel() == 0
    torch.testing.assert_close(sel.merged_embeddings(x, merge), authors_token_merging(x, keep), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- properties
@pytest.mark.parametrize(("grids", "n", "window"), [([(24, 24)], 96, 6), ([(7, 5)], 9, 4), ([(3, 2)], 5, 4),
                                                    ([(16, 16), (16, 16), (16, 16)], 40, 4), ([(11, 13)], 1, 4),
                                                    ([(11, 13)], 143, 4)])
def test_scans_keep_n_unique_tokens_with_the_local_half_spread_over_windows(grids, n, window):
    total = sum(r * c for r, c in grids)
    gen = torch.Generator().manual_seed(n)
    local, deep = torch.rand(total, generator=gen), torch.rand(total, generator=gen)
    kept = sel.vscan_select(local, deep, grids, n, window)
    assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == n and 0 <= kept.min() <= kept.max() < total
    ids = sel.window_ids(grids, window)
    windows = int(ids.max()) + 1
    picks = sel.local_scan(local, grids, n // 2, window)
    assert torch.bincount(ids[picks], minlength=windows).max() <= math.ceil((n // 2) / windows)
    assert set(picks.tolist()) <= set(kept.tolist())
    if n == 1:  # no local pick: the global scan's top token
        assert kept.tolist() == [int(deep.argmax())]


def test_window_ids_fold_the_edge_rows_and_columns_into_the_last_windows():
    ids = sel.window_ids([(9, 7), (3, 3)], 4).tolist()
    grid = torch.tensor(ids[:63]).view(9, 7)
    assert grid[8].tolist() == grid[4].tolist() and grid[:, 6].tolist() == grid[:, 4].tolist()
    assert sorted(set(ids[:63])) == [0, 1] and set(ids[63:]) == {2}  # 9 x 7: 2 x 1 windows; 3 x 3: one


@pytest.mark.parametrize("k", [1, 7, 49])
def test_every_token_is_kept_or_merged_into_exactly_one_kept_token(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(50, 6, generator=gen)
    keep = torch.randperm(50, generator=gen)[:k].sort().values
    merge = sel.nearest_merge(x, keep)
    members = merge.weights > 0
    assert members.sum(0).tolist() == [1] * 50  # each token in exactly one group
    assert members[torch.arange(k), keep].all()  # each group holds its kept token
    torch.testing.assert_close(merge.weights.sum(1), torch.ones(k))
    others = torch.ones(50, dtype=torch.bool)
    others[keep] = False
    unit = F.normalize(x, dim=-1)
    best = (unit[others] @ unit[keep].T).max(1).values
    got = (unit[others] * unit[keep][members[:, others].float().argmax(0)]).sum(1)
    torch.testing.assert_close(got, best)  # each joined its most similar kept token
    assert torch.equal(sel.nearest_merge(x, torch.arange(50)), torch.arange(50))  # nothing to merge


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="window=0"):
        sel.window_ids([(4, 4)], 0)
    with pytest.raises(ValueError, match="cover 16 tokens"):
        sel.local_scan(torch.rand(20), [(4, 4)], 3, 2)
    with pytest.raises(ValueError, match="unique"):
        sel.nearest_merge(torch.randn(5, 2), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="vscan_window=0"):
        resolve_config("vscan", vscan_window=0)
    with pytest.raises(ValueError, match="does not use"):
        resolve_config("visionzip", stage_ratio=0.5)


def test_preset_is_the_authors_schedule_and_its_llm_stage_is_a_composed_config():
    cfg = resolve_config("vscan")
    pre, llm = cfg.split_stages(32)
    assert (cfg.keep_ratio, cfg.stage_ratio) == (0.167, 0.333)  # the Qwen scripts' 0.167 then [0.333]
    assert (pre.stage, pre.selector, pre.llm_selector) == ("pre_llm", "vscan", "none")
    assert (llm.stage, llm.selector, llm.score, llm.prune_layers, llm.score_at) == ("llm", "topk", "attention", (16,),
                                                                                    "K")
    assert cfg.split_stages(28)[1].prune_layers == (14,)  # Qwen2.5-VL-7B's layer 14 of 28
    assert cfg.llm_positions is None and pre.positions == llm.positions == "contiguous"  # the LLaVA code renumbers
    assert int(576 * cfg.keep_ratio) == 96  # LLaVA-1.5: 96 tokens into the LLM


# ------------------------------------------------------------------------------------- the LLaVA pipeline
@pytest.fixture(scope="module")
def llava():
    model, proc = build_tiny_model("llava"), build_processor("llava")
    proc.tokenizer.padding_side = "left"
    return model, proc


def _causal(length: int) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]


def authors_llava_vscan(model, inputs, n, layer, ratio, extra_tokens=None):
    """Re-creation of VScan's LLaVA path on one prompt (batch 1): the tower's [CLS] attention rows (heads
    averaged) at the early layer (local) and the feature layer (global), the scans, the projector, the merge, the
    shortened prompt numbered 0..T'-1, then ``layer_prune`` before decoder layer ``layer``: that layer's input
    norm, q/k projections and RoPE, the last prompt token's causal row soft-maxed, heads averaged, image columns,
    ``topk(int(n * ratio))`` kept in order, renumbered. Returns the final-normed hidden states and the kept
    original indices after each stage."""
    tower, lm = model.model.vision_tower, model.model.language_model
    old, tower.config._attn_implementation = tower.config._attn_implementation, "eager"
    try:
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = old
    depth = len(out.attentions)
    cls_rows = torch.stack(out.attentions)[:, 0, :, 0, 1:].mean(1)  # [layers, 576]
    local, deep = cls_rows[max(0, depth // 4 - 1)], cls_rows[model.config.vision_feature_layer]
    keep = authors_scans(local, deep, n, 24, 24, llava=True)
    features = model.model.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][0, 1:])
    image = authors_token_merging(features, keep)
    ids = inputs["input_ids"][0]
    start = int((ids == model.config.image_token_id).nonzero()[0])
    text = lm.embed_tokens(ids[None])
    h = torch.cat([text[:, :start], image[None], text[:, start + 576:]], 1)
    if extra_tokens is not None:
        h = torch.cat([h, lm.embed_tokens(extra_tokens)], 1)
    extra = 0 if extra_tokens is None else extra_tokens.shape[1]
    rope = sys.modules[type(lm.layers[0].self_attn).__module__]
    kept = keep
    for i, block in enumerate(lm.layers):
        if i == layer:
            attn, length = block.self_attn, h.shape[1]
            x = block.input_layernorm(h)
            q = attn.q_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, length, -1, attn.head_dim).transpose(1, 2)
            cos, sin = lm.rotary_emb(x, torch.arange(length)[None])
            q, k = rope.apply_rotary_pos_emb(q, k, cos, sin)
            k = rope.repeat_kv(k, q.shape[1] // k.shape[1])
            query = length - extra - 1
            logits = torch.einsum("hd,hsd->hs", q[0, :, query], k[0, :, :query + 1]) / attn.head_dim ** 0.5
            row = torch.softmax(logits.float(), dim=-1).mean(0)  # the causal row of the last prompt token
            top = row[start: start + n].topk(int(n * ratio)).indices.sort().values
            kept = kept[top]
            h = torch.cat([h[:, :start], h[:, start + top], h[:, start + n:]], 1)
        pos = torch.arange(h.shape[1])[None]
        o = block(h, attention_mask=_causal(h.shape[1]), position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
        h = o[0] if isinstance(o, tuple) else o
    return lm.norm(h), keep, kept


def test_vscan_equals_a_recreation_of_the_authors_llava_code_at_prefill_and_decode(llava):
    model, proc = llava
    inputs = image_inputs("llava", proc, [[photo()]], ["Where is the cup on the table?"], "cpu", torch.float32)
    head = model.get_output_embeddings()
    with torch.no_grad(), lmms_prune.apply(model, "vscan", keep_tokens=96, stage_ratio=1 / 3,
                                           budget_rounding="round") as handle:
        logits = model(**inputs).logits
        record = handle.records[0]
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        layer = handle.stage_layers[0]
    tokens, steps = out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)
    assert layer == 7  # the middle of the tiny model's 14 layers (LLaVA-1.5-7B: 16 of 32)
    with torch.no_grad():
        hidden, first, kept = authors_llava_vscan(model, inputs, 96, layer, 1 / 3 + 1e-9)
        assert record.kept[0].tolist() == kept.tolist() and len(kept) == 32  # the LLaVA script's 96 then 32
        assert handle.pre.records[0].kept[0].tolist() == first.tolist()
        torch.testing.assert_close(logits[0, -1], head(hidden)[0, -1], atol=TOL.atol, rtol=0)
        for j in range(1, tokens.shape[1]):  # decode step j: the prompt plus the j tokens generated so far
            hidden, _, _ = authors_llava_vscan(model, inputs, 96, layer, 1 / 3 + 1e-9, tokens[:, :j])
            torch.testing.assert_close(steps[0, j], head(hidden)[0, -1], atol=TOL.atol, rtol=0)


# ------------------------------------------------------------------------------------- the composed engine path
@pytest.mark.parametrize(("family", "positions"), [("qwen2_5_vl", "contiguous"), ("qwen2_5_vl", "original"),
                                                   ("internvl3", "contiguous"), ("llava_next", "original")])
def test_composed_prune_equals_mask_mode_of_the_llm_stage_on_the_shrunk_inputs(left_padded_toys, family, positions):
    """Prefill logits at the kept positions, every cached decode step and the generated tokens agree; the kept
    sets agree and each is unique, ascending and within the image."""
    model, proc = left_padded_toys(family)
    inputs = image_inputs(family, proc, [[photo()]], ["Where is the cup on the table?"], "cpu", torch.float32)
    pruned = run(model, inputs, "vscan", positions=positions, stage_ratio=0.5, decode=4)
    mask = run(model, inputs, "vscan", mode="mask", positions=positions, stage_ratio=0.5, decode=4)
    assert pruned.kept == mask.kept and pruned.index is not None
    equal_prefill_and_decode(pruned, mask, TOL)
    rec = pruned.records[0]
    n_in = sum(max(1, round(0.167 * s.num_visual)) for s in rec.spans)
    assert rec.visual_after == sum(max(1, int(0.5 * max(1, round(0.167 * s.num_visual)))) for s in rec.spans)
    assert rec.kv_lengths[0] == rec.seq_len_before - rec.visual_before + n_in  # layers before K: the shrunk prompt
    assert rec.kv_lengths[-1] == rec.seq_len_after


def test_composed_batch_equals_its_samples(left_padded_toys):
    model, proc = left_padded_toys("internvl3")
    texts = ("Where is the cup?", "Describe the picture in a few words please, with detail.")
    sizes = ((300, 200), (200, 420))
    both = run(model, image_inputs("internvl3", proc, [[photo(s)] for s in sizes], texts, "cpu", torch.float32),
               "vscan", decode=3)
    for row, (size, text) in enumerate(zip(sizes, texts)):
        one = run(model, image_inputs("internvl3", proc, [[photo(size)]], [text], "cpu", torch.float32), "vscan",
                  decode=3)
        assert both.kept[row] == one.kept[0]
        assert same_tokens(both.tokens[row], one.tokens[0], both.steps[row], one.steps[0], TOL)


@pytest.mark.parametrize(("family", "positions"), [("qwen2_5_vl", "original"), ("llava", "contiguous")])
def test_nothing_pruned_equals_the_unpruned_model_and_remove_restores(left_padded_toys, llava, family, positions):
    """Qwen: with its M-RoPE grid positions kept (the authors' Qwen code); 'contiguous' renumbers a Qwen prompt
    even where nothing is dropped, as every pre-LLM method does."""
    model, proc = left_padded_toys(family) if family != "llava" else llava
    inputs = image_inputs(family, proc, [[photo()]], ["Where is the cup?"], "cpu", torch.float32)
    with torch.no_grad():
        reference = model(**inputs).logits
        with lmms_prune.apply(model, "vscan", keep_ratio=1.0, stage_ratio=1.0, positions=positions) as handle:
            kept = model(**inputs).logits
            rec = handle.records[0]
        after = model(**inputs).logits
    assert rec.visual_after == rec.visual_before and rec.kept[0].tolist() == list(range(rec.visual_before))
    torch.testing.assert_close(kept, reference, atol=TOL.atol, rtol=0)
    assert torch.equal(after, reference)


def test_any_pre_llm_method_composes_with_an_llm_stage(left_padded_toys):
    """The composition names no method: vispruner before the LLM, then FastV's attention top-k at layer 2."""
    model, proc = left_padded_toys("qwen2_5_vl")
    inputs = image_inputs("qwen2_5_vl", proc, [[photo()]], ["Where is the cup?"], "cpu", torch.float32)
    params = dict(keep_ratio=0.5, llm_selector="topk", prune_layers="2", stage_ratio=0.5)
    pruned = run(model, inputs, "vispruner", decode=3, **params)
    mask = run(model, inputs, "vispruner", mode="mask", decode=3, **params)
    equal_prefill_and_decode(pruned, mask, TOL)
    rec = pruned.records[0]
    assert rec.visual_after == int(0.5 * round(0.5 * rec.visual_before))
    assert rec.kv_lengths[1] > rec.kv_lengths[2] == rec.seq_len_after


def test_composed_refusals_name_the_fix(left_padded_toys):
    with pytest.raises(ValueError, match="stage_ratio"):
        resolve_config("vispruner", llm_selector="topk", prune_layers="2")
    with pytest.raises(ValueError, match="LLM stage after the pre-LLM stage is refused.*subset"):
        resolve_config("vispruner", llm_selector="dart", prune_layers="2", stage_ratio=0.5)
    model, _ = left_padded_toys("qwen2_5_vl")
    depth = get_adapter(model).num_layers
    with pytest.raises(ValueError, match=f"prune_layers.*{depth} decoder layers"):
        lmms_prune.apply(model, "vscan", prune_layers=str(depth))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl3"])
def test_composed_cached_decoding_equals_recomputation_with_the_kept_sets_frozen(left_padded_toys, family):
    """Generation with the KV cache equals generation that recomputes the whole sequence at every step
    (``use_cache=False``), the LLM stage's kept set frozen to the cached run's (recomputing through the method
    itself would rank with another last token); the pre-LLM stage reads the image only, so it selects the same."""
    model, proc = left_padded_toys(family)
    inputs = image_inputs(family, proc, [[photo()]], ["Where is the cup on the table?"], "cpu", torch.float32)
    with torch.no_grad(), lmms_prune.apply(model, "vscan", stage_ratio=0.5) as handle:
        tokens, steps = generate(model, inputs, 4)
        frozen = handle.llm.records[0].kept[0]
        kept = handle.records[0].kept[0]
    with torch.no_grad(), lmms_prune.apply(model, "vscan", stage_ratio=0.5) as handle:
        handle.llm.selectors[0] = lambda image, scores, n: frozen
        full_tokens, full_steps = generate(model, inputs, 4, use_cache=False)
        assert handle.records[0].kept[0].tolist() == kept.tolist()
    assert same_tokens(tokens, full_tokens, steps, full_steps, TOL)
    assert steps_close(steps, full_steps, tokens, full_tokens, TOL)


def test_composed_records_map_the_llm_stage_back_to_original_tokens_after_a_merging_stage(llava):
    """VisionZip ([CLS] first, then its kept tokens, then merged ones) followed by an LLM stage: the composed record
    lists the original tokens still present and counts the new (merged or [CLS]) ones apart."""
    model, proc = llava
    inputs = image_inputs("llava", proc, [[photo()]], ["Where is the cup?"], "cpu", torch.float32)
    with torch.no_grad(), lmms_prune.apply(model, "visionzip", keep_tokens=64, llm_selector="topk",
                                           prune_layers="4", stage_ratio=0.5) as handle:
        model(**inputs)
        pre, llm, rec = handle.pre.records[0], handle.llm.records[0], handle.records[0]
    source = pre.sources[0]
    assert source.numel() == 64 and (source < 0).sum() == pre.merged[0]  # [CLS] + contextual tokens are new
    assert rec.kept[0].tolist() == source[llm.kept[0]][source[llm.kept[0]] >= 0].tolist()
    assert set(rec.kept[0].tolist()) <= set(pre.kept[0].tolist())
    assert rec.visual_after == llm.visual_after == rec.kept[0].numel() + rec.merged[0] == 32
    assert rec.visual_before == 576 and rec.seq_len_before == pre.seq_len_before
