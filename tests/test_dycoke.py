"""DyCoke's token temporal merging, TTM (``lmms_prune.selection.dycoke``, the ``dycoke`` preset).

* ``authors_ttm`` below is a re-creation of ``dycole_ttm`` (github.com/KD-TAO/DyCoke at
  dd7463498203479d0ff6f2d29c4e72928c0af244, ``llava/model/llava_arch.py``), written from reading it: two passes
  over the frames (pairs, then windows of four), ``topk(largest=False)`` of the cosine similarities, the frames'
  tokens concatenated in the authors' order; it tracks token indices instead of features. Their code runs on an
  even number of frames above 4 (fewer fail on an empty ``torch.stack``, an odd count loses its last frame), so
  the comparison is there; the other counts are our documented extension, stated as properties;
* properties: the count, frames ``4j`` whole, each pruned frame keeps its least similar tokens, odd counts keep
  the last frame whole, ``K = 0`` keeps all;
* the engine: on a tiny Qwen2.5-VL video the preset keeps exactly that set of the projected video embeddings,
  and pre-LLM removal at original positions equals intra-LLM pruning of the same set at K=0 (prefill and decode).
"""

from __future__ import annotations

import numpy as np
import pytest
import test_engine
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import ATOL, _generate, _same_tokens, _steps_close
from test_video_engine import _video_inputs, _video_span

import lmms_prune
from lmms_prune.families import get_adapter
from lmms_prune.presets import resolve_config
from lmms_prune.selection import ttm_count, ttm_references, ttm_select

toys = test_engine.toys


def authors_ttm(features: torch.Tensor, tokens_per_frame: int, merging_ratio: float) -> list[int]:
    """DyCoke's ``dycole_ttm`` re-created on token indices: the kept tokens in the authors' output order."""
    t = tokens_per_frame
    frames = features.shape[0] // t
    keep = int((1 - merging_ratio) * t)
    frame = [torch.arange(f * t, (f + 1) * t) for f in range(frames)]
    out = []
    for i in range(0, frames - 1, 2):
        sim = torch.nn.functional.cosine_similarity(features[frame[i]], features[frame[i + 1]], dim=1)
        out += [frame[i], frame[i + 1][sim.topk(keep, largest=False).indices]]
    for i in range(0, frames - 4, 4):
        sim = torch.nn.functional.cosine_similarity(features[frame[i]], features[frame[i + 2]], dim=1)
        out[i], out[i + 2] = frame[i], frame[i + 2][sim.topk(keep, largest=False).indices]
    return torch.cat(out).tolist()


RATIOS = st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9, 1.0])


@given(st.sampled_from([6, 8, 10, 12, 16]), st.integers(1, 4), st.integers(1, 4), RATIOS, st.integers(0, 1000))
@settings(max_examples=50, deadline=None)
def test_ttm_keeps_the_set_of_the_recreation_of_the_authors_code(frames, rows, cols, k, seed):
    features = torch.randn(frames * rows * cols, 8, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)
    ours = ttm_select(features, [(rows, cols)] * frames, k)
    theirs = authors_ttm(features, rows * cols, k)
    assert ours.tolist() == sorted(theirs)  # same set; ours in the original order (docs/fidelity.md)
    assert ours.numel() == ttm_count(rows * cols, frames, k)


@given(st.integers(1, 13), st.integers(1, 4), st.integers(1, 4), RATIOS, st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_whole_frames_and_pruned_frames_keep_their_least_similar_tokens(frames, rows, cols, k, seed):
    cells = rows * cols
    features = torch.randn(frames * cells, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    kept = ttm_select(features, [(rows, cols)] * frames, k)
    assert torch.equal(kept, kept.unique()) and kept.numel() == ttm_count(cells, frames, k)
    refs = dict(ttm_references(frames))
    unit = torch.nn.functional.normalize(features, dim=-1).view(frames, cells, -1)
    for f in range(frames):
        mine = kept[(kept >= f * cells) & (kept < (f + 1) * cells)] - f * cells
        if f not in refs:  # frames 4j, the last 4j + 2 and an odd count's last frame stay whole
            assert mine.tolist() == list(range(cells))
            continue
        assert refs[f] in (f - 1, f - 2) and refs[f] % 2 == 0  # compared with the ORIGINAL reference frame
        assert mine.numel() == int((1 - k) * cells)
        similarity = (unit[f] * unit[refs[f]]).sum(-1)
        dropped = torch.ones(cells, dtype=torch.bool)
        dropped[mine] = False
        if mine.numel() and dropped.any():
            assert similarity[mine].max() <= similarity[dropped].min()
    if frames % 2:
        assert frames - 1 not in refs  # the authors' code loses it; here it stays whole


def test_references_of_32_frames_are_the_authors_pairs_and_fours():
    refs = dict(ttm_references(32))
    assert sorted(refs) == sorted([*range(1, 32, 2), *range(2, 27, 4)])  # frame 30 is whole: range(0, 28, 4)
    assert all(refs[f] == f - 1 for f in range(1, 32, 2)) and all(refs[f] == f - 2 for f in range(2, 27, 4))
    assert ttm_count(196, 32, 0.7) == 9 * 196 + 23 * int(0.3 * 196)
    assert ttm_references(1) == [] and ttm_count(5, 1, 0.7) == 5


def test_k0_keeps_every_token_k1_only_the_whole_frames_and_bad_k_is_refused():
    features = torch.randn(8 * 4, 3, generator=torch.Generator().manual_seed(0))
    assert ttm_select(features, [(2, 2)] * 8, 0.0).tolist() == list(range(32))
    assert ttm_select(features, [(2, 2)] * 8, 1.0).tolist() == [0, 1, 2, 3, 16, 17, 18, 19, 24, 25, 26, 27]
    for bad in (-0.1, 1.5, True, float("nan")):
        with pytest.raises(ValueError, match="dycoke_k"):
            ttm_select(features, [(2, 2)] * 8, bad)
    with pytest.raises(ValueError, match="dycoke_k"):
        resolve_config("dycoke", dycoke_k=2)
    with pytest.raises(ValueError, match="same"):
        ttm_select(torch.ones(8, 2), [(2, 2), (1, 4)], 0.5)


def test_dycoke_on_a_qwen_video_keeps_the_ttm_set_leaves_the_image_and_equals_k0_pruning(toys):
    model, proc = toys("qwen2_5_vl")
    inputs = _video_inputs(proc, with_image=True)
    (image, video), _ = _video_span(model, inputs)
    adapter = get_adapter(model)
    with torch.no_grad():
        embeds = adapter.flatten_image_features(adapter.encode_videos(inputs).pooler_output)
        with lmms_prune.apply(model, "dycoke", positions="original") as handle:
            pre = model(**inputs).logits
            pre_tokens, pre_steps = _generate(model, inputs)
            rec = handle.records[0]
        offsets = np.cumsum([0] + [s.num_visual for s in rec.spans])
        kept = [int(o) + i for o, k in zip(offsets, rec.kept) for i in k.tolist()]
        with lmms_prune.apply(model, "fixed", keep_indices=kept, prune_layer=0):
            k0 = model(**inputs).logits
            k0_tokens, k0_steps = _generate(model, inputs)
    torch.testing.assert_close(pre, k0, atol=ATOL, rtol=0)
    assert _same_tokens(pre_tokens, k0_tokens, pre_steps, k0_steps)
    assert _steps_close(pre_steps, k0_steps, pre_tokens, k0_tokens)
    assert len(video.grids) == 2  # 4 frames, two per merged grid: grid 1 is pruned against grid 0
    assert rec.kept[0].tolist() == list(range(image.num_visual))  # DyCoke compresses videos only
    assert rec.kept[1].tolist() == ttm_select(embeds.float(), video.grids, 0.7).tolist()
