"""VidCom2, Video Compression Commander (Liu et al., EMNLP 2025, arXiv 2505.14454): per-frame budgets from frame
uniqueness, then the most distinct tokens of each frame.

Authors' code: github.com/xuyang-liu16/VidCom2 ``token_compressor/vidcom2/vidcom2.py`` at commit
``944a17d14f4848ad080a65eab2b0711a760fa154`` (``select_low_var_channels``, ``compute_gaussian_scores``,
``compute_scales``, ``select_outlier_indices``), called on each video's projected embeddings (LLaVA-OneVision:
after the 2x2 pooling; Qwen2.5-VL / Qwen3-VL: after the merger). vLLM's reading (``--video-retention-ratio``,
``vllm/multimodal/video_prune/vidcom2.py`` at ``0f17ee061e413bf8ab7927f926f69cdff24dc63e``,
``compute_retention_mask``) is the same arithmetic plus an exact total count.

For a video of ``T`` frames of ``P`` tokens and a retention ratio ``r`` (their ``base_scale`` / ``R_RATIO``):

1. **Channels**: the ``int(D / 2)`` channels of lowest variance over the video's tokens (population variance).
2. **Scores**: each token's row (those channels) L2-normalised; ``s_video`` and ``s_frame`` are multi-scale
   Gaussian similarities ``sum_a exp(-||x - c||^2 / (2a))``, ``a in {1/8, 1/4, 1/2, 1, 2}``, to the video's mean
   ``c`` and to its frame's mean. Token score ``s_video + s_frame``: low = unlike both (an outlier).
3. **Frame budgets** (uniqueness): ``u_t = -mean(s_video)`` over frame ``t``; ``p = softmax(u / 0.01)``;
   ``scale_t = min(1, r (1 + p_t - mean(p)))``; ``k_t = max(1, round(scale_t * P))`` (half to even, torch's
   ``round``). The scales average ``r`` (before the clamp), so distinctive frames keep more.
4. **Within a frame**: the ``k_t`` tokens of lowest score.

The total is ``sum_t k_t`` (the authors'), near ``r * N`` but not exactly. ``count="vllm"``: vLLM's exact total
``max(T, min(int(N r), N))``, reached after step 4 by dropping the kept tokens of highest score or adding the
dropped ones of lowest score, over the whole video.

Ties (the authors' ``torch.topk`` leaves them to the kernel): the lower index wins, here and in vLLM's
reconcile. Arithmetic runs in float64 (theirs in the embeddings' dtype): the softmax at temperature 0.01 and
the rounding of ``k_t`` amplify a low-precision difference into a different budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import Grid, check_features, sorted_indices
from lmms_prune.selection.temporal import frame_layout

GAUSSIAN_BANDWIDTHS = tuple(2.0 ** k for k in range(-3, 2))  # the authors' alphas: 1/8 .. 2
LOW_VARIANCE_RATIO = 0.5  # share of channels scored: the lowest-variance half
TEMPERATURE = 0.01  # softmax temperature of the frame budgets
COUNTS = ("authors", "vllm")


def low_variance_channels(features: Tensor, ratio: float = LOW_VARIANCE_RATIO) -> Tensor:
    """``[N, int(D * ratio)]``: the columns of ``features`` ``[N, D]`` of lowest population variance over the N
    tokens (at least one; equal variances: the lower channel first), VidCom2's ``select_low_var_channels``."""
    variances = features.var(dim=0, unbiased=False)
    count = max(1, int(features.shape[-1] * ratio))
    return features[:, torch.sort(variances, stable=True).indices[:count]]


def multi_scale_gaussian(x: Tensor, centre: Tensor, bandwidths: Sequence[float] = GAUSSIAN_BANDWIDTHS) -> Tensor:
    """``sum_a exp(-||x - centre||^2 / (2a))`` over the last axis: ``[..., C]`` and a broadcastable centre ->
    ``[...]`` (VidCom2's ``_multi_scale_gaussian``)."""
    dist_sq = ((x - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2 * a)) for a in bandwidths)


def vidcom2_scores(features: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    """VidCom2's token scores and frame uniqueness of one video.

    Args:
        features: ``[N, D]`` projected video tokens in time order, ``N = frames * P``.
        frames: ``T``.

    Returns:
        ``(score [T, P], uniqueness [T])`` in float64: ``score = s_video + s_frame`` (low: an outlier of both its
        video and its frame); ``uniqueness = -mean_P(s_video)`` (high: a frame unlike the video).
    """
    x = low_variance_channels(features.double())
    x = F.normalize(x.view(frames, -1, x.shape[-1]), dim=-1)
    s_video = multi_scale_gaussian(x, x.mean(dim=(0, 1), keepdim=True))
    s_frame = multi_scale_gaussian(x, x.mean(dim=1, keepdim=True))
    return s_video + s_frame, -s_video.mean(dim=-1)


def frame_budgets(uniqueness: Tensor, retention: float, cells: int, temperature: float = TEMPERATURE) -> Tensor:
    """``[T]`` int64 per-frame counts ``k_t = max(1, round(min(1, r (1 + p_t - mean p)) * P))``, ``p`` the softmax
    of ``uniqueness / temperature`` (VidCom2's ``compute_scales`` and ``select_outlier_indices``)."""
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention={retention!r}: must be in (0, 1] (VidCom2's base_scale, the keep ratio)")
    probs = F.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    scales = (retention * (1 + probs - probs.mean())).clamp(max=1.0)
    return (scales * cells).round().long().clamp(min=1, max=cells)


def vidcom2_select(features: Tensor, grids: Sequence[Grid], retention: float, count: str = "authors",
                   n: int | None = None) -> Tensor:
    """The video tokens VidCom2 keeps.

    Args:
        features: ``[N, D]`` projected video tokens in time order.
        grids: one equal ``(rows, cols)`` per (merged) frame.
        retention: ``r`` in (0, 1], the frame budgets' mean share.
        count: ``"authors"`` (``sum_t k_t`` tokens) or ``"vllm"`` (exactly ``n``, reconciled by score).
        n: the exact total for ``count="vllm"``; default vLLM's ``max(T, min(int(N r), N))``.

    Returns:
        ``[k]`` int64 kept indices, ascending, on ``features.device``.
    """
    num_tokens = check_features(features)
    frames, cells = frame_layout(grids, num_tokens)
    if count not in COUNTS:
        raise ValueError(f"vidcom2_count={count!r}: must be one of {COUNTS} (the authors' per-frame total, or "
                         "vLLM's exact count)")
    if count == "vllm":
        # vLLM's compute_retention_mask takes the pruning rate q = 1 - r and works with 1 - q: the same float
        # (e.g. 1 - (1 - 0.1) = 0.09999999999999998), so that per-frame budgets at a rounding boundary agree
        retention = 1.0 - (1.0 - retention)
    score, uniqueness = vidcom2_scores(features, frames)
    ks = frame_budgets(uniqueness, retention, cells)
    # ascending score, ties to the lower index: each frame keeps the head of its order
    order = torch.sort(score, dim=1, stable=True).indices
    in_budget = torch.arange(cells, device=features.device)[None, :] < ks[:, None].to(features.device)
    keep = torch.zeros_like(in_budget).scatter(1, order, in_budget).flatten()  # rank j of frame t -> order[t, j]
    if count == "vllm":
        target = max(frames, min(int(num_tokens * retention), num_tokens)) if n is None else n
        keep = _reconcile(keep, score.flatten(), target)
    return sorted_indices(torch.nonzero(keep).flatten())


def _reconcile(keep: Tensor, score: Tensor, target: int) -> Tensor:
    """vLLM's exact count: drop the kept tokens of highest score, or add the dropped ones of lowest score, until
    ``target`` are kept (ties to the lower index: it is kept first and dropped last)."""
    order = torch.sort(score, stable=True).indices  # keep-preference order
    keep = keep.clone()
    current = int(keep.sum())
    if current > target:
        kept_in_order = order[keep[order]]
        keep[kept_in_order[target - current:]] = False
    elif current < target:
        keep[order[~keep[order]][: target - current]] = True
    return keep
