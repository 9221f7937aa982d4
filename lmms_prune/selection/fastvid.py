"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025):
dynamic temporal segmentation, then per frame salient tokens kept and density-peak anchors that absorb their
segment.

Authors' code: github.com/LunarShen/FastVID at commit ``a40a109cb8df20e8c2c17c6850f8269717369990``, in two
versions that differ in their budgets and merge pools (``variant``):

* ``llava_onevision``: the implementation their README names as the core code
  (``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py``, the block ``FastVID`` of
  ``Qwen2Model.forward``);
* ``qwen2_5_vl``: their Qwen2.5-VL port (``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/
  modeling_qwen2_5_vl.py``, ``Qwen2_5_VLForConditionalGeneration.forward``, lines 1889-2099).

Both run once on the LLM's input embeddings at prefill. For a video of ``T`` frames of ``P`` tokens, retention
``r``, ``R = int(P r)``:

1. **DySeg** (dynamic segmentation, both): ``s_t = cos(g_t, g_{t+1})`` of consecutive frames' global features;
   cut after the ``c - 1`` frames of lowest ``s_t`` and after every ``t`` with ``s_t < tau``; segments run
   between cuts.
2. **Budgets**.
   ``llava_onevision``: every frame keeps ``salient = R - int(R d)`` (``d``: their ``STPrune_d``) tokens by
   attention and ``context = R - salient`` anchors' worth; in a segment of ``L`` frames, counting back from its
   last frame, every ``p``-th frame (``DTM_p``) holds ``(context L) // ceil(L / p)`` anchors (a one-frame
   segment: ``context``).
   ``qwen2_5_vl``: a segment of ``L`` frames keeps ``R L`` tokens, ``C = max(int(R L d), 1)`` anchors and
   ``S = R L - C`` salient. A one-frame segment keeps them on its frame. A longer one is split again after every
   ``s_t < ignore`` (their ``DySeg_ignore``) into ``V`` sub-segments, and only the LAST frame of each
   sub-segment keeps tokens: sub-segment ``i`` gets ``S // V`` salient (the first ``S % V`` one more); counting
   back from the last sub-segment, every ``p``-th holds anchors, ``C`` spread over those ``ceil(V / p)`` the
   same way (the last sub-segment first), each at most ``P // 2``; a frame's salient count is at most ``P``
   minus its anchors.
3. **ATS** (attention token selection, both): each frame keeps its salient count of highest attention.
4. **Anchors** (both): a frame's non-salient tokens of highest density score (density peaks, DPC-KNN): ``rho_i =
   exp(-mean of the squared distances to its 4 nearest)`` (itself included) with distances ``||x_i - x_j|| /
   sqrt(D)``, ``delta_i`` = the distance to the nearest token of higher ``rho`` (the frame's largest distance
   for the densest), score ``rho_i delta_i``.
5. **DTM** (density token merging): the tokens of a pool each join the anchor of highest cosine; an anchor with
   ``n`` members becomes ``w x_anchor + (1 - w) mean(members)``, ``w = max(beta, 1 / (n + 1))`` (``DTM_beta``),
   at the anchor's own place. ``llava_onevision``: the pool is the frame's non-salient tokens (a one-frame
   segment) or the whole segment's (an anchor frame of a longer one), the anchors themselves included (each
   joins itself). ``qwen2_5_vl``: the segment's non-salient tokens except this frame's anchors (other frames'
   anchors included).

The video keeps the salient tokens and the merged anchors, in original order at their original positions.

Where this differs from their code: their density adds ``1e-6`` uniform noise to break ties (here ties go to the
lower index: equal densities are not "higher"); ``topk`` ties to the lower index; ``c - 1`` cuts are capped at
``T - 1`` (their ``topk`` fails on fewer frames) and no cut at all is one segment (their Qwen2.5-VL port fails);
``llava_onevision``: a frame's anchors at most its non-salient tokens (theirs fails beyond); ``qwen2_5_vl``: a
segment's anchors at most its ``R L`` budget, so ``R = 0`` keeps nothing (their ``max(., 1)`` then asks for one
anchor and ``-1`` salient tokens, and fails); arithmetic in float64.
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
VARIANTS = ("llava_onevision", "qwen2_5_vl")  # the authors' two codes (module docstring)


def unit_means(states: Tensor, unit: int) -> Tensor:
    """Means over runs of ``unit`` consecutive patches, per head: ``[H, S, d] -> float32 [H, S // unit, d]``.

    Qwen2-VL/2.5-VL's towers hold each 2 x 2 merge unit's patches consecutively (also in Qwen2.5-VL's window
    order, which permutes whole units), so a run is one LLM token's patches: their Qwen2.5-VL port's
    ``k_attn.view(heads, t, h * w // 4, 4, head_dim).mean(-2)`` for ``unit = 4``.
    """
    heads, length, dim = states.shape
    if length % unit:
        raise ValueError(f"{length} patches: not a multiple of the merge unit {unit}")
    return states.float().view(heads, length // unit, unit, dim).mean(2)


def frame_query_attention(unit_query: Tensor, unit_key: Tensor, frames: int) -> Tensor:
    """FastVID's ATS attention on Qwen2.5-VL (their port, ``Qwen2_5_VLVisionFlashAttention2.forward``, lines
    193-203): per frame and head, the softmax of the frame's mean query over its merge units' mean keys, scaled
    by ``1 / sqrt(d)``, then averaged over heads.

    Args:
        unit_query, unit_key: ``[H, T U, d]`` the tower block's rotary-embedded queries and keys averaged per
            merge unit (:func:`unit_means`), ``T`` frames of ``U`` units each, frame after frame (any order of
            the units within a frame: Qwen2.5-VL's window order is fine).
        frames: ``T``.

    Returns:
        float32 ``[T, U]``, each row summing to 1, in the units' given order. A frame's mean query is the mean of
        its units' mean queries (every unit holds as many patches).
    """
    heads, length, dim = unit_key.shape
    if unit_query.shape != unit_key.shape or length % frames:
        raise ValueError(f"queries {tuple(unit_query.shape)}, keys {tuple(unit_key.shape)}: need equal [H, S, d] "
                         f"shapes with S a multiple of frames={frames}")
    keys = unit_key.float().view(heads, frames, length // frames, dim)
    query = unit_query.float().view(heads, frames, length // frames, dim).mean(2, keepdim=True)  # [H, T, 1, d]
    logits = (query @ keys.transpose(-1, -2))[:, :, 0] * dim**-0.5  # [H, T, U]
    return torch.softmax(logits, dim=-1).mean(0)


def frame_similarity(frame_features: Tensor) -> Tensor:
    """``[T - 1]`` float64 cosines ``s_t = cos(g_t, g_{t+1})`` of consecutive rows of ``frame_features`` ``[T, D]``."""
    unit = F.normalize(frame_features.double(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def segment_lengths(similarity: Tensor, num_cuts: int, tau: float) -> list[int]:
    """Lengths (in frames, summing to ``len(similarity) + 1``) of the segments cut after the ``num_cuts`` (at
    most ``T - 1``) lowest ``similarity`` values (ties: the earlier pair) and after every one below ``tau``."""
    frames = similarity.numel() + 1
    lowest = torch.sort(similarity, stable=True).indices[: min(num_cuts, frames - 1)]
    cuts = torch.cat([lowest, torch.nonzero(similarity < tau).flatten()]).unique().sort().values.tolist()
    bounds = [-1, *cuts, frames - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def dynamic_segments(frame_features: Tensor, num_cuts: int, tau: float) -> list[int]:
    """FastVID's DySeg: segment lengths (in frames, summing to ``T``) of ``frame_features`` ``[T, D]``.

    Cuts follow the ``num_cuts`` (their ``c - 1``, at most ``T - 1``) lowest cosines of consecutive frames
    (ties: the earlier pair) and every cosine below ``tau``.
    """
    return segment_lengths(frame_similarity(frame_features), num_cuts, tau)


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


def spread(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal shares, the first ``total % parts`` one larger (their Qwen2.5-VL port's
    ``chunk_size`` / ``remainder`` split)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def segment_counts(sub_segments: Sequence[int], retain: int, cells: int, context_share: float,
                   period: int) -> tuple[list[int], list[int]]:
    """Their Qwen2.5-VL port's budgets (module docstring, step 2) of ONE DySeg segment of ``L =
    sum(sub_segments)`` frames: ``(salient, anchors)`` per frame.

    ``sub_segments``: the segment's sub-segment lengths (split after every cosine below ``DySeg_ignore``);
    ``retain``: ``R = int(P r)``; ``cells``: ``P``. The segment keeps ``R L`` tokens: ``C = max(int(R L d), 1)``
    anchors (here at most ``R L``, so ``R = 0`` keeps none) and ``S = R L - C`` salient ones.
    """
    length = sum(sub_segments)
    total = retain * length
    context = min(max(int(total * context_share), 1), total)
    salient = total - context
    if length == 1:
        return [salient], [context]
    parts = len(sub_segments)
    salient_part = spread(salient, parts)
    held = spread(context, math.ceil(parts / period))  # the anchor sub-segments', the last one first
    salient_out: list[int] = []
    context_out: list[int] = []
    for i, size in enumerate(sub_segments):
        back = parts - 1 - i
        anchors = min(held[back // period], cells // 2) if back % period == 0 else 0
        salient_out += [0] * (size - 1) + [min(salient_part[i], cells - anchors)]  # the sub-segment's last frame
        context_out += [0] * (size - 1) + [anchors]
    return salient_out, context_out


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


def _merge_rows(features: Tensor, pool: Tensor, anchors: Tensor, beta: float) -> Tensor:
    """``[len(anchors), N]`` weights over the ``N`` rows of ``features``: each token of ``pool`` (indices) joins
    the anchor (indices ``anchors``) of highest cosine (ties: the first anchor); anchor ``j`` with ``n`` members
    -> ``w x_anchor + (1 - w) mean(members)``, ``w = max(beta, 1 / (n + 1))`` (DTM)."""
    unit = F.normalize(features[torch.cat([pool, anchors])].double(), dim=-1)
    assign = (unit[: pool.numel()] @ unit[pool.numel():].T).argmax(dim=1)
    weights = torch.zeros(anchors.numel(), features.shape[0], dtype=torch.float64, device=features.device)
    for j in range(anchors.numel()):
        members = pool[assign == j]
        w = max(beta, 1.0 / (members.numel() + 1))
        if members.numel():
            weights[j, members] = (1.0 - w) / members.numel()
        weights[j, anchors[j]] += w
    return weights.float()


def _counts(variant: str, segments: Sequence[int], similarity: Tensor, cells: int, retention: float,
            context_share: float, period: int, ignore: float) -> tuple[list[int], list[int]]:
    """``(salient, anchors)`` per frame of the whole video under ``variant`` (module docstring, step 2)."""
    if variant == "llava_onevision":
        salient, context = frame_counts(cells, retention, context_share)
        return [salient] * sum(segments), anchor_counts(segments, context, period)
    salient_out: list[int] = []
    anchors_out: list[int] = []
    start = 0
    for length in segments:
        subs = segment_lengths(similarity[start:start + length - 1], 0, ignore)
        salient, anchors = segment_counts(subs, int(cells * retention), cells, context_share, period)
        salient_out += salient
        anchors_out += anchors
        start += length
    return salient_out, anchors_out


def fastvid(features: Tensor, attention: Tensor, frame_features: Tensor, grids: Sequence[Grid], retention: float,
            num_cuts: int = 7, tau: float = 0.9, context_share: float = 0.4, period: int = 4,
            beta: float = 0.6, variant: str = "llava_onevision", ignore: float = 0.95) -> Merge:
    """FastVID on one video (module docstring, steps 1-5; their defaults ``c = 8``, ``tau = 0.9`` (Qwen2.5-VL:
    0.84), ``d = 0.4``, ``p = 4``, ``beta = 0.6``, ``DySeg_ignore = 0.95``).

    Args:
        features: ``[N, D]`` tokens in time order (their LLM input embeddings); distances and merges use them.
        attention: ``[N]`` per-token attention (ATS's salience).
        frame_features: ``[T, D']`` one global feature per frame (DySeg).
        grids: one equal ``(rows, cols)`` per frame.
        retention: ``r`` in (0, 1].
        variant: ``llava_onevision`` or ``qwen2_5_vl`` (which of the authors' codes; module docstring).
        ignore: ``qwen2_5_vl`` only: the cosine below which a segment is split into sub-segments.

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
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {VARIANTS}")
    device = features.device
    similarity = frame_similarity(frame_features)
    segments = segment_lengths(similarity, num_cuts, tau)
    salient_n, anchors_n = _counts(variant, segments, similarity, cells, retention, context_share, period, ignore)
    att = attention.double().view(frames, cells)
    salient = [torch.sort(att[t], descending=True, stable=True).indices[:salient_n[t]] + t * cells
               for t in range(frames)]
    rest = []  # per frame: the non-salient token indices, ascending
    for t in range(frames):
        mask = torch.ones(cells, dtype=torch.bool, device=device)
        mask[salient[t] - t * cells] = False
        rest.append(torch.nonzero(mask).flatten() + t * cells)
    context_n = frame_counts(cells, retention, context_share)[1]
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
            if variant == "qwen2_5_vl":  # the segment's non-salient tokens but this frame's anchors
                pool = segment_pool[~torch.isin(segment_pool, chosen)]
            else:  # their one-frame rule also covers an anchor frame holding exactly one frame's context
                pool = rest[t] if length == 1 or anchors_n[t] == context_n else segment_pool
            anchors.append(chosen)
            rows.append(_merge_rows(features, pool, chosen, beta))
        start += length
    slots = torch.cat(anchors) if anchors else torch.zeros(0, dtype=torch.long, device=device)
    weights = torch.cat(rows) if rows else torch.zeros(0, num_tokens, device=device)
    return Merge(sorted_indices(torch.cat(salient)), weights, slots=slots)
