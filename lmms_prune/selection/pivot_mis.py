"""D2Pruner: pivots plus a greedy maximal independent set on a semantic-spatial graph.

Implements methods.md section 5 ("D2Pruner pivot + maximal independent set"), i.e. the D2Pruner paper's
"Adjacency Graph Construction" (eqs. 5-8) and "Pivot-based Diverse Token Selection". The deep-layer paper
uses the same selection with raw deep-layer attention as the importance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import (
    Grid,
    check_budget,
    check_features,
    check_grids,
    check_same_device,
    check_scores,
    check_unit_interval,
    descending_order,
    floor_fraction,
    sorted_indices,
)
from lmms_prune.selection.temporal import temporal_neighbour_pairs

_OFFSETS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def grid_neighbour_pairs(grids: Sequence[Grid], device: torch.device | str | None = None,
                         temporal_adjacency: bool = False) -> tuple[Tensor, Tensor]:
    """All ordered pairs ``(i, j)`` of 8-neighbours that lie inside one grid block.

    Blocks are consecutive runs of ``rows * cols`` tokens in row-major order (one InternVL tile, one
    Qwen2.5-VL image, one video frame, ...); a pair never crosses blocks. Both ``(i, j)`` and ``(j, i)`` are
    listed. ``temporal_adjacency``: the blocks are a video's frames (all one shape), and the same cell of
    neighbouring frames is linked too (``selection.temporal.temporal_neighbour_pairs``; methods.md section 1's
    documented option).

    Returns:
        ``(src, dst)``, two int64 tensors ``[E]`` on ``device``.
    """
    blocks = check_grids(grids)
    sizes = torch.tensor([r * c for r, c in blocks], device=device)
    rows = torch.tensor([r for r, _ in blocks], device=device).repeat_interleave(sizes)
    cols = torch.tensor([c for _, c in blocks], device=device).repeat_interleave(sizes)
    start = (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes)
    index = torch.arange(int(sizes.sum()), device=device)
    row, col = (index - start) // cols, (index - start) % cols
    src, dst = [], []
    for dr, dc in _OFFSETS:
        nr, nc = row + dr, col + dc
        inside = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols)
        src.append(index[inside])
        dst.append((start + nr * cols + nc)[inside])
    if temporal_adjacency:
        later_src, later_dst = temporal_neighbour_pairs(blocks, device)
        src.append(later_src)
        dst.append(later_dst)
    return torch.cat(src), torch.cat(dst)


def grid_adjacency(grids: Sequence[Grid], device: torch.device | str | None = None,
                   temporal_adjacency: bool = False) -> Tensor:
    """``S_spat`` of D2Pruner eq. 6 as a bool ``[N, N]`` matrix: True for 8-neighbours inside one block.

    ``N = sum(rows * cols)``; no self loops; adjacency never crosses blocks (methods.md section 1: tiles
    are separate grids, the thumbnail is its own block), except the same cell of neighbouring video frames
    with ``temporal_adjacency`` (see ``grid_neighbour_pairs``).
    """
    src, dst = grid_neighbour_pairs(grids, device, temporal_adjacency)
    num_tokens = sum(r * c for r, c in check_grids(grids))
    adjacency = torch.zeros(num_tokens, num_tokens, dtype=torch.bool, device=device)
    adjacency[src, dst] = True
    return adjacency


def normalized_similarity(features: Tensor) -> Tensor:
    """``S_sem_hat`` of D2Pruner eqs. 4-5: pairwise cosine similarity, min-max normalised over the matrix.

    The min and max run over the whole ``[N, N]`` matrix, diagonal included. If the matrix is constant
    (every token parallel to every other) it normalises to all ones: all tokens are equally, maximally
    similar. Computed in at least float32.

    Args:
        features: ``[N, D]`` token features (D2Pruner: hidden states at the pruning layer's input).

    Returns:
        ``[N, N]`` similarities in [0, 1].
    """
    check_features(features)
    unit = _unit_rows(features)
    similarity = unit @ unit.T
    low, high = torch.aminmax(similarity)
    if high == low:
        return torch.ones_like(similarity)
    return similarity.sub_(low).div_(high - low)


def _unit_rows(features: Tensor) -> Tensor:
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)


def _upper_slabs(unit: Tensor, block: int = 512) -> list[tuple[int, Tensor]]:
    """The upper block triangle of ``unit @ unit.T`` as ``(start, unit[start:start+block] @ unit[start:].T)``.

    Row ``i`` of a slab is token ``start + i``; column ``j`` is token ``start + j``. About half the work of
    the dense matrix.
    """
    return [(start, unit[start : start + block] @ unit[start:].T) for start in range(0, unit.shape[0], block)]


def fused_graph(features: Tensor, grids: Sequence[Grid], alpha: float = 0.5, theta_sim: float = 0.8,
                temporal_adjacency: bool = False) -> Tensor:
    """D2Pruner's binary adjacency graph (eqs. 7-8) as a symmetric bool ``[N, N]`` matrix.

    ``S_fused = alpha * S_sem_hat + (1 - alpha) * S_spat`` with ``S_sem_hat`` as in
    ``normalized_similarity`` and ``S_spat`` as in ``grid_adjacency``; an edge joins ``i != j`` iff
    ``S_fused(i, j) > theta_sim``. Each unordered pair is decided once, from its ``i < j`` entry, so the
    graph is exactly symmetric, and only the upper triangle of the similarity matrix is computed. With
    ``alpha <= theta_sim`` only grid neighbours can pass the threshold (``alpha * S_sem_hat <= alpha``),
    so only their fused values are formed.

    Args:
        features: ``[N, D]`` token features.
        grids: ``(rows, cols)`` blocks whose sizes sum to N (see ``grid_adjacency``).
        alpha: weight of semantic similarity in [0, 1] (paper: 0.5 grounding, 1.0 understanding).
        theta_sim: edge threshold, >= 0 (paper: 0.8); ``theta_sim >= 1`` gives no edges.
        temporal_adjacency: ``S_spat`` also links the same cell of neighbouring video frames (``grids``: one
            equal grid per frame).
    """
    num_tokens = check_features(features)
    check_grids(grids, num_tokens)
    check_unit_interval(alpha, "alpha")
    _check_theta(theta_sim)
    device = features.device
    src, dst = grid_neighbour_pairs(grids, device, temporal_adjacency)
    upper = src < dst
    src, dst = src[upper], dst[upper]
    slabs = _upper_slabs(_unit_rows(features))
    low = torch.stack([slab.amin() for _, slab in slabs]).amin()
    high = torch.stack([slab.amax() for _, slab in slabs]).amax()
    constant = bool(high == low)

    def normalize(similarity: Tensor) -> Tensor:
        return torch.ones_like(similarity) if constant else (similarity - low) / (high - low)

    edges = torch.zeros(num_tokens, num_tokens, dtype=torch.bool, device=device)
    for start, slab in slabs:
        in_slab = (src >= start) & (src < start + slab.shape[0])
        rows, cols = src[in_slab] - start, dst[in_slab] - start
        if alpha <= theta_sim:
            linked = alpha * normalize(slab[rows, cols]) + (1.0 - alpha) > theta_sim
            edges[rows[linked] + start, cols[linked] + start] = True
            edges[cols[linked] + start, rows[linked] + start] = True
        else:
            fused = normalize(slab).mul_(alpha)
            fused[rows, cols] = fused[rows, cols] + (1.0 - alpha)
            edges[start : start + slab.shape[0], start:] = torch.triu(fused > theta_sim, diagonal=1)
    return edges if alpha <= theta_sim else edges | edges.T


def pivot_mis(
    scores: Tensor,
    features: Tensor,
    grids: Sequence[Grid],
    n: int,
    r_pivot: float = 0.7,
    theta_sim: float = 0.8,
    alpha: float = 0.5,
    temporal_adjacency: bool = False,
) -> Tensor:
    """D2Pruner pivot-based diverse token selection (methods.md section 5, steps 1-5).

    1. Graph ``fused_graph(features, grids, alpha, theta_sim)``.
    2. Pivots: the top ``floor(n * r_pivot)`` tokens by importance, taken unconditionally (even if two
       pivots are adjacent).
    3. Neighbours of pivots leave the candidate pool.
    4. Expansion: repeatedly keep the most important candidate still in the pool and remove its
       neighbours from the pool, until ``n`` are kept or the pool is empty.
    5. Fill: if the pool runs dry, keep the most important unselected tokens until ``n`` are kept.

    Equal importances are ranked by the lower index. The graph is built with tensor ops; the Python loop
    runs once per expansion pick.

    Args:
        scores: ``[N]`` importance (D2Pruner: debiased attention; deep-layer paper: raw layer-11 attention).
        features: ``[N, D]`` features for the semantic similarity.
        grids: ``(rows, cols)`` blocks whose sizes sum to N.
        n: tokens to keep, ``1 <= n <= N``.
        r_pivot: pivot share of the budget in [0, 1].
        theta_sim: edge threshold (>= 0).
        alpha: semantic weight in [0, 1].
        temporal_adjacency: the graph also links the same cell of neighbouring video frames.

    Returns:
        ``[n]`` int64 kept indices, ascending, on ``scores.device``.
    """
    num_tokens = check_scores(scores)
    check_features(features, num_tokens)
    check_budget(n, num_tokens)
    check_unit_interval(r_pivot, "r_pivot")
    check_same_device(scores, features)
    edges = fused_graph(features, grids, alpha=alpha, theta_sim=theta_sim, temporal_adjacency=temporal_adjacency)
    device = scores.device
    order = descending_order(scores)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_tokens, device=device)

    pivots = order[: floor_fraction(n, r_pivot)]
    selected = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    selected[pivots] = True
    available = ~selected & ~edges[pivots].any(dim=0)
    for _ in range(n - pivots.numel()):
        if not bool(available.any()):
            break
        pick = torch.where(available, rank, num_tokens).argmin()
        selected[pick] = True
        available &= ~edges[pick]
        available[pick] = False

    missing = n - int(selected.sum())
    if missing > 0:
        fill = torch.where(selected, num_tokens, rank).topk(missing, largest=False).indices
        selected[fill] = True
    return sorted_indices(selected.nonzero().squeeze(1))


def _check_theta(theta_sim: float) -> None:
    if (
        isinstance(theta_sim, bool)
        or not isinstance(theta_sim, Real)
        or not math.isfinite(theta_sim)
        or theta_sim < 0
    ):
        raise ValueError(f"theta_sim={theta_sim!r}: must be a finite number >= 0 (paper default 0.8)")
