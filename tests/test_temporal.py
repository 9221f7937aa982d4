"""The temporal selection (``lmms_prune.selection.temporal``), temporal adjacency in pivot-MIS graphs, and the
``temporal`` method's selector on video and image spans."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmms_prune.families.base import ImageSpan
from lmms_prune.methods.base import ImageSignals
from lmms_prune.methods.temporal import Temporal
from lmms_prune.presets import resolve_config
from lmms_prune.selection import (
    frame_layout,
    fused_graph,
    grid_adjacency,
    pivot_mis,
    previous_frame_similarity,
    temporal_neighbour_pairs,
    temporal_redundant,
    temporal_select,
    topk,
)


def video_features(frames: int, rows: int, cols: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames * rows * cols, dim, generator=g)


def static_video(frames: int, rows: int, cols: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Every frame repeats frame 0 (scaled: cosine is 1 whatever the norm)."""
    first = video_features(1, rows, cols, dim, seed)
    return torch.cat([first * (1 + t) for t in range(frames)])


def changing_video(frames: int, rows: int, cols: int) -> torch.Tensor:
    """Each cell alternates between two orthogonal directions from frame to frame: cosine 0 with the
    previous frame everywhere."""
    cells = rows * cols
    out = torch.zeros(frames * cells, 2 * cells)
    for t in range(frames):
        for c in range(cells):
            out[t * cells + c, 2 * c + t % 2] = 1.0
    return out


GRID_SHAPES = st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))


# --- redundancy -------------------------------------------------------------------------------------------
@given(GRID_SHAPES, st.integers(0, 50))
@settings(max_examples=30, deadline=None)
def test_a_static_video_is_redundant_after_its_first_frame(shape, seed):
    frames, rows, cols = shape
    redundant = temporal_redundant(static_video(frames, rows, cols, seed=seed), [(rows, cols)] * frames, 0.99)
    cells = rows * cols
    assert redundant.tolist() == [False] * cells + [True] * (cells * (frames - 1))


@given(GRID_SHAPES)
@settings(max_examples=30, deadline=None)
def test_a_fully_changing_video_has_nothing_redundant(shape):
    frames, rows, cols = shape
    features = changing_video(frames, rows, cols)
    assert not temporal_redundant(features, [(rows, cols)] * frames, 0.01).any()


def test_similarity_is_the_cosine_with_the_same_cell_of_the_previous_frame():
    frames, rows, cols = 4, 2, 3
    features = video_features(frames, rows, cols, seed=3).double()
    got = previous_frame_similarity(features, [(rows, cols)] * frames)
    cells = rows * cols
    assert torch.isinf(got[:cells]).all() and (got[:cells] < 0).all()
    for i in range(cells, frames * cells):
        expected = torch.nn.functional.cosine_similarity(features[i], features[i - cells], dim=0)
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-12)


def test_a_token_exactly_at_the_threshold_is_redundant():
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # cosine exactly 0.6 (FrameFusion: similarity >= S_th)
    assert temporal_redundant(features, [(1, 1), (1, 1)], 0.6).tolist() == [False, True]
    assert temporal_redundant(features, [(1, 1), (1, 1)], 0.61).tolist() == [False, False]


def test_frames_of_different_shapes_and_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match=r"same \(rows, cols\)"):
        frame_layout([(2, 2), (2, 3)])
    with pytest.raises(ValueError, match="sum to N"):
        temporal_redundant(torch.ones(7, 2), [(2, 2), (2, 2)], 0.5)
    with pytest.raises(ValueError, match="temporal_threshold=1.5"):
        temporal_redundant(torch.ones(8, 2), [(2, 2), (2, 2)], 1.5)


# --- selection --------------------------------------------------------------------------------------------
@given(GRID_SHAPES, st.integers(0, 50), st.floats(0.0, 1.0), st.floats(-1.0, 1.0))
@settings(max_examples=60, deadline=None)
def test_temporal_select_keeps_exactly_n_fresh_tokens_first_then_the_least_similar(shape, seed, share, threshold):
    frames, rows, cols = shape
    grids = [(rows, cols)] * frames
    features = video_features(frames, rows, cols, dim=3, seed=seed)
    num = features.shape[0]
    scores = torch.rand(num, generator=torch.Generator().manual_seed(seed + 1))
    n = max(1, round(share * num))
    kept = temporal_select(scores, features, grids, n, threshold)
    assert kept.dtype == torch.long and kept.numel() == n
    assert torch.equal(kept, torch.unique(kept))  # ascending, unique
    redundant = temporal_redundant(features, grids, threshold)
    fresh = (~redundant).nonzero().flatten()
    if fresh.numel() >= n:  # only fresh tokens, the n best by score
        assert not redundant[kept].any()
        assert torch.equal(kept, fresh[topk(scores[fresh], n)])
    else:  # every fresh token, then redundant ones no more similar than any dropped one
        assert set(fresh.tolist()) <= set(kept.tolist())
        similarity = previous_frame_similarity(features, grids)
        kept_mask = torch.zeros(num, dtype=torch.bool)
        kept_mask[kept] = True
        dropped = ~kept_mask
        if dropped.any():
            assert similarity[kept_mask & redundant].max() <= similarity[dropped].min()


def test_static_video_keeps_the_first_frame_and_changing_video_is_plain_topk():
    frames, rows, cols = 4, 3, 3
    grids = [(rows, cols)] * frames
    scores = torch.rand(36, generator=torch.Generator().manual_seed(0))
    assert temporal_select(scores, static_video(frames, rows, cols), grids, 9, 0.9).tolist() == list(range(9))
    # 5 of a static video: the 5 best-scored tokens of frame 0, whatever the later frames score
    assert temporal_select(scores, static_video(frames, rows, cols), grids, 5, 0.9).tolist() == sorted(
        topk(scores[:9], 5).tolist())
    changing = changing_video(frames, rows, cols)
    for n in (1, 7, 36):
        assert torch.equal(temporal_select(scores, changing, grids, n, 0.5), topk(scores, n))


def test_an_image_has_nothing_redundant_so_temporal_equals_topk():
    scores = torch.rand(12, generator=torch.Generator().manual_seed(2))
    features = torch.ones(12, 4)  # all identical: redundant only if a previous frame existed
    assert torch.equal(temporal_select(scores, features, [(3, 4)], 5, 0.5), topk(scores, 5))


# --- temporal adjacency -----------------------------------------------------------------------------------
@given(GRID_SHAPES)
@settings(max_examples=30, deadline=None)
def test_temporal_pairs_link_exactly_the_same_cell_of_neighbouring_frames(shape):
    frames, rows, cols = shape
    cells = rows * cols
    src, dst = temporal_neighbour_pairs([(rows, cols)] * frames)
    pairs = set(zip(src.tolist(), dst.tolist()))
    expected = {(i, j) for i in range(frames * cells) for j in range(frames * cells)
                if i % cells == j % cells and abs(i // cells - j // cells) == 1}
    assert pairs == expected and len(pairs) == src.numel()  # no duplicates, symmetric by construction


@pytest.mark.parametrize("frames,rows,cols", [(3, 2, 3), (4, 1, 1), (2, 4, 4)])
def test_temporal_adjacency_adds_only_same_cell_links_to_the_spatial_graph(frames, rows, cols):
    grids = [(rows, cols)] * frames
    spatial = grid_adjacency(grids)
    both = grid_adjacency(grids, temporal_adjacency=True)
    assert torch.equal(both, both.T) and not both.diagonal().any()
    cells = rows * cols
    added = (both & ~spatial).nonzero().tolist()
    assert all(i % cells == j % cells and abs(i // cells - j // cells) == 1 for i, j in added)
    assert len(added) == 2 * (frames - 1) * cells and torch.equal(both & spatial, spatial)


@pytest.mark.parametrize("alpha,theta", [(0.5, 0.8), (0.9, 0.8), (0.0, 0.5)])
def test_fused_graph_with_temporal_adjacency_equals_the_formula_with_the_larger_s_spat(alpha, theta):
    frames, rows, cols = 3, 3, 3
    grids = [(rows, cols)] * frames
    features = video_features(frames, rows, cols, dim=4, seed=5)
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    cos = unit @ unit.T
    sem = (cos - cos.min()) / (cos.max() - cos.min())
    spat = grid_adjacency(grids, temporal_adjacency=True).double()
    expected = alpha * sem + (1 - alpha) * spat > theta
    expected.fill_diagonal_(False)
    assert torch.equal(fused_graph(features, grids, alpha, theta, temporal_adjacency=True), expected)


def test_pivot_mis_with_temporal_adjacency_keeps_no_two_same_cell_neighbours_of_a_static_video():
    # static video, alpha=0: edges = adjacency alone; with room for it, the MIS avoids temporal neighbours
    frames, rows, cols = 4, 1, 1
    grids = [(rows, cols)] * frames
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])
    features = static_video(frames, rows, cols)
    kept = pivot_mis(scores, features, grids, 2, r_pivot=0.0, theta_sim=0.5, alpha=0.0, temporal_adjacency=True)
    assert kept.tolist() == [0, 2]
    assert pivot_mis(scores, features, grids, 2, r_pivot=0.0, theta_sim=0.5, alpha=0.0).tolist() == [0, 1]


# --- the method's selectors -------------------------------------------------------------------------------
def _signals(span: ImageSpan, hidden: torch.Tensor) -> ImageSignals:
    return ImageSignals(sample=0, span=span, offset=0, sample_visual=span.num_visual, hidden=hidden)


def test_temporal_selector_prunes_repeats_on_a_video_span_and_is_topk_on_an_image_span():
    config = resolve_config("temporal", temporal_threshold=0.9)
    selector = Temporal(config)
    frames, rows, cols = 3, 2, 2
    hidden = static_video(frames, rows, cols)
    scores = torch.arange(12, dtype=torch.float32)  # later frames score higher
    video = ImageSpan(start=5, length=12, grids=[(rows, cols)] * frames, video=True)
    image = ImageSpan(start=5, length=12, grids=[(rows * frames, cols)])
    assert selector(_signals(video, hidden), scores, 4).tolist() == [0, 1, 2, 3]
    assert selector(_signals(image, hidden), scores, 4).tolist() == [8, 9, 10, 11]


def test_pivot_mis_selector_links_frames_only_on_video_spans():
    from lmms_prune.methods.d2pruner import PivotMIS

    frames = 4
    hidden = static_video(frames, 1, 1)
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])
    config = resolve_config("deepprune", temporal_adjacency=True, alpha=0.0, theta_sim=0.5, r_pivot=0.0)
    video = ImageSpan(start=0, length=4, grids=[(1, 1)] * frames, video=True)
    images = ImageSpan(start=0, length=4, grids=[(1, 1)] * frames)  # four 1x1 tiles: no frames to link
    assert PivotMIS(config)(_signals(video, hidden), scores, 2).tolist() == [0, 2]
    assert PivotMIS(config)(_signals(images, hidden), scores, 2).tolist() == [0, 1]


def test_temporal_parameters_are_validated():
    assert resolve_config("temporal").temporal_threshold == 0.6
    with pytest.raises(ValueError, match="temporal_threshold=2"):
        resolve_config("temporal", temporal_threshold="2")
    with pytest.raises(ValueError, match="temporal_adjacency='maybe': must be true or false"):
        resolve_config("deepprune", temporal_adjacency="maybe")
    assert resolve_config("d2pruner", temporal_adjacency="false", bias_prior="p.pt").temporal_adjacency is False
    with pytest.raises(ValueError, match="does not use temporal_adjacency"):
        resolve_config("fastv", temporal_adjacency="true")


# --- on the tiny models' real video layouts ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "qwen3_vl"])
def test_temporal_on_a_static_video_keeps_the_first_frame(family):
    """A video whose frames are all the same picture: every token after the first (merged) frame repeats its
    cell, so at a quarter of the tokens the kept set is the first frame (plus the least similar repeats
    when the budget exceeds one frame), through the engine's real spans, grids and hidden states."""
    import numpy as np
    from PIL import Image

    import lmms_prune
    from lmms_prune.toy.models import build_processor, build_tiny_model

    model, proc = build_tiny_model(family, seed=0, dtype=torch.float32), build_processor(family)
    frame = Image.fromarray((np.random.RandomState(0).rand(112, 140, 3) * 255).astype("uint8"))
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                       "text": "What moves?"}]}], add_generation_prompt=True)
    inputs = proc(text=[prompt], videos=[[frame] * 8], return_tensors="pt", do_sample_frames=False)
    with torch.no_grad(), lmms_prune.apply(model, "temporal", keep_ratio=0.25, temporal_threshold=0.9) as handle:
        model(**inputs)
    record = handle.records[0]
    (index,) = [i for i, s in enumerate(record.spans) if s.video]
    span, kept = record.spans[index], record.kept[index]
    frames, cells = frame_layout(span.grids)
    n = round(0.25 * span.num_visual)
    assert frames >= 4 and kept.numel() == n >= cells  # a quarter of >= 4 frames: at least one frame's worth
    assert set(range(cells)) <= set(kept.tolist())  # the whole first frame
    if n == cells:
        assert kept.tolist() == list(range(cells))  # and nothing else


def test_query_rows_is_framefusions_mean_over_the_last_num_query_rows():
    """FrameFusion's pruning score (framefusion/utils.py: scaled_dot_product_attention(..., num) with the causal
    mask of those rows, then mean over heads and rows; num=4 in its Qwen2-VL model): query_rows=4 records the
    mean of the last 4 rows of the eager attention probabilities at layer K-1, heads averaged."""
    from test_engine import _one

    import lmms_prune
    from lmms_prune.toy.models import build_processor, build_tiny_model

    model, proc = build_tiny_model("qwen2_5_vl", seed=0), build_processor("qwen2_5_vl")
    inputs = _one("qwen2_5_vl", proc)
    layer = 1
    with torch.no_grad():
        model.set_attn_implementation("eager")
        try:
            probs = model(**inputs, output_attentions=True).attentions[layer]
        finally:
            model.set_attn_implementation("sdpa")
        with lmms_prune.apply(model, "temporal", query_rows=4, prune_layer=layer + 1) as handle:
            model(**inputs)
            row = handle.state.attention[layer]
    torch.testing.assert_close(row, probs[:, :, -4:, :].float().mean(dim=(1, 2)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="query_rows=4 with query='text_mean'"):
        resolve_config("temporal", query_rows=4, query="text_mean")
