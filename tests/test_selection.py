"""Properties of the selection algorithms (methods.md section 5), checked against literal references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmms_prune.selection import (
    block_quotas,
    budget,
    dart,
    divprune,
    fused_graph,
    grid_adjacency,
    normalized_similarity,
    pivot_mis,
    random_select,
    remove_duplicates,
    topk,
    uniform_select,
    vispruner,
)

torch.set_num_threads(1)

GRIDS = [(3, 4), (2, 3), (1, 1)]  # 19 tokens: two tiles and a one-token block
N_GRIDS = 19


def assert_selection(kept: torch.Tensor, n: int, num_tokens: int) -> None:
    """The output contract: exactly n unique int64 indices in [0, N), ascending."""
    assert kept.dtype == torch.long
    assert kept.shape == (n,)
    assert bool((kept[1:] > kept[:-1]).all()), "indices must be strictly ascending (hence unique)"
    assert 0 <= int(kept.min()) and int(kept.max()) < num_tokens


def distinct_scores(num_tokens: int, seed: int) -> torch.Tensor:
    return torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed)).double()


def clustered_features(num_tokens: int, seed: int, dim: int = 6) -> torch.Tensor:
    """float64 features drawn around a few centres, so that many pairs are very similar (graphs have edges)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    members = torch.randint(0, 3, (num_tokens,), generator=gen)
    return centres[members] + 0.3 * torch.randn(num_tokens, dim, generator=gen, dtype=torch.float64)


def rank_order(scores: torch.Tensor) -> list[int]:
    return sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))


def coordinates(grids: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(block, row, col) of every token, row-major inside consecutive blocks."""
    return [(b, r, c) for b, (rows, cols) in enumerate(grids) for r in range(rows) for c in range(cols)]


def reference_graph(features: torch.Tensor, grids, alpha: float, theta: float) -> torch.Tensor:
    """D2Pruner eqs. 4-8 written out literally in float64."""
    unit = features / features.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    sem = (cos - cos.min()) / (cos.max() - cos.min())
    coords = coordinates(grids)
    spat = torch.tensor(
        [[float(bi == bj and (ri, ci) != (rj, cj) and abs(ri - rj) <= 1 and abs(ci - cj) <= 1)
          for bj, rj, cj in coords] for bi, ri, ci in coords],
        dtype=torch.float64,
    )
    edges = alpha * sem + (1 - alpha) * spat > theta
    edges.fill_diagonal_(False)
    return edges


def reference_pivot_mis(scores, edges, n, r_pivot) -> tuple[list[int], bool]:
    """Steps 2-5 with Python sets; also says whether the fill step was needed."""
    order = rank_order(scores)
    pivots = order[: math.floor(n * r_pivot + 1e-9)]
    kept = list(pivots)
    pool = [i for i in order if i not in pivots and not any(edges[p, i] for p in pivots)]
    while pool and len(kept) < n:
        pick = pool.pop(0)
        kept.append(pick)
        pool = [i for i in pool if not edges[pick, i]]
    filled = len(kept) < n
    kept += [i for i in order if i not in kept][: n - len(kept)]
    return sorted(kept), filled


# --- budget --------------------------------------------------------------------------------------------


def test_budget_rounds_the_ratio_and_keeps_at_least_one():
    assert budget(256, keep_ratio=0.1) == 26  # methods.md section 1
    assert budget(576, keep_ratio=0.25) == 144
    assert budget(10, keep_ratio=0.001) == 1
    assert budget(7, keep_ratio=1.0) == 7


def test_budget_and_grids_accept_numpy_integers():
    assert budget(np.int64(256), keep_ratio=0.1) == 26
    assert uniform_select([(np.int64(2), np.int64(2))], np.int64(2)).tolist() == [2, 3]  # one lattice row


def test_budget_caps_keep_tokens_at_n():
    assert budget(256, keep_tokens=64) == 64
    assert budget(256, keep_tokens=1000) == 256


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"keep_ratio": 1.5}, "keep_ratio=1.5"),
        ({"keep_ratio": 0.0}, "keep_ratio=0.0"),
        ({"keep_ratio": float("nan")}, "keep_ratio=nan"),
        ({"keep_tokens": 0}, "keep_tokens=0"),
        ({"keep_ratio": 0.5, "keep_tokens": 3}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_budget_rejects_bad_values_by_name(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        budget(256, **kwargs)


# --- top-k ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_topk_keeps_the_n_best_with_ties_to_the_lower_index(seed):
    scores = torch.randint(0, 4, (15,), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    for n in range(1, 16):
        kept = topk(scores, n)
        assert_selection(kept, n, 15)
        assert kept.tolist() == sorted(rank_order(scores)[:n])


@pytest.mark.parametrize(
    "scores, n, shown",
    [
        (torch.rand(5), 0, "n=0"),
        (torch.rand(5), 6, "n=6"),
        (torch.rand(5, 2), 1, r"shape \(5, 2\)"),
        (torch.tensor([1.0, float("nan")]), 1, "NaN"),
        (torch.arange(5), 1, "floating"),
    ],
)
def test_topk_rejects_bad_inputs(scores, n, shown):
    with pytest.raises(ValueError, match=shown):
        topk(scores, n)


# --- grid adjacency and the fused graph ----------------------------------------------------------------


@pytest.mark.parametrize("grids", [[(4, 5)], [(3, 4), (2, 3), (1, 1)], [(1, 6), (6, 1), (2, 2)]])
def test_grid_adjacency_is_the_8_neighbourhood_inside_each_block(grids):
    adjacency = grid_adjacency(grids)
    coords = coordinates(grids)
    expected = [
        [bi == bj and (ri, ci) != (rj, cj) and abs(ri - rj) <= 1 and abs(ci - cj) <= 1 for bj, rj, cj in coords]
        for bi, ri, ci in coords
    ]
    assert adjacency.tolist() == expected


def test_grid_adjacency_of_a_16x16_tile_has_3_5_8_neighbours_and_never_crosses_tiles():
    adjacency = grid_adjacency([(16, 16), (16, 16)])
    degree = adjacency.sum(dim=1).view(2, 16, 16)
    assert degree[:, 0, 0].tolist() == [3, 3] and degree[:, 0, 5].tolist() == [5, 5]
    assert bool((degree[:, 1:-1, 1:-1] == 8).all())
    assert not adjacency[:256, 256:].any()


@pytest.mark.parametrize("alpha, theta", [(0.5, 0.8), (0.3, 0.5), (0.8, 0.8), (0.9, 0.8), (1.0, 0.8), (1.0, 0.95)])
def test_fused_graph_equals_the_literal_formula(alpha, theta):
    for seed in range(3):
        features = clustered_features(N_GRIDS, seed)
        graph = fused_graph(features, GRIDS, alpha=alpha, theta_sim=theta)
        assert torch.equal(graph, reference_graph(features, GRIDS, alpha, theta))


def test_fused_graph_matches_the_formula_across_several_similarity_slabs():
    grids = [(16, 16), (16, 16), (10, 10)]  # 612 tokens: more than one 512-row slab
    features = clustered_features(612, seed=7, dim=8)
    for alpha in (0.5, 0.9, 1.0):
        graph = fused_graph(features, grids, alpha=alpha, theta_sim=0.8)
        assert graph.any()
        assert torch.equal(graph, reference_graph(features, grids, alpha, 0.8))


def test_fused_graph_needs_the_fused_similarity_strictly_above_theta():
    # cosines are -1, 0 or 1, so S_sem_hat is exactly 0, 0.5 or 1 for these three tokens in a row
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert not fused_graph(features, [(1, 3)], alpha=0.5, theta_sim=0.75).any()  # 0.5 * 0.5 + 0.5 = theta
    assert fused_graph(features, [(1, 3)], alpha=0.5, theta_sim=0.74).sum() == 4  # two pairs, both ways
    assert not fused_graph(features, [(1, 3)], alpha=1.0, theta_sim=0.5).any()
    assert fused_graph(features, [(1, 3)], alpha=1.0, theta_sim=0.49).sum() == 4


def test_fused_graph_normalises_by_the_minimum_of_the_whole_matrix():
    # the only negative cosine joins tokens 600 and 611, which both live in the last 512-row slab
    gen = torch.Generator().manual_seed(0)
    features = torch.zeros(612, 3, dtype=torch.float64)
    features[:, 0] = 1.0
    features[:, 1:] = 0.1 * torch.rand(612, 2, generator=gen, dtype=torch.float64)
    features[600] = torch.tensor([0.0, 0.0, 1.0])
    features[611] = torch.tensor([0.0, 0.0, -1.0])
    grids = [(16, 16), (16, 16), (10, 10)]
    for alpha, theta in [(0.5, 0.99), (1.0, 0.995)]:
        graph = fused_graph(features, grids, alpha=alpha, theta_sim=theta)
        assert torch.equal(graph, reference_graph(features, grids, alpha, theta))
        assert graph.any() and not graph.all()


def test_fused_graph_alpha_one_ignores_space_and_alpha_zero_ignores_features():
    features = clustered_features(24, seed=3)
    one_grid, other_grids = [(4, 6)], [(2, 2), (5, 4)]
    semantic = normalized_similarity(features) > 0.8
    semantic.fill_diagonal_(False)
    assert torch.equal(fused_graph(features, one_grid, alpha=1.0), semantic)
    assert torch.equal(fused_graph(features, other_grids, alpha=1.0), semantic)
    for seed in range(3):
        other_features = clustered_features(24, seed=10 + seed)
        assert torch.equal(fused_graph(other_features, other_grids, alpha=0.0), grid_adjacency(other_grids))


def test_fused_graph_edges_stay_inside_blocks_when_alpha_is_at_most_theta():
    features = torch.ones(N_GRIDS, 4, dtype=torch.float64)  # every pair maximally similar
    graph = fused_graph(features, GRIDS, alpha=0.5, theta_sim=0.8)
    assert torch.equal(graph, grid_adjacency(GRIDS))


# --- D2Pruner pivot + MIS ------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, theta", [(0.5, 0.8), (0.2, 0.6), (1.0, 0.8), (1.0, 0.7)])
def test_pivot_mis_matches_the_reference_for_every_budget(alpha, theta):
    for seed in range(3):
        scores, features = distinct_scores(N_GRIDS, seed), clustered_features(N_GRIDS, seed)
        edges = reference_graph(features, GRIDS, alpha, theta)
        for n in range(1, N_GRIDS + 1):
            kept = pivot_mis(scores, features, GRIDS, n, r_pivot=0.5, theta_sim=theta, alpha=alpha)
            assert_selection(kept, n, N_GRIDS)
            assert kept.tolist() == reference_pivot_mis(scores, edges, n, 0.5)[0]


@settings(max_examples=60, deadline=None)
@given(
    grids=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
    seed=st.integers(0, 10_000),
    budget_share=st.floats(0.01, 1.0),
    r_pivot=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    alpha=st.sampled_from([0.5, 1.0]),
)
def test_pivot_mis_properties(grids, seed, budget_share, r_pivot, alpha):
    num_tokens = sum(r * c for r, c in grids)
    n = max(1, min(num_tokens, round(budget_share * num_tokens)))
    scores, features = distinct_scores(num_tokens, seed), clustered_features(num_tokens, seed)
    kept = pivot_mis(scores, features, grids, n, r_pivot=r_pivot, alpha=alpha)
    assert_selection(kept, n, num_tokens)
    edges = fused_graph(features, grids, alpha=alpha, theta_sim=0.8)
    pivots = rank_order(scores)[: math.floor(n * r_pivot + 1e-9)]
    assert set(pivots) <= set(kept.tolist()), "the top floor(n * r_pivot) tokens are always kept"
    _, filled = reference_pivot_mis(scores, edges, n, r_pivot)
    if not filled:
        expansion = [i for i in kept.tolist() if i not in pivots]
        for i in expansion:
            assert not any(edges[i, j] for j in expansion + pivots), "expansion picks are independent"


def test_pivot_mis_without_edges_is_topk():
    for seed in range(3):
        scores, features = distinct_scores(N_GRIDS, seed), clustered_features(N_GRIDS, seed)
        for n in range(1, N_GRIDS + 1):
            for theta in (1.0, 1.5):
                assert torch.equal(pivot_mis(scores, features, GRIDS, n, theta_sim=theta), topk(scores, n))


def test_pivot_mis_fills_from_the_most_important_when_the_pool_runs_dry():
    scores = distinct_scores(N_GRIDS, 0)
    features = torch.ones(N_GRIDS, 3)  # alpha=1: a complete graph, so pivots remove every candidate
    for n in range(1, N_GRIDS + 1):
        assert torch.equal(pivot_mis(scores, features, GRIDS, n, alpha=1.0), topk(scores, n))


def test_pivot_mis_spreads_picks_over_a_uniform_tile():
    scores = torch.linspace(1.0, 0.0, 16)  # raster order = importance order
    features = torch.ones(16, 3)
    kept = pivot_mis(scores, features, [(4, 4)], n=4, r_pivot=0.25, alpha=0.5)  # edges = 8-neighbours
    assert kept.tolist() == [0, 2, 8, 10]


def test_pivot_mis_handles_the_benchmark_size_quickly():
    grids = [(16, 16)] * 13
    features, scores = torch.randn(3328, 896), torch.rand(3328)
    kept = pivot_mis(scores, features, grids, 333)
    assert_selection(kept, 333, 3328)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"n": 0}, "n=0"),
        ({"n": 20}, "n=20"),
        ({"grids": [(3, 4)]}, "hold 12 tokens but N=19"),
        ({"grids": [(3, 0), (19, 1)]}, r"\(3, 0\)"),
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"r_pivot": -0.1}, "r_pivot=-0.1"),
        ({"theta_sim": -1.0}, "theta_sim=-1.0"),
        ({"features": torch.rand(18, 4)}, "18 rows"),
    ],
)
def test_pivot_mis_rejects_bad_inputs(kwargs, shown):
    args = {"scores": torch.rand(N_GRIDS), "features": torch.rand(N_GRIDS, 4), "grids": GRIDS, "n": 5}
    with pytest.raises(ValueError, match=shown):
        pivot_mis(**{**args, **kwargs})


# --- VisPruner -----------------------------------------------------------------------------------------


def reference_duplicate_removal(features: torch.Tensor, num_keep: int) -> list[int]:
    """VisPruner Algorithm 1, one fresh a @ b.T per round as in the paper's listing."""
    unit = features / features.norm(dim=1, keepdim=True)
    remaining = list(range(features.shape[0]))
    r = min(8, len(remaining) - num_keep)
    while r > 0:
        a, b = remaining[0::2], remaining[1::2]
        score = (unit[a] @ unit[b].T).max(dim=1).values.tolist()
        by_score = sorted(range(len(a)), key=lambda k: -score[k])  # Python's sort is stable
        remaining = [a[k] for k in by_score[r:]] + b
        r = min(r, len(remaining) - num_keep)
    return remaining


class TheirIndexingFails(Exception):
    """Raised by the reference where the authors' batched indexing raises (their code, not the algorithm)."""


def reference_authors_vispruner(importance, features, n, ratio) -> list[int]:
    """The VisPruner authors' selection loop (llava_arch.encode_images), rewritten with Python lists.

    Candidates start in descending-importance order. Where their ``expand(-1, R // 2 - r)`` index does not
    broadcast against the ``ceil(R / 2) - r`` surviving ``a`` tokens (odd lists, or ``r`` above ``R // 2 + 1``),
    their code raises; so does this reference.
    """
    unit = features / features.norm(dim=1, keepdim=True)
    order = sorted(range(importance.numel()), key=lambda i: -float(importance[i]))
    num_important = int(n * ratio)
    residual, diverse = order[num_important:], n - num_important
    while diverse > 0:
        length = len(residual)
        r = min(8, length - diverse)
        if r <= 0:
            break
        survivors = (length + 1) // 2 - r
        expanded = length // 2 - r
        if not (expanded == survivors or expanded == 1 or (expanded == -1 and survivors <= 0)):
            raise TheirIndexingFails(f"R={length}, r={r}")
        a, b = residual[0::2], residual[1::2]
        score = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        by_score = sorted(range(len(a)), key=lambda k: -score[k])
        residual = [a[k] for k in by_score[r:]] + b
    return sorted(order[:num_important] + (residual if diverse > 0 else []))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8])
def test_vispruner_matches_algorithm_1_in_patch_order_with_residual_order_original(ratio):
    num_tokens = 40
    for seed in range(2):
        importance = distinct_scores(num_tokens, seed)
        features = torch.randn(num_tokens, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        order = rank_order(importance)
        for n in range(1, num_tokens + 1):
            kept = vispruner(importance, features, n, important_ratio=ratio, residual_order="original")
            assert_selection(kept, n, num_tokens)
            n_imp = math.floor(n * ratio + 1e-9)
            rest = sorted(order[n_imp:])
            diverse = [rest[k] for k in reference_duplicate_removal(features[rest], n - n_imp)]
            assert set(order[:n_imp]) <= set(kept.tolist()), "the top floor(n * r) are kept"
            assert kept.tolist() == sorted(order[:n_imp] + diverse)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.8])
def test_vispruner_equals_the_authors_loop_wherever_their_code_runs(ratio):
    compared = 0
    for num_tokens, seed in [(40, 0), (41, 1), (64, 2)]:
        importance = torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        features = torch.randn(num_tokens, 6, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
        for n in range(1, num_tokens + 1):
            try:
                expected = reference_authors_vispruner(importance, features, n, ratio)
            except TheirIndexingFails:
                continue
            compared += 1
            assert vispruner(importance, features, n, important_ratio=ratio).tolist() == expected
    assert compared >= 60, "the comparison must cover many budgets"


def test_vispruner_residual_order_changes_which_tokens_are_paired():
    # The start order decides the a/b pairs of every round, so the two orders are different methods.
    importance = torch.rand(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    features = torch.randn(64, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    differ = sum(
        vispruner(importance, features, n).tolist() != vispruner(importance, features, n, residual_order="original").tolist()
        for n in range(8, 40)
    )
    assert differ >= 16


@pytest.mark.parametrize("num_tokens", [7, 21, 33, 99])
def test_vispruner_never_crashes_on_odd_candidate_lists_and_keeps_exactly_n(num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    importance = torch.rand(num_tokens, generator=gen)
    features = torch.randn(num_tokens, 4, generator=gen)
    for order in ("descending", "original"):
        for ratio in (0.0, 0.5):
            for n in range(1, num_tokens + 1):
                assert_selection(vispruner(importance, features, n, ratio, residual_order=order), n, num_tokens)


def test_remove_duplicates_splits_an_odd_list_with_a_one_longer_than_b():
    for length in (5, 9, 17, 23):
        features = torch.randn(length, 4, generator=torch.Generator().manual_seed(length), dtype=torch.float64)
        for keep in range(1, length + 1):
            assert remove_duplicates(features, keep).tolist() == reference_duplicate_removal(features, keep)


def near_duplicate_features(num_tokens: int, seed: int, dim: int = 48, spread: float = 1e-3) -> torch.Tensor:
    """float32 features of a nearly plain image: one vector plus tiny per-token differences. Their cosine
    similarities differ by ~1e-7, float32's rounding, as for the demo's background patches."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=gen)
    return (base + spread * torch.randn(num_tokens, dim, generator=gen)).float()


@pytest.mark.parametrize("seed", range(4))
def test_selections_depend_on_the_feature_values_not_on_their_rounding(seed):
    # The same values in float32 and float64, and with the feature dimensions permuted (a different
    # accumulation order, as another BLAS kernel or CPU instruction set uses), must select the same
    # tokens: near-tie decisions may not be left to float32 rounding.
    num_tokens, n = 96, 16
    features = near_duplicate_features(num_tokens + 6, seed)  # the last 6 rows are DART's text tokens
    perm = torch.randperm(features.shape[1], generator=torch.Generator().manual_seed(seed))
    variants = (features, features.double(), features[:, perm], features[:, perm].double())
    importance = torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed + 100))
    text_norms = torch.rand(6, generator=torch.Generator().manual_seed(seed + 200))
    for order in ("descending", "original"):
        picks = [vispruner(importance, f[:num_tokens], n, residual_order=order).tolist() for f in variants]
        assert all(p == picks[0] for p in picks), order
    picks = [divprune(f[:num_tokens], n).tolist() for f in variants]
    assert all(p == picks[0] for p in picks), "divprune"
    picks = [dart(importance, f[:num_tokens], n, text_key_norms=text_norms, text_features=f[num_tokens:]).tolist()
             for f in variants]
    assert all(p == picks[0] for p in picks), "dart"


def test_vispruner_with_ratio_one_is_topk():
    importance, features = torch.rand(30), torch.randn(30, 4)
    for n in range(1, 31):
        assert torch.equal(vispruner(importance, features, n, important_ratio=1.0), topk(importance, n))


def test_remove_duplicates_drops_an_exact_copy_first():
    features = torch.eye(6, dtype=torch.float64)
    features[2] = features[3]  # tokens 2 (an `a` token) and 3 (a `b` token) are duplicates
    assert sorted(remove_duplicates(features, 5).tolist()) == [0, 1, 3, 4, 5]


def test_vispruner_rejects_bad_ratio_order_and_shapes():
    with pytest.raises(ValueError, match="important_ratio=1.2"):
        vispruner(torch.rand(8), torch.rand(8, 3), 4, important_ratio=1.2)
    with pytest.raises(ValueError, match="residual_order='patch'"):
        vispruner(torch.rand(8), torch.rand(8, 3), 4, residual_order="patch")
    with pytest.raises(ValueError, match="7 rows"):
        vispruner(torch.rand(8), torch.rand(7, 3), 4)
    with pytest.raises(ValueError, match="num_keep=9"):
        remove_duplicates(torch.rand(8, 3), 9)


# --- DivPrune ------------------------------------------------------------------------------------------


def reference_divprune_order(features: torch.Tensor, n: int) -> list[int]:
    """Brute-force greedy max-min on 1 - cosine, returning the pick order."""
    unit = features / features.norm(dim=1, keepdim=True)
    distance = (1 - unit @ unit.T).tolist()
    num_tokens = len(distance)
    nearest_other = [min(distance[i][j] for j in range(num_tokens) if j != i) for i in range(num_tokens)]
    picks = [max(range(num_tokens), key=lambda i: (nearest_other[i], -i))]
    while len(picks) < n:
        rest = [i for i in range(num_tokens) if i not in picks]
        picks.append(max(rest, key=lambda i: (min(distance[i][p] for p in picks), -i)))
    return picks


@pytest.mark.parametrize("seed", range(3))
def test_divprune_picks_the_farthest_token_each_step(seed):
    features = torch.randn(25, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    full_order = reference_divprune_order(features, 25)
    for n in range(1, 26):
        kept = divprune(features, n)
        assert_selection(kept, n, 25)
        assert kept.tolist() == sorted(full_order[:n])


def test_divprune_keeps_one_of_each_duplicate_group_before_any_second_copy():
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    features = base.repeat(3, 1)  # tokens i, i+4, i+8 are identical
    kept = divprune(features, 4)
    assert sorted(i % 4 for i in kept.tolist()) == [0, 1, 2, 3]


def test_divprune_single_token():
    assert divprune(torch.randn(1, 3), 1).tolist() == [0]


# --- DART ----------------------------------------------------------------------------------------------


def reference_dart(key_norms, features, n, num_pivots, text_norms=None, text=None, num_text_pivots=4) -> list[int]:
    """Our documented rule, literally: pivots in order, shares split with the remainder to the first."""
    unit = features / features.norm(dim=1, keepdim=True)
    pivots = rank_order(key_norms)[: min(num_pivots, n)]
    pivot_units = [unit[p] for p in pivots]
    if text is not None:
        chosen = rank_order(text_norms)[:num_text_pivots]
        pivot_units += [text[t] / text[t].norm() for t in chosen]
    share, extra = divmod(n - len(pivots), len(pivot_units))
    kept = list(pivots)
    for k, pivot in enumerate(pivot_units):
        candidates = [i for i in range(features.shape[0]) if i not in kept]
        candidates.sort(key=lambda i: (float(unit[i] @ pivot), i))
        kept += candidates[: share + (k < extra)]
    return sorted(kept)


def reference_authors_dart(key_norms, features, text_norms, text, num_pivots, num_text_pivots, token_topk) -> list[int]:
    """The DART authors' get_retained_image_token, rewritten over one sequence [visual tokens, text tokens]
    with Python sets, iterating the pivots by descending key norm, visual first (theirs: set order)."""
    sequence = torch.cat([features, text])
    num_visual = features.shape[0]
    image_pivots = sorted(range(num_visual), key=lambda i: -float(key_norms[i]))[:num_pivots]
    text_pivots = [num_visual + t for t in sorted(range(text.shape[0]), key=lambda t: -float(text_norms[t]))]
    text_pivots = text_pivots[:num_text_pivots]
    kept = set(image_pivots + text_pivots)
    valid = set(range(num_visual)) - set(image_pivots)
    for pivot in image_pivots + text_pivots:
        cosine = {i: float(F.cosine_similarity(sequence[pivot], sequence[i], dim=0)) for i in valid}
        least_similar = sorted(valid, key=lambda i: cosine[i])[:token_topk]
        kept.update(least_similar)
        valid.difference_update(least_similar)
    return sorted(kept - set(text_pivots))


@pytest.mark.parametrize("num_pivots", [1, 3, 8])
def test_dart_keeps_its_pivots_and_matches_the_reference(num_pivots):
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        key_norms = distinct_scores(30, seed)
        features = torch.randn(30, 5, generator=gen, dtype=torch.float64)
        text = torch.randn(5, 5, generator=gen, dtype=torch.float64)
        text_norms = distinct_scores(5, seed + 1)
        for n in range(1, 31):
            kept = dart(key_norms, features, n, num_pivots=num_pivots)
            assert_selection(kept, n, 30)
            assert set(rank_order(key_norms)[: min(num_pivots, n)]) <= set(kept.tolist())
            assert kept.tolist() == reference_dart(key_norms, features, n, num_pivots)
            with_text = dart(key_norms, features, n, num_pivots=num_pivots, text_key_norms=text_norms,
                             text_features=text, num_text_pivots=2)
            assert_selection(with_text, n, 30)
            assert set(rank_order(key_norms)[: min(num_pivots, n)]) <= set(with_text.tolist())
            assert with_text.tolist() == reference_dart(key_norms, features, n, num_pivots, text_norms, text, 2)


@pytest.mark.parametrize(("num_pivots", "num_text_pivots"), [(4, 4), (2, 3), (1, 0)])
def test_dart_equals_the_authors_loop_when_the_budget_splits_evenly(num_pivots, num_text_pivots):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        key_norms = torch.rand(48, generator=gen, dtype=torch.float64)
        features = torch.randn(48, 8, generator=gen, dtype=torch.float64)
        text_norms = torch.rand(7, generator=gen, dtype=torch.float64)
        text = torch.randn(7, 8, generator=gen, dtype=torch.float64)
        pivots = num_pivots + num_text_pivots
        for token_topk in range(0, (48 - num_pivots) // pivots + 1):
            n = num_pivots + pivots * token_topk  # the authors keep exactly this many
            kept = dart(key_norms, features, n, num_pivots, text_norms, text, num_text_pivots)
            expected = reference_authors_dart(key_norms, features, text_norms, text, num_pivots, num_text_pivots,
                                              token_topk)
            assert kept.tolist() == expected


def test_dart_defaults_are_the_authors_4_visual_and_4_text_pivots():
    gen = torch.Generator().manual_seed(5)
    key_norms, features = torch.rand(60, generator=gen, dtype=torch.float64), torch.randn(60, 6, generator=gen, dtype=torch.float64)
    text_norms, text = torch.rand(9, generator=gen, dtype=torch.float64), torch.randn(9, 6, generator=gen, dtype=torch.float64)
    for n in (4, 12, 28, 52):
        assert dart(key_norms, features, n, text_key_norms=text_norms, text_features=text).tolist() == \
            reference_authors_dart(key_norms, features, text_norms, text, 4, 4, (n - 4) // 8)


def test_dart_text_pivots_claim_budget_but_are_never_kept():
    # Visual pivot 0 = [1, 0]; its least similar token is 1 = [-1, 0]; tokens 2 and 3 are equally dissimilar.
    features = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.9, 0.1]])
    key_norms = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0])
    assert dart(key_norms, features, 3, num_pivots=1).tolist() == [0, 1, 2]  # the tie goes to token 2
    # One text pivot [0, 1] takes one of the two picks: its least similar visual token, 3.
    with_text = dart(key_norms, features, 3, num_pivots=1, text_key_norms=torch.tensor([2.0, 1.0]),
                     text_features=torch.tensor([[0.0, 1.0], [1.0, 0.0]]), num_text_pivots=1)
    assert with_text.tolist() == [0, 1, 3]


def test_dart_one_pivot_adds_the_least_similar_tokens():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]])
    key_norms = torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0])
    assert dart(key_norms, features, 3, num_pivots=1).tolist() == [0, 2, 3]


def test_dart_rejects_bad_pivot_counts_and_text_inputs():
    with pytest.raises(ValueError, match="num_pivots=0"):
        dart(torch.rand(5), torch.rand(5, 2), 2, num_pivots=0)
    with pytest.raises(ValueError, match="num_text_pivots=-1"):
        dart(torch.rand(5), torch.rand(5, 2), 2, text_key_norms=torch.rand(3), text_features=torch.rand(3, 2),
             num_text_pivots=-1)
    with pytest.raises(ValueError, match="go together"):
        dart(torch.rand(5), torch.rand(5, 2), 2, text_key_norms=torch.rand(3))
    with pytest.raises(ValueError, match="D=3"):
        dart(torch.rand(5), torch.rand(5, 2), 2, text_key_norms=torch.rand(3), text_features=torch.rand(3, 3))
    with pytest.raises(ValueError, match="2 rows"):
        dart(torch.rand(5), torch.rand(5, 2), 2, text_key_norms=torch.rand(3), text_features=torch.rand(2, 2))


# --- random and uniform baselines ----------------------------------------------------------------------


def test_random_select_is_reproducible_per_seed_and_differs_across_seeds():
    draws = [random_select(100, 10, seed=s) for s in range(20)]
    for s, kept in enumerate(draws):
        assert_selection(kept, 10, 100)
        assert torch.equal(kept, random_select(100, 10, seed=s))
    assert len({tuple(d.tolist()) for d in draws}) == 20


def test_random_select_reaches_every_token():
    seen = set()
    for seed in range(200):
        seen.update(random_select(20, 5, seed=seed).tolist())
    assert seen == set(range(20))


def test_block_quotas_use_largest_remainder():
    # exact shares 7.69, 7.69, 7.69, 1.92: the 3 leftover tokens go to the last block, then the earlier ties
    assert block_quotas([(16, 16)] * 3 + [(8, 8)], 25) == [8, 8, 7, 2]
    assert block_quotas([(16, 16)] * 3 + [(8, 8)], 26) == [8, 8, 8, 2]
    for n in range(1, 95):
        quotas = block_quotas([(4, 4), (2, 3), (9, 8)], n)
        assert sum(quotas) == n
        assert all(abs(q - n * s / 94) < 1 for q, s in zip(quotas, [16, 6, 72]))


def test_uniform_select_spreads_over_blocks_and_inside_them():
    grids = [(4, 4), (2, 3), (16, 16)]
    starts = [0, 16, 22]
    for n in range(1, 279):
        kept = uniform_select(grids, n)
        assert_selection(kept, n, 278)
        per_block = [int(((kept >= a) & (kept < a + r * c)).sum()) for a, (r, c) in zip(starts, grids)]
        assert per_block == block_quotas(grids, n)
    for k in range(4, 257):
        local = uniform_select([(16, 16)], k)
        rows, cols = local // 16, local % 16
        for top in (rows < 8, rows >= 8):
            for left in (cols < 8, cols >= 8):
                assert int((top & left).sum()) >= k // 8, f"k={k}: a quadrant of the tile is nearly empty"


def test_uniform_select_square_budgets_give_the_centred_lattice():
    for m, centres in [(1, [8]), (2, [4, 12]), (4, [2, 6, 10, 14])]:
        expected = sorted(r * 16 + c for r in centres for c in centres)
        assert uniform_select([(16, 16)], m * m).tolist() == expected


def test_baselines_reject_bad_inputs():
    with pytest.raises(ValueError, match="n=11"):
        random_select(10, 11, seed=0)
    with pytest.raises(ValueError, match="seed=1.5"):
        random_select(10, 2, seed=1.5)
    with pytest.raises(ValueError, match="n=0"):
        uniform_select([(2, 2)], 0)
