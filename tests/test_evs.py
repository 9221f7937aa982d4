"""EVS, vLLM's Efficient Video Sampling (``lmms_prune.selection.evs``, the ``evs`` preset).

* ``vllm_retention_mask`` below is a re-creation of vLLM's ``compute_retention_mask`` and
  ``compute_retained_tokens_count`` (``vllm/multimodal/evs.py`` at 094f117823287790739d3022162a3f30f13d758b),
  written from reading them: reshape to ``(T, rows, cols, D)``, ``1 - cosine_similarity`` of consecutive
  frames, 255 for the first frame, a stable descending ``argsort``, the first ``max(cells, int(N (1 - q)))``;
  ours must give the same mask on the same inputs;
* properties: the first frame is kept whole, every kept token is at least as dissimilar as every dropped one,
  ties go to the lower index, a static clip keeps its first frame only;
* the engine: on tiny Qwen2.5-VL and InternVL videos, the preset keeps exactly that set of the model's
  projected video embeddings (images untouched), and pre-LLM removal at original positions equals intra-LLM
  pruning of the same set at K=0, at prefill and every cached decode step.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_engine
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import ATOL, _generate, _same_tokens, _steps_close
from test_temporal import changing_video
from test_video_engine import _internvl_video, _video_inputs, _video_span, moving_square

import lmms_prune
from lmms_prune.families import get_adapter
from lmms_prune.selection import evs_dissimilarity, evs_retained_count, evs_retention_mask, evs_select

toys = test_engine.toys


def vllm_retention_mask(embeds: torch.Tensor, frames: int, rows: int, cols: int, q: float) -> torch.Tensor:
    """vLLM's EVS on one video, re-created (spatial_merge_size 1: ``rows x cols`` are already merged cells)."""
    video = embeds.reshape(frames, rows, cols, embeds.shape[-1])
    dissimilarity = 1 - torch.nn.functional.cosine_similarity(video[1:], video[:-1], dim=-1)
    dissimilarity = torch.cat([255 * torch.ones_like(video[:1, :, :, 0]), dissimilarity], dim=0).view(-1)
    order = torch.argsort(dissimilarity, descending=True, stable=True)
    count = max(rows * cols, int(rows * cols * frames * (1 - q)))
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


SHAPES = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))
RATES = st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9, 0.99])


@given(SHAPES, RATES, st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_retention_mask_equals_the_recreation_of_vllms_arithmetic(shape, q, seed):
    frames, rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(frames * rows * cols, 8, generator=g, dtype=torch.float64)
    ours = evs_retention_mask(embeds, [(rows, cols)] * frames, q)
    assert torch.equal(ours, vllm_retention_mask(embeds, frames, rows, cols, q))
    assert int(ours.sum()) == evs_retained_count(rows * cols, frames, q)


def test_retained_count_is_the_floor_and_never_less_than_one_frame():
    assert evs_retained_count(16, 4, 0.75) == 16
    assert evs_retained_count(16, 4, 0.9) == 16  # int(6.4) < one frame: the first frame stays whole
    assert evs_retained_count(10, 5, 0.33) == 33  # int(33.5): the floor, not round
    assert evs_retained_count(16, 4, 0.0) == 64
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="video_pruning_rate"):
            evs_retained_count(16, 4, bad)


@given(SHAPES, st.integers(0, 1000), st.data())
@settings(max_examples=40, deadline=None)
def test_first_frame_whole_then_the_most_dissimilar(shape, seed, data):
    frames, rows, cols = shape
    cells, total = rows * cols, frames * rows * cols
    n = data.draw(st.integers(1, total))
    embeds = torch.randn(total, 6, generator=torch.Generator().manual_seed(seed))
    kept = evs_select(embeds, [(rows, cols)] * frames, n)
    assert kept.numel() == max(cells, n) and torch.equal(kept, kept.unique())
    assert set(range(cells)) <= set(kept.tolist())
    dissimilarity = evs_dissimilarity(embeds, [(rows, cols)] * frames)
    dropped = torch.ones(total, dtype=torch.bool)
    dropped[kept] = False
    if dropped.any():
        assert dissimilarity[kept].min() >= dissimilarity[dropped].max()


def test_ties_go_to_the_lower_index_and_a_static_clip_keeps_its_first_frame():
    grids = [(2, 2)] * 3
    static = torch.eye(4).repeat(3, 1)  # one-hot cells, every frame the same: dissimilarity exactly 0
    assert evs_select(static, grids, 4).tolist() == [0, 1, 2, 3]
    assert evs_select(static, grids, 6).tolist() == [0, 1, 2, 3, 4, 5]  # equal dissimilarity: lower index
    changing = changing_video(3, 2, 2)  # cosine 0 with the previous frame: dissimilarity 1 everywhere
    assert evs_select(changing, grids, 7).tolist() == list(range(7))
    # one changed cell in frame 2 (cell 1) goes before the unchanged cells of frames 1 and 2
    mixed = static.clone()
    mixed[8 + 1] = -mixed[8 + 1]
    assert evs_select(mixed, grids, 5).tolist() == [0, 1, 2, 3, 9]
    with pytest.raises(ValueError, match="same"):
        evs_select(torch.ones(8, 2), [(2, 2), (1, 4)], 4)


def _pre_llm_equals_k0(model, inputs, keep_ratio, video_frames=None):
    """Run ``evs`` (pre-LLM, original positions) and ``fixed`` at K=0 on its kept set; return the evs record
    after checking that both give the same logits, tokens and decode steps."""
    with torch.no_grad():
        with lmms_prune.apply(model, "evs", keep_ratio=keep_ratio) as handle:
            handle.video_frames = video_frames
            pre = model(**inputs).logits
            pre_tokens, pre_steps = _generate(model, inputs)
            rec = handle.records[0]
        offsets = np.cumsum([0] + [s.num_visual for s in rec.spans])
        kept = [int(o) + i for o, k in zip(offsets, rec.kept) for i in k.tolist()]
        with lmms_prune.apply(model, "fixed", keep_indices=kept, prune_layer=0) as handle:
            handle.video_frames = video_frames
            k0 = model(**inputs).logits
            k0_tokens, k0_steps = _generate(model, inputs)
    torch.testing.assert_close(pre, k0, atol=ATOL, rtol=0)
    assert _same_tokens(pre_tokens, k0_tokens, pre_steps, k0_steps)
    assert _steps_close(pre_steps, k0_steps, pre_tokens, k0_tokens)
    return rec


def test_evs_on_a_qwen_video_keeps_vllms_set_leaves_the_image_and_equals_k0_pruning(toys):
    model, proc = toys("qwen2_5_vl")
    inputs = _video_inputs(proc, with_image=True)
    (image, video), _ = _video_span(model, inputs)
    adapter = get_adapter(model)
    with torch.no_grad():
        embeds = adapter.flatten_image_features(adapter.encode_videos(inputs).pooler_output)
    expected = evs_retention_mask(embeds.float(), video.grids, q=0.5).nonzero().flatten()
    rec = _pre_llm_equals_k0(model, inputs, keep_ratio=0.5)
    assert rec.kept[0].tolist() == list(range(image.num_visual))  # vLLM prunes videos only
    assert rec.kept[1].tolist() == expected.tolist()
    assert rec.kept[1].numel() == max(video.grids[0][0] * video.grids[0][1], video.num_visual // 2)


def test_evs_on_an_internvl_video_of_tiles_equals_k0_pruning(toys):
    """InternVL's frames are image tiles in ``pixel_values``: one video span (the runner's frame counts), its
    rows read from the image encoder's output, the text between frames kept."""
    model, proc = toys("internvl_qwen2")
    inputs, video_frames = _internvl_video(proc, moving_square(2))
    rec = _pre_llm_equals_k0(model, inputs, keep_ratio=0.75, video_frames=video_frames)
    [span] = rec.spans
    assert span.video and rec.kept[0].numel() == 384 and rec.kept[0][:256].tolist() == list(range(256))
