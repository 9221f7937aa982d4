"""FEATHER (arXiv 2412.13180) runs the authors' arithmetic (github.com/markendo/FEATHER @ c2a09b2, read in
``prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py``: ``FastVLlamaModel.forward``,
``calculate_attention_weight``; nothing copied): a re-creation of it, written here from reading that code, runs
layer by layer on the tiny Llama decoder and is compared with the ``feather`` preset on the same inputs (kept
sets per stage, prefill logits, cached decode steps). The engine's new signal options (own-layer query/key
attention of layer K-1, without RoPE, soft-maxed over the visual keys) are proven prune == mask on 1-D RoPE and
M-RoPE, and the selection functions by their properties.

The re-creation (the authors' rule, their batch of one): before layer ``i`` runs, where ``i + 1`` is a pruning
layer, layer ``i``'s ``input_layernorm``, ``q_proj`` and ``k_proj`` are applied to its input, NO RoPE, the
last token's query against the image keys only, softmax over those keys in float32, heads averaged. At pruning
layer ``K_1``: ``topk(int(len(image) * (1 - 0.7)))`` UNION ``grid[::3, ::3]`` (``torch.unique``); at ``K_2``:
``topk(int(len(image) * (1 - 0.7)^2))`` where ``image`` is now the survivors of ``K_1``. Kept tokens keep their
original position ids (``position_ids[:, keep_indexs]``).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from test_engine import ATOL, _generate, _one

import lmms_prune
from lmms_prune import selection as sel
from lmms_prune.engine import attention as attn
from lmms_prune.families import get_adapter
from lmms_prune.families.base import ImageSpan
from lmms_prune.methods.base import ImageSignals
from lmms_prune.methods.feather import TopKUniform
from lmms_prune.presets import resolve_config
from lmms_prune.toy.models import build_processor, build_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toys():
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = (build_tiny_model(family, seed=0), build_processor(family))
        return cache[family]

    return get


def _causal(length: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def authors_feather(lm, embeds, start, n, layers, extra=0, reduction=0.7, stride=3):
    """Re-creation of FEATHER's two-stage forward for one sample of 1-D RoPE (batch 1, no padding): ``embeds``
    [1, T, D] is the prompt (a square image of ``n`` tokens from ``start``) then ``extra`` decoded tokens; the
    query is the last PROMPT token. Returns the final-normed hidden states and the kept original indices per
    stage (the authors' ``saved_selected_tokens``)."""
    rope = sys.modules[type(lm.layers[0].self_attn).__module__]
    ratio = 1 - reduction  # their fastV_ratio
    h, pos = embeds, torch.arange(embeds.shape[1])[None]
    image, offset, saved, last, kept = torch.arange(start, start + n), start, [], None, None
    for i, layer in enumerate(lm.layers):
        if i in layers:
            if i == layers[0]:
                top = last.topk(int(len(image) * ratio)).indices + offset
                side = int(math.sqrt(len(image)))
                grid = np.arange(len(image)).reshape(side, side)[::stride, ::stride].flatten()
                top = torch.unique(torch.cat([top, torch.from_numpy(grid) + offset]), sorted=True)
                kept = (top - offset).sort().values
            else:
                top = last.topk(int(len(image) * (ratio * ratio))).indices + offset
                kept = kept[(top - offset).sort().values]
            keep = torch.cat([torch.arange(offset), top, torch.arange(int(image[-1]) + 1, h.shape[1])]).sort().values
            h, pos = h[:, keep], pos[:, keep]
            image = torch.arange(len(top)) + offset
            saved.append(kept.clone())
        if i + 1 in layers:
            a, length = layer.self_attn, h.shape[1]
            hd = a.head_dim
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(1, length, -1, hd).transpose(1, 2)
            k = rope.repeat_kv(a.k_proj(x).view(1, length, -1, hd).transpose(1, 2), q.shape[1] // a.config.num_key_value_heads)
            w = torch.matmul(q[:, :, length - extra - 1:length - extra], k[:, :, image].transpose(2, 3)) / math.sqrt(hd)
            last = torch.softmax(w, dim=-1, dtype=torch.float32).mean(dim=1)[0][0]
        out = layer(h, attention_mask=_causal(h.shape[1], h.dtype), position_ids=pos,
                    position_embeddings=lm.rotary_emb(h, pos))
        h = out[0] if isinstance(out, tuple) else out
    return lm.norm(h), saved


def test_feather_equals_a_recreation_of_the_authors_code_at_prefill_and_decode(toys):
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    adapter = get_adapter(model)
    lm, head = adapter.language_model, model.get_output_embeddings()
    captured = {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: captured.update(x=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    (span,) = adapter.spans(inputs["input_ids"], inputs)[0]
    assert span.grids == [(16, 16)]  # one square image grid, as the authors' prismatic prompt
    with torch.no_grad(), lmms_prune.apply(model, "feather") as handle:
        logits = model(**inputs).logits
        kept = [k[0][0] for k in handle.state.stage_kept]
        layers = list(handle.stage_layers)
        tokens, steps = _generate(model, inputs)
    assert layers == [4, 7]  # 8 and 16 of 32 as fractions of the toy's 14 layers
    with torch.no_grad():
        hidden, expected = authors_feather(lm, captured["x"], span.start, span.num_visual, layers)
        assert [k.tolist() for k in kept] == [e.tolist() for e in expected]
        assert len(kept[1]) == int(len(kept[0]) * 0.09) < int(256 * 0.09)  # counted from stage 1's survivors
        torch.testing.assert_close(logits[0, -1], head(hidden)[0, -1], atol=ATOL, rtol=0)
        for j in range(1, tokens.shape[1]):  # decode step j: the prompt plus the j tokens generated so far
            x = torch.cat([captured["x"], lm.embed_tokens(tokens[:, :j])], 1)
            hidden, _ = authors_feather(lm, x, span.start, span.num_visual, layers, extra=j)
            torch.testing.assert_close(steps[0, j], head(hidden)[0, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["internvl_llama", "qwen2_5_vl"])
def test_feather_prune_equals_mask_mode_at_prefill_and_cached_decode(toys, family):
    """The own-layer row of layer K-1 (no RoPE, visual-key softmax) at each stage, in prune and mask mode: the
    same kept sets, prefill logits and cached decode steps (1-D RoPE and Qwen2.5-VL's M-RoPE)."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    with torch.no_grad():
        with lmms_prune.apply(model, "feather", mode="mask") as handle:
            mask_logits = model(**inputs).logits
            mask_kept = [k[0][0].tolist() for k in handle.state.stage_kept]
            mask_rows = {k: v.clone() for k, v in handle.state.attention.items()}
            mask_tokens, mask_steps = _generate(model, inputs)
        with lmms_prune.apply(model, "feather") as handle:
            logits = model(**inputs).logits
            kept = [k[0][0].tolist() for k in handle.state.stage_kept]
            rows = handle.state.attention
            index = handle.state.keep_index[0]
            tokens, steps = _generate(model, inputs)
    assert kept == mask_kept and len(kept) == 2 and set(kept[1]) < set(kept[0])
    first = handle.stage_layers[0] - 1
    torch.testing.assert_close(rows[first], mask_rows[first], atol=1e-6, rtol=0)  # stage 1 on the full sequence
    for layer in rows:  # every row is a distribution over the visual keys
        torch.testing.assert_close(rows[layer].sum(-1), torch.ones(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[0], mask_logits[0, index], atol=ATOL, rtol=0)
    torch.testing.assert_close(steps, mask_steps, atol=ATOL, rtol=0)
    assert torch.equal(tokens, mask_tokens)


def test_unrotated_own_row_is_the_projections_without_rope_on_qwen3_norms():
    """On Qwen3-VL (q_norm/k_norm before RoPE), the recorded row of layer K-1 equals the softmax over the image
    keys of q_norm(q_proj(x)) . k_norm(k_proj(x)), x = the layer's normed input: RoPE is left out, the norms
    are not."""
    family = "qwen3_vl"
    model, proc = build_tiny_model(family, seed=0), build_processor(family)
    inputs = _one(family, proc)
    adapter = get_adapter(model)
    layer_k = 3
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("h", args[0] if args else kwargs["hidden_states"])

    hook = adapter.layers[layer_k - 1].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad(), lmms_prune.apply(model, "feather", prune_layers=f"{layer_k},{layer_k + 2}") as handle:
        model(**inputs)
        row = handle.state.attention[layer_k - 1][0]
    hook.remove()
    (span,) = adapter.spans(inputs["input_ids"], inputs)[0]
    a = adapter.layers[layer_k - 1].self_attn
    assert hasattr(a, "q_norm") and hasattr(a, "k_norm")
    with torch.no_grad():
        x = adapter.layers[layer_k - 1].input_layernorm(captured["h"])[0]
        hd = a.head_dim
        q = a.q_norm(a.q_proj(x).view(x.shape[0], -1, hd))[-1]  # [H, d]
        k = a.k_norm(a.k_proj(x).view(x.shape[0], -1, hd))[span.visual_positions]  # [n, KV, d]
        k = k.repeat_interleave(q.shape[0] // k.shape[1], dim=1)
        expected = torch.softmax(torch.einsum("hd,nhd->hn", q, k).float() * a.scaling, -1).mean(0)
    torch.testing.assert_close(row[span.visual_positions], expected, atol=1e-5, rtol=1e-4)
    assert float(row.sum()) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("grids", [[(16, 16)], [(7, 11)], [(4, 4), (4, 4), (2, 3)]])
@pytest.mark.parametrize("stride", [1, 2, 3, 5])
def test_strided_grid_is_every_sth_row_and_column_per_block(grids, stride):
    idx = sel.strided_grid(grids, stride)
    assert len(idx) == sum(math.ceil(r / stride) * math.ceil(c / stride) for r, c in grids)
    assert torch.equal(idx, torch.unique(idx)) and int(idx.max()) < sum(r * c for r, c in grids)
    base, expected = 0, []
    for r, c in grids:  # numpy's slicing of each block, the authors' grid[::s, ::s]
        expected.extend((np.arange(r * c).reshape(r, c)[::stride, ::stride].flatten() + base).tolist())
        base += r * c
    assert idx.tolist() == expected
    if stride == 1:
        assert idx.tolist() == list(range(base))


def test_topk_union_contains_the_topk_and_the_extra_tokens():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.rand(50, generator=gen)
        n = int(torch.randint(1, 50, (1,), generator=gen))
        extra = torch.randint(0, 50, (7,), generator=gen)
        out = sel.topk_union(scores, n, extra)
        assert set(out.tolist()) == set(sel.topk(scores, n).tolist()) | set(extra.tolist())
        assert out.tolist() == sorted(set(out.tolist()))
    with pytest.raises(ValueError, match="extra indices"):
        sel.topk_union(torch.rand(5), 2, torch.tensor([5]))


@pytest.mark.parametrize("present", [1, 7, 76, 112, 576, 9999])
def test_present_stage_budget_is_the_int_of_the_present_count(present):
    for stage in (0, 1, 2):
        n = sel.present_stage_budget(present, 0.3, stage)
        assert n == min(present, max(1, int(present * (1 - 0.7) ** (stage + 1))))  # the authors' float
        assert 1 <= n <= present
    with pytest.raises(ValueError, match="stage_ratio"):
        sel.present_stage_budget(10, 1.5, 1)


def test_attention_rows_over_columns_is_the_softmax_over_those_keys():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    cols = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    rows = attn.attention_rows(q, k, None, None, 1, columns=cols)[:, -1]
    kk = k.repeat_interleave(2, dim=1)
    logits = torch.einsum("hd,hsd->hs", q[0, :, -1], kk[0, :, cols[0]]) / 8**0.5
    torch.testing.assert_close(rows[0, cols[0]], torch.softmax(logits, -1).mean(0))
    assert float(rows[0, ~cols[0]].abs().sum()) == 0 and float(rows[1].abs().sum()) == 0  # no visual key: zeros


def test_topk_uniform_adds_the_grid_at_the_first_stage_only():
    cfg = resolve_config("feather")
    span = ImageSpan(start=0, length=49, grids=[(7, 7)])
    scores = torch.arange(49, dtype=torch.float32)  # the last tokens score highest
    selector = TopKUniform(cfg, None)
    first = selector(ImageSignals(sample=0, span=span, offset=0, sample_visual=49), scores, 5)
    grid = sel.strided_grid([(7, 7)], 3).tolist()
    assert first.tolist() == sorted(set(range(44, 49)) | set(grid))
    later = selector(ImageSignals(sample=0, span=span, offset=0, sample_visual=49, present=torch.arange(49)),
                     scores, 5)
    assert later.tolist() == list(range(44, 49))


def test_feather_preset_is_the_authors_schedule_and_keep_ratio_is_an_average():
    cfg = resolve_config("feather")
    assert (cfg.stage_ratio, cfg.score_at, cfg.qk_rope, cfg.qk_softmax, cfg.budget_base, cfg.uniform_stride,
            cfg.positions) == (0.3, "own-K-1", False, "visual", "present", 3, "gap")
    assert cfg.stage_layers(32) == (8, 16) and cfg.stage_layers(28) == (7, 14)
    avg = resolve_config("feather", keep_ratio=0.2)  # a budget given: the stage ratio is solved from it
    assert avg.keep_ratio == 0.2 and avg.stage_ratio is None


def test_feather_keep_ratio_solves_the_stage_ratio_of_the_average(toys):
    """keep_ratio: the stage ratio r of PyramidDrop's average rule (N r, N r^2 after the stages); stage 1 keeps
    int(N r) UNION the grid, stage 2 int(M r^2) of its M survivors."""
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    with torch.no_grad(), lmms_prune.apply(model, "feather", keep_ratio=0.3) as handle:
        model(**inputs)
        kept = [len(k[0][0]) for k in handle.state.stage_kept]
    r = sel.stage_ratio_for_average(0.3, handle.stage_layers, 14)
    grid = len(sel.strided_grid([(16, 16)], 3))
    assert max(int(256 * r), grid) <= kept[0] <= int(256 * r) + grid
    assert kept[1] == max(1, int(kept[0] * r**2))
