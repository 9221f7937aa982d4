"""VidCom2 (``lmms_prune.selection.vidcom2``, the ``vidcom2`` preset).

* ``authors_keep`` re-creates the authors' ``vidcom2_compression`` on one video (xuyang-liu16/VidCom2,
  ``token_compressor/vidcom2/vidcom2.py`` at 944a17d14f4848ad080a65eab2b0711a760fa154), written from reading it:
  lowest-variance half of the channels, normalised per token, multi-scale Gaussian similarity to the video's
  and each frame's centre, softmax(-mean video score / 0.01) frame scales, ``round(scale * P)`` per frame, the
  lowest-scoring tokens of each frame; ``vllm_keep`` re-creates vLLM's ``compute_retention_mask``
  (vllm/multimodal/video_prune/vidcom2.py at 0f17ee061e413bf8ab7927f926f69cdff24dc63e): the same, then the
  exact count ``max(T, min(int(N (1 - q)), N))`` by dropping the highest or adding the lowest scores;
  ours must keep the same set on the same inputs;
* properties: per-frame counts are the budgets, each frame keeps its lowest scores, the budgets average the
  ratio, a static clip spreads the budget evenly;
* the engine: on a tiny Qwen2.5-VL video beside an image the preset keeps exactly that set of the model's
  projected video embeddings (the image whole), and pre-LLM removal at original positions equals pruning the
  same set at K=0, at prefill and every cached decode step.
"""

from __future__ import annotations

import pytest
import test_engine
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_engine import ATOL, _generate, _same_tokens, _steps_close
from test_video_engine import _video_inputs, _video_span

import lmms_prune
from lmms_prune.conformance import sample_index
from lmms_prune.families import get_adapter
from lmms_prune.presets import resolve_config
from lmms_prune.selection import frame_budgets, vidcom2_scores, vidcom2_select

toys = test_engine.toys


def _authors_scores(x: torch.Tensor, tpf: int):
    """Their steps 1-2 and the frame scales' input, on ``[N, D]`` tokens (float64 here)."""
    variances = x.var(dim=0, unbiased=False)
    x = x[:, torch.topk(variances, k=int(x.shape[-1] * 0.5), largest=False).indices]
    frames = F.normalize(x.view(-1, tpf, x.shape[-1]), dim=-1)
    alphas = [2 ** k for k in range(-3, 2)]

    def gauss(centre):
        d2 = ((frames - centre) ** 2).sum(-1)
        return sum(torch.exp(-d2 / (2 * a)) for a in alphas)

    v, f = gauss(frames.mean(dim=(0, 1), keepdim=True)), gauss(frames.mean(dim=1, keepdim=True))
    return v + f, -v.mean(dim=-1)


def _authors_ks(frame_scores: torch.Tensor, base: float, tpf: int) -> list[int]:
    probs = F.softmax((frame_scores - frame_scores.max()) / 0.01, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    return (scales * tpf).round().long().clamp(min=1).tolist()


def authors_keep(x: torch.Tensor, tpf: int, base: float) -> torch.Tensor:
    """Bool ``[N]``: the tokens the authors' ``vidcom2_compression`` keeps (linear mapper)."""
    score, frame_scores = _authors_scores(x, tpf)
    keep = torch.zeros(score.shape, dtype=torch.bool)
    for i, k in enumerate(_authors_ks(frame_scores, base, tpf)):
        keep[i, torch.topk(score[i], k=k, largest=False).indices] = True
    return keep.flatten()


def vllm_keep(x: torch.Tensor, tpf: int, q: float) -> torch.Tensor:
    """Bool ``[N]``: vLLM's ``compute_retention_mask`` (its own per-frame step, then the exact count)."""
    frames = x.shape[0] // tpf
    target = max(frames, min(int(x.shape[0] * (1.0 - q)), x.shape[0]))
    score, frame_scores = _authors_scores(x, tpf)
    ks = torch.tensor(_authors_ks(frame_scores, 1.0 - q, tpf)).clamp(max=tpf)
    mask = torch.zeros(score.shape, dtype=torch.bool)
    for i in range(frames):
        mask[i, torch.topk(score[i], k=int(ks[i]), largest=False).indices] = True
    mask, flat = mask.flatten(), score.flatten()
    current = int(mask.sum())
    if current > target:
        kept = mask.nonzero().flatten()
        mask[kept[torch.topk(flat[kept], k=current - target).indices]] = False
    elif current < target:
        free = (~mask).nonzero().flatten()
        mask[free[torch.topk(flat[free], k=target - current, largest=False).indices]] = True
    return mask


SHAPES = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))
RATIOS = st.sampled_from([0.05, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0])


def _video(frames, cells, seed, dim=10):
    """Random float64 tokens with a per-frame offset, so frames differ in uniqueness."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(frames, cells, dim, generator=g, dtype=torch.float64)
    return (x + 2 * torch.randn(frames, 1, dim, generator=g, dtype=torch.float64)).reshape(-1, dim)


@given(SHAPES, RATIOS, st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_kept_set_equals_the_recreations_of_the_authors_and_of_vllm(shape, ratio, seed):
    frames, rows, cols = shape
    x = _video(frames, rows * cols, seed)
    grids = [(rows, cols)] * frames
    ours = torch.zeros(x.shape[0], dtype=torch.bool)
    ours[vidcom2_select(x, grids, ratio)] = True
    assert torch.equal(ours, authors_keep(x, rows * cols, ratio))
    exact = torch.zeros(x.shape[0], dtype=torch.bool)
    exact[vidcom2_select(x, grids, ratio, count="vllm")] = True
    vllm_ratio = 1.0 - (1.0 - ratio)  # vLLM works with 1 - q for the pruning rate q = 1 - r
    assert int(exact.sum()) == max(frames, min(int(x.shape[0] * vllm_ratio), x.shape[0]))
    # vLLM's exact-count step ranks with torch.topk, whose order among EXACTLY equal scores is unspecified (two
    # tokens of one frame score alike by symmetry); ours breaks such ties by index, so compare where none exist
    assume(_authors_scores(x, rows * cols)[0].unique().numel() == x.shape[0])
    assert torch.equal(exact, vllm_keep(x, rows * cols, 1.0 - ratio))


@given(SHAPES, RATIOS, st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_each_frame_keeps_its_budget_of_lowest_scores_and_the_budgets_average_the_ratio(shape, ratio, seed):
    frames, rows, cols = shape
    cells = rows * cols
    x = _video(frames, cells, seed)
    kept = vidcom2_select(x, [(rows, cols)] * frames, ratio)
    assert torch.equal(kept, kept.unique())
    score, uniqueness = vidcom2_scores(x, frames)
    ks = frame_budgets(uniqueness, ratio, cells)
    per_frame = torch.bincount(kept // cells, minlength=frames)
    assert per_frame.tolist() == ks.tolist() and bool((ks >= 1).all())
    for t in range(frames):
        mine = kept[kept // cells == t] % cells
        dropped = torch.ones(cells, dtype=torch.bool)
        dropped[mine] = False
        if dropped.any():
            assert score[t, mine].max() <= score[t, dropped].min()
    # the scales sum to ratio * T before the clamp at 1 and the floor of one token; rounding moves each by < 1
    unclamped = ratio * (1 + F.softmax((uniqueness - uniqueness.max()) / 0.01, 0) - 1 / frames)
    if bool((unclamped <= 1).all()) and bool((unclamped * cells >= 0.5).all()):
        assert abs(int(ks.sum()) - ratio * frames * cells) <= frames / 2


def test_a_static_clip_spreads_the_budget_evenly_and_bad_input_is_refused():
    frame = torch.randn(9, 6, dtype=torch.float64)
    kept = vidcom2_select(frame.repeat(4, 1), [(3, 3)] * 4, 0.34)  # equal uniqueness: round(0.34 * 9) = 3 each
    assert torch.bincount(kept // 9).tolist() == [3, 3, 3, 3]
    assert len({tuple((kept[kept // 9 == t] % 9).tolist()) for t in range(4)}) == 1  # the same cells each frame
    with pytest.raises(ValueError, match="vidcom2_count='max'"):
        vidcom2_select(frame.repeat(2, 1), [(3, 3)] * 2, 0.5, count="max")
    with pytest.raises(ValueError, match="retention=1.5"):
        vidcom2_select(frame.repeat(2, 1), [(3, 3)] * 2, 1.5)
    with pytest.raises(ValueError, match="same"):
        vidcom2_select(torch.randn(8, 2), [(2, 2), (1, 4)], 0.5)
    with pytest.raises(ValueError, match="vidcom2_count"):
        resolve_config("vidcom2", keep_ratio=0.25, vidcom2_count="max")


def test_a_family_without_videos_is_refused_before_any_weights_load(monkeypatch):
    """A videos-only method on LLaVA-1.5 (no videos) would prune nothing: refused from the config alone."""
    import transformers

    from lmms_prune.models import wrappers
    from lmms_prune.toy.models import tiny_model_dir

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    with pytest.raises(ValueError, match="'vidcom2' prunes videos only, and the llava family takes no videos"):
        wrappers.LlavaPrune_vidcom2(pretrained=str(tiny_model_dir("llava")), device="cpu")
    with pytest.raises(AssertionError, match="weights must not load"):  # a video family passes the check
        wrappers.LlavaOnevisionPrune_vidcom2(pretrained=str(tiny_model_dir("llava_onevision")), device="cpu")


@pytest.mark.parametrize("count", ["authors", "vllm"])
def test_vidcom2_on_a_qwen_video_keeps_the_authors_set_leaves_the_image_and_equals_k0_pruning(toys, count):
    model, proc = toys("qwen2_5_vl")
    inputs = _video_inputs(proc, with_image=True)
    (image, video), _ = _video_span(model, inputs)
    adapter = get_adapter(model)
    with torch.no_grad():
        embeds = adapter.flatten_image_features(adapter.encode_videos(inputs).pooler_output)
    expected = vidcom2_select(embeds.float(), video.grids, 0.3, count=count)
    with torch.no_grad():
        with lmms_prune.apply(model, "vidcom2", keep_ratio=0.3, vidcom2_count=count) as handle:
            pre = model(**inputs).logits
            pre_tokens, pre_steps = _generate(model, inputs)
            rec = handle.records[0]
        assert rec.kept[0].tolist() == list(range(image.num_visual))  # images untouched
        assert rec.kept[1].tolist() == expected.tolist()
        kept = sample_index(rec)
        with lmms_prune.apply(model, "fixed", keep_indices=kept, prune_layer=0):
            k0 = model(**inputs).logits
            k0_tokens, k0_steps = _generate(model, inputs)
    torch.testing.assert_close(pre, k0, atol=ATOL, rtol=0)
    assert _same_tokens(pre_tokens, k0_tokens, pre_steps, k0_steps)
    assert _steps_close(pre_steps, k0_steps, pre_tokens, k0_tokens)
