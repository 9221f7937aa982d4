"""SparseVLM (text raters, rank-adaptive multi-stage pruning, recycling) and merged tokens inside the LLM.

Engine proofs at an LLM stage: a merge whose groups are singletons equals pruning the same set; merging a group
of identical hidden states equals keeping one of them; the sparsevlm preset equals mask mode at prefill and 8
cached decode steps, stage by stage. Property tests of the pure functions (raters, adaptive count, DPC-kNN,
recycling, the stage selection). ``score=trend`` is the score of every stage of sparsevlm and pyramiddrop."""

from __future__ import annotations

import pytest
import torch
from test_engine import ATOL, _generate, _image, _num_visual, _one

import lmms_prune
from lmms_prune import scores as S
from lmms_prune import selection as sel
from lmms_prune.families import get_adapter
from lmms_prune.presets import resolve_config
from lmms_prune.toy.models import RECIPES

torch.set_num_threads(1)
FAMILIES_MS = ("internvl_llama", "qwen2_5_vl")


def _run(model, inputs, method, selectors=None, mode="prune", **params):
    """Logits, greedy tokens, step logits, the record and the state of one run (``selectors``: per stage)."""
    with torch.no_grad(), lmms_prune.apply(model, method, mode=mode, **params) as handle:
        if selectors is not None:
            handle.selectors = selectors
        logits = model(**inputs).logits
        state = handle.state
        tokens, steps = _generate(model, inputs)
        return logits, tokens, steps, handle.records[0], state


# ------------------------------------------------------------------------------ engine: merges inside the LLM
@pytest.mark.parametrize("family", FAMILIES_MS)
def test_llm_stage_singleton_merge_equals_pruning_the_same_set(toys, family):
    """Stage 2 of two keeps some tokens as they are and the others as one-token groups at their own slots."""
    model, proc = toys(family)
    inputs = _one(family, proc)

    def prune(image, scores, k):
        return torch.arange(0, image.num_tokens, 3)

    def merge(image, scores, k):
        keep = torch.arange(0, image.num_tokens, 3)
        slots = keep[1::2]
        return sel.Merge(keep[0::2], sel.group_weights([[int(i)] for i in slots], image.num_tokens), slots)

    first = lambda image, scores, k: torch.arange(0, image.num_tokens, 2)  # noqa: E731
    params = dict(prune_layers="2,5", stage_ratio=0.5, seed=0)
    ref = _run(model, inputs, "random", [first, prune], **params)
    out = _run(model, inputs, "random", [first, merge], **params)
    torch.testing.assert_close(out[0], ref[0], atol=ATOL, rtol=0)
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], atol=ATOL, rtol=0)
    assert out[3].kept[0].tolist() == ref[3].kept[0].tolist() and out[3].kv_lengths == ref[3].kv_lengths
    present = len(out[4].stage_kept[0][0][0])
    assert out[3].merged == [len(torch.arange(0, present, 3)[1::2])] and ref[3].merged == []


@pytest.mark.parametrize("family", FAMILIES_MS)
def test_llm_stage_merging_identical_hidden_states_equals_keeping_one(toys, family):
    """A hook on layer K-1 makes tokens a and b identical at layer K's input; merging {a, b} at a's slot equals
    keeping a alone (b removed), at prefill and in cached decoding."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    span = get_adapter(model).spans(inputs["input_ids"], inputs)[0][0]
    pos = span.visual_positions
    a, b, k = 4, 9, 3
    base = [0, 2, 20, 30]

    def same(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[1] < int(pos[b]) + 1:
            return None
        hidden = hidden.clone()
        hidden[:, pos[b]] = hidden[:, pos[a]]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    layer = model.model.language_model.layers[k - 1]
    handle = layer.register_forward_hook(same)
    try:
        ref = _run(model, inputs, "fastv", [lambda image, s, n: torch.tensor([*base, a])], prune_layer=k)
        out = _run(model, inputs, "fastv", [lambda image, s, n: sel.Merge(
            torch.tensor(base), sel.group_weights([[a, b]], image.num_tokens), torch.tensor([a]))], prune_layer=k)
    finally:
        handle.remove()
    torch.testing.assert_close(out[0], ref[0], atol=ATOL, rtol=0)
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], atol=ATOL, rtol=0)
    assert out[3].merged == [1] and out[3].kept[0].tolist() == sorted([*base, a])


@pytest.mark.parametrize("mode", ["prune", "mask"])
def test_llm_stage_merged_token_is_its_groups_mean_at_its_slot(toys, mode):
    """Stage 2 of two (layer 5) merges three tokens still present into the first one's slot: layer 5's input
    there is the mean of their outputs of layer 4, the other kept tokens are untouched."""
    model, proc = toys("qwen2_5_vl")
    inputs = _one("qwen2_5_vl", proc)
    layers = model.model.language_model.layers
    seen = {}

    def out4(module, args, out):
        if "out" not in seen:
            seen["out"] = (out[0] if isinstance(out, tuple) else out).clone()

    def in5(module, args, kwargs):
        if "in" not in seen:
            seen["in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    first = lambda image, scores, k: torch.arange(0, image.num_tokens, 2)  # noqa: E731
    group = [1, 4, 6]  # indices among stage 1's survivors

    def merge(image, scores, k):
        return sel.Merge(torch.tensor([0, 2, 3]), sel.group_weights([group], image.num_tokens),
                         torch.tensor([group[0]]))

    with torch.no_grad(), lmms_prune.apply(model, "random", mode=mode, prune_layers="2,5", stage_ratio=0.5,
                                           seed=0) as handle:
        handle.selectors = [first, merge]
        hooks = [layers[4].register_forward_hook(out4), layers[5].register_forward_pre_hook(in5, with_kwargs=True)]
        try:
            model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        st = handle.state
        span = st.spans[0][0]
        present = st.stage_kept[0][0][0]
        orig = span.visual_positions[present]
        cols_before = orig if mode == "mask" else handle._inverse(0)[0, orig]
        cols_after = orig if mode == "mask" else handle._inverse(1)[0, orig]
    expected = seen["out"][0, cols_before[group]].float().mean(0).to(seen["out"].dtype)
    torch.testing.assert_close(seen["in"][0, cols_after[group[0]]], expected)
    for j in (0, 2, 3):
        torch.testing.assert_close(seen["in"][0, cols_after[j]], seen["out"][0, cols_before[j]])
    assert st.stage_kept[1][0][0].tolist() == present[[0, 1, 2, 3]].tolist()


def test_llm_merge_without_slots_is_refused(toys):
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    bad = lambda image, s, n: sel.Merge(torch.tensor([0, 1]), sel.group_weights([[3, 4]], image.num_tokens))  # noqa: E731
    with pytest.raises(ValueError, match="one slot per merged token"):
        _run(model, inputs, "fastv", [bad], prune_layer=2)


# ------------------------------------------------------------------------------ the preset in the engine
@pytest.mark.parametrize("family", FAMILIES_MS)
def test_sparsevlm_equals_mask_mode_prefill_and_decode(toys, family):
    model, proc = toys(family)
    inputs = _one(family, proc)
    n = _num_visual(model, inputs)
    mask = _run(model, inputs, "sparsevlm", mode="mask")
    out = _run(model, inputs, "sparsevlm")
    kept = [k[0][0].tolist() for k in out[4].stage_kept]
    assert kept == [k[0][0].tolist() for k in mask[4].stage_kept] and len(kept) == 3
    torch.testing.assert_close(out[0][0], mask[0][0, out[4].keep_index[0]], atol=ATOL, rtol=0)
    assert torch.equal(out[1], mask[1])
    torch.testing.assert_close(out[2], mask[2], atol=ATOL, rtol=0)
    rec = out[3]
    assert rec.visual_after == len(kept[-1]) and rec.merged[0] >= 1  # recycled tokens survive to the end
    full = inputs["input_ids"].shape[1]
    layers = sel.depth_scaled_layers(len(rec.kv_lengths), (3 / 32, 7 / 32, 16 / 32))
    assert [k - (full - n) for k in rec.kv_lengths] == [
        n if i < layers[0] else len(kept[sum(k <= i for k in layers) - 1]) for i in range(len(rec.kv_lengths))]


def test_sparsevlm_stage_is_the_pure_selection_on_the_recorded_signals(toys):
    """Stage 2 (mask mode: full-length signals): raters from the text rows at K_2-1 over stage 1's survivors,
    the rank-adaptive top-k of their importance plus the recycled slots."""
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    with torch.no_grad(), lmms_prune.apply(model, "sparsevlm", mode="mask") as handle:
        layers = handle.stage_layers
        model(**inputs)
        st = handle.state
        span = st.spans[0][0]
        present = st.stage_kept[0][0][0]
        rows = st.text_attention[layers[1] - 1][0][:, span.visual_positions[present]]
        tail = st.seq_len - (span.start + span.length)
        rows = rows[rows.shape[0] - tail:]
        importance = S.rater_importance(rows)
        n = handle._stage_counts(span.num_visual)[1]
        raters = S.select_raters(rows)
    torch.testing.assert_close(st.stage_scores[1][0][0], importance)
    keep = sel.adaptive_keep_count(rows[raters], n)
    top = sel.topk(importance, keep)
    local = set(torch.searchsorted(present, st.stage_kept[1][0][0]).tolist())
    slots = sum(len(p) for _, p, _ in st.stage_recycled.get(1, []))
    assert set(top.tolist()) <= local and len(local) == keep + slots and slots >= 1


def _prior(model, proc, tmp_path, layer):
    from lmms_prune.calibration import calibrate_prior
    from lmms_prune.engine.prior import save_prior

    prior = calibrate_prior(model, proc, [_image()], layer=layer, max_num=2)
    return save_prior(tmp_path / "p.pt", prior.means, prior.counts, prior.meta)


@pytest.mark.parametrize(("method", "query"), [("sparsevlm", "raters"), ("pyramiddrop", "last")])
def test_trend_is_the_score_of_every_stage(toys, tmp_path, method, query):
    """Every stage's scores are the trend-debiased attention (SparseVLM: the raters' mean row) at the tokens'
    ORIGINAL positions, and the selector stays the method's own."""
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    layers0 = resolve_config(method).stage_layers(len(model.model.language_model.layers))
    own = resolve_config(method).score_at == "K"  # pyramiddrop: layer K's own row (at stage 1 the row K records)
    path = _prior(model, proc, tmp_path, layers0[0] - (0 if own else 1))
    with torch.no_grad(), lmms_prune.apply(model, method, score="trend", bias_prior=str(path),
                                           mode="mask") as handle:
        model(**inputs)
        st, layers = handle.state, handle.stage_layers
        assert handle.config.selector == ("sparsevlm" if method == "sparsevlm" else "topk")
        span = st.spans[0][0]
        mu, sigma = handle.scores[0].fit(span.length)
        for s, layer in enumerate(layers):
            assert type(handle.scores[s]).__name__ == "Trend"
            present = torch.arange(span.num_visual) if s == 0 else st.stage_kept[s - 1][0][0]
            if query == "raters":
                rows = st.text_attention[layer - 1][0]
                rows = rows[rows.shape[0] - (st.seq_len - span.start - span.length):]
                base = S.rater_importance(rows[:, span.visual_positions[present]])
                full = base.new_zeros(span.length)
                full[present] = base
            else:
                full = st.attention[layer - (0 if own else 1)][0, span.positions]
            expected = S.trend_debias(full, mu, sigma)[present]
            torch.testing.assert_close(st.stage_scores[s][0][0], expected)


def test_sparsevlm_runs_on_every_family_with_its_signals_and_refuses_deepstack(toys):
    for family in RECIPES:
        model, proc = toys(family)
        inputs = _one(family, proc)
        if family == "qwen3_vl":
            with pytest.raises(ValueError, match=r"'sparsevlm'.*qwen3_vl.*DeepStack.*prune_layers at >= 3"):
                lmms_prune.apply(model, "sparsevlm")
            params = dict(prune_layers="3,5,7")  # after the last DeepStack layer it runs
        else:
            params = {}
        with torch.no_grad(), lmms_prune.apply(model, "sparsevlm", **params) as handle:
            model(**inputs)
            rec = handle.records[0]
        assert 1 <= rec.visual_after < rec.visual_before, family
        assert len(set(rec.kv_lengths)) == 4, family  # full, then three stages


def test_sparsevlm_configuration():
    cfg = resolve_config("sparsevlm")
    assert cfg.stage_layers(32) == (3, 7, 16) and cfg.stage_layers(14) == (1, 3, 7)
    assert cfg.query == "raters" and abs(cfg.keep_ratio - 1 / 3) < 1e-12
    assert resolve_config("sparsevlm", prune_layers="2/4/6").prune_layers == (2, 4, 6)  # lmms-eval's form
    assert resolve_config("sparsevlm", keep_ratio=0.2).stage_ratio is None
    assert resolve_config("sparsevlm", stage_ratio=0.5).keep_ratio is None
    with pytest.raises(ValueError, match=r"recycle_ratio=1.5: must be in \[0, 1\]"):
        resolve_config("sparsevlm", recycle_ratio=1.5)
    with pytest.raises(ValueError, match="does not use recycle_ratio"):
        resolve_config("pyramiddrop", recycle_ratio=0.2)


# ------------------------------------------------------------------------------ pure functions
def _relation(seed, m=7, n=30):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(m, n + 5, generator=g), 1)[:, :n]


@pytest.mark.parametrize("seed", range(5))
def test_select_raters_properties(seed):
    rel = _relation(seed)
    raters = S.select_raters(rel)
    mass = rel.double().sum(1)
    assert raters.dtype == torch.bool and bool(raters.any())
    assert torch.equal(raters, mass >= mass.mean() - 1e-12)
    perm = torch.randperm(rel.shape[0], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(S.select_raters(rel[perm]), raters[perm])  # a property of each row, not of its place
    assert torch.equal(S.select_raters(rel * 3.0), raters)
    imp = S.rater_importance(rel)
    torch.testing.assert_close(imp, rel[raters].mean(0))
    assert torch.equal(S.select_raters(rel[:1].repeat(4, 1)), torch.ones(4, dtype=torch.bool))


def test_raters_bad_inputs():
    with pytest.raises(ValueError, match=r"must be a floating \[M text tokens, N visual tokens\]"):
        S.select_raters(torch.ones(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        S.rater_importance(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="at least one True"):
        S.rater_importance(torch.ones(2, 3), torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 10, 29, 30])
def test_adaptive_keep_count_is_the_rank_rule(rank, n):
    g = torch.Generator().manual_seed(rank * 100 + n)
    rel = torch.rand(6, rank, generator=g, dtype=torch.float64) @ torch.rand(rank, 30, generator=g,
                                                                             dtype=torch.float64)
    keep = sel.adaptive_keep_count(rel, n)
    lam = (30 - n) / 30
    assert keep == 30 - int(lam * (30 - rank) + 1e-9) and n <= keep <= 30
    assert sel.adaptive_keep_count(torch.zeros(6, 30), n) == n  # rank 0: exactly the budget
    if n < 30:  # a higher rank never keeps fewer tokens
        more = torch.cat([rel, torch.rand(2, 30, generator=g, dtype=torch.float64)])
        assert sel.adaptive_keep_count(more, n) >= keep


def test_adaptive_keep_count_bad_inputs():
    with pytest.raises(ValueError, match=r"n=0: must be an int in \[1, 30\]"):
        sel.adaptive_keep_count(torch.rand(3, 30), 0)
    with pytest.raises(ValueError, match="relation must be a floating"):
        sel.adaptive_keep_count(torch.rand(30), 3)


def _blobs(seed, per=6, dim=4):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[10.0] * dim, [-10.0] * dim, [10.0, -10.0] * (dim // 2)])
    x = torch.cat([c + 0.1 * torch.randn(per, dim, generator=g) for c in centres])
    return x[torch.randperm(x.shape[0], generator=g)]


@pytest.mark.parametrize("seed", range(4))
def test_dpc_knn_properties(seed):
    x = _blobs(seed)
    centres, assign = sel.dpc_knn(x, 3)
    assert centres.tolist() == sorted(set(centres.tolist())) and len(centres) == 3
    assert assign.min() >= 0 and assign.max() < 3
    assert assign[centres].tolist() == [0, 1, 2]  # a centre is in its own cluster
    dist = torch.cdist(x.double(), x.double())
    others = torch.ones(len(x), dtype=torch.bool)
    others[centres] = False
    assert torch.equal(assign[others], dist[others][:, centres].argmin(1))  # nearest centre
    blob = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()  # three well-separated blobs are recovered
    for j in range(3):
        assert len(set(blob[assign == j].tolist())) == 1
    assert sel.dpc_knn(x, len(x))[1].tolist() == torch.argsort(sel.dpc_knn(x, len(x))[0]).tolist()
    with pytest.raises(ValueError, match=r"c=0: the number of clusters must be an int in \[1, 18\]"):
        sel.dpc_knn(x, 0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [3, 12, 40])
def test_sparsevlm_selection_properties(seed, n):
    g = torch.Generator().manual_seed(seed)
    num, dim = 40, 8
    imp = torch.rand(num, generator=g)
    rel = torch.softmax(torch.randn(5, num, generator=g), 1)
    feats = torch.randn(num, dim, generator=g)
    merge = sel.sparsevlm(imp, rel, feats, n)
    keep = sel.adaptive_keep_count(rel, n)
    assert merge.index.tolist() == sel.topk(imp, keep).tolist()  # rank-adaptive top-k by importance
    deleted = sorted(set(range(num)) - set(merge.index.tolist()))
    d = len(deleted)
    m = min(d, int(d * 0.3 + 1e-9) + 1) if d else 0
    c = min(m, int(m * 0.1 + 1e-9) + 1) if m else 0
    assert merge.weights.shape == (c, num) and merge.slots.numel() == c
    assert not set(merge.slots.tolist()) & set(merge.index.tolist())
    if c:
        members = merge.weights > 0
        top = sorted(torch.tensor(deleted)[torch.sort(imp[deleted], descending=True, stable=True).indices[:m]]
                     .tolist())
        assert sorted(torch.nonzero(members)[:, 1].tolist()) == top  # groups partition the top-m deleted
        assert int(members.sum(0).max()) == 1
        assert all(bool(members[j, s]) for j, s in enumerate(merge.slots.tolist()))  # a slot is its group's centre
        torch.testing.assert_close(merge.weights.sum(1), torch.ones(c))
        for j in range(c):
            torch.testing.assert_close(merge.weights[j][members[j]], torch.full((int(members[j].sum()),),
                                                                               1 / float(members[j].sum())))
    none = sel.sparsevlm(imp, rel, feats, n, recycle_ratio=0.0)
    assert none.weights.shape[0] == 0 and none.index.tolist() == merge.index.tolist()


def test_recycle_bad_inputs():
    imp, feats = torch.rand(10), torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"recycle_ratio=2: must be a number in \[0, 1\]"):
        sel.recycle(imp, feats, torch.tensor([1, 2]), recycle_ratio=2)
    with pytest.raises(ValueError, match=r"relation has shape \(3, 9\): must be \[R >= 1, 10\]"):
        sel.sparsevlm(imp, torch.rand(3, 9), feats, 4)


def test_lmms_prune_methods_documents_the_new_parameters(capsys):
    from lmms_prune.cli.main import main

    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert "sparsevlm" in lines and "3,7,16 of 32" in lines["sparsevlm"]
    for name, words in {"recycle_ratio": "floor(d*tau)+1", "cluster_ratio": "DPC-kNN",
                        "query": "'raters'", "trend_selector": "sparsevlm", "prune_layers": "8/16/24"}.items():
        assert words in lines[name], name


def test_demo_rows_include_the_new_presets_and_reach_their_budget():
    """The demo's default methods (CLI and module agree) include every new preset; each resolves at the demo's
    keep ratio on the tiny grounder's 14 layers (pyramiddrop's average of 10% needs its stages at 1, 3, 6)."""
    from lmms_prune.cli.demo import METHODS
    from lmms_prune.demo import DEMO_METHOD_ARGS, DEMO_METHODS
    from lmms_prune.selection import stage_ratio_for_average

    assert METHODS.split(",") == list(DEMO_METHODS)
    assert {"pyramiddrop", "visionzip", "fastervlm", "cdpruner", "sparsevlm"} <= set(DEMO_METHODS)
    for method in ("pyramiddrop", "sparsevlm"):
        cfg = resolve_config(method, keep_ratio=0.1, **DEMO_METHOD_ARGS.get(method, {}))
        stage_ratio_for_average(0.1, cfg.stage_layers(14), 14)  # raises when unreachable
    with pytest.raises(ValueError, match="keep_ratio=0.1: with prune_layers"):
        stage_ratio_for_average(0.1, resolve_config("pyramiddrop", keep_ratio=0.1).stage_layers(14), 14)
