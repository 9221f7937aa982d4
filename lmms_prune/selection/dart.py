"""DART: duplication-aware selection around a few pivot tokens (methods.md section 5 "DART")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import (
    check_budget,
    check_features,
    check_same_device,
    check_scores,
    descending_order,
    is_int,
    sorted_indices,
)


def dart(
    key_norms: Tensor,
    features: Tensor,
    n: int,
    num_pivots: int = 8,
    text_pivot_features: Tensor | None = None,
) -> Tensor:
    """DART selection of ``n`` visual tokens: pivots plus the tokens least similar to each pivot.

    Choices (DART keeps tokens that duplicate the pivots least; no attention weights needed):

    - Visual pivots: the ``min(num_pivots, n)`` visual tokens with the largest ``key_norms`` (DART: L1 norm
      of the keys at layer K-1), ties to the lower index. They are always kept.
    - Optional text pivots (DART also draws pivots from the text tokens): ``text_pivot_features`` are the
      features of text tokens the caller chose by the same key-norm rule. They claim a share of the budget
      but are never kept, since only visual tokens are selected here.
    - The remaining budget ``n - (visual pivots)`` is split evenly over all pivots (visual first, by
      descending key norm, then text in the given order); the first ``remainder`` pivots get one more.
    - Pivots take turns in that order; each adds its share of the not-yet-kept visual tokens with the
      lowest cosine similarity to it (ties to the lower index). Taking only not-yet-kept tokens is what
      makes the total exactly ``n`` (the reference code also removes each pivot's picks from the pool).

    Args:
        key_norms: ``[N]`` key-norm per visual token.
        features: ``[N, D]`` visual token features (DART: hidden states at the pruning layer's input).
        n: tokens to keep, ``1 <= n <= N``.
        num_pivots: visual pivots, >= 1 (default 8).
        text_pivot_features: optional ``[M, D]`` features of text pivots.

    Returns:
        ``[n]`` int64 kept indices, ascending, on ``key_norms.device``.
    """
    num_tokens = check_scores(key_norms, "key_norms")
    check_features(features, num_tokens)
    check_same_device(key_norms, features, "key_norms")
    check_budget(n, num_tokens)
    if not is_int(num_pivots) or num_pivots < 1:
        raise ValueError(f"num_pivots={num_pivots!r}: must be an int >= 1")
    pivots = descending_order(key_norms)[: min(num_pivots, n)]
    dtype = torch.promote_types(features.dtype, torch.float32)
    unit = F.normalize(features.to(dtype), dim=-1)
    pivot_units = unit[pivots]
    if text_pivot_features is not None:
        check_features(text_pivot_features, name="text_pivot_features")
        if text_pivot_features.shape[1] != features.shape[1]:
            raise ValueError(
                f"text_pivot_features have D={text_pivot_features.shape[1]} but features D={features.shape[1]}: "
                "use the same hidden states for both"
            )
        text_units = F.normalize(text_pivot_features.to(device=features.device, dtype=dtype), dim=-1)
        pivot_units = torch.cat([pivot_units, text_units])

    similarity = unit @ pivot_units.T
    total_pivots = pivot_units.shape[0]
    share, remainder = divmod(n - pivots.numel(), total_pivots)
    kept = torch.zeros(num_tokens, dtype=torch.bool, device=features.device)
    kept[pivots] = True
    for k in range(total_pivots):
        quota = share + (1 if k < remainder else 0)
        if quota == 0:
            break
        candidates = similarity[:, k].masked_fill(kept, float("inf"))
        kept[torch.sort(candidates, stable=True).indices[:quota]] = True
    return sorted_indices(kept.nonzero().squeeze(1))
