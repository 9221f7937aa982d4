"""FastVID (``lmms_prune.selection.fastvid``, the ``fastvid`` preset) and the slotted pre-LLM merge it needs.

* ``authors_fastvid`` re-creates FastVID's LLaVA-OneVision block (LunarShen/FastVID at
  a40a109cb8df20e8c2c17c6850f8269717369990, ``fastvid_llavaonevision/.../modeling_qwen2.py``, "FastVID" in
  ``Qwen2Model.forward``), written from reading it, vectorised over frames as theirs is: DySeg cuts, the anchor
  distribution, ATS top-k, the density score from the 4 nearest, single-frame and multi-frame DTM; without their
  1e-6 tie-breaking noise (no ties on random inputs) and in float64; ours must keep the same tokens at the
  same places with the same values;
* ``authors_fastvid_qwen`` re-creates their Qwen2.5-VL port (same commit,
  ``fastvid_qwen25vl/.../qwenvlutils/modeling_qwen2_5_vl.py``, ``forward`` lines 1889-2099), written from
  reading it, segment by segment and frame by frame as theirs runs: budgets per segment with at least one
  anchor, sub-segments below ``DySeg_ignore`` whose last frame alone keeps tokens, salient counts spread over
  the sub-segments, anchors over every ``p``-th sub-segment from the end (their list built forward and
  reversed), the ``P // 2`` and ``P - anchors`` caps, and each anchor merging the segment's non-salient tokens
  but its own frame's anchors; same comparison, on random clips whose frame features drift so that segments,
  sub-segments and several anchor sub-segments occur;
* properties: each frame's salient tokens are its most attended, the merges are convex combinations with the
  anchor's weight at least beta, the video keeps at most ``int(P r)`` tokens per frame (both variants), ties
  and the inputs their code fails on (one frame, no cut, ``int(P r) = 0``, fewer than 4 tokens to rank);
* ``fastvid_variant='auto'`` resolves per family when the method is applied;
* the engine (the new mechanism): a slotted pre-LLM merge at original positions equals pruning the kept union
  at layer 0 of a model whose slot embeddings were replaced by the merged values, at prefill and every cached
  decode step (Qwen2.5-VL's M-RoPE beside an image, with the Qwen2.5-VL variant's cross-frame merge into the
  last frame; LLaVA-OneVision's newline after the video, with the multi-frame merge; InternVL's frames as tiles
  with the text between them).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import test_engine
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import ATOL, _generate, _same_tokens, _steps_close
from test_video_engine import _internvl_video, _video_inputs, moving_square

import lmms_prune
import lmms_prune.selection as selection
from lmms_prune.families import get_adapter
from lmms_prune.families.base import ImageSpan
from lmms_prune.methods.base import ImageSignals
from lmms_prune.methods.fastvid import FastVID
from lmms_prune.presets import check_model, resolve_config
from lmms_prune.selection import anchor_counts, dynamic_segments, fastvid, segment_counts

toys = test_engine.toys


def _dtm(tokens, targets, target_tokens, beta):
    """Their merge: every token joins the target of highest cosine; ``w x_target + (1 - w) mean(members)``."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    aim = target_tokens / target_tokens.norm(dim=-1, keepdim=True)
    one_hot = torch.zeros(unit.shape[0], aim.shape[0], dtype=tokens.dtype)
    one_hot.scatter_(1, (unit @ aim.T).argmax(dim=1, keepdim=True), 1)
    w = (1 / (one_hot.sum(0)[:, None] + 1)).clamp(min=beta)
    mean = one_hot.T @ tokens / one_hot.sum(0).clamp(min=1)[:, None]
    return w * targets + (1 - w) * mean


def authors_fastvid(h, attn, g, r, c, tau, d, p, beta) -> dict[int, torch.Tensor]:
    """``{token index: its value}`` of the tokens FastVID keeps of one video ``h`` ``[T, P, D]``."""
    frames, cells, dim = h.shape
    gn = g / g.norm(dim=1, keepdim=True)
    sim = (gn[:-1] * gn[1:]).sum(dim=1)
    cuts = torch.unique(torch.cat([torch.topk(sim, min(c - 1, frames - 1), largest=False).indices,
                                   torch.nonzero(sim < tau).flatten()])).sort().values
    padded = F.pad(cuts, (1, 1), value=-1)
    padded[-1] = frames - 1
    sizes = padded.diff().tolist()
    retain = int(cells * r)
    salient_n = retain - int(retain * d)
    context_n = retain - salient_n
    counts = torch.zeros(frames, dtype=torch.long)
    offset = 0
    for length in sizes:
        per = context_n * length // ((length + p - 1) // p)
        counts[offset:offset + length][torch.arange(length - 1, -1, -1) % p == 0] = per
        offset += length
    out = {}
    salient = torch.topk(attn, salient_n, dim=1).indices
    for t in range(frames):
        for i in salient[t].tolist():
            out[t * cells + i] = h[t, i]
    mask = torch.ones(frames, cells, dtype=torch.bool)
    mask.scatter_(1, salient, False)
    filtered = torch.arange(cells).expand(frames, -1)[mask].view(frames, -1)
    tf = torch.stack([h[t, filtered[t]] for t in range(frames)])
    dist = torch.cdist(tf, tf) / dim ** 0.5
    density = (-(torch.topk(dist, k=4, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = (density[:, None, :] > density[:, :, None]).to(dist.dtype)
    dist_max = dist.flatten(1).max(-1).values[:, None, None]
    score = (dist * denser + dist_max * (1 - denser)).min(-1).values * density
    sampled = torch.topk(score, k=context_n, dim=-1).indices
    one_frame = torch.nonzero(counts == context_n).flatten().tolist() if context_n else []  # theirs fails on 0
    for t in one_frame:  # one-frame segments
        merged = _dtm(tf[t], tf[t, sampled[t]], tf[t, sampled[t]], beta)
        for j, i in enumerate(filtered[t, sampled[t]].tolist()):
            out[t * cells + i] = merged[j]
    start = 0
    for length in sizes:
        if length > 1:
            seg = range(start, start + length)
            targets = [t for t in seg if counts[t] > context_n]
            pool = tf[start:start + length].reshape(-1, dim)
            for t in targets:
                chosen = torch.topk(score[t], k=int(counts[start + length - 1]), dim=-1).indices
                merged = _dtm(pool, tf[t, chosen], tf[t, chosen], beta)
                for j, i in enumerate(filtered[t, chosen].tolist()):
                    out[t * cells + i] = merged[j]
        start += length
    return out


def _split(sizes_after_cuts: list[int], frames: int) -> list[int]:
    """Their segment sizes from sorted cut indices: up to and including each cut, then the rest."""
    if not sizes_after_cuts:
        return [frames]
    cuts = sizes_after_cuts
    return [cuts[0] + 1] + [b - a for a, b in zip(cuts, cuts[1:])] + [frames - cuts[-1] - 1]


def authors_fastvid_qwen(h, attn, g, r, c, tau, ignore, d, p, beta) -> dict[int, torch.Tensor]:
    """``{token index: its value}`` of the tokens their Qwen2.5-VL port keeps of one video ``h`` ``[T, P, D]``
    (inputs where their code runs: ``2 <= c <= T``, at least one salient token per segment). Their density's
    ``topk(k=4)`` is ``min(4, M)`` here: with fewer tokens theirs fails."""
    frames, cells, dim = h.shape
    g = g / g.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cuts = torch.unique(torch.cat([torch.topk(sim, c - 1, largest=False).indices,
                                   torch.nonzero(sim < tau).squeeze(1)])).sort().values.tolist()
    sizes = _split(cuts, frames)
    retain = int(cells * r)
    out = {}
    start = 0
    for length in sizes:
        hs, att, gs = h[start:start + length], attn[start:start + length], g[start:start + length]
        context = max(int(retain * length * d), 1)
        salient = retain * length - context
        if length == 1:
            salient_f, context_f = [salient], [context]
        else:
            subs = _split(torch.nonzero((gs[:-1] * gs[1:]).sum(dim=1) < ignore).squeeze(1).sort().values.tolist(),
                          length)
            parts = len(subs)
            salient_sub = [salient // parts + (1 if i < salient % parts else 0) for i in range(parts)]
            holders = (parts + p - 1) // p
            held = [context // holders + (1 if i < context % holders else 0) for i in range(holders)]
            forward, taken = [], 0
            for i in range(parts):
                if i % p == 0:
                    forward.append(min(held[taken], cells // 2))
                    taken += 1
                else:
                    forward.append(0)
            context_sub = forward[::-1]
            salient_f, context_f = [], []
            for i, size in enumerate(subs):
                salient_f += [0] * (size - 1)
                context_f += [0] * (size - 1)
                if context_sub[i] == 0:
                    salient_f.append(min(salient_sub[i], cells))
                    context_f.append(0)
                else:
                    context_f.append(min(context_sub[i], cells // 2))
                    salient_f.append(min(salient_sub[i], cells - context_f[-1]))
        salient_idx, context_idx = [], []
        for f in range(length):
            top = torch.topk(att[f], salient_f[f]).indices if salient_f[f] > 0 else None
            if context_f[f] > 0:
                every = torch.arange(cells)
                remaining = every if top is None else every[~torch.isin(every, top)]
                x = hs[f, remaining].unsqueeze(0)
                dist = torch.cdist(x, x) / dim ** 0.5
                nearest = torch.topk(dist, k=min(4, remaining.numel()), dim=-1, largest=False).values
                density = (-(nearest ** 2).mean(dim=-1)).exp()
                denser = (density[:, None, :] > density[:, :, None]).to(dist.dtype)
                dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
                score = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values * density
                picked = torch.topk(score, k=context_f[f], dim=-1).indices[0].sort().values
                context_idx.append(remaining[picked] + f * cells)
            if top is not None:
                salient_idx.append(top + f * cells)
        flat = hs.reshape(length * cells, dim)
        salient_all = torch.cat(salient_idx)
        for i in salient_all.tolist():
            out[start * cells + i] = flat[i]
        every = torch.arange(length * cells)
        for anchors in context_idx:
            members = every[~torch.isin(every, torch.cat([salient_all, anchors]))]
            merged = _dtm(flat[members], flat[anchors], flat[anchors], beta)
            for j, i in enumerate(anchors.tolist()):
                out[start * cells + i] = merged[j]
        start += length
    return out


def _ours(h, attn, g, r, c, tau, d, p, beta, **variant) -> dict[int, torch.Tensor]:
    frames, cells, dim = h.shape
    x = h.reshape(-1, dim)
    merge = fastvid(x, attn.reshape(-1), g, [(1, cells)] * frames, r, num_cuts=c - 1, tau=tau, context_share=d,
                    period=p, beta=beta, **variant)
    out = {i: x[i] for i in merge.index.tolist()}
    out.update({int(s): merge.weights[j].double() @ x for j, s in enumerate(merge.slots.tolist())})
    return out


@given(st.integers(1, 7), st.sampled_from([12, 20, 30]), st.sampled_from([0.15, 0.25, 0.3]),
       st.sampled_from([1, 3, 8]), st.sampled_from([-1.0, 0.5, 0.95]), st.sampled_from([0.0, 0.4, 0.7]),
       st.sampled_from([1, 2, 4]), st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_kept_tokens_and_merged_values_equal_the_recreation_of_the_authors(frames, cells, r, c, tau, d, p, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(frames, cells, 8, generator=g, dtype=torch.float64)
    attn = torch.rand(frames, cells, generator=g, dtype=torch.float64)
    glob = torch.randn(frames, 5, generator=g, dtype=torch.float64) + 1.5
    theirs, ours = authors_fastvid(h, attn, glob, r, c, tau, d, p, 0.6), _ours(h, attn, glob, r, c, tau, d, p, 0.6)
    assert sorted(ours) == sorted(theirs)
    for i in ours:
        torch.testing.assert_close(ours[i], theirs[i], atol=1e-6, rtol=0)


def _drifting_clip(frames, cells, steps, seed):
    """Random tokens ``[T, P, 8]``, attention ``[T, P]`` and frame features ``[T, 6]`` that drift by ``steps``
    (one scale per transition), so consecutive cosines fall on both sides of tau and DySeg_ignore."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(frames, cells, 8, generator=g, dtype=torch.float64)
    attn = torch.rand(frames, cells, generator=g, dtype=torch.float64)
    glob = [torch.randn(6, generator=g, dtype=torch.float64) + 2.0]
    for t in range(frames - 1):
        glob.append(glob[-1] + steps[t % len(steps)] * torch.randn(6, generator=g, dtype=torch.float64))
    return h, attn, torch.stack(glob)


@given(st.integers(2, 12), st.integers(2, 9), st.sampled_from([12, 20, 30]), st.sampled_from([0.15, 0.25, 0.5]),
       st.sampled_from([0.84, 0.5, -1.0]), st.sampled_from([0.95, 0.99, 1.0, -1.0]),
       st.sampled_from([0.0, 0.4, 0.7]), st.sampled_from([1, 2, 4]),
       st.lists(st.sampled_from([0.02, 0.5, 1.0, 2.0]), min_size=1, max_size=4),
       st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_qwen_variant_keeps_the_tokens_and_values_of_the_recreation_of_their_qwen_port(frames, c, cells, r, tau,
                                                                                      ignore, d, p, steps, seed):
    c = min(c, frames)  # their topk needs c - 1 <= T - 1 similarities
    if int(cells * r) < 2:
        r = 0.25  # their code needs a salient token per segment: int(P r) >= 2 with d <= 0.7
    h, attn, glob = _drifting_clip(frames, cells, steps, seed)
    theirs = authors_fastvid_qwen(h, attn, glob, r, c, tau, ignore, d, p, 0.6)
    ours = _ours(h, attn, glob, r, c, tau, d, p, 0.6, variant="qwen2_5_vl", ignore=ignore)
    assert sorted(ours) == sorted(theirs)
    for i in ours:
        torch.testing.assert_close(ours[i], theirs[i], atol=1e-6, rtol=0)


def test_qwen_budgets_per_segment_and_sub_segment():
    # 8 frames in sub-segments [2, 1, 3, 1, 1], R = 3, d = 0.3: C = int(24 * 0.3) = 7, S = 17; salient [4, 4, 3, 3, 3]
    # by sub-segment; anchors on every 2nd sub-segment from the end, 7 = [3, 2, 2] from the last one back
    salient, anchors = segment_counts([2, 1, 3, 1, 1], retain=3, cells=10, context_share=0.3, period=2)
    assert salient == [0, 4, 4, 0, 0, 3, 3, 3] and anchors == [0, 2, 0, 0, 0, 2, 0, 3]
    # one sub-segment of 4 frames: its last frame holds it all, anchors capped at P // 2, salient at P - anchors
    assert segment_counts([4], retain=3, cells=6, context_share=0.4, period=4) == ([0, 0, 0, 3], [0, 0, 0, 3])
    assert segment_counts([1], retain=3, cells=10, context_share=0.0, period=4) == ([2], [1])  # one anchor at least
    assert segment_counts([1], retain=0, cells=10, context_share=0.4, period=4) == ([0], [0])  # theirs fails
    assert segment_counts([2, 2], retain=0, cells=10, context_share=0.4, period=4) == ([0] * 4, [0] * 4)


@given(st.integers(1, 9), st.sampled_from([1, 2, 8]), st.sampled_from([4, 6, 12]),
       st.sampled_from([0.05, 0.25, 0.5, 1.0]), st.sampled_from([0.84, -1.0]), st.sampled_from([0.95, -1.0, 1.0]),
       st.sampled_from([0.0, 0.4, 0.9, 1.0]), st.sampled_from([1, 3]), st.booleans(), st.integers(0, 1000))
@settings(max_examples=50, deadline=None)
def test_qwen_variant_properties_also_where_their_code_fails(frames, c, cells, r, tau, ignore, d, p, tied, seed):
    """One frame, no cut (c = 1), ``int(P r) = 0``, anchors beyond P // 2, frames with fewer than 4 tokens to
    rank, tied attention and tokens: at most ``int(P r)`` per frame over each segment, only the last frame of a
    sub-segment keeps tokens, salient tokens the most attended of their frame, merges convex with the anchor's
    weight >= beta over its segment's non-salient tokens, and the same result twice."""
    h, attn, glob = _drifting_clip(frames, cells, [0.02, 1.0], seed)
    if tied:
        attn = torch.ones_like(attn)
        h[:, 1::2] = h[:, :1]
    x, flat_attn = h.reshape(-1, 8), attn.reshape(-1)
    run = functools.partial(fastvid, x, flat_attn, glob, [(1, cells)] * frames, r, num_cuts=c - 1, tau=tau,
                            context_share=d, period=p, beta=0.6, variant="qwen2_5_vl", ignore=ignore)
    merge = run()
    index, slots, weights = merge.index, merge.slots, merge.weights.double()
    again = run()
    assert torch.equal(index, again.index) and torch.equal(slots, again.slots)
    assert torch.equal(merge.weights, again.weights)
    kept = torch.cat([index, slots])
    assert kept.unique().numel() == kept.numel() and torch.equal(index, index.sort().values)
    assert kept.numel() <= frames * int(cells * r)
    segments = dynamic_segments(glob, c - 1, tau)
    bounds = np.cumsum([0, *segments]) * cells
    keepers = set()  # frames allowed to keep tokens: each sub-segment's last
    for start, length in zip(np.cumsum([0, *segments]), segments):
        subs = dynamic_segments(glob[start:start + length], 0, ignore) if length > 1 else [1]
        keepers |= {int(start + e - 1) for e in np.cumsum(subs)}
        seg = (kept >= start * cells) & (kept < (start + length) * cells)
        assert int(seg.sum()) <= length * int(cells * r)
    assert {int(t) for t in kept // cells} <= keepers
    for t in (index // cells).unique().tolist():
        mine = index[index // cells == t]
        frame = flat_attn[t * cells:(t + 1) * cells]
        assert frame[mine - t * cells].min() >= frame.sort(descending=True).values[mine.numel() - 1]
        if tied:  # equal attention: the lowest indices
            assert mine.tolist() == list(range(t * cells, t * cells + mine.numel()))
    torch.testing.assert_close(weights.sum(1), torch.ones(slots.numel(), dtype=torch.float64))
    assert bool((weights >= 0).all())
    for j, s in enumerate(slots.tolist()):
        assert weights[j, s] >= 0.6 - 1e-6
        members = set(torch.nonzero(weights[j]).flatten().tolist()) - {s}
        seg = int(np.searchsorted(bounds, s, side="right")) - 1
        assert all(bounds[seg] <= m < bounds[seg + 1] for m in members)
        assert not members & set(index.tolist())
        assert not members & {a for a in slots.tolist() if a // cells == s // cells}


def test_variant_auto_is_the_authors_code_for_the_family():
    cfg = resolve_config("fastvid", keep_ratio=0.25)
    assert (cfg.fastvid_variant, cfg.fastvid_dyseg_tau) == ("auto", None)
    for family, variant, tau in (("qwen2_5_vl", "qwen2_5_vl", 0.84), ("qwen2_vl", "qwen2_5_vl", 0.84),
                                 ("llava_onevision", "llava_onevision", 0.9),
                                 ("internvl", "llava_onevision", 0.9)):
        resolved = FastVID.for_family(cfg, family)
        assert (resolved.fastvid_variant, resolved.fastvid_dyseg_tau) == (variant, tau)
    chosen = resolve_config("fastvid", keep_ratio=0.25, fastvid_variant="llava_onevision", fastvid_dyseg_tau=0.7)
    # a named variant and tau stay (the attention: the variant's, tests/test_fastvid_attention.py)
    assert FastVID.for_family(chosen, "qwen2_5_vl") == dataclasses.replace(chosen, fastvid_attention="received")
    with pytest.raises(ValueError, match="does not use fastvid_dyseg_ignore"):
        resolve_config("fastvid", fastvid_variant="llava_onevision", fastvid_dyseg_ignore=0.9)
    with pytest.raises(ValueError, match="fastvid_variant='qwen'"):
        resolve_config("fastvid", fastvid_variant="qwen")
    with pytest.raises(ValueError, match="variant='auto'"):  # the maths takes a resolved variant only
        fastvid(torch.randn(8, 4), torch.rand(8), torch.randn(2, 3), [(2, 2)] * 2, 0.5, variant="auto")
    video = ImageSignals(0, ImageSpan(0, 8, grids=[(2, 2)] * 2, video=True), 0, 8, embeddings=torch.randn(8, 4),
                         vision_attention=torch.rand(8), vision_frame_attention=torch.rand(8))
    with pytest.raises(ValueError, match="for the model's family first"):  # a selector built outside apply
        FastVID(cfg)(video, None, 4)
    assert FastVID(FastVID.for_family(cfg, "qwen2_5_vl"))(video, None, 4).count <= 2 * int(4 * 0.25)


def test_segments_anchors_salience_and_merge_weights():
    # cosines of consecutive frames 1, 0, 1: one cut from tau, a second from the c - 1 lowest
    glob = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])
    assert dynamic_segments(glob, num_cuts=0, tau=0.5) == [2, 2]
    assert dynamic_segments(glob, num_cuts=2, tau=-2.0) == [1, 1, 2]  # 0, then the earlier of the tied 1s
    assert dynamic_segments(glob, num_cuts=10, tau=0.5) == [1, 1, 1, 1]
    assert anchor_counts([5, 1], context=2, period=4) == [5, 0, 0, 0, 5, 2]  # from the end: every 4th frame
    x = torch.randn(4 * 20, 6, generator=torch.Generator().manual_seed(0))
    attention = torch.rand(80, generator=torch.Generator().manual_seed(1))
    merge = fastvid(x, attention, glob, [(4, 5)] * 4, 0.5, num_cuts=0, tau=0.5, period=2, beta=0.6)
    index, slots = merge.index, merge.slots
    assert not set(index.tolist()) & set(slots.tolist())
    assert index.numel() + slots.numel() <= 4 * int(20 * 0.5)
    for t in range(4):  # 10 per frame: 6 salient of highest attention, the anchors from the 4 left
        mine = index[index // 20 == t]
        assert mine.numel() == 6 and attention[mine].min() >= attention[t * 20:(t + 1) * 20].sort().values[-6]
    torch.testing.assert_close(merge.weights.sum(1), torch.ones(slots.numel()))
    assert bool((merge.weights[torch.arange(slots.numel()), slots] >= 0.6 - 1e-6).all())
    # a two-frame segment's anchors sit on its last frame and merge tokens of both frames
    assert set((slots // 20).tolist()) == {1, 3}
    assert bool(((merge.weights[slots // 20 == 1] > 0).nonzero()[:, 1] // 20 <= 1).all())


def test_bad_input_is_refused_with_the_reason():
    x, attention = torch.randn(2 * 12, 4), torch.rand(24)
    with pytest.raises(ValueError, match="anchors"):  # one 2-frame segment, p=4: 2 * 4 anchors > 7 left
        fastvid(x, attention, torch.ones(2, 3), [(3, 4)] * 2, 0.9, num_cuts=0, tau=-1.0, period=4)
    with pytest.raises(ValueError, match="one per frame"):
        fastvid(x, attention, torch.ones(3, 3), [(3, 4)] * 2, 0.5)
    with pytest.raises(ValueError, match="fastvid_dtm_p=0"):
        resolve_config("fastvid", keep_ratio=0.25, fastvid_dtm_p=0)
    with pytest.raises(ValueError, match="Merge.slots"):
        from lmms_prune.engine.pre_llm import _check_slots
        _check_slots(selection.Merge(torch.tensor([0, 1]), torch.zeros(1, 4), slots=torch.tensor([1])))


def test_deepstack_models_are_refused_from_their_config_before_any_weights_load():
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    cfg = resolve_config("fastvid", keep_ratio=0.25)
    with pytest.raises(ValueError, match="'fastvid' merges tokens before the LLM.*DeepStack"):
        check_model(cfg, Qwen3VLConfig())
    check_model(cfg, Qwen2_5_VLConfig())
    check_model(resolve_config("vidcom2", keep_ratio=0.25), Qwen3VLConfig())  # a subset: no merged token


def _replacing_embeddings(model, name: str, rows: torch.Tensor, values: torch.Tensor):
    """Patch the model's ``name`` (``get_video_features``; InternVL's frames: ``get_image_features``) so that the
    flattened rows ``rows`` of its output hold ``values``."""
    inner = model.model
    original = getattr(inner, name)

    @functools.wraps(original)  # generate reads its signature
    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        pooled = out.pooler_output
        flat = torch.cat(list(pooled)) if isinstance(pooled, tuple) else pooled.reshape(-1, pooled.shape[-1])
        flat = flat.clone()
        flat[rows.to(flat.device)] = values.to(flat.device, flat.dtype)
        if isinstance(pooled, tuple):
            out.pooler_output = tuple(torch.split(flat, [p.shape[0] for p in pooled]))
        else:
            out.pooler_output = flat.view(pooled.shape)
        return out

    setattr(inner, name, patched)
    return original


@pytest.mark.parametrize(("family", "with_image", "params", "variant", "anchor_frames"), [
    ("qwen2_5_vl", True, {"fastvid_dyseg_c": 1, "fastvid_dyseg_tau": -1.0, "fastvid_dyseg_ignore": -1.0},
     "qwen2_5_vl", {1}),
    ("llava_onevision", False, {"fastvid_dyseg_c": 1, "fastvid_dyseg_tau": -1.0, "fastvid_dtm_p": 2},
     "llava_onevision", {1, 3}),
    ("internvl_qwen2", False, {}, "llava_onevision", None),
])
def test_slotted_pre_llm_merge_equals_layer0_pruning_with_the_merged_values_in_place(toys, monkeypatch, family,
                                                                                     with_image, params, variant,
                                                                                     anchor_frames):
    """``fastvid_variant='auto'``: the authors' Qwen2.5-VL code on Qwen2.5-VL (one segment of its two merged
    frames, one sub-segment: the last frame alone keeps tokens, its anchors merge both frames' tokens), their
    LLaVA-OneVision code elsewhere. InternVL: the video's frames are tiles of ``pixel_values`` (the runner's frame
    counts make them one video span), the text between frames structural."""
    model, proc = toys(family)
    video_frames, encoder = None, "get_video_features"
    if family.startswith("internvl"):
        inputs, video_frames = _internvl_video(proc, moving_square(4))
        encoder = "get_image_features"
    else:
        inputs = _video_inputs(proc, with_image=with_image)
    seen = []
    real = selection.fastvid
    monkeypatch.setattr(selection, "fastvid", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    with torch.no_grad():
        with lmms_prune.apply(model, "fastvid", keep_ratio=0.5, **params) as handle:
            handle.video_frames = video_frames
            pre = model(**inputs).logits
            pre_tokens, pre_steps = _generate(model, inputs)
            rec = handle.records[0]
            assert handle.config.fastvid_variant == variant
    spans = rec.spans
    merge, video = seen[0], spans[-1]
    assert video.video and all(torch.equal(m.index, merge.index) and torch.equal(m.slots, merge.slots) for m in seen)
    # the record's kept tokens: the plain kept ones and the slots (which hold merged values); nothing is added
    assert rec.kept[-1].tolist() == torch.cat([merge.index, merge.slots]).sort().values.tolist()
    assert merge.slots.numel() > 0 and rec.merged[-1] == 0
    if with_image:
        assert rec.kept[0].tolist() == list(range(spans[0].num_visual))  # images untouched
    cells = video.num_visual // len(video.grids)
    if anchor_frames is not None:
        assert {int(t) for t in merge.slots // cells} == anchor_frames
    if variant == "qwen2_5_vl":  # the first frame keeps nothing but is merged into the last one's anchors
        assert bool((merge.index // cells == 1).all()) and bool((merge.weights[:, :cells] > 0).any())
    adapter = get_adapter(model)
    with torch.no_grad():
        encoded = adapter.encode_images(inputs) if video_frames else adapter.encode_videos(inputs)
        embeds = adapter.flatten_image_features(encoded.pooler_output)
    rows = adapter.encoder_rows(video)[video.visual_index]
    values = (merge.weights @ embeds[rows].float()).to(embeds.dtype)
    offsets = np.cumsum([0] + [s.num_visual for s in spans])
    union = torch.cat([merge.index, merge.slots]).sort().values
    kept = [int(offsets[i]) + j for i, s in enumerate(spans[:-1]) for j in range(s.num_visual)]
    kept += [int(offsets[-2]) + j for j in union.tolist()]
    original = _replacing_embeddings(model, encoder, rows[merge.slots], values)
    try:
        with torch.no_grad(), lmms_prune.apply(model, "fixed", keep_indices=kept, prune_layer=0) as handle:
            handle.video_frames = video_frames
            k0 = model(**inputs).logits
            k0_tokens, k0_steps = _generate(model, inputs)
    finally:
        setattr(model.model, encoder, original)
    torch.testing.assert_close(pre, k0, atol=ATOL, rtol=0)
    assert _same_tokens(pre_tokens, k0_tokens, pre_steps, k0_steps)
    assert _steps_close(pre_steps, k0_steps, pre_tokens, k0_tokens)
    assert rec.visual_after == sum(s.num_visual for s in spans[:-1]) + union.numel()
