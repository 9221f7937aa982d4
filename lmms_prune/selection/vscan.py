"""VScan's visual-encoding stage (Zhang et al., 2025, "VScan: Rethinking Visual Token Reduction for Efficient
Large Vision-Language Models", arXiv 2505.22654, section 4.1): complementary global and local scans pick the
tokens that stay, and every other token is merged into the kept token it is most similar to.

Arithmetic read in the authors' code (github.com/Tencent/SelfEvolvingAgent, commit a82450e1b5e1, folder
``VScan``: ``qwen/model/qwen2_5_vl_utils.py`` ``window_selection``, ``token_merging``;
``qwen/model/qwen2_5_vl_custom.py`` ``Qwen2_5_VLForConditionalGeneration_X.forward``;
``llava/model/llava_arch.py`` ``window_cls_selection``, ``token_merging``, ``encode_images``; nothing copied).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import (
    Grid,
    check_budget,
    check_features,
    check_grids,
    check_scores,
    is_int,
)
from lmms_prune.selection.merge import Merge


def window_ids(grids: list[Grid], window: int) -> Tensor:
    """``[N]`` int64: the window of each token of the grid blocks (row-major tokens, blocks in order).

    Each ``rows x cols`` block is cut into ``max(1, rows // window) x max(1, cols // window)`` windows of side
    ``window``; the last rows/columns that fill no whole window join the last window of their row/column (the
    authors' ``window_selection`` clamps ``index // window`` to the last window). Window ids count across the
    blocks (InternVL's tiles, LLaVA-NeXT's base image and mosaic each have their own windows).
    """
    if not is_int(window) or window < 1:
        raise ValueError(f"window={window!r}: must be an int >= 1 (the side of a local window, e.g. 4)")
    out, base = [], 0
    for rows, cols in check_grids(grids):
        nh, nw = max(1, rows // window), max(1, cols // window)
        r = (torch.arange(rows) // window).clamp(max=nh - 1)
        c = (torch.arange(cols) // window).clamp(max=nw - 1)
        out.append(base + (r[:, None] * nw + c[None, :]).flatten())
        base += nh * nw
    return torch.cat(out)


def local_scan(scores: Tensor, grids: list[Grid], n: int, window: int) -> Tensor:
    """VScan's local scan: the ``n`` highest-scoring tokens with at most ``ceil(n / W)`` per window.

    Tokens are visited in descending ``scores`` (ties: lower index first) and taken while their window holds
    fewer than ``ceil(n / W)`` of them (``W`` windows, :func:`window_ids`), until ``n`` are taken (the authors'
    ``window_selection``; where ``W`` divides ``n`` this is the top ``n / W`` of every window, LLaVA's
    ``window_cls_selection``). ``ceil(n / W) * W >= n``, so ``n`` tokens are always found.

    Args:
        scores: ``[N]`` the shallow vision layer's attention; grids: blocks covering the ``N`` tokens;
        ``0 <= n <= N``.

    Returns:
        ``[n]`` int64 kept indices, ascending.
    """
    num_tokens = check_scores(scores)
    ids = window_ids(list(grids), window)
    if ids.numel() != num_tokens:
        raise ValueError(f"grids {list(grids)} cover {ids.numel()} tokens but the scores have N={num_tokens}")
    if not is_int(n) or not 0 <= n <= num_tokens:
        raise ValueError(f"n={n!r}: must be an int in [0, N={num_tokens}]")
    limit = math.ceil(n / (int(ids.max()) + 1))
    order = torch.sort(-scores.detach().float().cpu(), stable=True).indices
    taken = torch.zeros(int(ids.max()) + 1, dtype=torch.long)
    keep = []
    for i in order.tolist():
        if len(keep) == n:
            break
        w = int(ids[i])
        if taken[w] < limit:
            taken[w] += 1
            keep.append(i)
    return torch.tensor(sorted(keep), dtype=torch.long, device=scores.device)


def global_scan(scores: Tensor, n: int, exclude: Tensor) -> Tensor:
    """VScan's global scan: the ``n`` highest-scoring tokens outside ``exclude`` (ties: lower index first).

    The authors zero the excluded tokens' scores before their ``topk``; attention scores are positive, so
    that equals leaving them out. Returns ``[n]`` int64 indices, ascending."""
    num_tokens = check_scores(scores)
    free = torch.ones(num_tokens, dtype=torch.bool, device=scores.device)
    free[exclude.to(scores.device)] = False
    if not is_int(n) or not 0 <= n <= int(free.sum()):
        raise ValueError(f"n={n!r}: must be an int in [0, {int(free.sum())}] (the tokens not excluded)")
    candidates = torch.nonzero(free).flatten()
    order = torch.sort(-scores.detach().float()[candidates], stable=True).indices[:n]
    return torch.sort(candidates[order]).values


def vscan_select(local_scores: Tensor, global_scores: Tensor, grids: list[Grid], n: int, window: int) -> Tensor:
    """The tokens VScan keeps: ``n // 2`` by the local scan of ``local_scores`` (:func:`local_scan`), the other
    ``n - n // 2`` by the global scan of ``global_scores`` among the rest (:func:`global_scan`).

    The split is the authors' (``num_keep_tokens // 2`` local on Qwen2.5-VL; ``int(T * 0.5)`` on LLaVA, the
    same). Returns ``[n]`` int64 indices, ascending."""
    num_tokens = check_scores(local_scores, "local_scores")
    if check_scores(global_scores, "global_scores") != num_tokens:
        raise ValueError(f"global_scores has {global_scores.numel()} tokens but local_scores {num_tokens}: "
                         "one score per token")
    check_budget(n, num_tokens)
    local = local_scan(local_scores, grids, n // 2, window).to(global_scores.device)
    both = torch.cat([local, global_scan(global_scores, n - n // 2, local)])
    return torch.sort(both).values


def nearest_merge(features: Tensor, kept: Tensor) -> Merge | Tensor:
    """VScan's token merging: each token not in ``kept`` joins the kept token of highest cosine similarity
    (ties: the first kept token in ascending order, ``argmax``), and each kept token becomes the mean of itself
    and the tokens that joined it (the authors' ``token_merging`` with ``scaling=1``: ``(x_k + sum x_j) /
    (1 + count)``).

    The merged tokens stay at their kept tokens' places: a :class:`Merge` with no plain kept token
    (``index`` empty), one ``weights`` row per kept token (ascending) and ``slots = kept``. Where every token is
    kept there is nothing to merge and ``kept`` itself is returned.

    Args:
        features: ``[N, D]`` the similarity features (the projected visual embeddings, as the authors merge);
        kept: ``[k]`` int64 ascending unique indices, ``k >= 1``.
    """
    num_tokens = check_features(features)
    kept = kept.to(features.device)
    if kept.numel() == 0 or kept.numel() != torch.unique(kept).numel() or int(kept.min()) < 0 \
            or int(kept.max()) >= num_tokens:
        raise ValueError(f"kept={kept.tolist()[:8]}: must be 1..N unique indices in [0, {num_tokens - 1}]")
    kept = torch.sort(kept).values
    if kept.numel() == num_tokens:
        return kept
    rest = torch.ones(num_tokens, dtype=torch.bool, device=features.device)
    rest[kept] = False
    others = torch.nonzero(rest).flatten()
    unit = F.normalize(features.float(), dim=-1)
    target = (unit[others] @ unit[kept].T).argmax(1)  # [N - k] the row of the kept token each joins
    weights = torch.zeros(kept.numel(), num_tokens, dtype=torch.float32, device=features.device)
    weights[torch.arange(kept.numel(), device=features.device), kept] = 1.0
    weights[target, others] = 1.0
    weights /= weights.sum(1, keepdim=True)
    return Merge(kept[:0], weights, slots=kept)
