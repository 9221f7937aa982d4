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
  and pre-LLM removal at original positions equals intra-LLM pruning of the same set at K=0 (prefill and decode);
* stage 2, the decode-time KV pruning: ``authors_decode_steps`` re-creates ``dycoke_pruning``/``update_cache``
  (``llava/model/language_model/modeling_qwen2.py``) over a call's steps and ours picks the same entries; on tiny
  Qwen2.5-VL, OneVision and InternVL videos decoding with the picked entries gathered equals decoding with the
  others masked at every step, keeping every entry equals stage 1 alone, and keeping half changes the logits.
"""

from __future__ import annotations

import pytest
import test_engine
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import ATOL, _generate, _same_tokens, _steps_close
from test_video_engine import _internvl_video, _video_inputs, _video_span, moving_square
from transformers import AutoConfig

import lmms_prune
from lmms_prune.conformance import sample_index
from lmms_prune.families import get_adapter
from lmms_prune.presets import check_model, resolve_config
from lmms_prune.selection import dycoke_decode_keep, ttm_count, ttm_references, ttm_select
from lmms_prune.toy.models import tiny_model_dir

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
        with lmms_prune.apply(model, "dycoke", positions="original", dycoke_l=None) as handle:  # stage 1 alone
            pre = model(**inputs).logits
            pre_tokens, pre_steps = _generate(model, inputs)
            rec = handle.records[0]
        kept = sample_index(rec)
        with lmms_prune.apply(model, "fixed", keep_indices=kept, prune_layer=0):
            k0 = model(**inputs).logits
            k0_tokens, k0_steps = _generate(model, inputs)
    torch.testing.assert_close(pre, k0, atol=ATOL, rtol=0)
    assert _same_tokens(pre_tokens, k0_tokens, pre_steps, k0_steps)
    assert _steps_close(pre_steps, k0_steps, pre_tokens, k0_tokens)
    assert len(video.grids) == 2  # 4 frames, two per merged grid: grid 1 is pruned against grid 0
    assert rec.kept[0].tolist() == list(range(image.num_visual))  # DyCoke compresses videos only
    assert rec.kept[1].tolist() == ttm_select(embeds.float(), video.grids, 0.7).tolist()


# ------------------------------------------------------------------ stage 2: decode-time KV pruning
def authors_decode_steps(rows: list[torch.Tensor], p: float) -> list[list[int] | None]:
    """DyCoke's ``dycoke_pruning`` + ``update_cache`` re-created over a call's decode steps: per step the kept
    video entries (sorted; the authors' order is ``topk``'s, which attention ignores) or None (the whole cache)."""
    out, reference = [], None
    for row in rows:
        similarity = 0 if reference is None else torch.nn.functional.cosine_similarity(row, reference, dim=0)
        reference = row
        out.append(sorted(torch.topk(row, int(row.numel() * (1 - p)), sorted=False)[1].tolist())
                   if similarity < 0.9 else None)
    return out


@given(st.integers(1, 40), st.integers(1, 8), st.sampled_from([0.0, 0.5, 0.8, 1.0]), st.sampled_from([0.02, 0.3, 1.0]),
       st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_decode_keep_follows_the_recreation_of_the_authors_rule(n, steps, p, drift, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.rand(n, generator=g, dtype=torch.float64)]
    for _ in range(steps - 1):  # small drift: the attention barely moves, the step keeps the whole cache
        rows.append((rows[-1] + drift * torch.rand(n, generator=g, dtype=torch.float64)).softmax(0))
    ours, previous = [], None
    for row in rows:
        kept = dycoke_decode_keep(row, previous, p)
        previous = row
        ours.append(None if kept is None else kept.tolist())
    assert ours == authors_decode_steps(rows, p)
    assert ours[0] is not None and len(ours[0]) == int(n * (1 - p))  # the first step always prunes


def _stage2(model, inputs, mode, video_frames=None, **params):
    with torch.no_grad(), lmms_prune.apply(model, "dycoke", mode=mode, **params) as handle:
        handle.video_frames = video_frames
        tokens, steps = _generate(model, inputs)
        history = [keep.clone() for keep in handle.decode.history] if handle.decode is not None else []
        columns = [[(span, span.visual_positions) for span in rec.spans_after] for rec in handle.records]
        return tokens, steps, history, handle.records[0], columns


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_stage2_gathered_cache_equals_masked_columns_at_every_decode_step(toys, family):
    """Decode with only the picked video KV entries gathered (prune) equals decode with the others masked (the
    reference), step by step; the picked set is DyCoke's rule on the step's own attention row."""
    model, proc = toys(family)
    inputs = _video_inputs(proc, with_image=True)
    params = dict(dycoke_l=2, dycoke_p=0.5)
    tokens, steps, history, rec, columns = _stage2(model, inputs, "prune", **params)
    m_tokens, m_steps, m_history, _, _ = _stage2(model, inputs, "mask", **params)
    assert _same_tokens(tokens, m_tokens, steps, m_steps)
    assert _steps_close(steps, m_steps, tokens, m_tokens)
    assert len(history) == tokens.shape[1] - 1  # every decode step (the first token comes from the prefill)
    assert all(torch.equal(a, b) for a, b in zip(history, m_history))
    (image, image_cols), (video, video_cols) = columns[0]
    first = history[0][0]
    assert bool(first[image_cols].all())  # the image's entries are never dropped
    assert int(first[video_cols].sum()) == int(video_cols.numel() * 0.5)  # the first step always prunes
    assert int((~first).sum()) == video_cols.numel() - int(video_cols.numel() * 0.5)  # nothing else dropped


def test_stage2_keeping_every_entry_is_stage1_alone(toys):
    model, proc = toys("qwen2_5_vl")
    inputs = _video_inputs(proc)
    tokens, steps, history, _, _ = _stage2(model, inputs, "prune", dycoke_l=2, dycoke_p=0.0)
    alone, alone_steps, none, _, _ = _stage2(model, inputs, "prune", dycoke_l=None)
    assert none == [] and all(bool(h.all()) for h in history)
    assert torch.equal(tokens, alone) and torch.equal(steps, alone_steps)
    _, pruned_steps, _, _, _ = _stage2(model, inputs, "prune", dycoke_l=2, dycoke_p=0.5)
    assert not torch.allclose(pruned_steps, alone_steps)  # the selection reaches the attention of layers >= L
    with pytest.raises(ValueError, match="decode layer 14"):  # from the config alone, before any weights load
        check_model(resolve_config("dycoke", dycoke_l=14), AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl")))


def test_internvl_video_of_tiles_runs_both_stages_and_gathered_equals_masked(toys):
    """InternVL's frames are image tiles with text between them: one video span (the runner's frame counts),
    stage 1 keeps whole tiles 0 and 2 (of 4) and prunes 1 and 3, stage 2 gathers as the mask reference."""
    model, proc = toys("internvl_qwen2")
    inputs, video_frames = _internvl_video(proc, moving_square(4))
    tokens, steps, history, rec, _ = _stage2(model, inputs, "prune", video_frames, dycoke_l=2, dycoke_p=0.5)
    m_tokens, m_steps, m_history, _, _ = _stage2(model, inputs, "mask", video_frames, dycoke_l=2, dycoke_p=0.5)
    [span] = rec.spans
    assert span.video and len(span.grids) == 4 and rec.kept[0].numel() == 2 * 256 + 2 * int(0.3 * 256)
    assert _same_tokens(tokens, m_tokens, steps, m_steps) and _steps_close(steps, m_steps, tokens, m_tokens)
    assert all(torch.equal(a, b) for a, b in zip(history, m_history)) and not bool(history[0].all())


def test_left_padded_batch_equals_single_samples_with_both_stages(toys):
    """Two prompts of different lengths (a 2-frame video; an image and a 4-frame one) decoded as one left-padded batch
    pick, per step, the same video entries as each prompt alone (gathered columns padded per row), and give the
    same tokens and steps."""
    model, proc = toys("qwen2_5_vl")
    convs = [([{"type": "video"}], "Where does it go?"),
             ([{"type": "image"}, {"type": "video"}], "Compare the picture with the clip, in detail please.")]
    prompts = [proc.apply_chat_template([{"role": "user", "content": c + [{"type": "text", "text": t}]}],
                                        add_generation_prompt=True) for c, t in convs]
    image = test_engine._image((160, 120))

    def encode(texts, images, videos):
        out = proc(text=texts, images=images or None, videos=videos, return_tensors="pt", padding=True,
                   do_sample_frames=False).to(test_engine.DEVICE)
        return {k: v.to(test_engine.DTYPE) if v.is_floating_point() else v for k, v in out.items()}

    videos = [moving_square(2), moving_square(4)[::-1]]  # unequal video lengths: unequal gathered widths
    tokens, steps, history, _, columns = _stage2(model, encode(prompts, [image], videos), "prune", dycoke_l=2,
                                                 dycoke_p=0.5)
    for row, single in enumerate([encode(prompts[:1], [], videos[:1]), encode(prompts[1:], [image], videos[1:])]):
        t1, s1, h1, _, c1 = _stage2(model, single, "prune", dycoke_l=2, dycoke_p=0.5)
        assert _same_tokens(tokens[row], t1[0], steps[row], s1[0])
        assert _steps_close(steps[row:row + 1], s1, tokens[row:row + 1], t1)
        for step, alone in zip(history, h1):
            for (_, cols), (_, cols1) in zip(columns[row], c1[0]):
                assert torch.equal(step[row, cols], alone[0, cols1])
