"""Merged tokens before the LLM (VisionZip) and the [CLS]-only FasterVLM.

Engine proofs: a merge whose groups are singletons equals pre-LLM pruning of the same set; merging a group of
identical embeddings equals keeping one of them. Selection properties of :func:`lmms_prune.selection.visionzip`:
exactly ``n`` tokens, dominant = top [CLS] tokens, groups partition the rest, each member joins its most similar
target, means are means."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine import ATOL, _generate, _num_visual, _one

import lmms_prune
from lmms_prune import selection as sel
from lmms_prune.families import get_adapter

torch.set_num_threads(1)


def _run(model, inputs, method, selector=None, **params):
    """Logits, greedy tokens and step logits of a pre-LLM run; ``selector`` replaces the preset's."""
    with torch.no_grad(), lmms_prune.apply(model, method, **params) as handle:
        if selector is not None:
            handle.selector = selector
        logits = model(**inputs).logits
        tokens, steps = _generate(model, inputs)
        return logits, tokens, steps, handle.records[0]


@pytest.mark.parametrize("family", ["internvl_llama", "llava", "qwen2_5_vl"])
def test_singleton_merge_equals_pre_llm_pruning_of_the_same_set(toys, family):
    model, proc = toys(family)
    inputs = _one(family, proc)
    n = _num_visual(model, inputs)
    keep = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(2))[:12].tolist())
    kept_part, merged_part = keep[:5], keep[5:]  # some kept as they are, the others as one-token groups

    def prune(image, scores, k):
        return torch.tensor(keep)

    def merge(image, scores, k):
        return sel.Merge(torch.tensor(kept_part), sel.group_weights([[i] for i in merged_part], image.num_tokens))

    ref = _run(model, inputs, "divprune", prune)
    out = _run(model, inputs, "divprune", merge)
    torch.testing.assert_close(out[0], ref[0], atol=ATOL, rtol=0)
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], atol=ATOL, rtol=0)
    assert out[3].visual_after == ref[3].visual_after == len(keep) and out[3].merged == [len(merged_part)]


@pytest.mark.parametrize("family", ["internvl_llama", "qwen2_5_vl"])
def test_merging_identical_embeddings_equals_keeping_one(toys, family):
    """The last two visual tokens are made identical (a hook on the projector); merging them equals keeping
    the first of them (it comes last in both prompts)."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    n = _num_visual(model, inputs)
    a, b = n - 2, n - 1

    def same(module, args, out):
        flat = out.reshape(-1, out.shape[-1]).clone()
        flat[b] = flat[a]
        return flat.view(out.shape)

    hook = get_adapter(model).projector().register_forward_hook(same)
    try:
        base = [0, 3, 7, 20]
        ref = _run(model, inputs, "divprune", lambda image, s, k: torch.tensor([*base, a]))
        out = _run(model, inputs, "divprune",
                   lambda image, s, k: sel.Merge(torch.tensor(base), sel.group_weights([[a, b]], image.num_tokens)))
    finally:
        hook.remove()
    torch.testing.assert_close(out[0], ref[0], atol=ATOL, rtol=0)
    assert torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], atol=ATOL, rtol=0)


def test_visionzip_dominant_tokens_are_the_projected_cls_then_the_top_patches_as_the_authors(toys):
    """LLaVA-1.5: the LLM receives, at the image's place, the projected feature-layer states of the [CLS] and of
    the kept ``d - 1`` patches, in that order (VisionZip's ``dominant_tokens``, then projected); the patches are
    the top ``d - 1`` by [CLS] attention (test_visionzip_runs_its_selection_on_the_recorded_signals)."""
    model, proc = toys("llava")
    inputs = _one("llava", proc)
    adapter = get_adapter(model)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("x", kwargs["inputs_embeds"])

    hook = adapter.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), lmms_prune.apply(model, "visionzip", keep_tokens=16) as handle:
            model(**inputs)
            rec = handle.records[0]
    finally:
        hook.remove()
    layers = adapter.vision_layers()
    fl = model.config.vision_feature_layer
    index = fl if fl >= 0 else len(layers) + 1 + fl
    with torch.no_grad():
        states = adapter.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[index][0]
        dominant = adapter.projector()(states[torch.cat([torch.tensor([0]), rec.kept[0] + 1])])
    start = rec.spans[0].start
    torch.testing.assert_close(seen["x"][0, start: start + dominant.shape[0]], dominant, atol=1e-5, rtol=1e-5)
    assert rec.kept[0].numel() == 13 and rec.merged == [3]  # 13 patches + [CLS] + 2 contextual = 16
    with torch.no_grad(), lmms_prune.apply(model, "visionzip", keep_tokens=16, cls_dominant=False) as handle:
        model(**inputs)
        assert handle.records[0].kept[0].numel() == 14 and handle.records[0].merged == [2]


def _feature_layer_keys(model, inputs):
    """[N, d]: keys of the vision feature layer (its k_proj on its normed input), heads averaged, [CLS] dropped:
    VisionZip's ``metric`` (utils.py: ``raw_key_states.mean(1)``), recomputed from the tower's hidden states."""
    adapter = get_adapter(model)
    layers = adapter.vision_layers()
    fl = model.config.vision_feature_layer
    index = fl if fl >= 0 else len(layers) + 1 + fl
    layer = layers[index - 1]
    states = adapter.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[index - 1]
    keys = layer.self_attn.k_proj(layer.layer_norm1(states))
    keys = keys.view(*keys.shape[:2], layer.self_attn.num_heads, -1).mean(2)
    return keys[:, 1:].reshape(-1, keys.shape[-1])


@pytest.mark.parametrize("family", ["internvl_llama", "llava"])
def test_visionzip_runs_its_selection_on_the_recorded_signals(toys, family):
    """Similarity on the feature layer's keys where the tower's patches are the LLM's tokens (LLaVA-1.5: one
    patch per token), on the pre-projector features where they are not (InternVL's 2x2 pixel shuffle)."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    n_visual = _num_visual(model, inputs)
    with torch.no_grad(), lmms_prune.apply(model, "visionzip", keep_tokens=16) as handle:
        captured = {}
        original = handle.selector.__call__

        def spy(image, scores, n):
            captured.update(scores=scores, features=image.vision_features, keys=image.vision_keys, n=n)
            return original(image, scores, n)

        handle.selector = spy
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        rec = handle.records[0]
    llava = family == "llava"  # one CLIP patch per LLM token, a [CLS]: the authors' keys and [CLS] apply
    if llava:
        with torch.no_grad():
            torch.testing.assert_close(captured["keys"], _feature_layer_keys(model, inputs), atol=1e-5, rtol=1e-5)
    else:
        assert captured["keys"] is None
    similarity = captured["keys"] if llava else captured["features"]
    expected = sel.visionzip(captured["scores"], similarity, 16, cls_slot=llava)
    assert rec.kept[0].tolist() == expected.index.tolist() and rec.merged == [expected.weights.shape[0] + llava]
    assert rec.visual_before == n_visual and rec.visual_after == 16 == captured["n"]
    assert rec.kept[0].numel() == round(16 * 54 / 64) - llava  # dominant - 1 patches + [CLS] (authors)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    with torch.no_grad(), lmms_prune.apply(model, "visionzip", keep_tokens=16, features="hidden") as handle:
        handle.selector = spy
        model(**inputs)
    assert captured["keys"] is None  # features='hidden' (our earlier reading) records no keys


def test_fastervlm_is_vispruner_with_importance_only(toys):
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    with torch.no_grad():
        with lmms_prune.apply(model, "fastervlm", keep_ratio=0.2) as handle:
            model(**inputs)
            fast = handle.records[0].kept[0].tolist()
        with lmms_prune.apply(model, "vispruner", keep_ratio=0.2, important_ratio=1.0) as handle:
            model(**inputs)
            vis = handle.records[0].kept[0].tolist()
    assert fast == vis and len(fast) == round(0.2 * _num_visual(model, inputs))


def test_merging_refuses_original_positions():
    with pytest.raises(ValueError, match="positions='contiguous'"):
        lmms_prune.presets.resolve_config("visionzip", positions="original")


# ------------------------------------------------------------------------------ pure selection properties
def _case(seed, n_tokens=60, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_tokens, generator=g), torch.randn(n_tokens, dim, generator=g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 59, 60])
def test_visionzip_properties(seed, n):
    importance, features = _case(seed)
    big_n = importance.numel()
    m = sel.visionzip(importance, features, n)
    assert m.count == n
    idx = m.index.tolist()
    assert idx == sorted(set(idx)) and m.index.dtype == torch.long
    d = len(idx)
    assert d == (big_n if n == big_n else min(n, max(1, round(n * 54 / 64))))
    assert set(idx) == set(torch.sort(importance, descending=True, stable=True).indices[:d].tolist())
    w = m.weights
    if w.shape[0] == 0:
        return
    members = w > 0
    assert not members[:, idx].any()  # dominant tokens are not merged
    rest = [i for i in range(big_n) if i not in set(idx)]
    assert members[:, rest].sum(0).tolist() == [1] * len(rest)  # the groups partition the other tokens
    # targets: every step-th of the other tokens, in order; each member joins its most similar target
    step = max(1, len(rest) // w.shape[0])
    targets = rest[::step][: w.shape[0]]
    unit = F.normalize(features, dim=-1)
    for j, t in enumerate(targets):  # target + mean(members): weight 1 on the target, 1/|members| on each member
        assert members[j, t] and float(w[j, t]) == 1.0
        others = members[j].clone()
        others[t] = False
        if others.any():
            torch.testing.assert_close(w[j, others], torch.full((int(others.sum()),), 1 / int(others.sum())))
    for i in rest:
        if i in targets:
            continue
        best = int((unit[targets] @ unit[i]).argmax())
        assert members[best, i]


def test_merged_embeddings_are_group_means_and_identical_rows_merge_to_themselves():
    x = torch.randn(10, 4)
    m = sel.Merge(torch.tensor([1, 4]), sel.group_weights([[0, 2, 3], [5]], 10))
    out = sel.merged_embeddings(x, m)
    torch.testing.assert_close(out, torch.stack([x[1], x[4], x[[0, 2, 3]].mean(0), x[5]]))
    x[[6, 7, 8]] = x[6].clone()
    same = sel.merged_embeddings(x, sel.Merge(torch.tensor([], dtype=torch.long), sel.group_weights([[6, 7, 8]], 10)))
    torch.testing.assert_close(same, x[6:7])


def test_visionzip_bad_inputs_raise_clear_errors():
    importance, features = _case(0)
    with pytest.raises(ValueError, match="n=61"):
        sel.visionzip(importance, features, 61)
    with pytest.raises(ValueError, match="dominant_ratio"):
        sel.visionzip(importance, features, 5, dominant_ratio=0.0)
    with pytest.raises(ValueError, match="empty"):
        sel.group_weights([[]], 5)


def authors_contextual(hidden, metric, dominant, contextual_num):
    """Re-creation of VisionZip's contextual tokens (dvlab-research/VisionZip @ 3151f6df, visionzip/clip_encoder.py)
    for one image without its [CLS]: the non-dominant tokens in order, targets every ``max(1, R // c)``-th (first
    ``c``), the others assigned by the argmax of the unit metric's cosine, ``target + sum(members) / max(1, count)``.
    """
    keep = torch.ones(hidden.shape[0], dtype=torch.bool)
    keep[dominant] = False
    h, m = hidden[keep], metric[keep]
    m = m / m.norm(dim=-1, keepdim=True)
    step = max(1, m.shape[0] // contextual_num)
    targets = torch.arange(0, m.shape[0], step)[:contextual_num]
    rest = ~torch.isin(torch.arange(m.shape[0]), targets)
    one_hot = torch.zeros(int(rest.sum()), contextual_num)
    one_hot.scatter_(1, (m[rest] @ m[targets].T).argmax(1, keepdim=True), 1)
    counts = one_hot.sum(0).clamp(min=1)[:, None]
    return h[targets] + one_hot.T @ h[rest] / counts


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [4, 16, 40])
def test_visionzip_contextual_tokens_equal_the_authors_target_plus_mean(seed, n):
    importance, metric = _case(seed)
    hidden = torch.randn(importance.numel(), 5, generator=torch.Generator().manual_seed(seed + 10))
    m = sel.visionzip(importance, metric, n)
    expected = authors_contextual(hidden, metric, m.index, m.weights.shape[0])
    out = sel.merged_embeddings(hidden, m)
    torch.testing.assert_close(out[: m.index.numel()], hidden[m.index])
    torch.testing.assert_close(out[m.index.numel():], expected)
    old = sel.merged_embeddings(hidden, sel.visionzip(importance, metric, n, contextual="mean"))  # our earlier reading
    assert not torch.allclose(old[m.index.numel():], expected)


def test_visionzip_budget_one_keeps_one_dominant_token_where_the_authors_divide_by_zero():
    importance, features = _case(0)
    m = sel.visionzip(importance, features, 1)
    assert m.index.tolist() == [int(importance.argmax())] and m.weights.shape[0] == 0
    with pytest.raises(ZeroDivisionError):
        authors_contextual(features, features, m.index, 0)


@pytest.mark.parametrize(("method", "params"), [("visionzip", {"keep_tokens": 1}), ("cdpruner", {"keep_tokens": 1}),
                                                 ("pyramiddrop", {"stage_ratio": 0.001})])
def test_budget_of_one_token_runs_end_to_end(toys, method, params):
    """One visual token kept (pyramiddrop: int(N * 0.001^s) is 0 at every stage, one token is kept instead)."""
    model, proc = toys("internvl_llama")
    inputs = _one("internvl_llama", proc)
    with torch.no_grad(), lmms_prune.apply(model, method, **params) as handle:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        rec = handle.records[0]
    assert rec.visual_after == 1 and out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("n", [1, 2, 16])
def test_visionzip_cls_slot_keeps_one_patch_fewer_for_the_callers_cls(n):
    """cls_slot: the [CLS] is one of the d dominant tokens (the authors' dominant - 1 patches), so the selection
    leaves one place for it: n - 1 tokens before Merge.prefix, the top d - 1 patches."""
    importance, features = _case(1)
    full, slot = sel.visionzip(importance, features, n), sel.visionzip(importance, features, n, cls_slot=True)
    assert slot.count == n - 1 and slot.index.numel() == full.index.numel() - 1
    assert set(slot.index.tolist()) < set(full.index.tolist())
    with_cls = sel.Merge(slot.index, slot.weights, prefix=torch.zeros(1, 8))
    assert with_cls.count == n and sel.merged_embeddings(features, with_cls).shape == (n, 8)
