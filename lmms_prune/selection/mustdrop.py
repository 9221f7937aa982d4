"""MustDrop (Liu et al., 2024, "Multi-Stage Vision Token Dropping", arXiv 2411.10803): its vision-encoding stage
(spatially adjacent similar tokens merged in non-overlapping windows before the LLM) and its prefill stage (the
"dual-attention filter": visual tokens that the text neither attends to in sum nor in any single row dropped).

Vision stage read in LightCompress (github.com/ModelTC/LightCompress, commit 9701d035b0aa,
``llmc/compression/token_reduction/mustdrop.py``: ``conditional_pooling``, ``merge_wavg``,
``spatial_merge_hook``; config ``configs/sparsification/methods/MustDrop/mustdrop.yml``) and in the authors' code
(github.com/liuting20/MustDrop, commit 909afa538bff, ``llava/model/multimodal_encoder/local_merge.py``); prefill
stage in the authors' ``llava/model/language_model/modelling_sparse_llama.py`` (``dual_attention_filter``).
Nothing copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import Grid, check_features, check_grids, is_int
from lmms_prune.selection.merge import Merge, group_weights


def window_members(grids: list[Grid], window: tuple[int, int]) -> Tensor:
    """``[W, wh * ww]`` token indices of the non-overlapping ``wh x ww`` windows of each grid block (row-major
    windows, row-major members; a block's last rows/columns that fill no whole window belong to none)."""
    wh, ww = window
    out, base = [], 0
    for rows, cols in check_grids(grids):
        r = torch.arange(rows - rows % wh).view(-1, wh)  # [gh, wh]
        c = torch.arange(cols - cols % ww).view(-1, ww)  # [gw, ww]
        idx = r[:, None, :, None] * cols + c[None, :, None, :]  # [gh, gw, wh, ww]
        out.append(base + idx.reshape(-1, wh * ww))
        base += rows * cols
    return torch.cat(out) if out else torch.zeros(0, wh * ww, dtype=torch.long)


def window_similarity(features: Tensor, members: Tensor) -> Tensor:
    """``[W]``: each window's mean pairwise cosine similarity of its tokens, self-pairs excluded
    (``sum_{i != j} cos(x_i, x_j) / (m (m - 1))``, m tokens per window). features ``[N, D]``."""
    x = features.float()[members]  # [W, m, D]
    sims = F.cosine_similarity(x[:, :, None, :], x[:, None, :, :], dim=-1)
    m = members.shape[1]
    off = 1 - torch.eye(m, device=sims.device)
    return (sims * off).sum((-1, -2)) / (m * (m - 1))


def mustdrop_merge(features: Tensor, grids: list[Grid], n: int, window: tuple[int, int] = (3, 3),
                   threshold: float = 0.6) -> Merge:
    """Merge the ``r`` most self-similar windows of the image into one token each (their mean).

    ``r = (N - n) // (m - 1)`` windows (``m = wh * ww`` tokens each) so that about ``n`` tokens remain
    (LightCompress's ``fix_r`` from ``retained_tokens``), at most the number of windows; where that is 0, the
    windows whose similarity (:func:`window_similarity`) is ``>= threshold`` (the method's adaptive count).
    The ``r`` windows of highest similarity are merged (``topk``), each into the mean of its ``m`` tokens
    (``merge_wavg`` with unit sizes); every other token is kept.

    Returns a :class:`Merge`: ``index`` the tokens of no merged window (ascending), ``weights`` ``[r, N]`` the
    merged windows' means in descending similarity; ``N - r (m - 1)`` tokens in all.
    """
    num_tokens = check_features(features)
    if not (isinstance(window, tuple | list) and len(window) == 2 and all(is_int(w) and w >= 1 for w in window)
            and window[0] * window[1] >= 2):
        raise ValueError(f"window={window!r}: must be (rows, cols) of at least 2 tokens, e.g. (3, 3)")
    members = window_members(list(grids), tuple(window)).to(features.device)
    if int(members.numel()) and int(members.max()) >= num_tokens:
        raise ValueError(f"grids={grids!r} cover more than the {num_tokens} tokens given")
    m = members.shape[1]
    sim = window_similarity(features, members) if members.shape[0] else features.new_zeros(0)
    r = min(max(0, (num_tokens - n) // (m - 1)), members.shape[0])
    if r == 0:
        r = int((sim >= threshold).sum())
    top = sim.topk(r).indices if r else torch.zeros(0, dtype=torch.long, device=features.device)
    merged = members[top]  # [r, m], descending similarity
    keep = torch.ones(num_tokens, dtype=torch.bool, device=features.device)
    keep[merged.flatten()] = False
    weights = group_weights(list(merged), num_tokens, device=features.device)
    return Merge(index=torch.nonzero(keep).flatten(), weights=weights)


def dual_attention_filter(rows: Tensor, global_thr: float, individual_thr: float) -> Tensor:
    """MustDrop's prefill "dual-attention filter" (paper Sec. 3.3): the visual tokens kept at one LLM layer.

    ``rows`` ``[M, N]``: the attention probabilities (heads averaged, each row soft-maxed over the whole prompt)
    of the ``M`` text tokens after the image over the image's ``N`` visual tokens still present. A token is
    dropped where BOTH its global attention (its column's sum) is ``< global_thr`` times the sum of all ``N``
    columns AND its individual attention (its column's largest value) is ``< individual_thr``; every other token
    is kept, so the count is adaptive (``global_thr=1, individual_thr=0``, the authors' defaults, drop nothing).
    Without text rows (``M = 0``) nothing is judged and every token is kept.

    Returns the kept indices ``[n]``, ascending (the authors' ``all_indices[~candidate_mask]``).
    """
    if rows.dim() != 2:
        raise ValueError(f"rows of shape {tuple(rows.shape)}: must be [M text rows, N visual tokens]")
    if rows.shape[0] == 0:
        return torch.arange(rows.shape[1], device=rows.device)
    column = rows.float().sum(0)  # [N] global attention
    dropped = (column < column.sum() * global_thr) & (rows.float().amax(0) < individual_thr)
    return torch.nonzero(~dropped).flatten()
