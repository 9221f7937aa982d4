"""CDPruner's conditional DPP: the fast greedy equals a brute-force greedy on log-determinants; with constant
relevance it is greedy diversity; exactly n unique sorted indices; it runs through the engine on every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine import _num_visual, _one

import lmms_prune
from lmms_prune import selection as sel
from lmms_prune.toy.models import FAMILIES, build_processor, build_tiny_model

torch.set_num_threads(1)


def _brute_greedy(kernel: torch.Tensor, n: int) -> list[int]:
    """Add, at each step, the token whose addition maximises log det L[S, S] (ties: lower index)."""
    k = kernel.double()
    chosen: list[int] = []
    for _ in range(n):
        best, best_val = None, -float("inf")
        for j in range(k.shape[0]):
            if j in chosen:
                continue
            idx = chosen + [j]
            val = float(torch.logdet(k[idx][:, idx]))
            if val > best_val + 1e-9:
                best, best_val = j, val
        chosen.append(best)
    return sorted(chosen)


def _case(seed, n_tokens=14, dim=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, dim, generator=g), torch.rand(n_tokens, generator=g) + 0.05


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 3, 6])
def test_fast_greedy_equals_brute_force_log_det_greedy(seed, n):
    features, q = _case(seed)
    unit = F.normalize(features.double(), dim=-1)
    kernel = q.double()[:, None] * (unit @ unit.T) * q.double()[None, :]
    assert sel.cdpruner(features, q, n).tolist() == _brute_greedy(kernel, n)


@pytest.mark.parametrize("seed", range(4))
def test_constant_relevance_is_greedy_diversity(seed):
    features, _ = _case(seed)
    unit = F.normalize(features.double(), dim=-1)
    for c in (0.3, 1.0):
        picked = sel.cdpruner(features, torch.full((14,), c), 5)
        assert picked.tolist() == _brute_greedy(unit @ unit.T, 5) == sel.dpp_greedy(unit @ unit.T, 5).tolist()


def test_relevance_steers_the_selection():
    """Two identical tokens: the DPP keeps at most one of them; a higher q decides which."""
    features, q = _case(0, n_tokens=8)
    features[3] = features[5]
    q = torch.ones(8)
    q[5] = 2.0
    picked = sel.cdpruner(features, q, 4).tolist()
    assert 5 in picked and 3 not in picked


@pytest.mark.parametrize("n", [1, 5, 14, 20])
def test_exactly_n_unique_sorted_even_beyond_the_rank(n):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(20, 3, generator=g)  # rank 3: later picks are the fallback
    out = sel.cdpruner(features, torch.rand(20, generator=g) + 0.1, n)
    assert out.dtype == torch.long and out.tolist() == sorted(set(out.tolist())) and out.numel() == n


def authors_relevance(image_embeds, text_embeds):
    """Re-creation of CDPruner's ``encode_images`` relevance (Theia-4869/CDPruner @ 9541616c, llava_arch.py):
    unit rows, cosine [N, M], NEGATED, averaged over the text embeddings, min-max with +1e-6."""
    image = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-(image @ text.t())).mean(dim=-1)
    return (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())


def test_instruction_relevance_is_the_authors_negated_normalised_mean_cosine():
    g = torch.Generator().manual_seed(2)
    emb, text = torch.randn(9, 5, generator=g), torch.randn(3, 5, generator=g)
    q = sel.instruction_relevance(emb, text)
    torch.testing.assert_close(q, authors_relevance(emb, text))
    raw = (F.normalize(emb, dim=-1) @ F.normalize(text, dim=-1).T).mean(-1)
    assert q.argmax() == raw.argmin() and q.argmin() == raw.argmax()  # the least similar token is the most relevant
    plain = sel.instruction_relevance(emb, text, negate=False)  # relevance_sign='plain'
    assert plain.argmax() == raw.argmax() and plain.argmin() == raw.argmin()
    assert float(q.min()) > 0 and abs(float(q.max()) - 1) < 1e-5
    with pytest.raises(ValueError, match="same space"):
        sel.instruction_relevance(emb, torch.randn(3, 4))


def test_bad_inputs_raise_clear_errors():
    features, q = _case(0)
    with pytest.raises(ValueError, match="n=15"):
        sel.cdpruner(features, q, 15)
    with pytest.raises(ValueError, match="q >= 0"):
        sel.cdpruner(features, -q, 3)
    with pytest.raises(ValueError, match="square"):
        sel.dpp_greedy(torch.ones(3, 4), 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_cdpruner_selects_the_dpp_map_of_the_recorded_signals(family):
    model, proc = build_tiny_model(family, seed=0), build_processor(family)
    inputs = _one(family, proc)
    with torch.no_grad(), lmms_prune.apply(model, "cdpruner", keep_ratio=0.1) as handle:
        seen = {}
        original = handle.selector

        def spy(image, scores, n):
            seen.update(emb=image.embeddings, text=image.instruction, scores=scores, n=n)
            return original(image, scores, n)

        handle.selector = spy
        model(**inputs)
        rec = handle.records[0]
    ids = inputs["input_ids"][0]
    last_image = int(torch.nonzero(ids == model.config.image_token_id).max())
    with torch.no_grad():
        expected_text = model.get_input_embeddings()(ids[last_image + 1:])
    torch.testing.assert_close(seen["text"], expected_text)
    q = authors_relevance(seen["emb"].float(), expected_text.float())  # relevance_sign='negated', the default
    torch.testing.assert_close(seen["scores"], q)
    assert rec.kept[0].tolist() == sel.cdpruner(seen["emb"], q, seen["n"]).tolist()
    assert rec.visual_after == max(1, round(0.1 * _num_visual(model, inputs)))


@pytest.mark.parametrize("seed", range(5))
def test_picks_near_the_kernel_rank_stay_finite(seed):
    """At n close to the rank, the last gains are tiny; a pick must never take a negative (rounded) gain."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(120, 8, generator=g)
    q = torch.rand(120, generator=g) ** 4 + 1e-5
    for n in (7, 8, 9, 12):
        out = sel.cdpruner(features, q, n)
        assert out.numel() == n and out.tolist() == sorted(set(out.tolist()))
