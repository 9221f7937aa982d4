"""LLaVA-PruMerge+ (``prumerge_plus``): its selection against a re-creation of the authors' arithmetic
(github.com/42Shawn/LLaVA-PruMerge, commit 097c04116a58, ``token_prune_merge_advanced_plus``), its properties at a
fixed budget, and the engine feeding the LLM exactly the merged embeddings of the recorded signals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_engine import _num_visual, _one

import lmms_prune
from lmms_prune import selection as sel
from lmms_prune.families import get_adapter
from lmms_prune.presets import resolve_config

torch.set_num_threads(1)


def _authors_ratio(attn: np.ndarray) -> float:
    """``outlier_dectection``: share of scores above Q3 + 1.5 IQR (numpy percentiles)."""
    q1, q3 = np.percentile(attn, 25), np.percentile(attn, 75)
    return len(np.where(attn > q3 + 1.5 * (q3 - q1))[0]) / len(attn)


def _authors_prumerge_plus(attn: torch.Tensor, keys: torch.Tensor, x: torch.Tensor, k: int = 32) -> torch.Tensor:
    """The authors' adaptive PruMerge+ for one image, re-written from reading their loop: ``[C + 1, D]``."""
    n = attn.numel()
    ratio = _authors_ratio(attn.numpy())
    idx = torch.topk(attn, int(n * ratio)).indices
    step = int(1 / ratio)
    seq = torch.arange(0, n - 1, int(step / 3))
    idx = torch.cat([idx, torch.tensor([s for s in seq.tolist() if s not in idx.tolist()], dtype=torch.long)])
    compl = torch.tensor(sorted(set(range(n)) - set(idx.tolist())), dtype=torch.long)
    keys_n = F.normalize(keys, dim=-1)
    rows = []
    for i in range(idx.numel()):
        others = torch.cat([idx[:i], idx[i + 1:], compl])
        sim = keys_n[idx[i]] @ keys_n[others].T
        near = others[torch.topk(sim, k).indices]
        rows.append(x[idx[i]] + (x[near] * attn[near, None]).sum(0))
    rows.append((x[compl] * attn[compl, None]).sum(0))
    return torch.stack(rows)


def _inputs(seed: int, n: int = 144, d: int = 24):
    g = torch.Generator().manual_seed(seed)
    attn = torch.softmax(torch.randn(n, generator=g) * 2.5, 0)  # heavy-tailed, as [CLS] attention
    return attn, torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, 8, generator=g,
                                                                                  dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_adaptive_prumerge_plus_equals_the_authors_arithmetic(seed):
    attn, keys, x = _inputs(seed)
    assert sel.iqr_outlier_ratio(attn) == pytest.approx(_authors_ratio(attn.numpy()), abs=0)
    merge = sel.prumerge_plus(attn, keys)
    ours = sel.merged_embeddings(x, merge)
    theirs = _authors_prumerge_plus(attn.double(), keys, x)
    assert merge.index.numel() == 0 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1, 2, 9, 30, 143, 144])
def test_fixed_budget_properties(seed, n):
    attn, keys, _ = _inputs(seed)
    num = attn.numel()
    centres = sel.prumerge_centres(attn, n)
    merge = sel.prumerge_plus(attn, keys, n, neighbours=5)
    assert merge.count == n and centres.numel() == n - 1 == len(set(centres.tolist()))
    t = max(1, int(num * sel.iqr_outlier_ratio(attn)))
    top = torch.sort(attn, descending=True, stable=True).indices
    assert centres[: min(t, n - 1)].tolist() == top[: min(t, n - 1)].tolist()  # the IQR outliers lead
    w = merge.weights
    assert bool((w >= 0).all())
    for r, c in enumerate(centres.tolist()):  # a centre: itself once, plus its 5 most similar others
        assert w[r, c] == 1.0 and int((w[r] > 0).sum()) == 6
    rest = torch.ones(num, dtype=torch.bool)
    rest[centres] = False
    torch.testing.assert_close(w[-1], torch.where(rest, attn, torch.zeros_like(attn)))  # the summary token


def test_prumerge_plus_config_and_refusals():
    assert resolve_config("prumerge_plus").prumerge_budget == "fixed"
    with pytest.raises(ValueError, match="positions='contiguous'"):
        resolve_config("prumerge_plus", positions="gap")
    with pytest.raises(ValueError, match="prumerge_budget"):
        resolve_config("prumerge_plus", prumerge_budget="half")
    with pytest.raises(ValueError, match="must be >= 1"):
        sel.prumerge_plus(torch.rand(9), torch.rand(9, 2), neighbours=0)


@pytest.mark.parametrize("family", ["internvl_llama", "llava"])  # projector rows in token order (Qwen: windows)
def test_the_llm_receives_the_merged_embeddings_of_the_recorded_signals(toys, family):
    """The image's part of the LLM input is exactly ``merged_embeddings(projected, prumerge_plus(scores,
    features, n))`` of the signals the engine recorded, in place of the image's placeholders."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    n_visual = _num_visual(model, inputs)
    adapter = get_adapter(model)
    seen: dict = {}

    def keep(name, value):
        seen.setdefault(name, value)  # the first call's (returns None: the hooks change nothing)

    hooks = [adapter.projector().register_forward_hook(lambda m, a, out: keep("projected", out)),
             adapter.language_model.register_forward_pre_hook(
                 lambda m, a, kw: keep("embeds", kw["inputs_embeds"]), with_kwargs=True),
             model.register_forward_pre_hook(lambda m, a, kw: keep("ids", kw["input_ids"]), with_kwargs=True)]
    try:
        with torch.no_grad(), lmms_prune.apply(model, "prumerge_plus", keep_tokens=12) as handle:
            original = handle.selector.__call__

            def spy(image, scores, n):
                seen.update(scores=scores, features=image.vision_features, n=n)
                return original(image, scores, n)

            handle.selector = spy
            model(**inputs)
            rec = handle.records[0]
    finally:
        for h in hooks:
            h.remove()
    projected = seen["projected"].reshape(-1, seen["projected"].shape[-1])
    assert projected.shape[0] == n_visual and seen["n"] == 12
    expected = sel.merged_embeddings(projected, sel.prumerge_plus(seen["scores"], seen["features"], 12))
    start = int((seen["ids"][0] == model.config.image_token_id).nonzero()[0])  # the text before is unchanged
    torch.testing.assert_close(seen["embeds"][0, start:start + 12], expected, atol=1e-5, rtol=0)
    assert rec.visual_before == n_visual and rec.visual_after == 12 and rec.merged == [12]
