"""EVS, Efficient Video Sampling (vLLM's video pruning, ``--video-pruning-rate q``).

vLLM ``vllm/multimodal/evs.py`` (read at commit ``094f117823287790739d3022162a3f30f13d758b``:
``compute_retained_tokens_count``, ``compute_retention_mask``), applied there to each video's projected
embeddings (one ``(rows, cols)`` grid per merged frame) before the LLM:

- dissimilarity of a token = ``1 - cos`` with the token of the same cell in the previous frame; the first
  frame's tokens get 255 (above any ``1 - cos <= 2``), so they come first;
- retained count ``max(cells, int(cells * frames * (1 - q)))``: never less than one whole frame;
- the tokens of highest dissimilarity are kept, ties to the lower index (a stable descending sort).

The cosine here is float64 (:func:`lmms_prune.selection.temporal.previous_frame_similarity`), vLLM's is in the
embeddings' dtype: the order can differ only where two dissimilarities are within that dtype's rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from lmms_prune.selection._validate import (
    Grid,
    check_budget,
    check_features,
    descending_order,
    sorted_indices,
)
from lmms_prune.selection.temporal import frame_layout, previous_frame_similarity

FIRST_FRAME_DISSIMILARITY = 255.0  # vLLM's value for the first frame: above every 1 - cos, so it is kept whole


def evs_retained_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """Tokens EVS keeps of a video of ``num_frames`` frames of ``tokens_per_frame`` tokens at pruning rate
    ``q`` in ``[0, 1)``: ``max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - q)))`` (vLLM's
    ``compute_retained_tokens_count``: the floor, and at least the first frame)."""
    if isinstance(q, bool) or not isinstance(q, Real) or not 0.0 <= q < 1.0:
        raise ValueError(f"video_pruning_rate={q!r}: must be in [0, 1) (vLLM's --video-pruning-rate)")
    if tokens_per_frame < 1 or num_frames < 1:
        raise ValueError(f"tokens_per_frame={tokens_per_frame}, num_frames={num_frames}: must be >= 1")
    return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - q)))


def evs_dissimilarity(features: Tensor, grids: Sequence[Grid]) -> Tensor:
    """``[N]`` float64: ``1 - cos`` of each token with the same cell of the previous frame, 255 on the first
    frame. ``features``: ``[N, D]`` in time order; ``grids``: one equal ``(rows, cols)`` per frame."""
    similarity = previous_frame_similarity(features, grids)
    dissimilarity = 1.0 - similarity
    dissimilarity[torch.isinf(similarity)] = FIRST_FRAME_DISSIMILARITY
    return dissimilarity


def evs_select(features: Tensor, grids: Sequence[Grid], n: int) -> Tensor:
    """Keep the ``max(cells, n)`` tokens most unlike the same cell of their previous frame (EVS's order).

    Args:
        features: ``[N, D]`` token features in time order (vLLM: the projected video embeddings).
        grids: one equal ``(rows, cols)`` per (merged) frame, ``frames * rows * cols = N``.
        n: requested count, ``1 <= n <= N``; EVS never keeps less than the first frame, so ``cells`` when
            ``n`` is smaller (:func:`evs_retained_count` gives vLLM's ``n`` for a pruning rate ``q``).

    Returns:
        ``[max(cells, n)]`` int64 kept indices, ascending, on ``features.device``: the first frame whole, then
        by descending dissimilarity, ties to the lower index.
    """
    num_tokens = check_features(features)
    check_budget(n, num_tokens)
    _, cells = frame_layout(grids, num_tokens)
    order = descending_order(evs_dissimilarity(features, grids))
    return sorted_indices(order[: max(cells, n)])


def evs_retention_mask(features: Tensor, grids: Sequence[Grid], q: float) -> Tensor:
    """Bool ``[N]``, True for the tokens EVS keeps at pruning rate ``q`` (vLLM's ``compute_retention_mask`` on
    one video: the count of :func:`evs_retained_count`, the order of :func:`evs_select`)."""
    num_tokens = check_features(features)
    frames, cells = frame_layout(grids, num_tokens)
    mask = torch.zeros(num_tokens, dtype=torch.bool, device=features.device)
    mask[evs_select(features, grids, evs_retained_count(cells, frames, q))] = True
    return mask
