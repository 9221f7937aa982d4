"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025):
dynamic temporal segmentation, then per frame salient tokens kept and density-peak anchors that absorb their
segment.

Authors' code: github.com/LunarShen/FastVID at commit ``a40a109cb8df20e8c2c17c6850f8269717369990``, the
LLaVA-OneVision implementation their README names as the core code
(``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py``, the block
``FastVID`` of ``Qwen2Model.forward``, run once on the LLM's input embeddings at prefill). For a video of ``T``
frames of ``P`` tokens, retention ``r``:

1. **DySeg** (dynamic segmentation): ``s_t = cos(g_t, g_{t+1})`` of consecutive frames' global features; cut
   after the ``c - 1`` frames of lowest ``s_t`` and after every ``t`` with ``s_t < tau``; segments run between
   cuts.
2. **Budgets**: per frame ``int(P r)`` tokens, of which ``d`` (their ``STPrune_d``) share are context:
   ``salient = int(P r) - int(int(P r) d)`` and ``context = int(P r) - salient``.
3. **ATS** (attention token selection): each frame keeps its ``salient`` tokens of highest attention.
4. **Anchors**: in a segment of ``L`` frames, counting back from its last frame, every ``p``-th frame (``DTM_p``)
   is an anchor frame with ``(context L) // ceil(L / p)`` anchors (a one-frame segment: ``context``). Anchors are
   a frame's non-salient tokens of highest density score (density peaks, DPC-KNN): ``rho_i =
   exp(-mean of the squared distances to its 4 nearest)`` (itself included) with distances ``||x_i - x_j|| /
   sqrt(D)``, ``delta_i`` = the distance to the nearest token of higher ``rho`` (the frame's largest distance
   for the densest), score ``rho_i delta_i``.
5. **DTM** (density token merging): each non-salient token of the frame (a one-frame segment) or of the whole
   segment (an anchor frame of a longer segment) joins the anchor of highest cosine; an anchor with ``n``
   members becomes ``w x_anchor + (1 - w) mean(members)``, ``w = max(beta, 1 / (n + 1))`` (``DTM_beta``),
   at the anchor's own place.

The video keeps the salient tokens and the merged anchors, in original order at their original positions.

Where this differs from their code: their density adds ``1e-6`` uniform noise to break ties (here ties go to the
lower index: equal densities are not "higher"); ``topk`` ties to the lower index; ``c - 1`` cuts are capped at
``T - 1`` (their ``topk`` fails on fewer frames); a frame's anchors at most its non-salient tokens (theirs
fails beyond); arithmetic in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_prune.selection._validate import Grid, check_features, check_scores, sorted_indices
from lmms_prune.selection.merge import Merge
from lmms_prune.selection.temporal import frame_layout

NEAREST = 4  # DPC-KNN's neighbours, the point itself included


def dynamic_segments(frame_features: Tensor, num_cuts: int, tau: float) -> list[int]:
    """FastVID's DySeg: segment lengths (in frames, summing to ``T``) of ``frame_features`` ``[T, D]``.

    Cuts follow the ``num_cuts`` (their ``c - 1``, at most ``T - 1``) lowest cosines of consecutive frames
    (ties: the earlier pair) and every cosine below ``tau``.
    """
    frames = frame_features.shape[0]
    unit = F.normalize(frame_features.double(), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(dim=-1)
    lowest = torch.sort(similarity, stable=True).indices[: min(num_cuts, frames - 1)]
    cuts = torch.cat([lowest, torch.nonzero(similarity < tau).flatten()]).unique().sort().values.tolist()
    bounds = [-1, *cuts, frames - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def frame_counts(cells: int, retention: float, context_share: float) -> tuple[int, int]:
    """``(salient, context)`` tokens per frame: ``int(P r)`` split as their ``STPrune_d`` (the context share)."""
    retain = int(cells * retention)
    salient = retain - int(retain * context_share)
    return salient, retain - salient


def anchor_counts(segments: Sequence[int], context: int, period: int) -> list[int]:
    """Anchors per frame: in a segment of ``L`` frames, the frames ``L - 1, L - 1 - p, ...`` (its own index) get
    ``(context L) // ceil(L / p)``; the others none (FastVID's anchor token distribution)."""
    out: list[int] = []
    for length in segments:
        per_anchor_frame = context * length // math.ceil(length / period)
        out += [per_anchor_frame if (length - 1 - j) % period == 0 else 0 for j in range(length)]
    return out


def density_scores(tokens: Tensor) -> Tensor:
    """``[M]`` float64 density-peak scores ``rho * delta`` of ``tokens`` ``[M, D]`` (DPC-KNN, FastVID's step 4):
    ``rho = exp(-mean of the squared scaled distances to the 4 nearest)``, ``delta`` = the scaled distance to the
    nearest token of strictly higher ``rho``, or the largest distance among the tokens for none."""
    x = tokens.double()
    dist = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    nearest = torch.sort(dist, dim=-1).values[:, : min(NEAREST, x.shape[0])]
    rho = torch.exp(-(nearest ** 2).mean(dim=-1))
    denser = rho[None, :] > rho[:, None]
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    return rho * delta


def _merge_rows(pool: Tensor, pool_index: Tensor, anchors: Tensor, beta: float, num_tokens: int) -> Tensor:
    """``[len(anchors), N]`` weights: each token of ``pool`` (features ``[M, D]`` of tokens ``pool_index``) joins
    the anchor (token indices ``anchors``, among ``pool_index``) of highest cosine (ties: the first anchor);
    anchor ``j`` with ``n`` members -> ``w x_anchor + (1 - w) mean(members)``, ``w = max(beta, 1 / (n + 1))``."""
    unit = F.normalize(pool.double(), dim=-1)
    anchor_rows = torch.searchsorted(pool_index, anchors)
    assign = (unit @ unit[anchor_rows].T).argmax(dim=1)
    weights = torch.zeros(anchors.numel(), num_tokens, dtype=torch.float64, device=pool.device)
    for j in range(anchors.numel()):
        members = pool_index[assign == j]
        w = max(beta, 1.0 / (members.numel() + 1))
        if members.numel():
            weights[j, members] = (1.0 - w) / members.numel()
        weights[j, anchors[j]] += w
    return weights.float()


def fastvid(features: Tensor, attention: Tensor, frame_features: Tensor, grids: Sequence[Grid], retention: float,
            num_cuts: int = 7, tau: float = 0.9, context_share: float = 0.4, period: int = 4,
            beta: float = 0.6) -> Merge:
    """FastVID on one video (module docstring, steps 1-5; their defaults ``c = 8``, ``tau = 0.9``, ``d = 0.4``,
    ``p = 4``, ``beta = 0.6``).

    Args:
        features: ``[N, D]`` tokens in time order (their LLM input embeddings); distances and merges use them.
        attention: ``[N]`` per-token attention (ATS's salience).
        frame_features: ``[T, D']`` one global feature per frame (DySeg).
        grids: one equal ``(rows, cols)`` per frame.
        retention: ``r`` in (0, 1].

    Returns:
        :class:`Merge` with ``index`` the salient tokens (ascending), ``weights`` one row per anchor (ascending
        anchor index) and ``slots`` the anchors: the video becomes the ascending union of both, each anchor's
        place holding its merge.
    """
    num_tokens = check_features(features)
    check_scores(attention, "attention")
    frames, cells = frame_layout(grids, num_tokens)
    if attention.numel() != num_tokens or frame_features.shape[0] != frames:
        raise ValueError(f"attention has {attention.numel()} rows and frame_features {frame_features.shape[0]}: "
                         f"need one per token ({num_tokens}) and one per frame ({frames})")
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention={retention!r}: must be in (0, 1]")
    device = features.device
    segments = dynamic_segments(frame_features, num_cuts, tau)
    salient_n, context_n = frame_counts(cells, retention, context_share)
    anchors_n = anchor_counts(segments, context_n, period)
    att = attention.double().view(frames, cells)
    salient = [torch.sort(att[t], descending=True, stable=True).indices[:salient_n] + t * cells
               for t in range(frames)]
    rest = []  # per frame: the non-salient token indices, ascending
    for t in range(frames):
        mask = torch.ones(cells, dtype=torch.bool, device=device)
        mask[salient[t] - t * cells] = False
        rest.append(torch.nonzero(mask).flatten() + t * cells)
    anchors, rows = [], []
    start = 0
    for length in segments:
        segment_pool = torch.cat(rest[start:start + length])
        for t in range(start, start + length):
            if anchors_n[t] == 0:
                continue
            if anchors_n[t] > rest[t].numel():
                raise ValueError(f"FastVID: frame {t} needs {anchors_n[t]} anchors but has {rest[t].numel()} "
                                 "non-salient tokens; lower keep_ratio or fastvid_dtm_p")
            score = density_scores(features[rest[t]])
            chosen = rest[t][torch.sort(score, descending=True, stable=True).indices[: anchors_n[t]]].sort().values
            pool = rest[t] if length == 1 or anchors_n[t] == context_n else segment_pool
            anchors.append(chosen)
            rows.append(_merge_rows(features[pool], pool, chosen, beta, num_tokens))
        start += length
    slots = torch.cat(anchors) if anchors else torch.zeros(0, dtype=torch.long, device=device)
    weights = torch.cat(rows) if rows else torch.zeros(0, num_tokens, device=device)
    return Merge(sorted_indices(torch.cat(salient)), weights, slots=slots)
