"""Top-k selection by importance (FastV; methods.md section 5)."""

from __future__ import annotations

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
