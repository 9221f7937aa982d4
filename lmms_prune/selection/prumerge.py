"""LLaVA-PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", the "+" variant): IQR outliers of the [CLS] attention + spatially uniform samples, each
updated with its nearest tokens weighted by their attention, plus one token summarising the rest.

Arithmetic read in the authors' code (github.com/42Shawn/LLaVA-PruMerge, commit 097c04116a58, file
``llava/model/multimodal_encoder/clip_encoder.py``, ``token_prune_merge_advanced_plus`` and
``outlier_dectection``); nothing copied. Deliberate differences are listed in :func:`prumerge_plus`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import check_budget, check_features, check_scores, descending_order
from lmms_prune.selection.merge import Merge

NEIGHBOURS = 32  # the authors' k of the key-similarity neighbourhood of each kept token


def iqr_outlier_ratio(attention: Tensor) -> float:
    """PruMerge's adaptive ratio: the fraction of the ``N`` scores above ``Q3 + 1.5 * IQR`` (Tukey's upper
    fence; quartiles by linear interpolation, numpy's default, as the authors' ``np.percentile``)."""
    n = check_scores(attention, "attention")
    values = attention.detach().double()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=values.dtype, device=values.device))
    return int((values > q3 + 1.5 * (q3 - q1)).sum()) / n


def prumerge_centres(attention: Tensor, n: int | None = None) -> Tensor:
    """The cluster centres of PruMerge+, in the authors' order: the IQR outliers by descending attention, then
    the spatial samples ascending.

    Adaptive (``n`` None, the authors'): ``t = int(N * r)`` outliers (``r``: :func:`iqr_outlier_ratio`, at least
    one token), then every ``int(int(1 / r) / 3)``-th index of ``0..N-2`` (at least every one) not already an
    outlier (the authors' ``arange(0, 575, ...)`` for LLaVA's 576 tokens, i.e. ``N - 1`` exclusive).
    Fixed (``n`` given, ``1 <= n <= N``): ``n - 1`` centres (one slot is the summary token): ``min(t, n - 1)``
    outliers, the rest filled with evenly spaced non-outlier tokens (every ``max(1, R // s)``-th of the ``R``
    others in index order, the first ``s``).
    """
    num = check_scores(attention, "attention")
    ratio = max(iqr_outlier_ratio(attention), 1.0 / num)  # no outlier: keep the top token (authors: 1/0)
    order = descending_order(attention)
    if n is None:
        outliers = order[: max(1, int(num * ratio))]
        step = max(1, int(int(1.0 / ratio) / 3))
        grid = torch.arange(0, num - 1, step, device=attention.device)
        samples = grid[~torch.isin(grid, outliers)]
        return torch.cat([outliers, samples])
    check_budget(n, num)
    outliers = order[: min(max(1, int(num * ratio)), n - 1)]
    rest = torch.ones(num, dtype=torch.bool, device=attention.device)
    rest[outliers] = False
    others = torch.nonzero(rest).flatten()
    s = min(n - 1 - outliers.numel(), others.numel())
    samples = others[torch.arange(0, others.numel(), max(1, others.numel() // max(s, 1)), device=others.device)[:s]]
    return torch.cat([outliers, samples])


def prumerge_plus(attention: Tensor, features: Tensor, n: int | None = None,
                  neighbours: int = NEIGHBOURS) -> Merge:
    """PruMerge+: every centre (:func:`prumerge_centres`) becomes ``x_i + sum_j a_j x_j`` over its
    ``neighbours`` most key-similar other tokens ``j`` (cosine; every other token is a candidate, kept or
    not), weighted by their attention ``a_j`` (not normalised, as the authors'); one more token is
    ``sum_j a_j x_j`` over the tokens that are not centres.

    Args:
        attention: ``[N]`` [CLS] attention (the weights and the outlier test); features: ``[N, D]`` similarity
            features; ``n``: the token budget (None: the authors' adaptive count); ``neighbours``: k (32).

    Returns:
        :class:`Merge` with no kept original token (every output token is an update) and one weight row per
        centre, then the summary row (left out when every token is a centre). ``count == n`` when ``n`` is given.

    Differences from the authors' code (deliberate): similarity features are the caller's (here the
    pre-projector features; the authors: the penultimate CLIP layer's keys); ``attention`` is the engine's
    [CLS] row, heads averaged (the authors: one softmax of the full-width query-key product); ``k`` is capped
    at ``N - 1``; the merge is applied to the projected embeddings (:func:`merged_embeddings`).
    """
    num = check_scores(attention, "attention")
    check_features(features, num)
    if neighbours < 1:
        raise ValueError(f"neighbours={neighbours}: must be >= 1")
    centres = prumerge_centres(attention, n)
    unit = F.normalize(features.double(), dim=-1)
    sim = unit[centres] @ unit.T  # [C, N]
    rows = torch.arange(centres.numel(), device=sim.device)
    sim[rows, centres.to(sim.device)] = float("-inf")  # a centre is not its own neighbour
    k = min(neighbours, num - 1)
    weight = attention.detach().to(device=sim.device, dtype=torch.float32)
    out = torch.zeros(centres.numel() + 1, num, dtype=torch.float32, device=sim.device)
    if k:
        near = torch.topk(sim, k, dim=1).indices  # [C, k]
        out[rows[:, None], near] = weight[near]
    out[rows, centres.to(sim.device)] += 1.0
    rest = torch.ones(num, dtype=torch.bool, device=sim.device)
    rest[centres.to(sim.device)] = False
    out[-1, rest] = weight[rest]
    if not bool(rest.any()):
        out = out[:-1]
    return Merge(torch.zeros(0, dtype=torch.long, device=attention.device), out.to(attention.device))
