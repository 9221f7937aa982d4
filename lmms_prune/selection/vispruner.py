"""VisPruner: important tokens by vision-encoder attention plus diverse tokens by duplicate removal.

Implements methods.md section 5 "VisPruner" and the VisPruner paper's section 4.2 with its Algorithm 1
(similarity-based duplication removal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import (
    check_budget,
    check_features,
    check_same_device,
    check_scores,
    check_unit_interval,
    descending_order,
    floor_fraction,
    sorted_indices,
)

MAX_REMOVED_PER_ROUND = 8


def vispruner(importance: Tensor, features: Tensor, n: int, important_ratio: float = 0.5) -> Tensor:
    """VisPruner selection of ``n`` visual tokens.

    1. Important tokens: the top ``n_imp = floor(n * important_ratio)`` by ``importance`` (ties: lower
       index first).
    2. Diverse tokens: the others, in original order, shrink to ``n - n_imp`` by rounds of Algorithm 1:
       split the current list into ``a = list[0::2]`` and ``b = list[1::2]``, score each ``a`` token by its
       largest cosine similarity to a ``b`` token, drop the ``r = min(8, len(list) - (n - n_imp))``
       highest-scoring ``a`` tokens (all of ``a`` if it has fewer), and continue with
       ``[remaining a in descending-score order] + b``. Equal scores keep list order (stable sort).

    Features are L2-normalised here. Their cosine matrix is formed once (in at least float32); each round
    reads its ``a x b`` block from it instead of a fresh matmul.

    Args:
        importance: ``[N]`` vision-encoder attention (``scores.vision.cls_attention``).
        features: ``[N, D]`` vision features before the projector.
        n: tokens to keep, ``1 <= n <= N``.
        important_ratio: the paper's ``r`` in [0, 1] (default 0.5).

    Returns:
        ``[n]`` int64 kept indices, ascending, on ``importance.device``.
    """
    num_tokens = check_scores(importance, "importance")
    check_features(features, num_tokens)
    check_same_device(importance, features, "importance")
    check_budget(n, num_tokens)
    check_unit_interval(important_ratio, "important_ratio")
    order = descending_order(importance)
    num_important = floor_fraction(n, important_ratio)
    important = order[:num_important]
    if num_important == n:
        return sorted_indices(important)
    rest = torch.sort(order[num_important:]).values
    diverse = rest[remove_duplicates(features[rest], n - num_important)]
    return sorted_indices(torch.cat([important, diverse]))


def remove_duplicates(features: Tensor, num_keep: int) -> Tensor:
    """VisPruner Algorithm 1: positions (into ``features``' rows) of the ``num_keep`` diverse tokens.

    Args:
        features: ``[L, D]`` candidate features in original token order (normalised here).
        num_keep: how many to keep, ``0 <= num_keep <= L``.

    Returns:
        ``[num_keep]`` int64 row positions, in the algorithm's final list order (not sorted).
    """
    length = check_features(features)
    if not 0 <= num_keep <= length:
        raise ValueError(f"num_keep={num_keep}: must be in [0, {length}]")
    if num_keep == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    unit = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
    similarity = unit @ unit.T
    remaining = torch.arange(length, device=features.device)
    removed = min(MAX_REMOVED_PER_ROUND, length - num_keep)
    while removed > 0:
        a, b = remaining[0::2], remaining[1::2]
        score = similarity.index_select(0, a).index_select(1, b).amax(dim=1)
        survivors = torch.sort(score, descending=True, stable=True).indices[removed:]
        remaining = torch.cat([a[survivors], b])
        removed = min(MAX_REMOVED_PER_ROUND, remaining.numel() - num_keep)
    return remaining
