"""Multi-stage pruning (``prune_layers``, PyramidDrop) is proven stage by stage with the single-stage references
of tests/test_engine.py: pruning at 2 and 3 stages equals mask mode (every stage's removed set masked as keys
from its layer on) at prefill and at 8 cached decode steps; KV-cache decoding equals recomputation; the
per-layer cache lengths are the per-stage token counts. The budget rules are pure functions tested here too."""

from __future__ import annotations

import pytest
import torch
from test_engine import ATOL, _generate, _image, _num_visual, _one

import lmms_prune
from lmms_prune import selection as sel
from lmms_prune.presets import resolve_config
from lmms_prune.toy.models import build_processor, build_tiny_model

torch.set_num_threads(1)
FAMILIES_MS = ("internvl_llama", "qwen2_5_vl")
STAGES = ((2, 6), (2, 5, 9))


@pytest.fixture(scope="module")
def toys():
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            proc = build_processor(family)
            proc.tokenizer.padding_side = "left"
            cache[family] = (build_tiny_model(family, seed=0), proc)
        return cache[family]

    return get


def _depth(model):
    return len(model.model.language_model.layers)


def _expected_kv(full, n, counts, layers, depth):
    out = []
    for i in range(depth):
        s = sum(k <= i for k in layers) - 1
        out.append(full if s < 0 else full - n + counts[s])
    return out


@pytest.mark.parametrize("family", FAMILIES_MS)
@pytest.mark.parametrize(("layers", "positions"), [(STAGES[0], "contiguous"), (STAGES[1], "contiguous"),
                                                   (STAGES[1], "original")],
                         ids=lambda x: x if isinstance(x, str) else "stages" + "-".join(map(str, x)))
def test_multistage_prune_equals_mask_mode_prefill_and_decode(toys, family, layers, positions):
    """Seeded random selection at every stage (so both modes select the same sets whatever the scores); the
    survivors renumbered after each stage (positions='contiguous', the default) or at their original positions."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    n = _num_visual(model, inputs)
    params = dict(prune_layers=",".join(map(str, layers)), stage_ratio=0.5, seed=3, positions=positions)
    with torch.no_grad():
        with lmms_prune.apply(model, "random", mode="mask", **params) as handle:
            mask_logits = model(**inputs).logits
            mask_kept = [k[0][0].tolist() for k in handle.state.stage_kept]
            mask_tokens, mask_steps = _generate(model, inputs)
        with lmms_prune.apply(model, "random", **params) as handle:
            logits = model(**inputs).logits
            index = handle.state.keep_index[0]
            kept = [k[0][0].tolist() for k in handle.state.stage_kept]
            tokens, steps = _generate(model, inputs)
            rec = handle.records[0]
    counts = sel.stage_budgets(n, 0.5, len(layers))
    assert [len(k) for k in kept] == counts and kept == mask_kept
    for before, after in zip(kept, kept[1:]):  # each stage keeps a subset of the tokens still present
        assert set(after) < set(before) and after == sorted(after)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - n + counts[-1]
    torch.testing.assert_close(logits[0], mask_logits[0, index], atol=ATOL, rtol=0)
    torch.testing.assert_close(steps, mask_steps, atol=ATOL, rtol=0)
    assert torch.equal(tokens, mask_tokens)
    full = inputs["input_ids"].shape[1]
    assert rec.kv_lengths == _expected_kv(full, n, counts, layers, _depth(model))
    assert rec.kept[0].tolist() == kept[-1] and rec.visual_after == counts[-1]


@pytest.mark.parametrize("family", ["internvl_qwen2", "qwen2_5_vl"])
def test_multistage_kv_cache_decoding_equals_recomputation(toys, family):
    model, proc = toys(family)
    inputs = _one(family, proc)
    with torch.no_grad(), lmms_prune.apply(model, "random", prune_layers="2,5,9", stage_ratio=0.5, seed=1):
        cached_tokens, cached_steps = _generate(model, inputs)
        full_tokens, full_steps = _generate(model, inputs, use_cache=False)
    assert torch.equal(cached_tokens, full_tokens)
    torch.testing.assert_close(cached_steps, full_steps, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES_MS)
def test_pyramiddrop_attention_stages_equal_mask_mode(toys, family):
    """The preset as released (each stage ranked by layer K_s's own query/key on its input, survivors renumbered,
    int budgets): the scores, kept sets, prefill logits and cached decode steps are the same in prune and mask
    mode (mask mode renumbers the same way)."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    with torch.no_grad():
        with lmms_prune.apply(model, "pyramiddrop", mode="mask") as handle:
            mask_logits = model(**inputs).logits
            mask_kept = [k[0][0].tolist() for k in handle.state.stage_kept]
            mask_tokens, mask_steps = _generate(model, inputs)
        with lmms_prune.apply(model, "pyramiddrop") as handle:
            logits = model(**inputs).logits
            kept = [k[0][0].tolist() for k in handle.state.stage_kept]
            index = handle.state.keep_index[0]
            assert handle.stage_layers == sel.depth_scaled_layers(_depth(model))
            tokens, steps = _generate(model, inputs)
    assert kept == mask_kept and len(kept) == 3
    torch.testing.assert_close(logits[0], mask_logits[0, index], atol=ATOL, rtol=0)
    torch.testing.assert_close(steps, mask_steps, atol=ATOL, rtol=0)
    assert torch.equal(tokens, mask_tokens)


def test_pyramiddrop_later_stage_ranks_the_present_tokens_by_their_attention(toys):
    """score_at='K-1' (our earlier reading, kept as an option): stage 2's kept set is the top of the attention row
    recorded at K_2-1 restricted to stage 1's survivors."""
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    with torch.no_grad(), lmms_prune.apply(model, "pyramiddrop", mode="mask", score_at="K-1") as handle:
        model(**inputs)
        st, layers = handle.state, handle.stage_layers
        span = st.spans[0][0]
        present = st.stage_kept[0][0][0]
        row = st.attention[layers[1] - 1][0, span.start + present]
        n = len(st.stage_kept[1][0][0])
        expected = present[torch.topk(row, n).indices].sort().values
    assert st.stage_kept[1][0][0].tolist() == expected.tolist()


def test_keep_ratio_is_the_average_per_layer(toys):
    model, proc = toys("internvl_qwen2")
    inputs = _one("internvl_qwen2", proc)
    n = _num_visual(model, inputs)
    with torch.no_grad(), lmms_prune.apply(model, "pyramiddrop", keep_ratio=0.5) as handle:
        model(**inputs)
        rec = handle.records[0]
    full = inputs["input_ids"].shape[1]
    visual_per_layer = [k - (full - n) for k in rec.kv_lengths]
    assert abs(sum(visual_per_layer) / len(visual_per_layer) / n - 0.5) < 3 / n * len(handle.stage_layers)


def test_trend_composes_per_stage(toys, tmp_path):
    from lmms_prune.calibration import calibrate_prior
    from lmms_prune.engine.prior import save_prior
    from lmms_prune.scores import trend_debias

    model, proc = toys("internvl_llama")
    # score_at='K' (the preset): a stage at K is scored by layer K's own row, at stage 1 the row layer K records
    prior = calibrate_prior(model, proc, [_image()], layer=sel.depth_scaled_layers(_depth(model))[0], max_num=2)
    path = save_prior(tmp_path / "p.pt", prior.means, prior.counts, prior.meta)
    inputs = _one("internvl_llama", proc)
    with torch.no_grad(), lmms_prune.apply(model, "pyramiddrop", score="trend", bias_prior=str(path),
                                           mode="mask") as handle:
        model(**inputs)
        st, layers, score = handle.state, handle.stage_layers, handle.scores[-1]
        span = st.spans[0][0]
        present = st.stage_kept[-2][0][0]  # the last stage scores the second stage's survivors
        mu, sigma = score.fit(span.length)
        full_row = st.attention[layers[-1]][0, span.positions]
        expected = trend_debias(full_row, mu, sigma)[present]  # debiased at the ORIGINAL positions
        torch.testing.assert_close(handle.records[0].scores[0], expected)


# ------------------------------------------------------------------------------ configuration and budgets
@pytest.mark.parametrize(("depth", "layers"), [(32, (8, 16, 24)), (24, (6, 12, 18)), (28, (7, 14, 21)),
                                               (14, (4, 7, 11))])
def test_depth_scaled_layers_are_pyramiddrop_quarters(depth, layers):
    assert sel.depth_scaled_layers(depth) == layers


def test_stage_budgets_properties():
    for n in (1, 7, 256, 576, 1025):
        for ratio in (0.1, 0.5, 0.9, 1.0):
            counts = sel.stage_budgets(n, ratio, 3)
            assert all(1 <= c <= n for c in counts)
            assert counts == sorted(counts, reverse=True)
            assert counts[0] == max(1, round(n * ratio))
    assert sel.stage_budgets(576, 0.5, 3) == [288, 144, 72]


def test_stage_ratio_for_average_inverts_the_average():
    for layers, depth in (((8, 16, 24), 32), ((2, 8, 14), 24), ((2, 6), 14)):
        for target in (layers[0] / depth + 0.01, 0.3, 0.47, 0.9):
            if target <= layers[0] / depth:
                continue
            r = sel.stage_ratio_for_average(target, layers, depth)
            assert abs(sel.average_kept_fraction(r, layers, depth) - target) < 1e-9
    # LLaVA-1.5's default, lambda = 0.5 at 8/16/24 of 32, averages (8 + 4 + 2 + 1) / 32 of the tokens per layer
    assert abs(sel.average_kept_fraction(0.5, (8, 16, 24), 32) - 15 / 32) < 1e-12
    with pytest.raises(ValueError, match="lower the first prune layer"):
        sel.stage_ratio_for_average(0.1, (6, 12, 18), 24)


@pytest.mark.parametrize(("params", "message"), [
    ({"prune_layers": "8,4"}, "strictly increasing"),
    ({"prune_layers": "0,4"}, "strictly increasing"),
    ({"prune_layers": "a,b"}, "not a list of integers"),
    ({"prune_layers": "2,6", "prune_layer": 3}, "give one of them"),
    ({"prune_layers": "2,6", "keep_ratio": 0.3, "stage_ratio": 0.5}, "exactly one of them"),
    ({"prune_layers": "2,6", "score_layer": 1}, "drop score_layer"),
    ({"stage_ratio": 0.5}, "does not use stage_ratio"),
])
def test_bad_multistage_parameters_raise_clear_errors(params, message):
    method = "pyramiddrop" if "prune_layer" in params else "fastv"
    with pytest.raises(ValueError, match=message):
        resolve_config(method, **params)


def test_multistage_refuses_grid_selectors():
    with pytest.raises(ValueError, match="cannot run in multi-stage pruning"):
        resolve_config("deepprune", prune_layers="2,6")


def test_unreachable_average_and_too_deep_layers_fail_before_running(toys):
    model, _ = toys("internvl_qwen2")
    with pytest.raises(ValueError, match="lower the first prune layer"):
        lmms_prune.apply(model, "pyramiddrop", keep_ratio=0.1)
    with pytest.raises(ValueError, match="this model has 14 decoder layers"):
        lmms_prune.apply(model, "pyramiddrop", prune_layers="4,8,14")


@pytest.mark.parametrize("family", FAMILIES_MS)
def test_multistage_left_padded_batch_equals_single_samples(toys, family):
    from test_engine import _inputs

    model, proc = toys(family)
    sizes = [(300, 200), (200, 420)]  # InternVL: 1 tile vs 2 tiles + thumbnail -> unequal lengths at every stage
    texts = ["Where is the cup?", "Describe the picture in a few words please, with detail."]
    batch = _inputs(family, proc, [[_image(s)] for s in sizes], texts)
    singles = [_inputs(family, proc, [[_image(s)]], [t]) for s, t in zip(sizes, texts)]
    with torch.no_grad(), lmms_prune.apply(model, "pyramiddrop", prune_layers="2,5,9") as handle:
        tokens, steps = _generate(model, batch)
        batch_records = list(handle.records)
        for row, single in enumerate(singles):
            t1, s1 = _generate(model, single)
            rec = handle.records[0]
            assert rec.kept[0].tolist() == batch_records[row].kept[0].tolist()
            assert rec.kv_lengths == batch_records[row].kv_lengths
            assert torch.equal(tokens[row], t1[0])
            torch.testing.assert_close(steps[row], s1[0], atol=ATOL, rtol=0)
