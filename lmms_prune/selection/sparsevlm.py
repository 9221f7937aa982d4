"""SparseVLM's selection at one pruning stage (Zhang et al., 2025, "SparseVLM: Visual Token Sparsification for
Efficient Vision-Language Model Inference", sections 3.3-3.4; methods.md section 5b).

* :func:`adaptive_keep_count`: the sparsification level adaptation: the number of deletions is
  ``lambda * (N - rank(P))``, ``P`` the raters' attention over the ``N`` visual tokens still present;
* :func:`dpc_knn`: density-peaks clustering with k-nearest-neighbour density (the paper's recycling clusters);
* :func:`recycle`: the deleted tokens with the highest importance grouped into a few clusters;
* :func:`sparsevlm`: the three together, a :class:`~lmms_prune.selection.merge.Merge` with ``slots``.

Pure tensor functions; the engine (``lmms_prune.engine.core``) places the merged tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmms_prune.selection._validate import (
    check_features,
    check_scores,
    check_unit_interval,
    descending_order,
    floor_fraction,
    is_int,
    sorted_indices,
)
from lmms_prune.selection.merge import Merge, group_weights

RECYCLE_RATIO = 0.3  # tau: the top 30% of the deleted tokens are recycled (authors' code: int(0.3 * d) + 1)
CLUSTER_RATIO = 0.1  # clusters per recycled token (authors' code: int(m / 10) + 1)


def _check_relation(relation: Tensor, num_tokens: int) -> None:
    if not isinstance(relation, Tensor) or relation.dim() != 2 or not relation.is_floating_point():
        raise ValueError("relation must be a floating [R raters, N visual tokens] tensor")
    if relation.shape[0] == 0 or relation.shape[1] != num_tokens:
        raise ValueError(f"relation has shape {tuple(relation.shape)}: must be [R >= 1, {num_tokens}] (one row per "
                         "rater, one column per visual token still present)")


def adaptive_keep_count(relation: Tensor, n: int) -> int:
    """Visual tokens kept at a stage by SparseVLM's rank rule (paper section 3.3, ``N_del = lambda (L_v - rank P)``).

    ``relation`` ``[R, N]``: the raters' attention over the ``N`` visual tokens still present; ``n``: the stage's
    budget (``1 <= n <= N``). The scale is the budget's deletion fraction at this stage, ``lambda = (N - n) / N``,
    so a rank-0 (empty) relation keeps exactly ``n``; each independent direction of ``P`` spares ``lambda`` tokens.
    Deletions ``floor(lambda * (N - rank(P)))`` (rank in float64, torch's default tolerance). Returns the kept
    count ``N - deletions``, in ``[n, N]``.
    """
    num_tokens = relation.shape[1] if isinstance(relation, Tensor) and relation.dim() == 2 else 0
    _check_relation(relation, num_tokens)
    if not is_int(n) or not 1 <= n <= num_tokens:
        raise ValueError(f"n={n!r}: must be an int in [1, {num_tokens}]")
    rank = int(torch.linalg.matrix_rank(relation.double()))
    deletions = floor_fraction(num_tokens - rank, (num_tokens - n) / num_tokens)
    return num_tokens - deletions


def dpc_knn(features: Tensor, c: int, k: int | None = None) -> tuple[Tensor, Tensor]:
    """Density-peaks clustering with kNN density (Du et al., 2016, DPC-KNN; SparseVLM's recycling clusters).

    1. Distances ``d_ij = ||x_i - x_j|| / sqrt(D)`` (float64) of the ``m`` rows of ``features`` ``[m, D]``.
    2. Density ``rho_i = exp(-mean of d_ij^2 over its k nearest tokens, itself included)`` (``k`` default ``c``,
       the authors' choice; at most ``m``).
    3. ``delta_i`` = distance to the nearest denser token (denser: higher ``rho``, ties: the lower index; the
       authors break ties with random noise), the densest token's ``delta`` = the largest distance.
    4. Centres: the ``c`` tokens of highest ``rho * delta`` (ties: lower index); each token joins its nearest
       centre (ties: the first centre in ascending index), a centre joins itself.

    Returns ``(centres [c] ascending int64, assign [m] int64 in [0, c))``: token ``i`` is in the cluster of
    ``centres[assign[i]]``.
    """
    m = check_features(features)
    if not is_int(c) or not 1 <= c <= m:
        raise ValueError(f"c={c!r}: the number of clusters must be an int in [1, {m}]")
    k = c if k is None else k
    if not is_int(k) or k < 1:
        raise ValueError(f"k={k!r}: the density's neighbour count must be an int >= 1")
    x = features.double()
    dist = torch.cdist(x, x) / x.shape[1] ** 0.5
    near = torch.topk(dist, min(k, m), dim=1, largest=False).values
    density = torch.exp(-(near ** 2).mean(1))
    index = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    top = dist.max()
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).min(1).values
    delta = torch.where(torch.isinf(delta), top, delta)
    centres = sorted_indices(descending_order(density * delta)[:c])
    assign = dist[:, centres].argmin(1)
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


def recycle(importance: Tensor, features: Tensor, deleted: Tensor, recycle_ratio: float = RECYCLE_RATIO,
            cluster_ratio: float = CLUSTER_RATIO) -> tuple[list[Tensor], Tensor]:
    """SparseVLM's token recycling (paper section 3.4): of the ``d`` ``deleted`` tokens, the
    ``m = min(d, floor(d * recycle_ratio) + 1)`` of highest ``importance`` are clustered by :func:`dpc_knn` on
    ``features`` into ``c = min(m, floor(m * cluster_ratio) + 1)`` groups (the authors' counts);
    ``recycle_ratio = 0`` (or nothing deleted) recycles nothing.

    Returns ``(groups, slots)``: ``c`` index tensors (token indices among the ``N``, each group ascending)
    and ``slots`` ``[c]``, each group's centre (the place its merged token takes).
    """
    num_tokens = check_scores(importance, "importance")
    check_features(features, num_tokens)
    check_unit_interval(recycle_ratio, "recycle_ratio")
    check_unit_interval(cluster_ratio, "cluster_ratio")
    deleted = torch.as_tensor(deleted, dtype=torch.long, device=importance.device).flatten()
    d = int(deleted.numel())
    empty = torch.zeros(0, dtype=torch.long, device=importance.device)
    if d == 0 or recycle_ratio == 0:
        return [], empty
    m = min(d, floor_fraction(d, recycle_ratio) + 1)
    candidates = deleted[descending_order(importance[deleted])[:m]]
    c = min(m, floor_fraction(m, cluster_ratio) + 1)
    centres, assign = dpc_knn(features[candidates], c)
    groups = [sorted_indices(candidates[assign == j]) for j in range(c)]
    return groups, candidates[centres]


def sparsevlm(importance: Tensor, relation: Tensor, features: Tensor, n: int,
              recycle_ratio: float = RECYCLE_RATIO, cluster_ratio: float = CLUSTER_RATIO) -> Merge:
    """One SparseVLM stage over the ``N`` visual tokens still present.

    1. Keep the top ``adaptive_keep_count(relation, n)`` tokens by ``importance`` (ties: lower index).
    2. Recycle the deleted ones (:func:`recycle` on ``features``, the hidden states at the stage's input).

    Args:
        importance: ``[N]`` the raters' attention (or a debiased version of it); relation: ``[R, N]`` the raters'
            rows (the rank's matrix); features: ``[N, D]``; ``1 <= n <= N`` the stage's budget.

    Returns:
        :class:`Merge` with ``index`` (kept, ascending), ``weights`` ``[c, N]`` (each group's mean) and ``slots``
        ``[c]`` (each group's centre, a deleted token); ``index`` and ``slots`` are disjoint.
    """
    num_tokens = check_scores(importance, "importance")
    check_features(features, num_tokens)
    _check_relation(relation, num_tokens)
    keep = adaptive_keep_count(relation, n)
    order = descending_order(importance)
    index = sorted_indices(order[:keep])
    deleted = sorted_indices(order[keep:])
    groups, slots = recycle(importance, features, deleted, recycle_ratio, cluster_ratio)
    return Merge(index, group_weights(groups, num_tokens, importance.device), slots)
