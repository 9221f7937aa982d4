"""DivPrune: greedy max-min diversity selection (methods.md section 5 "DivPrune")."""

from __future__ import annotations

import torch
from torch import Tensor

from lmms_prune.selection._validate import check_budget, check_features, sorted_indices, unit_rows


def divprune(features: Tensor, n: int) -> Tensor:
    """Greedy max-min diversity (DivPrune's solution of the max-min diversity problem).

    Distance is ``1 - cosine`` between token features (DivPrune: the projected visual embeddings).

    - First pick: the token whose nearest other token is farthest, ``argmax_i min_{j != i} d(i, j)``.
    - Each next pick: the unpicked token with the largest distance to its nearest picked token,
      ``argmax_{i not in S} min_{j in S} d(i, j)``.

    Ties go to the lower index (as the authors' ``argmax``). Picked tokens are excluded explicitly; the
    authors' code relies on their zero self distance, which rounding can make slightly positive, so it can
    pick a token twice when the rest duplicate the picked ones. Their first pick takes the second-smallest
    distance of each column (the smallest being the self distance); ours excludes the diagonal, which is the
    same unless rounding puts another distance below the self distance. The ``[N, N]`` distance matrix is
    formed once in float64 (``unit_rows``: near-ties must not depend on the machine's rounding); each pick
    updates an ``[N]`` running minimum.

    Args:
        features: ``[N, D]`` token features.
        n: tokens to keep, ``1 <= n <= N``.

    Returns:
        ``[n]`` int64 kept indices, ascending, on ``features.device``.
    """
    num_tokens = check_features(features)
    check_budget(n, num_tokens)
    unit = unit_rows(features)
    distance = 1.0 - unit @ unit.T
    picked = torch.zeros(num_tokens, dtype=torch.bool, device=features.device)
    if num_tokens == 1:
        picked[0] = True
        return sorted_indices(picked.nonzero().squeeze(1))

    nearest = distance.clone().fill_diagonal_(float("inf")).amin(dim=1)
    pick = nearest.argmax()
    nearest_picked = distance[pick].clone()
    picked[pick] = True
    for _ in range(n - 1):
        pick = nearest_picked.masked_fill(picked, float("-inf")).argmax()
        picked[pick] = True
        nearest_picked = torch.minimum(nearest_picked, distance[pick])
    return sorted_indices(picked.nonzero().squeeze(1))
