"""Top-k selection by importance (FastV; methods.md section 5)."""

from __future__ import annotations

import torch
from torch import Tensor

from lmms_prune.selection._validate import check_budget, check_scores, descending_order, sorted_indices


def topk(scores: Tensor, n: int) -> Tensor:
    """Keep the ``n`` highest-scoring tokens (FastV's rule).

    Args:
        scores: ``[N]`` importance per token (e.g. text-to-vision attention); no NaN.
        n: number of tokens to keep, ``1 <= n <= N``.

    Returns:
        ``[n]`` int64 indices, ascending, on ``scores.device``. Equal scores are broken by the lower index,
        so the result is deterministic on every device.
    """
    num_tokens = check_scores(scores)
    check_budget(n, num_tokens)
    return sorted_indices(descending_order(scores)[:n])


def topk_union(scores: Tensor, n: int, extra: Tensor) -> Tensor:
    """The ``n`` highest-scoring tokens together with the tokens ``extra`` (FEATHER's first stage: top-k of the
    attention UNION the uniform grid, ``torch.unique`` of both in the authors' code).

    Args:
        scores: ``[N]`` importance per token; no NaN.
        n: number of top tokens, ``1 <= n <= N``.
        extra: int indices in ``[0, N)`` kept regardless of their scores.

    Returns:
        int64 indices, ascending, unique: between ``max(n, len(unique(extra)))`` and ``n + len(extra)`` of them.
    """
    num_tokens = check_scores(scores)
    extra = extra.to(device=scores.device, dtype=torch.long).flatten()
    if extra.numel() and (int(extra.min()) < 0 or int(extra.max()) >= num_tokens):
        raise ValueError(f"extra indices must lie in [0, {num_tokens}); got {extra.min()}..{extra.max()}")
    return torch.unique(torch.cat([topk(scores, n), extra]), sorted=True)
