"""Temporal redundancy of video tokens: the same cell of consecutive frames (FrameFusion, Fu et al., ICCV 2025).

A video's visual tokens are one grid per (merged) frame, in time order (methods.md section 1): token ``i`` of
frame ``t`` is cell ``i mod (rows * cols)`` of grid ``t``. FrameFusion compares each token with the token of
the same cell in the previous frame (cosine similarity of the LLM hidden states) and treats those at or above
a threshold ``S_th`` as redundant: it merges them first, then prunes the rest by importance (FastV's
attention) to the budget. :func:`temporal_select` is that two-step selection with pruning instead of
merging (the redundant tokens are dropped, not averaged into their run's first token); see the method
module ``lmms_prune.methods.temporal`` and docs/fidelity.md for the other differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from lmms_prune.selection._validate import (
    Grid,
    check_budget,
    check_features,
    check_grids,
    check_same_device,
    check_scores,
    descending_order,
    sorted_indices,
    unit_rows,
)


def frame_layout(grids: Sequence[Grid], num_tokens: int | None = None) -> tuple[int, int]:
    """``(frames, cells)`` of a video's per-frame grids: all frames must share one ``(rows, cols)``.

    Raises ``ValueError`` naming the grids when frames differ (no cell correspondence) or the sizes do not
    sum to ``num_tokens``.
    """
    blocks = check_grids(grids, num_tokens)
    if len(set(blocks)) != 1:
        raise ValueError(f"grids={blocks}: temporal correspondence needs every frame grid to have the same "
                         "(rows, cols)")
    rows, cols = blocks[0]
    return len(blocks), rows * cols


def temporal_neighbour_pairs(grids: Sequence[Grid], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """All ordered pairs ``(i, j)`` of tokens in the same cell of neighbouring frames (frame ``t`` and
    ``t + 1``), both directions listed. ``grids``: one equal ``(rows, cols)`` per frame (:func:`frame_layout`).

    Returns:
        ``(src, dst)``, two int64 tensors ``[2 * (frames - 1) * cells]`` on ``device``.
    """
    frames, cells = frame_layout(grids)
    earlier = torch.arange((frames - 1) * cells, device=device)
    later = earlier + cells
    return torch.cat([earlier, later]), torch.cat([later, earlier])


def previous_frame_similarity(features: Tensor, grids: Sequence[Grid]) -> Tensor:
    """Cosine similarity of every token with the token of the same cell in the previous frame.

    Args:
        features: ``[N, D]`` token features in time order (FrameFusion: LLM hidden states).
        grids: one equal ``(rows, cols)`` per frame, ``frames * rows * cols = N``.

    Returns:
        ``[N]`` float64; the first frame's tokens (no previous frame) are ``-inf``. Computed in float64 so that
        near-ties do not depend on the machine (``selection._validate.unit_rows``).
    """
    num_tokens = check_features(features)
    _, cells = frame_layout(grids, num_tokens)
    unit = unit_rows(features)
    similarity = torch.full((num_tokens,), -math.inf, dtype=unit.dtype, device=features.device)
    similarity[cells:] = (unit[cells:] * unit[:-cells]).sum(-1)
    return similarity


def temporal_redundant(features: Tensor, grids: Sequence[Grid], threshold: float) -> Tensor:
    """Bool ``[N]``: True for a token whose cosine similarity with the same cell of the previous frame is at
    least ``threshold`` (FrameFusion's ``similarity >= S_th``). The first frame is never redundant."""
    _check_threshold(threshold)
    return previous_frame_similarity(features, grids) >= threshold


def temporal_select(scores: Tensor, features: Tensor, grids: Sequence[Grid], n: int, threshold: float = 0.6) -> Tensor:
    """Drop temporally redundant tokens first, then keep the ``n`` most important of the rest.

    1. Redundant = :func:`temporal_redundant` (``threshold``: FrameFusion's ``S_th``, default 0.6).
    2. If at least ``n`` tokens are not redundant: keep the ``n`` highest-scoring of them (ties: lower index).
    3. Otherwise keep every non-redundant token and, of the redundant ones, the ``n - fresh`` least similar to
       their previous frame (ties: higher score, then lower index). FrameFusion likewise merges only the most
       similar tokens when more pass the threshold than the budget lets it remove.

    Args:
        scores: ``[N]`` importance (e.g. FastV's attention of the last prompt token).
        features: ``[N, D]`` features for the similarity, same device as ``scores``.
        grids: one equal ``(rows, cols)`` per frame (a single grid: an image, nothing is redundant).
        n: tokens to keep, ``1 <= n <= N``.
        threshold: similarity at or above which a token repeats its previous frame, in ``[-1, 1]``.

    Returns:
        ``[n]`` int64 kept indices, ascending, on ``scores.device``.
    """
    num_tokens = check_scores(scores)
    check_features(features, num_tokens)
    check_budget(n, num_tokens)
    check_same_device(scores, features)
    _check_threshold(threshold)
    similarity = previous_frame_similarity(features, grids)
    redundant = similarity >= threshold
    by_score = descending_order(scores)
    fresh = by_score[~redundant[by_score]]
    if fresh.numel() >= n:
        return sorted_indices(fresh[:n])
    stale = by_score[redundant[by_score]]
    stale = stale[torch.sort(similarity[stale], stable=True).indices]  # least similar first, score order kept
    return sorted_indices(torch.cat([fresh, stale[: n - fresh.numel()]]))


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"temporal_threshold={threshold!r}: must be a cosine similarity in [-1, 1] "
                         "(FrameFusion's S_th, default 0.6)")
