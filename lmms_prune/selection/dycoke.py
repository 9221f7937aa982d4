"""DyCoke's token temporal merging, TTM (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large
Language Models", CVPR 2025), stage 1: before the LLM, frames are taken in pairs and in windows of four, and of
each pruned frame only the tokens least like the same cell of a reference frame are kept.

Arithmetic read in the authors' code (github.com/KD-TAO/DyCoke at commit
``dd7463498203479d0ff6f2d29c4e72928c0af244``, ``llava/model/llava_arch.py``: ``dycole_ttm``; nothing copied),
on ``F`` frames of ``T`` tokens each (the projected, pooled video features):

1. pairs ``(i, i + 1)`` for even ``i`` with ``i + 1 < F``: frame ``i`` is kept whole; of frame ``i + 1`` the
   ``int((1 - K) * T)`` tokens of LOWEST cosine similarity with the same cell of frame ``i`` are kept;
2. windows of four, ``i`` in ``range(0, F - 4, 4)``: frame ``i + 2`` (kept whole by step 1) is replaced by its
   ``int((1 - K) * T)`` tokens least like the same cell of frame ``i``.

So frame ``4j`` and (where ``F - 4 <= 4j + 2``, e.g. frame 30 of 32) frame ``4j + 2`` stay whole; every odd frame
is pruned against the frame before it, every other ``4j + 2`` against frame ``4j``. ``K`` is DyCoke's merging
ratio (``dycoke_k``; 0.7 in the authors' lmms-eval wrapper).

Deliberate differences (docs/fidelity.md, "dycoke"):

- an odd ``F``: the authors' loop never appends the last frame, so it is lost (and ``F = 1`` fails on an empty
  stack); here the last frame, which has no partner, is kept whole like every pair's first frame;
- kept tokens stay in their original order (the authors concatenate a pruned frame's tokens in the order of
  ``topk``, ascending similarity); ties in similarity go to the lower index (``topk`` leaves them unspecified);
- similarities in float64 (the authors': the features' dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from lmms_prune.selection._validate import Grid, check_features, sorted_indices
from lmms_prune.selection.temporal import frame_layout

MERGING_RATIO = 0.7  # DyCoke's K in the authors' lmms-eval wrapper (``dycoke_k``)


def check_merging_ratio(k: float) -> None:
    """DyCoke's ``K`` must be a number in [0, 1]."""
    if isinstance(k, bool) or not isinstance(k, Real) or not 0.0 <= k <= 1.0 or math.isnan(k):
        raise ValueError(f"dycoke_k={k!r}: DyCoke's merging ratio must be in [0, 1] (0.7: the authors' default)")


def ttm_references(num_frames: int) -> list[tuple[int, int]]:
    """``(pruned frame, reference frame)`` pairs of DyCoke's TTM for ``num_frames`` frames, in the order the
    authors' code decides them (a frame listed twice takes its last reference: step 2 overrides step 1)."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: must be >= 1")
    refs = {i + 1: i for i in range(0, num_frames - 1, 2)}  # step 1: odd frames against the frame before
    refs.update({i + 2: i for i in range(0, num_frames - 4, 4)})  # step 2: frame 4j + 2 against frame 4j
    return sorted(refs.items())


def ttm_count(tokens_per_frame: int, num_frames: int, k: float = MERGING_RATIO) -> int:
    """Tokens DyCoke's TTM keeps of ``num_frames`` frames of ``tokens_per_frame`` tokens: whole frames plus
    ``int((1 - k) * tokens_per_frame)`` per pruned frame (the authors' ``int``, a floor)."""
    check_merging_ratio(k)
    pruned = len(ttm_references(num_frames))
    return (num_frames - pruned) * tokens_per_frame + pruned * int((1 - k) * tokens_per_frame)


def ttm_select(features: Tensor, grids: Sequence[Grid], k: float = MERGING_RATIO) -> Tensor:
    """DyCoke's TTM (stage 1) on one video: the kept token indices.

    Args:
        features: ``[N, D]`` token features in time order (DyCoke: the projected, pooled video features).
        grids: one equal ``(rows, cols)`` per (merged) frame, ``frames * rows * cols = N``.
        k: DyCoke's merging ratio ``K`` in [0, 1]: a pruned frame keeps ``int((1 - K) * T)`` of its ``T`` tokens.

    Returns:
        ``[ttm_count(T, F, k)]`` int64 kept indices, ascending, on ``features.device``.
    """
    num_tokens = check_features(features)
    check_merging_ratio(k)
    frames, cells = frame_layout(grids, num_tokens)
    keep_per_frame = int((1 - k) * cells)
    unit = torch.nn.functional.normalize(features.double(), dim=-1).view(frames, cells, -1)
    kept = [torch.arange(num_tokens, device=features.device).view(frames, cells)[f] for f in range(frames)]
    for frame, ref in ttm_references(frames):
        similarity = (unit[frame] * unit[ref]).sum(-1)  # [T] cosine with the same cell of the reference frame
        lowest = torch.sort(similarity, stable=True).indices[:keep_per_frame]
        kept[frame] = frame * cells + lowest
    return sorted_indices(torch.cat(kept))


SIMILAR_STEP = 0.9  # DyCoke's stage 2: a step whose attention is at least this alike the previous one prunes nothing


def check_pruning_ratio(p: float) -> None:
    """DyCoke's stage-2 ``P`` must be a number in [0, 1]."""
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"dycoke_p={p!r}: DyCoke's KV pruning ratio must be in [0, 1] (0.8: the authors' default)")


def decode_keep(row: Tensor, previous: Tensor | None, p: float, similar: float = SIMILAR_STEP) -> Tensor | None:
    """DyCoke's stage 2 at one decode step: which of a video's ``N`` cached tokens the current token attends to
    in layers ``>= L`` (authors' ``modeling_qwen2.py``: ``dycoke_pruning``, ``update_cache``).

    Args:
        row: ``[N]`` the current token's attention over the video's tokens at layer ``L - 1`` (heads averaged).
        previous: the previous decode step's ``row`` (None at the call's first step).
        p: DyCoke's ``P``: ``int(N * (1 - p))`` tokens are kept.
        similar: at a cosine similarity of ``row`` with ``previous`` of at least this, nothing is pruned.

    Returns:
        None (attend to every token: the attention moved little) or the kept indices ``[int(N (1 - p))]``,
        ascending: the highest attention, ties to the lower index.
    """
    check_pruning_ratio(p)
    if previous is not None and previous.shape == row.shape:
        if float(torch.nn.functional.cosine_similarity(row.double(), previous.double(), dim=0)) >= similar:
            return None
    return sorted_indices(torch.sort(row.double(), descending=True, stable=True).indices[: int(row.numel() * (1 - p))])
