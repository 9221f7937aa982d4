"""HoliTom's pre-LLM merging (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
NeurIPS 2025): global temporal segmentation into windows of frames, temporal merging of the tokens that stay
alike through a window, then per-frame (and per-window) spatial merging.

Arithmetic read in the authors' code (github.com/cokeshao/HoliTom at commit
``e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0``, ``holitom/llava_arch.py``: ``select_static_windows``,
``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``, ``merge_tokens_by_density``,
``merge_tokens_by_clustering``, ``cluster_dpc_knn`` and ``prepare_inputs_labels_for_multimodal``; nothing copied),
on a video of ``F`` frames of ``T`` tokens (the projected, pooled features ``x`` and the vision tower's mean
received attention ``a`` pooled the same way):

1. ``s[f, p] = cos(x[f, p], x[f + 1, p])`` for ``f < F - 1``; a token is static over frames ``[b, e]`` when
   ``s[f, p] > tau`` for every ``b <= f < e``;
2. windows (:func:`static_windows`): the partition of the frames into runs ``[b, e]`` (at most
   ``max_window_size`` frames) that maximises ``sum (e - b) * #static tokens of [b, e]``, the tokens temporal
   merging removes (a dynamic programme over the last frame, a longer window only where strictly better);
3. the keep ratio ``r`` becomes ``r' = min(r / ((F T - R) / (F T)), 1)``, ``R`` the removed count of step 2;
4. per window of more than one frame: each static token is replaced by its mean over the window's frames;
   the static means are clustered (:func:`lmms_prune.selection.dpc_knn`, ``round(n_s r')`` centres, density over
   ``min(K, centres)`` neighbours) and each centre becomes ``beta * x_centre + (1 - beta) * mean(its members)``
   (itself where it has none);
5. per frame, of its ``n_d`` dynamic tokens (every token of a one-frame window): ``c = ceil(n_d r')``;
   ``round(c (1 - d))`` of highest attention are kept, and the other ``c - round(c (1 - d))`` are centres of the
   same clustering over the rest (``d = 0``, the authors' default, keeps the top ``c`` only).

Deliberate differences (docs/fidelity.md, "holitom"): the authors add ``1e-6``-scale random noise to the density to
break ties, here ties go to the lower index (as in every selection here); similarities in float64; the LLM sees
the kept tokens first (original order) and the merged tokens after them, in window order, where the authors
interleave each window's merged static tokens before its frames' tokens (the pre-LLM :class:`Merge` layout).
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
    check_scores,
    descending_order,
    is_int,
    sorted_indices,
)
from lmms_prune.selection.merge import Merge
from lmms_prune.selection.sparsevlm import dpc_knn
from lmms_prune.selection.temporal import frame_layout

TAU = 0.8  # the authors' default similarity threshold T (their scripts: 0.65 at a 10% budget, 0.8 above)
BETA = 0.6  # weight of a cluster's centre in its merged token
DENSITY_NEIGHBOURS = 7  # K of the kNN density
MAX_WINDOW = 1024


def adjacent_similarity(features: Tensor, frames: int) -> Tensor:
    """``[F - 1, T]`` float64 cosine similarity of each token with the same cell of the next frame."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1).view(frames, -1, features.shape[-1])
    return (unit[:-1] * unit[1:]).sum(-1)


def removed_by_window(similarity: Tensor, tau: float) -> Tensor:
    """``[F, F]`` float64: entry ``[b, e]`` (``b <= e``) = ``(e - b) *`` the tokens static over frames ``[b, e]``,
    the tokens merging that window removes (0 below the diagonal and on it)."""
    frames = similarity.shape[0] + 1
    alike = (similarity > tau).double()
    out = torch.zeros(frames, frames, dtype=torch.float64, device=similarity.device)
    for b in range(frames - 1):
        static = torch.cumprod(alike[b:], 0).sum(-1)  # [F - 1 - b]: tokens static over [b, b + 1 + j]
        out[b, b + 1:] = static * torch.arange(1, frames - b, dtype=torch.float64, device=similarity.device)
    return out


def static_windows(similarity: Tensor, tau: float = TAU, max_window_size: int = MAX_WINDOW) -> tuple[list[Grid], float]:
    """HoliTom's global temporal segmentation: ``([(first, last) frame of each window], tokens removed)``.

    ``dp[i]`` = the best removal over frames ``0..i``: frame ``i`` alone (``dp[i - 1]``), or a window
    ``[i - w + 1, i]`` of ``2 <= w <= min(i + 1, max_window_size)`` frames (``dp[i - w] + removed``), a longer
    window chosen only where strictly better (the authors' scan order); the windows are read back from the end.
    """
    frames = similarity.shape[0] + 1
    if not is_int(max_window_size) or max_window_size < 1:
        raise ValueError(f"holitom_max_window={max_window_size!r}: must be an int >= 1")
    removed = removed_by_window(similarity, tau).tolist()
    dp, start = [0.0] * frames, [0] * frames
    for i in range(frames):
        best, best_start = (dp[i - 1] if i > 0 else 0.0), i
        for w in range(2, min(i + 1, max_window_size) + 1):
            j = i - w
            value = (dp[j] if j >= 0 else 0.0) + removed[j + 1][i]
            if value > best:
                best, best_start = value, j + 1
        dp[i], start[i] = best, best_start
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], dp[-1]


def adjusted_ratio(keep_ratio: float, total: int, removed: float) -> float:
    """``min(r / ((total - removed) / total), 1)``: the ratio that keeps ``r * total`` tokens of those left after
    temporal merging."""
    return min(keep_ratio / ((total - removed) / total), 1.0)


def mean_rows(groups: Tensor, num_tokens: int) -> Tensor:
    """``[m, N]`` float64 rows: row ``i`` averages the tokens ``groups[i]`` (``[m, w]`` indices)."""
    out = torch.zeros(groups.shape[0], num_tokens, dtype=torch.float64, device=groups.device)
    return out.scatter_add_(1, groups, torch.full(groups.shape, 1.0 / groups.shape[1], dtype=torch.float64,
                                                  device=groups.device))


def cluster_weights(rows: Tensor, features: Tensor, centres_count: int, beta: float, neighbours: int) -> Tensor:
    """HoliTom's ``merge_tokens_by_clustering``: ``[c, N]`` float64 weights over the video's ``N`` tokens.

    ``rows``: ``[m, N]`` the candidate tokens as weights over the video's tokens (a frame's token one-hot, a
    static token its window mean, :func:`mean_rows`); ``features``: ``[m, D]`` their features. Centres by
    :func:`dpc_knn` (``c`` of them, density over ``min(neighbours, c)`` neighbours), in ascending order; each
    centre with members becomes ``beta * centre + (1 - beta) * mean(members)``, one without stays itself.
    """
    centres, assign = dpc_knn(features, centres_count, k=min(neighbours, centres_count))
    out = []
    for j, centre in enumerate(centres.tolist()):
        members = torch.nonzero(assign == j).flatten()
        members = members[members != centre]
        out.append(beta * rows[centre] + (1 - beta) * rows[members].mean(0) if members.numel() else rows[centre])
    return torch.stack(out)


def holitom_merge(features: Tensor, attention: Tensor, grids: Sequence[Grid], keep_ratio: float, tau: float = TAU,
                  beta: float = BETA, dominant_share: float = 0.0, neighbours: int = DENSITY_NEIGHBOURS,
                  max_window_size: int = MAX_WINDOW) -> Merge:
    """HoliTom's pre-LLM stage on one video (steps 1-5 of the module docstring).

    Args:
        features: ``[N, D]`` token features in time order (the projected, pooled video features).
        attention: ``[N]`` each token's attention (the vision tower's mean received attention, pooled).
        grids: one equal ``(rows, cols)`` per (merged) frame.
        keep_ratio: ``r`` in (0, 1] (the authors' ``RETAIN_RATIO``); tau, beta, neighbours (``K``),
            max_window_size: as the authors'; dominant_share: ``d`` (the authors' ``D``).

    Returns:
        :class:`Merge`: ``index`` the kept (dominant) tokens ascending, ``weights`` the merged tokens (each
        window's static clusters, then each frame's contextual clusters, in window and frame order).
    """
    num_tokens = check_features(features)
    check_scores(attention, "attention")
    if attention.numel() != num_tokens:
        raise ValueError(f"attention has {attention.numel()} tokens, features {num_tokens}")
    for name, value, low_open in (("keep_ratio", keep_ratio, True), ("holitom_beta", beta, False),
                                  ("holitom_d", dominant_share, False)):
        if isinstance(value, bool) or not isinstance(value, Real) or not (0 < value <= 1 if low_open
                                                                         else 0 <= value <= 1):
            raise ValueError(f"{name}={value!r}: must be in {'(0, 1]' if low_open else '[0, 1]'}")
    if not is_int(neighbours) or neighbours < 1:
        raise ValueError(f"holitom_k={neighbours!r}: the density's neighbour count must be an int >= 1")
    frames, cells = frame_layout(grids, num_tokens)
    device = features.device
    token = torch.arange(num_tokens, device=device).view(frames, cells)
    x = features.double()
    similarity = adjacent_similarity(features, frames)
    windows, removed = static_windows(similarity, tau, max_window_size)
    ratio = adjusted_ratio(keep_ratio, num_tokens, removed)
    kept: list[Tensor] = []
    merged: list[Tensor] = []
    for first, last in windows:
        if last > first:
            static = torch.all(similarity[first:last] > tau, dim=0)  # [T]
            n_static = int(static.sum())
            count = round(n_static * ratio)
            if count > 0:
                members = token[first:last + 1][:, static]  # [frames of the window, n_s]
                merged.append(cluster_weights(mean_rows(members.T, num_tokens), x[members].mean(0), count, beta,
                                              neighbours))
        else:
            static = torch.zeros(cells, dtype=torch.bool, device=device)
        dynamic_cells = torch.nonzero(~static).flatten()
        for frame in range(first, last + 1):
            members = token[frame][dynamic_cells]
            total = math.ceil(members.numel() * ratio)
            dominant = round(total * (1 - dominant_share))
            order = descending_order(attention[members].double())
            kept.append(members[order[:dominant]])
            if total - dominant > 0:
                rest = members[sorted_indices(order[dominant:])]
                merged.append(cluster_weights(mean_rows(rest[:, None], num_tokens), x[rest], total - dominant,
                                              beta, neighbours))
    index = sorted_indices(torch.cat(kept)) if kept else torch.zeros(0, dtype=torch.long, device=device)
    weights = torch.cat(merged) if merged else torch.zeros(0, num_tokens, device=device)
    return Merge(index, weights.float())


def inner_merge(attention: Tensor, hidden: Tensor, n: int) -> Merge:
    """HoliTom's inside-LLM merge at layer ``k`` (the authors' ``holitom/modeling_qwen2.py``) on one video's ``N``
    tokens: the ``n`` of highest ``attention`` (the last prompt token's row of layer ``k - 1``) are kept; each
    other token, in ascending order, is folded into the kept token of highest cosine similarity of ``hidden`` (the
    hidden states at layer ``k``'s input, similarities taken before any fold) by a running pairwise average
    ``target = (target + other) / 2``: a target with members ``m_1 < ... < m_j`` becomes
    ``x_t / 2^j + sum_i x_{m_i} / 2^(j - i + 1)``.

    Returns:
        :class:`Merge` with ``index`` the kept tokens that took no member (ascending), ``slots`` those that did
        (each holding its folded value at its own place) and ``weights`` ``[len(slots), N]`` their folds: ``n``
        tokens in all.
    """
    num_tokens = check_scores(attention, "attention")
    check_features(hidden, num_tokens, "hidden")
    check_budget(n, num_tokens)
    kept = sorted_indices(descending_order(attention.double())[:n])
    others = torch.ones(num_tokens, dtype=torch.bool, device=attention.device)
    others[kept] = False
    others = torch.nonzero(others).flatten()
    unit = torch.nn.functional.normalize(hidden.double(), dim=-1)
    target = (unit[others] @ unit[kept].T).argmax(1)  # [N - n] row of kept; ties: the lower index
    weights = torch.zeros(n, num_tokens, dtype=torch.float64, device=attention.device)
    weights[torch.arange(n, device=attention.device), kept] = 1.0
    for other, row in zip(others.tolist(), target.tolist()):
        weights[row] /= 2
        weights[row, other] += 0.5
    folded = torch.zeros(n, dtype=torch.bool, device=attention.device)
    folded[target] = True
    return Merge(kept[~folded], weights[folded].float(), slots=kept[folded])
