"""HoliTom's pre-LLM merging (``lmms_prune.selection.holitom``, the ``holitom`` preset).

* ``authors_holitom`` below re-creates the authors' pre-LLM path (github.com/cokeshao/HoliTom at
  e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0, ``holitom/llava_arch.py``: ``select_static_windows`` with its
  vectorised window counts, ``get_static_dynamic_features``, ``holitom``, ``merge_tokens_by_attention_density``,
  ``merge_tokens_by_density``, ``merge_tokens_by_clustering``, ``cluster_dpc_knn``), written from reading it, in
  their batched layout and output order, in float64, with the ``1e-6`` random density noise that breaks ties
  replaced by a ``1e-12`` offset favouring the lower index (ties are real: with ``k = 1`` every density is 1). Our merged sequence must hold the same tokens (a matching of rows; the order is the documented
  difference);
* properties: the segmentation is the best of all partitions (brute force), a changing clip is per-frame top-k
  of the attention, a static clip is one window of clustered means, the merged rows are convex combinations;
* the engine: on a tiny LLaVA-OneVision video the language model receives exactly the kept embeddings, the
  merged ones and the video's trailing newline;
* the inside-LLM stage (``holitom_full``, ``holitom/modeling_qwen2.py``): its folds against a re-creation of the
  authors' loop; prune = mask and cache = recompute; the positions decoder layers ``>= k`` receive against a
  re-creation of the authors' ``keep_indexs`` and of ``generate``'s numbering of the decoded tokens.
"""

from __future__ import annotations

import itertools
import math

import pytest
import test_engine
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from test_video_engine import _video_inputs, _video_span

import lmms_prune
from lmms_prune.families import get_adapter
from lmms_prune.presets import resolve_config
from lmms_prune.selection import holitom_inner_merge, holitom_merge, merged_embeddings, static_windows
from lmms_prune.selection.holitom import adjacent_similarity, removed_by_window

toys = test_engine.toys


# ------------------------------------------------------------------ the authors' arithmetic, re-created
def _dpc_centres(x: torch.Tensor, count: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_dpc_knn`` on ``[B, L, D]``: the centre indices ``[B, count]`` and the scaled distances."""
    dist = torch.cdist(x, x) / x.shape[-1] ** 0.5
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(-1)).exp()
    # the authors' tie-breaking noise, made deterministic: a tiny offset that favours the lower index (ours)
    density = density + 1e-12 * torch.arange(x.shape[1], 0, -1, dtype=density.dtype)
    denser = (density[:, None, :] > density[:, :, None]).double()
    far = dist.flatten(1).max(-1).values[:, None, None]
    delta = (dist * denser + far * (1 - denser)).min(-1).values
    return (delta * density).topk(count, dim=-1).indices, dist


def _cluster_tokens(x: torch.Tensor, centres: torch.Tensor, dist: torch.Tensor, beta: float) -> torch.Tensor:
    """``merge_tokens_by_clustering`` (the ``Beta`` path) on ``[B, L, D]`` with sorted ``centres`` ``[B, c]``."""
    out = []
    for b in range(x.shape[0]):
        others = torch.tensor([i for i in range(x.shape[1]) if i not in centres[b].tolist()], dtype=torch.long)
        nearest = dist[b][others][:, centres[b]].argmin(-1)
        row = []
        for i, centre in enumerate(centres[b].tolist()):
            members = x[b][others[nearest == i]]
            row.append(beta * x[b][centre] + (1 - beta) * members.mean(0) if len(members) else x[b][centre])
        out.append(torch.stack(row))
    return torch.stack(out)


def _by_attention(x, attn, ratio, d, beta, k):
    """``merge_tokens_by_attention_density`` on one window's dynamic tokens ``[W, n, D]`` -> ``[W, c, D]``."""
    frames, n, dim = x.shape
    dominant = round(math.ceil(n * ratio) * (1 - d))
    contextual = math.ceil(n * ratio) - dominant
    keep = torch.zeros(frames, n, dtype=torch.bool)
    if dominant:
        keep.scatter_(1, attn.topk(dominant, dim=1).indices, True)
    parts = [x[keep].view(frames, dominant, dim)]
    if contextual:
        rest = x[~keep].view(frames, n - dominant, dim)
        centres, dist = _dpc_centres(rest, contextual, min(k, contextual))
        parts.append(_cluster_tokens(rest, centres.sort(-1).values, dist, beta))
    return torch.cat(parts, 1)


def authors_holitom(x: torch.Tensor, attn: torch.Tensor, frames: int, ratio: float, tau: float, beta: float,
                    d: float, k: int, max_window: int = 1024) -> torch.Tensor:
    """The authors' pre-LLM HoliTom on ``[F * T, D]`` features -> the LLM's video tokens, in their order."""
    x, attn = x.view(frames, -1, x.shape[-1]), attn.view(frames, -1)
    unit = torch.nn.functional.normalize(x, dim=-1)
    sim = torch.nn.functional.cosine_similarity(unit[:-1], unit[1:], dim=-1)
    alike = torch.ones(frames, frames, x.shape[1], dtype=torch.float64)
    for start in range(frames - 1):
        run = torch.cumprod(sim[start:] > tau, dim=0)
        alike[start, start + 1:start + 1 + len(run)] = run.double()
    length = (torch.arange(frames)[None] - torch.arange(frames)[:, None]).clamp(min=0)
    removed = alike.sum(-1) * length
    dp, prev = torch.zeros(frames, dtype=torch.float64), [0] * frames
    for i in range(frames):
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + removed[j + 1, i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((prev[i], i))
        i = prev[i] - 1
    total = x.shape[0] * x.shape[1]
    ratio = min(ratio / ((total - float(dp[-1])) / total), 1)
    out = []
    for start, end in windows[::-1]:
        if start == end:
            out.append(_by_attention(x[start:end + 1], attn[start:end + 1], ratio, d, beta, k).flatten(0, 1))
            continue
        static = torch.all(sim[start:end] > tau, dim=0)
        dynamic = _by_attention(x[start:end + 1, ~static], attn[start:end + 1, ~static], ratio, d, beta, k)
        means = x[start:end + 1, static].mean(0)[None]
        count = round(means.shape[1] * ratio)
        if count > 0:
            centres, dist = _dpc_centres(means, count, min(k, count))
            out.append(_cluster_tokens(means, centres.sort(-1).values, dist, beta)[0])
        out.append(dynamic.flatten(0, 1))
    return torch.cat(out)


def moving_clip(frames: int, cells: int, changed: float, seed: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``[F * T, dim]`` features of a clip whose cells each change with probability ``changed`` per frame (small
    noise elsewhere, so static cells stay alike but not equal), and ``[F * T]`` attention."""
    g = torch.Generator().manual_seed(seed)
    frame = torch.randn(cells, dim, generator=g, dtype=torch.float64)
    out = []
    for _ in range(frames):
        change = torch.rand(cells, generator=g) < changed
        frame = torch.where(change[:, None], torch.randn(cells, dim, generator=g, dtype=torch.float64), frame)
        out.append(frame + 0.05 * torch.randn(cells, dim, generator=g, dtype=torch.float64))
    return torch.cat(out), torch.rand(frames * cells, generator=g, dtype=torch.float64)


def _same_rows(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    cost = torch.cdist(ours.double(), theirs.double())
    rows, cols = linear_sum_assignment(cost.numpy())
    assert float(cost[rows, cols].max()) < 1e-5


# ------------------------------------------------------------------ tests
@given(st.integers(1, 7), st.sampled_from([(2, 2), (2, 3), (3, 3)]), st.sampled_from([0.05, 0.3, 0.8]),
       st.sampled_from([0.1, 0.25, 0.5]), st.sampled_from([0.0, 0.5]), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_merged_tokens_are_those_of_the_recreation_of_the_authors_code(frames, grid, changed, ratio, d, seed):
    x, attn = moving_clip(frames, grid[0] * grid[1], changed, seed)
    merge = holitom_merge(x, attn, [grid] * frames, ratio, tau=0.8, beta=0.6, dominant_share=d, neighbours=7)
    theirs = authors_holitom(x, attn, frames, ratio, tau=0.8, beta=0.6, d=d, k=7)
    _same_rows(merged_embeddings(x, merge), theirs)


@given(st.integers(2, 7), st.integers(1, 6), st.integers(1, 7), st.sampled_from([0.0, 0.5, 0.9]),
       st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_the_segmentation_is_the_best_partition_into_windows(frames, cells, max_window, tau, seed):
    x, _ = moving_clip(frames, cells, 0.3, seed)
    similarity = adjacent_similarity(x, frames)
    windows, removed = static_windows(similarity, tau, max_window)
    assert windows[0][0] == 0 and windows[-1][1] == frames - 1
    assert all(b == a[1] + 1 for a, (b, _) in zip(windows, windows[1:])) and all(e - b < max_window
                                                                             for b, e in windows)
    table = removed_by_window(similarity, tau)
    assert removed == sum(float(table[b, e]) for b, e in windows)
    best = 0.0
    for cuts in itertools.product([False, True], repeat=frames - 1):  # every partition into runs
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [frames]
        runs = list(zip(bounds, bounds[1:]))
        if all(e - b <= max_window for b, e in runs):
            best = max(best, sum(float(table[b, e - 1]) for b, e in runs))
    assert removed == best


def test_a_changing_clip_is_per_frame_topk_of_the_attention():
    x, attn = moving_clip(5, 9, 1.0, seed=3)  # every cell changes every frame: nothing static
    merge = holitom_merge(x, attn, [(3, 3)] * 5, 0.3)
    expected = torch.cat([f * 9 + attn[f * 9:(f + 1) * 9].topk(math.ceil(9 * 0.3)).indices for f in range(5)])
    assert merge.index.tolist() == sorted(expected.tolist()) and merge.weights.shape[0] == 0
    assert holitom_merge(x, attn, [(3, 3)] * 5, 1.0).index.tolist() == list(range(45))


def test_a_static_clip_is_one_window_of_clustered_means_over_all_frames():
    frame = torch.randn(9, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = frame.repeat(4, 1)
    merge = holitom_merge(x, torch.rand(36, dtype=torch.float64), [(3, 3)] * 4, 0.1)
    # r' = min(0.1 / (9 / 36), 1) = 0.4: round(9 * 0.4) = 4 clusters of the 9 static cells, no token kept as is
    assert merge.index.numel() == 0 and merge.weights.shape == (4, 36)
    weights = merge.weights.view(4, 4, 9)
    assert torch.allclose(weights, weights[:, :1].expand(-1, 4, -1))  # each cell's four frames alike
    assert torch.allclose(merge.weights.sum(1), torch.ones(4)) and bool((merge.weights >= 0).all())


@given(st.integers(1, 6), st.sampled_from([0.1, 0.3, 1.0]), st.sampled_from([0.0, 0.5, 1.0]), st.integers(0, 500))
@settings(max_examples=30, deadline=None)
def test_kept_tokens_are_unique_dynamic_and_merged_rows_are_convex(frames, ratio, d, seed):
    x, attn = moving_clip(frames, 6, 0.3, seed)
    merge = holitom_merge(x, attn, [(2, 3)] * frames, ratio, dominant_share=d)
    assert torch.equal(merge.index, merge.index.unique())
    assert bool((merge.weights >= 0).all()) and torch.allclose(merge.weights.sum(1), torch.ones(len(merge.weights)))
    similarity = adjacent_similarity(x, frames)
    for first, last in static_windows(similarity)[0]:
        if last > first:  # a window's static cells are merged, never kept as they are
            static = torch.all(similarity[first:last] > 0.8, dim=0).nonzero().flatten()
            cells = (torch.arange(first, last + 1)[:, None] * 6 + static[None]).flatten().tolist()
            assert not set(cells) & set(merge.index.tolist())


def test_bad_parameters_are_refused_before_any_model():
    x, attn = moving_clip(2, 4, 0.3, 0)
    for kwargs, name in (({"beta": 1.5}, "holitom_beta"), ({"dominant_share": -1}, "holitom_d"),
                         ({"neighbours": 0}, "holitom_k"), ({"max_window_size": 0}, "holitom_max_window")):
        with pytest.raises(ValueError, match=name):
            holitom_merge(x, attn, [(2, 2)] * 2, 0.5, **kwargs)
    with pytest.raises(ValueError, match="positions='contiguous'"):
        resolve_config("holitom", positions="original")
    with pytest.raises(ValueError, match="keep_ratio instead"):
        resolve_config("holitom", keep_tokens=16)


def test_onevision_video_reaches_the_llm_as_kept_then_merged_then_its_newline(toys):
    from lmms_prune.engine.pre_llm import VisionCapture

    model, proc = toys("llava_onevision")
    adapter = get_adapter(model)
    inputs = _video_inputs(proc)
    _, span = _video_span(model, inputs)
    seen = []
    hook = adapter.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad(), lmms_prune.apply(model, "holitom", keep_ratio=0.25) as handle:
            capture = VisionCapture(handle, need_cls=True)
            try:
                projected = adapter.flatten_image_features(adapter.encode_videos(inputs).pooler_output)
            finally:
                capture.close()
            importance = adapter.vision_importance(capture.cls_rows, adapter.video_signal_kwargs(inputs))
            model(**inputs)
            rec = handle.records[0]
    finally:
        hook.remove()
    expected = holitom_merge(projected[:-1], importance[:-1], span.grids, 0.25)
    tokens = torch.cat([merged_embeddings(projected[:-1], expected), projected[-1:]])
    assert rec.kept[0].tolist() == expected.index.tolist() and rec.merged == [expected.weights.shape[0]]
    assert rec.visual_after == expected.count < span.num_visual
    torch.testing.assert_close(seen[0][0, span.start:span.start + len(tokens)], tokens, atol=1e-5, rtol=1e-5)
    assert seen[0].shape[1] == inputs["input_ids"].shape[1] - span.num_visual + expected.count


# ------------------------------------------------------------------ the inside-LLM stage (holitom_full)
def authors_inner(hidden: torch.Tensor, attention: torch.Tensor, r: float) -> dict[int, torch.Tensor]:
    """The merge of the authors' ``Qwen2Model_holitom.forward`` at layer ``HOLITOM_k`` on one video's hidden
    states ``[N, D]`` (start index 0), re-created: ``{kept position: its hidden state after the folds}``."""
    states = hidden.clone()[None]
    n = attention.numel()
    top = attention.topk(round(n * (1 - r))).indices
    others = torch.arange(n)[~torch.isin(torch.arange(n), top)]
    a, b = states[:, others, :], states[:, top, :]
    similarity = torch.bmm(a, b.transpose(1, 2)) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True)
                                                    .transpose(1, 2))
    best = similarity.max(dim=-1).indices
    for i, other in enumerate(others.tolist()):
        target = top[best[0, i]]
        states[0, target, :] = (states[0, target, :] + states[0, other, :]) / 2
    return {int(t): states[0, t] for t in top.sort().values}


@given(st.integers(1, 40), st.sampled_from([0.0, 0.3, 0.5, 0.9]), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_inner_merge_folds_as_the_recreation_of_the_authors_loop(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 6, generator=g, dtype=torch.float64)
    attention = torch.rand(n, generator=g, dtype=torch.float64)
    count = round(n * (1 - r))
    if count == 0:
        return
    merge = holitom_inner_merge(attention, hidden, count)
    theirs = authors_inner(hidden, attention, r)
    ours = {int(i): hidden[i] for i in merge.index} | {
        int(s): (w.double() @ hidden) for s, w in zip(merge.slots, merge.weights)}
    assert sorted(ours) == sorted(theirs) and len(ours) == count
    for position, value in theirs.items():
        torch.testing.assert_close(ours[position], value, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("family", "params"), [("qwen2_5_vl", {}), ("llava_onevision", {}),
                                                ("llava_onevision", {"llm_positions": "contiguous"}),
                                                ("llava_onevision", {"llm_structural": "keep"})])
def test_holitom_full_prunes_as_mask_mode_of_its_llm_stage_on_the_shrunk_inputs(toys, family, params):
    """Both stages: the LLM stage's folds at layer k equal mask mode (full shortened length, the removed keys
    masked, the slots holding their folds) at prefill and every decode step, at the shortened prompt's positions
    (the default, the authors') and renumbered (the option). The video keeps round(m / 2) of the m tokens the
    pre-LLM stage left it, its trailing newline (LLaVA-OneVision) counted among them as the authors' inner stage
    counts it (their ``image_tokens`` is the video's features with the newline), or with ``llm_structural='keep'``
    round(n / 2) of its n visual tokens and the newline besides; the image beside it keeps every token."""
    from test_engine import _generate, _same_tokens, _steps_close

    model, proc = toys(family)
    inputs = _video_inputs(proc, with_image=True)
    runs = {}
    for mode in ("prune", "mask"):
        with torch.no_grad(), lmms_prune.apply(model, "holitom_full", keep_ratio=0.5, mode=mode, **params) as handle:
            runs[mode] = (*_generate(model, inputs), handle.pre.records[0], handle.records[0],
                          handle.llm.records[0])
    tokens, steps, pre, both, llm = runs["prune"]
    assert _same_tokens(tokens, runs["mask"][0], steps, runs["mask"][1])
    assert _steps_close(steps, runs["mask"][1], tokens, runs["mask"][0])
    (image, video) = pre.spans_after
    newline = family == "llava_onevision"
    assert video.structural == ((video.length - 1,) if newline else ())
    candidates = video.num_visual + (newline and params.get("llm_structural") != "keep")
    assert llm.visual_before == image.num_visual + candidates
    assert both.visual_after == image.num_visual + round(candidates * 0.5)


@pytest.mark.parametrize("method", ["holitom", "holitom_full"])
def test_families_with_structure_between_frames_are_refused_before_any_weights_load(monkeypatch, method):
    """HoliTom replaces a video by a shorter merged sequence: an InternVL video ('FrameN: ' text between its
    frames) and a Qwen3-VL video (timestamps, and DeepStack) cannot hold it. Refused from the config, before
    ``from_pretrained``, naming the reason and the methods that work there; a family whose videos end with
    their structural tokens passes the check."""
    import transformers

    from lmms_prune.models import wrappers
    from lmms_prune.toy.models import tiny_model_dir

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    suffix = method
    with pytest.raises(ValueError, match=r"merges each video into a shorter sequence, but internvl videos .*"
                                         r"'FrameN: '.*fastvid"):
        getattr(wrappers, f"InternVLPrune_{suffix}")(pretrained=str(tiny_model_dir("internvl_qwen2")),
                                                      device="cpu", keep_ratio=0.25)
    with pytest.raises(ValueError, match="DeepStack"):
        getattr(wrappers, f"Qwen3VLPrune_{suffix}")(pretrained=str(tiny_model_dir("qwen3_vl")), device="cpu",
                                                    keep_ratio=0.25)
    with pytest.raises(AssertionError, match="weights must not load"):
        getattr(wrappers, f"LlavaOnevisionPrune_{suffix}")(pretrained=str(tiny_model_dir("llava_onevision")),
                                                           device="cpu", keep_ratio=0.25)


# ------------------------------------------------------------------ positions of the inside-LLM stage
def test_the_inner_stage_keeps_the_shortened_prompts_positions_by_default_and_renumbers_on_request():
    """holitom_full: the pre-LLM merge renumbers the shortened prompt (its merged tokens have no position), the LLM
    stage keeps that prompt's positions (the authors' code) unless ``llm_positions`` says otherwise; unset, the LLM
    stage follows ``positions`` (VScan's preset). Bad values and a method without an LLM stage are refused."""
    pre, llm = resolve_config("holitom_full").split_stages(28)
    assert (pre.positions, llm.positions, llm.prune_layers) == ("contiguous", "original", (18,))
    assert resolve_config("holitom_full", llm_positions="contiguous").split_stages(28)[1].positions == "contiguous"
    assert resolve_config("vscan", positions="original").split_stages(32)[1].positions == "original"
    with pytest.raises(ValueError, match=r"llm_positions='renumber': must be one of \('contiguous', 'original'"):
        resolve_config("holitom_full", llm_positions="renumber")
    with pytest.raises(ValueError, match="holitom.*does not use llm_positions; drop it.*holitom_full"):
        resolve_config("holitom", llm_positions="original")
    with pytest.raises(ValueError, match="positions='contiguous'.*the LLM stage's: llm_positions"):
        resolve_config("holitom_full", positions="original")


def authors_keep_indexs(start: int, length: int, top: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The sequence indices the authors' ``Qwen2Model_holitom.forward`` keeps at layer ``HOLITOM_k`` (re-created):
    the prompt before the video, its kept tokens (``top``: offsets in the video's block of ``length`` tokens), the
    rest of the shortened prompt of ``seq_len`` tokens, sorted. They are also the position ids of layers ``>= k``
    (``position_ids = keep_indexs.unsqueeze(0)``: the prompt was numbered ``0..seq_len-1``)."""
    return torch.cat([torch.arange(start), top + start, torch.arange(start + length, seq_len)]).sort().values


def authors_decode_position(seq_len: int, step: int) -> int:
    """The position of the token fed at decode call ``step`` (1, 2, ...) in the authors' runs: ``generate``
    numbers it from the attention mask of the shortened prompt (``cumsum - 1``), the same at every layer, so
    decoding continues from the shortened prompt's length whatever layer ``k`` dropped."""
    return seq_len + step - 1


def _observe_positions(model, layers):
    """Forward pre-hooks (run after the engine's own) recording, per call, the RoPE ids the language model was
    called with (M-RoPE: its three rows; ``None``: the cache positions) and the ``position_ids`` and RoPE cosines
    ``[1, q, d]`` that decoder layer ``i`` receives, for ``i`` in ``layers``."""
    adapter = get_adapter(model)
    seen: dict = {"lm": [], **{i: [] for i in layers}}

    def on_lm(module, args, kwargs):
        ids = kwargs.get("position_ids")
        seen["lm"].append(ids[1:] if ids is not None and ids.dim() == 3 and ids.shape[0] == 4 else ids)

    def make(i):
        return lambda module, args, kwargs: seen[i].append(
            (kwargs["position_ids"].clone(), kwargs["position_embeddings"][0].clone()))

    hooks = [adapter.language_model.register_forward_pre_hook(on_lm, with_kwargs=True)]
    hooks += [adapter.layers[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in layers]
    return seen, hooks


@pytest.mark.parametrize("llm_positions", [None, "contiguous"])
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_layers_from_k_see_the_shortened_prompts_positions_and_decoding_continues_from_its_length(
        toys, family, llm_positions):
    """Default (the authors' rule): every decoder layer from ``k`` on receives, at prefill, the position ids and
    RoPE tables that layer 0 has for the survivors of the shortened prompt (the authors' ``keep_indexs``), and at
    each decode step those of layer 0: decoding continues from the shortened prompt's length. On OneVision (the
    authors' model, 1-D RoPE) they are exactly ``keep_indexs`` and ``T' + step - 1``. The option
    ``llm_positions='contiguous'``: ids minus the tokens dropped before each survivor, the decoded tokens' minus
    all the dropped ones (OneVision: ``0..n-1``, then ``n + step - 1``), the RoPE tables of those ids."""
    model, proc = toys(family)
    inputs = _video_inputs(proc)
    params = {} if llm_positions is None else {"llm_positions": llm_positions}
    adapter = get_adapter(model)
    with torch.no_grad(), lmms_prune.apply(model, "holitom_full", keep_ratio=0.5, **params) as handle:
        k, last = handle.stage_layers[0], adapter.num_layers - 1
        seen, hooks = _observe_positions(model, (0, k, last))
        try:
            test_engine._generate(model, inputs, 4)
        finally:
            for hook in hooks:
                hook.remove()
        pre, llm = handle.pre.records[0], handle.llm.records[0]
    (span,) = llm.spans  # the video in the shortened prompt as the LLM stage sees it (OneVision: the newline
    short = pre.seq_len_after  # among its candidates); T': the shortened prompt's length
    assert span.structural == () and span.start == pre.spans_after[0].start
    top = span.visual_index[llm.kept[0]]
    keep = authors_keep_indexs(span.start, span.length, top, short)
    renumber = llm_positions == "contiguous"
    before = torch.tensor([int((~torch.isin(torch.arange(c), keep)).sum()) for c in keep]) if renumber else 0
    dropped = short - keep.numel() if renumber else 0
    calls = [ids if ids is not None else torch.arange(short)[None] for ids in seen["lm"][:1]]
    calls += [ids if ids is not None else torch.tensor([[short + j]]) for j, ids in enumerate(seen["lm"][1:])]
    assert len(calls) == 4 and calls[0].shape[-1] == short
    (ids0, cos0), *steps0 = seen[0]
    for layer in (k, last):
        (ids, cos), *steps = seen[layer]
        assert torch.equal(ids, ids0[..., keep] - before)
        torch.testing.assert_close(cos, adapter.language_model.rotary_emb(cos, calls[0][..., keep] - before)[0],
                                   atol=1e-6, rtol=0)
        assert renumber or torch.equal(cos, cos0[:, keep])
        for (step_ids, step_cos), (first_ids, first_cos), call in zip(steps, steps0, calls[1:]):
            assert torch.equal(step_ids, first_ids - dropped)
            torch.testing.assert_close(step_cos, adapter.language_model.rotary_emb(step_cos, call - dropped)[0],
                                       atol=1e-6, rtol=0)
            assert renumber or torch.equal(step_cos, first_cos)
    if family == "llava_onevision":  # the authors' numbers
        assert torch.equal(ids0[0], torch.arange(short))
        (ids, _), *steps = seen[k]
        if renumber:
            assert torch.equal(ids[0], torch.arange(keep.numel()))
            assert [int(s) for s, _ in steps] == [keep.numel() + j - 1 for j in (1, 2, 3)]
        else:
            assert torch.equal(ids[0], keep)
            assert [int(s) for s, _ in steps] == [authors_decode_position(short, j) for j in (1, 2, 3)]


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_holitom_full_cached_decoding_equals_recomputation_with_the_folds_frozen(toys, family):
    """Generation with the KV cache (layers >= k hold the survivors at their shortened-prompt positions, the
    decoded tokens continuing from its length) equals generation that recomputes the whole sequence at every
    step (``use_cache=False``), the inner stage's selections replayed from the cached run (recomputing them
    through the method would rank with another last token); the pre-LLM stage reads the video only."""
    model, proc = toys(family)
    inputs = _video_inputs(proc, with_image=True)
    with torch.no_grad(), lmms_prune.apply(model, "holitom_full", keep_ratio=0.5) as handle:
        inner, chosen = handle.llm.selectors[0], []
        handle.llm.selectors[0] = lambda image, scores, n: chosen.append(inner(image, scores, n)) or chosen[-1]
        tokens, steps = test_engine._generate(model, inputs, 4)
        kept = [k.tolist() for k in handle.records[0].kept]
    with torch.no_grad(), lmms_prune.apply(model, "holitom_full", keep_ratio=0.5) as handle:
        calls = itertools.count()
        handle.llm.selectors[0] = lambda image, scores, n: chosen[next(calls) % len(chosen)]
        full_tokens, full_steps = test_engine._generate(model, inputs, 4, use_cache=False)
        assert [k.tolist() for k in handle.records[0].kept] == kept and next(calls) == 4 * len(chosen)
    assert test_engine._same_tokens(tokens, full_tokens, steps, full_steps)
    assert test_engine._steps_close(steps, full_steps, tokens, full_tokens)
