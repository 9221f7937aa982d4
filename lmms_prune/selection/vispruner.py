"""VisPruner: important tokens by vision-encoder attention plus diverse tokens by duplicate removal.

Implements methods.md section 5 "VisPruner" and the VisPruner paper's section 4.2 with its Algorithm 1
(similarity-based duplication removal).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmms_prune.selection._validate import (
    check_budget,
    check_features,
    check_same_device,
    check_scores,
    check_unit_interval,
    descending_order,
    floor_fraction,
    is_int,
    sorted_indices,
    unit_rows,
)

MAX_REMOVED_PER_ROUND = 8
RESIDUAL_ORDERS = ("descending", "original")


def vispruner(
    importance: Tensor,
    features: Tensor,
    n: int,
    important_ratio: float = 0.5,
    residual_order: str = "descending",
) -> Tensor:
    """VisPruner selection of ``n`` visual tokens.

    1. Important tokens: the top ``n_imp = floor(n * important_ratio)`` by ``importance`` (ties: lower
       index first), as the authors' ``int(T * r)``.
    2. Diverse tokens: the other tokens form the candidate list, shrunk to ``n - n_imp`` by rounds of
       Algorithm 1 (``remove_duplicates``). ``residual_order`` sets the list's starting order, which decides
       how the rounds pair tokens:

       - ``"descending"`` (default, the authors' code: ``argsort(attn, descending)[n_imp:]``): by descending
         importance, ties to the lower index;
       - ``"original"``: patch order (the paper's Algorithm 1 does not say; our earlier reading).

    Args:
        importance: ``[N]`` vision-encoder attention (``scores.vision.cls_attention``).
        features: ``[N, D]`` vision features before the projector.
        n: tokens to keep, ``1 <= n <= N``.
        important_ratio: the paper's ``r`` in [0, 1] (default 0.5).
        residual_order: ``"descending"`` or ``"original"``.

    Returns:
        ``[n]`` int64 kept indices, ascending, on ``importance.device``.
    """
    num_tokens = check_scores(importance, "importance")
    check_features(features, num_tokens)
    check_same_device(importance, features, "importance")
    check_budget(n, num_tokens)
    check_unit_interval(important_ratio, "important_ratio")
    if residual_order not in RESIDUAL_ORDERS:
        raise ValueError(
            f"residual_order={residual_order!r}: must be 'descending' (the authors' code: candidates by "
            "descending importance) or 'original' (patch order)"
        )
    order = descending_order(importance)
    num_important = floor_fraction(n, important_ratio)
    important = order[:num_important]
    if num_important == n:
        return sorted_indices(important)
    rest = order[num_important:]
    if residual_order == "original":
        rest = torch.sort(rest).values
    diverse = rest[remove_duplicates(features[rest], n - num_important)]
    return sorted_indices(torch.cat([important, diverse]))


def remove_duplicates(features: Tensor, num_keep: int) -> Tensor:
    """VisPruner Algorithm 1: positions (into ``features``' rows) of the ``num_keep`` diverse tokens.

    Each round splits the current list into ``a = list[0::2]`` and ``b = list[1::2]``, scores each ``a``
    token by its largest cosine similarity to a ``b`` token, drops the ``r = min(8, len(list) - num_keep)``
    highest-scoring ``a`` tokens (all of ``a`` if it has fewer), and continues with
    ``[remaining a in descending-score order] + b``; it stops when ``num_keep`` remain. As the authors' code,
    except that:

    - an odd-length list is split the same way (``a`` one longer than ``b``), where theirs raises;
    - equal scores keep list order (stable sort; the authors' ``argsort`` leaves ties unspecified);
    - cosine similarities are computed in float64 from L2-normalised features (theirs: the model's dtype).
      Near-duplicate tokens (a plain background) have similarities that differ by ~1e-7; float32 rounding,
      which differs between CPU instruction sets and BLAS kernels, reorders them, and since the order of the
      surviving ``a`` tokens decides the next round's pairs, one swap changes the selection.

    The ``[L, L]`` cosine matrix is formed once; each round reads its ``a x b`` block from it.

    Args:
        features: ``[L, D]`` candidate features in list order (normalised here).
        num_keep: how many to keep, ``0 <= num_keep <= L``.

    Returns:
        ``[num_keep]`` int64 row positions, in the algorithm's final list order (not sorted).
    """
    length = check_features(features)
    if not is_int(num_keep) or not 0 <= num_keep <= length:
        raise ValueError(f"num_keep={num_keep!r}: must be an int in [0, {length}]")
    if num_keep == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    unit = unit_rows(features)
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
