"""Videos in the engine (methods.md section 1, "Video"): one span per video, one grid per (merged) frame.

On tiny models with the real video geometry scaled down (Qwen2.5-VL: two frames merged in time, 28 px per
merged token; Qwen3-VL: the same with 32 px and one run of tokens per merged frame after its timestamp;
LLaVA-OneVision: 2x2-pooled frame grids and one newline after the video):

* the family reads a video's layout from the processor's own output (grids, structural tokens);
* pruning a 4-frame video at K=0 and K=2 equals mask mode at prefill and at every cached decode step, and
  cached decoding equals recomputation;
* a prompt with an image and a video prunes each by its own budget (and still equals mask mode);
* Qwen3-VL's DeepStack additions land on the kept video tokens only (K below the last injection).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import test_engine
import torch
from test_engine import ATOL, DEVICE, DTYPE, _generate, _image, _same_tokens, _steps_close

import lmms_prune
from lmms_prune import conformance
from lmms_prune.families import get_adapter
from lmms_prune.toy.models import build_tiny_model

torch.set_num_threads(1)
toys = test_engine.toys  # the engine tests' models: LMMS_PRUNE_TEST_DEVICE / DTYPE, left padding
FAMILIES = ("qwen2_5_vl", "llava_onevision", "qwen3_vl")
FRAMES = 4
VIDEO_FPS = 1.0  # second_per_grid_ts = 2: unlike the default of 1 when none is passed


moving_square = conformance.moving_square


def _video_inputs(proc, with_image: bool = False, text: str = "Where does the square move?", frames: int = FRAMES):
    return conformance.video_inputs(proc, with_image, text, frames, fps=VIDEO_FPS, device=DEVICE, dtype=DTYPE)


def _video_span(model, inputs):
    spans = get_adapter(model).spans(inputs["input_ids"], inputs)[0]
    videos = [s for s in spans if s.video]
    assert len(videos) == 1
    return spans, videos[0]


def _random_keep(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


@pytest.mark.parametrize("family", FAMILIES)
def test_video_is_one_span_with_one_grid_per_merged_frame(toys, family):
    model, proc = toys(family)
    inputs = _video_inputs(proc)
    _, span = _video_span(model, inputs)
    ids = inputs["input_ids"][0]
    video_tokens = int((ids == model.config.video_token_id).sum())
    if family.startswith("qwen"):
        vp = proc.video_processor
        t, h, w = inputs["video_grid_thw"][0].tolist()
        assert t == FRAMES // vp.temporal_patch_size  # two frames merged in time
        assert span.grids == [(h // vp.merge_size, w // vp.merge_size)] * t
        # M-RoPE time of the video tokens: merged frames second_per_grid_ts * tokens_per_second apart
        pos = get_adapter(model).original_positions(inputs["input_ids"], inputs["attention_mask"], inputs)
        times = pos[1, 0, span.visual_positions].view(t, -1)
        assert bool((times == times[:, :1]).all())  # one time per merged frame
        if family == "qwen2_5_vl":  # (Qwen3-VL numbers frames by their timestamp text instead)
            step = model.config.vision_config.tokens_per_second * vp.temporal_patch_size / VIDEO_FPS
            assert (times[1:, 0] - times[:-1, 0]).tolist() == [step] * (t - 1)
    else:
        vc = model.config.vision_config
        side = math.ceil(vc.image_size // vc.patch_size / 2)  # 2x2 pooled frame grids
        assert span.grids == [(side, side)] * FRAMES
        assert span.structural == (span.length - 1,)  # the newline after the video (a video placeholder too)
        video_tokens -= 1
    assert span.num_visual == video_tokens == sum(r * c for r, c in span.grids)
    # every video token is inside the span; Qwen's structural tokens are the non-video ones inside (Qwen3-VL's
    # timestamps between frames)
    inside = ids[span.start: span.start + span.length] == model.config.video_token_id
    if family.startswith("qwen"):
        assert torch.equal(span.visual_index, torch.nonzero(inside).flatten())
    else:
        assert bool(inside.all())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k_layer", [0, 2])
def test_video_prune_equals_mask_mode_prefill_and_decode(toys, family, k_layer):
    model, proc = toys(family)
    inputs = _video_inputs(proc)
    _, span = _video_span(model, inputs)
    n = span.num_visual
    keep = _random_keep(n, max(1, n // 5), seed=k_layer + 1)
    mask, pruned = conformance.mask_and_prune(model, inputs, keep, k_layer)
    assert pruned.logits.shape[1] == inputs["input_ids"].shape[1] - n + len(keep)
    conformance.equal_prefill_and_decode(pruned, mask, test_engine.TOL)
    rec, index = pruned.records[0], pruned.index[0]
    assert rec.kept[0].tolist() == keep and rec.visual_before == n and rec.visual_after == len(keep)
    # structural tokens (timestamps, the newline) stay in the pruned sequence
    kept_positions = set(index.tolist())
    assert set(span.structural_positions.tolist()) <= kept_positions


@pytest.mark.parametrize("family", FAMILIES)
def test_video_cached_decoding_equals_recomputation(toys, family):
    model, proc = toys(family)
    inputs = _video_inputs(proc)
    _, span = _video_span(model, inputs)
    keep = _random_keep(span.num_visual, 12, seed=5)
    with torch.no_grad(), lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=2):
        cached_tokens, cached_steps = _generate(model, inputs)
        full_tokens, full_steps = _generate(model, inputs, use_cache=False)
    assert _same_tokens(cached_tokens, full_tokens, cached_steps, full_steps)
    assert _steps_close(cached_steps, full_steps, cached_tokens, full_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_video_keep_all_equals_unpruned(toys, family):
    model, proc = toys(family)
    inputs = _video_inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_tokens, ref_steps = _generate(model, inputs)
        with lmms_prune.apply(model, "fastv", keep_ratio=1.0, prune_layer=2) as handle:
            torch.testing.assert_close(model(**inputs).logits, ref, atol=ATOL, rtol=0)
            tokens, steps = _generate(model, inputs)
            assert handle.records[0].visual_after == handle.records[0].visual_before
    assert _same_tokens(tokens, ref_tokens, steps, ref_steps)
    assert _steps_close(steps, ref_steps, tokens, ref_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_and_video_prune_each_by_its_own_budget(toys, family):
    model, proc = toys(family)
    inputs = _video_inputs(proc, with_image=True)
    spans, video = _video_span(model, inputs)
    assert [s.video for s in spans] == [False, True]  # the image first, then the video, in prompt order
    ratio = 0.25
    with torch.no_grad():
        with lmms_prune.apply(model, "fastv", keep_ratio=ratio, prune_layer=2, mode="mask") as handle:
            mask_logits = model(**inputs).logits
            mask_tokens, mask_steps = _generate(model, inputs)
            mask_kept = [k.tolist() for k in handle.records[0].kept]
        with lmms_prune.apply(model, "fastv", keep_ratio=ratio, prune_layer=2) as handle:
            logits = model(**inputs).logits
            index = handle.state.keep_index[0]
            tokens, steps = _generate(model, inputs)
            rec = handle.records[0]
    assert len(rec.kept) == 2
    for span, kept in zip(spans, rec.kept):
        assert kept.numel() == max(1, round(ratio * span.num_visual))
        assert int(kept.max()) < span.num_visual
    assert rec.visual_before == sum(s.num_visual for s in spans)
    assert rec.visual_after == sum(k.numel() for k in rec.kept)
    assert [k.tolist() for k in rec.kept] == mask_kept
    torch.testing.assert_close(logits[0], mask_logits[0, index], atol=ATOL, rtol=0)
    assert _steps_close(steps, mask_steps, tokens, mask_tokens)
    assert _same_tokens(tokens, mask_tokens, steps, mask_steps)


def test_qwen3_vl_deepstack_on_video_lands_on_kept_tokens_only(toys):
    """K=1 is below Qwen3-VL's last DeepStack injection (3 layers): the engine adds the video's DeepStack
    features of layers >= 1 to the kept video tokens itself; dropping them changes the logits."""
    model, proc = toys("qwen3_vl")
    inputs = _video_inputs(proc)
    _, span = _video_span(model, inputs)
    keep = _random_keep(span.num_visual, 20, seed=7)
    with torch.no_grad():
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=1, mode="mask"):
            mask_logits = model(**inputs).logits
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=1) as handle:
            logits = model(**inputs).logits
            index = handle.state.keep_index[0]
            injections = handle.state.injections
        assert sorted(injections) == [1, 2]
        torch.testing.assert_close(logits[0], mask_logits[0, index], atol=ATOL, rtol=0)
        handle = lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=1)
        hooks = handle._hooks[-2:]  # the two injection hooks of layers 1 and 2
        for h in hooks:
            h.remove()
        dropped = model(**inputs).logits
        handle.remove()
    assert not torch.allclose(dropped[0], mask_logits[0, index], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "internvl_qwen2"])
def test_runner_takes_video_parts_and_prunes_image_and_video_by_their_own_budgets(family):
    """The harness-neutral runner: a conversation with an image and a ``{"type": "video", "video": frames}``
    part goes to the processor as ``videos=`` (Qwen: through qwen_vl_utils' frame pipeline, the part's fps
    setting the M-RoPE time step; InternVL: one tile per frame, the runner telling the engine which tiles form
    the video), and the engine prunes each by its own budget."""
    from lmms_prune.families import family_class as lookup
    from lmms_prune.runner import Runner, parse_options
    from lmms_prune.toy.models import tiny_model_dir

    family_class = lookup(family.split("_qwen2")[0])
    pixels = {"qwen2_5_vl": {"min_pixels": 3136, "max_pixels": 12544}, "internvl_qwen2": {"max_patches": 1}}.get(family, {})
    options, config = parse_options(family_class, f"{family}_fastv", "fastv", pretrained=str(tiny_model_dir(family)),
                                    device="cpu", dtype="float32", keep_ratio=0.25, **pixels)
    sampling = family_class.video_sampling(options.family)
    assert sampling == {"num_frames": 32, "fps": None}  # lmms-eval's defaults (max_num_frames / max_frames_num)
    runner = Runner(family_class, options, config, f"{family}_fastv")
    runner.setup_device()
    runner.load()
    runner.install()
    seen = {}
    hook = runner.model.register_forward_pre_hook(lambda m, a, kw: seen.setdefault("kw", kw) and None,
                                                with_kwargs=True)
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": _image((160, 120))},
        {"type": "video", "video": moving_square(FRAMES), "fps": 2.0},
        {"type": "text", "text": "Where does the square move?"}]}]
    try:
        [answer] = runner.generate([conversation], {"max_new_tokens": 3}, None)
    finally:
        hook.remove()
        runner.close()
    spans = runner.handle.records[0].spans
    assert [s.video for s in spans] == [False, True]
    assert answer.record["visual_after_per_image"] == [max(1, round(0.25 * s.num_visual)) for s in spans]
    video = spans[1]
    if family.startswith("qwen"):
        assert len(video.grids) == FRAMES // 2  # two frames merged in time
        assert seen["kw"]["second_per_grid_ts"].tolist() == [pytest.approx(2 / 2.0)]
    else:
        assert len(video.grids) == FRAMES
    with pytest.raises(ValueError, match="not a PIL image"):
        family_class.prepare_videos([{"type": "video", "video": [np.zeros((4, 4, 3))]}], options.family)


@pytest.mark.parametrize(("family", "method", "with_image"), [
    ("qwen2_5_vl", "divprune", False), ("qwen2_5_vl", "vispruner", True), ("llava_onevision", "divprune", True),
    ("llava_onevision", "vispruner", True), ("qwen3_vl", "divprune", False), ("qwen3_vl", "vispruner", True)])
def test_pre_llm_on_video_with_original_positions_equals_k0_of_the_same_set(toys, family, method, with_image):
    """Pre-LLM selection on a video (and an image beside it): dropping the tokens before the LLM at their
    original positions is exactly intra-LLM pruning of the same set at K=0, each span by its own budget."""
    model, proc = toys(family)
    inputs = _video_inputs(proc, with_image=with_image)
    spans, _ = _video_span(model, inputs)
    with torch.no_grad():
        with lmms_prune.apply(model, method, keep_ratio=0.1, positions="original") as handle:
            pre = model(**inputs).logits
            pre_tokens, pre_steps = _generate(model, inputs)
            rec = handle.records[0]
        assert [k.numel() for k in rec.kept] == [max(1, round(0.1 * s.num_visual)) for s in spans]
        kept = conformance.sample_index(rec)
        with lmms_prune.apply(model, "fixed", keep_indices=kept, prune_layer=0):
            k0 = model(**inputs).logits
            k0_tokens, k0_steps = _generate(model, inputs)
    torch.testing.assert_close(pre, k0, atol=ATOL, rtol=0)
    assert _same_tokens(pre_tokens, k0_tokens, pre_steps, k0_steps)
    assert _steps_close(pre_steps, k0_steps, pre_tokens, k0_tokens)


def test_onevision_video_importance_is_each_frames_received_attention_pooled_like_its_tokens(toys):
    """VisPruner on a OneVision video: each frame's mean received attention at the SigLIP feature layer,
    through the model's own 2x2 bilinear pooling, then a zero for the newline after the video."""
    from lmms_prune.engine.pre_llm import VisionCapture
    from lmms_prune.scores import cls_attention

    model, proc = toys("llava_onevision")
    adapter = get_adapter(model)
    inputs = _video_inputs(proc)
    attention = adapter.vision_feature_attention()
    grabbed = []
    hook = attention.register_forward_pre_hook(lambda m, args, kwargs: grabbed.append(kwargs["hidden_states"]),
                                               with_kwargs=True)
    with torch.no_grad(), lmms_prune.apply(model, "vispruner", keep_ratio=0.25) as handle:
        capture = VisionCapture(handle, need_cls=True)
        try:
            adapter.encode_videos(inputs)
        finally:
            capture.close()
            hook.remove()
        importance = adapter.vision_importance(capture.cls_rows, adapter.video_signal_kwargs(inputs))
    (hidden,) = grabbed
    frames, length, _ = hidden.shape
    q = attention.q_proj(hidden).reshape(frames, length, attention.num_heads, -1).transpose(1, 2).double()
    k = attention.k_proj(hidden).reshape(frames, length, attention.num_heads, -1).transpose(1, 2).double()
    probs = torch.softmax(q @ k.transpose(-1, -2) * attention.scale, dim=-1)
    received = torch.stack([cls_attention(p, has_cls=False) for p in probs]).float()  # [frames, P]
    side = int(length ** 0.5)
    pooled = torch.nn.functional.interpolate(received.reshape(frames, 1, side, side), mode="bilinear",
                                             size=(-(-side // 2), -(-side // 2))).reshape(-1)
    assert frames == FRAMES
    torch.testing.assert_close(importance, torch.cat([pooled, pooled.new_zeros(1)]), atol=1e-6, rtol=1e-5)
    _, span = _video_span(model, inputs)
    assert importance.shape == (span.length,)


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_llm_keep_all_on_video_equals_unpruned(toys, family):
    model, proc = toys(family)
    inputs = _video_inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
        with lmms_prune.apply(model, "divprune", keep_ratio=1.0, positions="original"):
            torch.testing.assert_close(model(**inputs).logits, ref, atol=ATOL, rtol=0)



def test_bench_video_geometry_is_a_32_frame_448px_video_and_any_preset_runs_on_it():
    """``qwen2_5_vl_7b_video``: 32 frames of 448x448 = 16 merged frames of 16x16 tokens (4096). The 7B widths
    are too heavy for a unit test, so the bench itself runs on the tiny model with the same video spec."""
    from types import SimpleNamespace

    from lmms_prune.bench import Bench, geometries, synthetic_inputs
    from lmms_prune.families.qwen2_5_vl import Qwen25VL

    fam, spec = geometries()["qwen2_5_vl_7b_video"]
    _, config = fam.build_geometry(spec, layers=1)
    gen = torch.Generator().manual_seed(0)
    pixels, extra = Qwen25VL.synthetic_video(SimpleNamespace(config=config), 4096, spec["video"], gen)
    assert extra["video_grid_thw"].tolist() == [[16, 32, 32]]  # 16 merged frames of 32x32 patches
    assert pixels.shape == (4096 * 4, 3 * 2 * 14 * 14)
    assert extra["second_per_grid_ts"].tolist() == [pytest.approx(1.0)]  # two frames at 2 fps
    with pytest.raises(ValueError, match="multiple of 256"):
        Qwen25VL.synthetic_video(SimpleNamespace(config=config), 1000, spec["video"], gen)

    model = build_tiny_model("qwen2_5_vl", seed=0)
    model.config.lmms_prune_bench_video = {"size": 112, "fps": 2.0}  # 4x4 tokens per merged frame
    inputs = synthetic_inputs(model, 64)
    [[span]] = get_adapter(model).spans(inputs["input_ids"], inputs)
    assert span.video and span.grids == [(4, 4)] * 4
    cells = Bench(model, repeats=1, warmup=0, decode_tokens=1).run(["fastv", "divprune"], [0.1], [64])
    assert [(c.method, c.visual_tokens, c.kept_tokens) for c in cells] == [
        ("none", 64, 64), ("fastv", 64, 6), ("divprune", 64, 6)]


def test_bench_keep_column_is_the_kept_share_where_the_method_never_reads_the_budget():
    """bench's video table runs every video method at one --keep. DyCoke never reads it (its K and the frame
    count set the count): its cell reports the share it kept, while the methods that read keep_ratio (FastVID's
    retention ratio, FastV) report the ratio they were given beside what they kept."""
    from lmms_prune.bench import Bench

    model = build_tiny_model("qwen2_5_vl", seed=0)
    model.config.lmms_prune_bench_video = {"size": 112, "fps": 2.0}  # 4 merged frames of 4x4 tokens
    cells = Bench(model, repeats=1, warmup=0, decode_tokens=1, e2e=False).run(
        ["dycoke", "fastvid", "fastv"], [0.25], [64], {"dycoke": {"dycoke_l": 2}})
    dycoke, fastvid, fastv = cells[1:]
    assert dycoke.keep_ratio == dycoke.kept_tokens / 64 != 0.25 and 16 < dycoke.kept_tokens < 64
    assert fastvid.keep_ratio == fastv.keep_ratio == 0.25 and fastv.kept_tokens == 16
    assert 0 < fastvid.kept_tokens <= 16


def _internvl_video(proc, frames):
    """A one-video InternVL prompt (448 px tiles: few frames keep the tests fast) and its ``video_frames``."""
    prompt = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "What changes?"}]}], add_generation_prompt=True)
    inputs = proc(text=[prompt], videos=[frames], return_tensors="pt", do_sample_frames=False).to(DEVICE)
    return {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in inputs.items()}, [[len(frames)]]


def test_internvl_video_is_one_span_of_frames_and_temporal_prunes_like_mask_mode(toys):
    """InternVL's processor writes a video as one-tile image runs ("Frame1: <img>...</img>\\nFrame2: ..."); with
    the request's frame counts the engine sees ONE video span, a 16x16 grid per frame, the text between frames
    structural. ``temporal`` on it: pruned equals mask mode at prefill and every cached decode step."""
    model, proc = toys("internvl_qwen2")
    inputs, video_frames = _internvl_video(proc, moving_square(2))
    adapter = get_adapter(model)
    runs = adapter.spans(inputs["input_ids"], inputs)
    assert [s.grids for s in runs[0]] == [[(16, 16)]] * 2 and not any(s.video for s in runs[0])
    [[span]] = adapter.join_videos(runs, video_frames)
    assert span.video and span.grids == [(16, 16)] * 2 and span.num_visual == 512
    ids = inputs["input_ids"][0]
    assert span.structural and not (ids[span.structural_positions] == adapter.image_token_id).any()
    assert bool((ids[span.visual_positions] == adapter.image_token_id).all())
    with pytest.raises(ValueError, match="accounts for 3 runs"):
        adapter.join_videos(runs, [[3]])
    with torch.no_grad():
        with lmms_prune.apply(model, "temporal", keep_ratio=0.25, mode="mask") as handle:
            handle.video_frames = video_frames
            mask_logits = model(**inputs).logits
            mask_tokens, mask_steps = _generate(model, inputs)
            mask_kept = handle.records[0].kept
        with lmms_prune.apply(model, "temporal", keep_ratio=0.25) as handle:
            handle.video_frames = video_frames
            logits = model(**inputs).logits
            index = handle.state.keep_index[0]
            tokens, steps = _generate(model, inputs)
            rec = handle.records[0]
    assert [s.video for s in rec.spans] == [True] and rec.visual_after == 128
    assert [k.tolist() for k in rec.kept] == [k.tolist() for k in mask_kept]
    assert set(span.structural_positions.tolist()) <= set(index.tolist())
    torch.testing.assert_close(logits[0], mask_logits[0, index], atol=ATOL, rtol=0)
    assert _steps_close(steps, mask_steps, tokens, mask_tokens)
    assert _same_tokens(tokens, mask_tokens, steps, mask_steps)


def test_internvl_temporal_drops_the_repeated_frame_of_a_static_clip(toys):
    """A clip of one frame shown twice: every cell of frame 2 repeats frame 1 (FrameFusion's redundancy), so
    keeping half the video's tokens keeps frame 1 whole; given as separate images (no video_frames) nothing
    has a previous frame and each frame keeps its own half. The tiny random model's decoder layers mix
    position into a repeated cell's state (cosine well below 1 on a few cells by layer 2), hence the loose
    threshold: the property is that the repetition is seen at all, across the frames of one span."""
    model, proc = toys("internvl_qwen2")
    frame = moving_square(1)[0]
    inputs, video_frames = _internvl_video(proc, [frame, frame.copy()])
    with torch.no_grad():
        with lmms_prune.apply(model, "temporal", keep_ratio=0.5, temporal_threshold=0.3) as handle:
            handle.video_frames = video_frames
            model(**inputs)
            [kept] = handle.records[0].kept
            handle.video_frames = None
            model(**inputs)
            per_frame = handle.records[0].kept
    assert kept.tolist() == list(range(256))
    assert [k.numel() for k in per_frame] == [128, 128]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_left_padded_batch_with_videos_equals_single_samples(toys, family):
    model, proc = toys(family)
    convs = [([{"type": "video"}], "Where does it go?", None),
             ([{"type": "image"}, {"type": "video"}], "Compare the picture with the clip, in detail please.",
              _image((160, 120)))]
    prompts = [proc.apply_chat_template([{"role": "user", "content": c + [{"type": "text", "text": t}]}],
                                        add_generation_prompt=True) for c, t, _ in convs]
    images = [im for _, _, im in convs if im is not None]

    def encode(texts, imgs, videos):
        out = proc(text=texts, images=imgs or None, videos=videos, return_tensors="pt", padding=True,
                   do_sample_frames=False).to(DEVICE)
        return {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in out.items()}

    batch = encode(prompts, images, [moving_square(), moving_square(FRAMES)[::-1]])
    singles = [encode([prompts[0]], [], [moving_square()]),
               encode([prompts[1]], images, [moving_square(FRAMES)[::-1]])]
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.25, prune_layer=2) as handle:
        tokens, steps = _generate(model, batch)
        batch_records = list(handle.records)
        for row, single in enumerate(singles):
            t1, s1 = _generate(model, single)
            assert [k.tolist() for k in handle.records[0].kept] == [k.tolist() for k in batch_records[row].kept]
            assert _same_tokens(tokens[row], t1[0], steps[row], s1[0])
            assert _steps_close(steps[row:row + 1], s1, tokens[row:row + 1], t1)
