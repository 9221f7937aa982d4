"""Issue 17: LLaVA-1.5's pad-to-square (``image_aspect_ratio=pad``, the default; ``crop`` as an option), its
padding tokens reaching the engine and scoring 0 under trend debiasing, and ``trend_weights`` (a released
weight vector applied as ``A * w``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import lmms_prune
from lmms_prune.families.llava import Llava, expand2square
from lmms_prune.families.llava_next import LlavaNext
from lmms_prune.runner import Runner, parse_options
from lmms_prune.scores import pad_to_square_token_mask, resize_prior
from lmms_prune.toy.models import CLIP_MEAN, build_processor, build_tiny_model, tiny_model_dir

torch.set_num_threads(1)

SIZES = [(300, 220), (220, 300), (337, 100), (336, 336), (97, 301)]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference_square(image: Image.Image, mean) -> np.ndarray:
    """expand2square written with numpy: a canvas of int(m * 255), the image at ((S - w) // 2, (S - h) // 2)."""
    width, height = image.size
    side = max(width, height)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = [int(m * 255) for m in mean]
    left, top = (side - width) // 2, (side - height) // 2
    canvas[top: top + height, left: left + width] = np.asarray(image)
    return canvas


@pytest.fixture(scope="module")
def proc():
    return build_processor("llava")


@pytest.fixture(scope="module")
def toy():
    return build_tiny_model("llava"), build_processor("llava")


def _inputs(proc, images, options=None, text="Where is the red circle?"):
    """Processor inputs as the runner builds them: the family's image pipeline, then the processor."""
    options = Llava.parse_model_args(dict(options or {}))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    return proc(images=Llava.prepare_images(images, options, proc), text=[prompt], return_tensors="pt")


# ------------------------------------------------------------------------------------------------ the option
def test_pad_is_the_default_and_bad_values_are_refused_by_name():
    assert Llava.parse_model_args({})["image_aspect_ratio"] == "pad"
    assert Llava.parse_model_args({"image_aspect_ratio": "crop"})["image_aspect_ratio"] == "crop"
    with pytest.raises(ValueError, match=r"image_aspect_ratio='square': must be pad .* or crop"):
        Llava.parse_model_args({"image_aspect_ratio": "square"})
    # LLaVA-NeXT's anyres pads and tiles in its processor: the option is not one of its keys
    assert "image_aspect_ratio" not in LlavaNext.model_args
    assert "image_aspect_ratio" not in LlavaNext.parse_model_args({})


def test_a_bad_aspect_ratio_stops_the_run_before_the_weights_load(monkeypatch):
    import transformers

    from lmms_prune.models.wrappers import LlavaNextPrune_fastv, LlavaPrune_fastv

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load when the configuration is invalid")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    with pytest.raises(ValueError, match=r"image_aspect_ratio='letterbox': must be pad"):
        LlavaPrune_fastv(pretrained=str(tiny_model_dir("llava")), device="cpu", image_aspect_ratio="letterbox")
    with pytest.raises(ValueError, match=r"unknown --model_args key\(s\) image_aspect_ratio"):
        LlavaNextPrune_fastv(pretrained=str(tiny_model_dir("llava_next")), device="cpu", image_aspect_ratio="pad")


@pytest.mark.parametrize(("array", "shown"), [
    (None, r"trend_weights=.*missing.npy: no trend weight file there; pass a .npy vector"),
    (np.ones((24, 24)), r"trend_weights=.*bad.npy: shape \(24, 24\): must be a non-empty 1-D vector"),
    (np.array([1.0, np.nan, 0.5]), r"trend_weights=.*bad.npy: 1 of 3 weights are NaN or infinite"),
    (np.array([1.0, -0.2, 0.5]), r"trend_weights=.*bad.npy: the smallest weight is -0.2: weights must be >= 0"),
    (np.arange(5), r"trend_weights=.*bad.npy: dtype int64: the weights must be floating point"),
])
def test_bad_trend_weights_stop_the_run_before_the_weights_load(monkeypatch, tmp_path, array, shown):
    import transformers

    from lmms_prune.models.wrappers import LlavaPrune_trend

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load when the configuration is invalid")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    path = tmp_path / ("missing.npy" if array is None else "bad.npy")
    if array is not None:
        np.save(path, array)
    with pytest.raises((ValueError, FileNotFoundError), match=shown):
        LlavaPrune_trend(pretrained=str(tiny_model_dir("llava")), device="cpu", trend_weights=str(path))


def test_trend_takes_a_prior_or_weights_not_both(tmp_path):
    from lmms_prune.presets import resolve_config

    path = _weights(tmp_path, np.ones(576))
    with pytest.raises(ValueError, match=r"trend_weights=.* and bias_prior='p.pt': .* give one of them"):
        resolve_config("trend", trend_weights=path, bias_prior="p.pt")
    with pytest.raises(ValueError, match=r"needs a calibrated attention prior.*or pass trend_weights=PATH.npy"):
        resolve_config("trend")
    assert not resolve_config("trend", trend_weights=path).needs().prior
    assert resolve_config("pyramiddrop", score="trend", trend_weights=path).needs().padding
    with pytest.raises(ValueError, match="does not use trend_weights"):
        resolve_config("fastv", trend_weights=path)


# ------------------------------------------------------------------------------------------------ pixels
@pytest.mark.parametrize("size", SIZES)
def test_pad_images_are_expand2square_with_the_processor_mean(proc, size):
    image = _image(*size)
    (square,) = Llava.prepare_images([image], {"image_aspect_ratio": "pad"}, proc)
    reference = _reference_square(image, proc.image_processor.image_mean)
    assert np.array_equal(np.asarray(square), reference)
    assert np.array_equal(np.asarray(expand2square(image, (1, 2, 3))), _reference_square(image, (1 / 255, 2 / 255, 3.5 / 255)))
    got = _inputs(proc, [image])["pixel_values"]
    expected = proc(images=[Image.fromarray(reference)], text=["<image>"], return_tensors="pt")["pixel_values"]
    assert torch.equal(got, expected)


def test_pad_colour_follows_the_processor_and_grey_images_become_rgb(proc):
    custom = build_processor("llava")
    custom.image_processor.image_mean = [0.1, 0.5, 0.9]
    (square,) = Llava.prepare_images([_image(40, 20)], {"image_aspect_ratio": "pad"}, custom)
    assert tuple(np.asarray(square)[0, 0]) == (25, 127, 229)
    grey = Image.new("L", (30, 10), 200)
    (square,) = Llava.prepare_images([grey], {}, proc)  # no option given: the default, pad
    assert square.mode == "RGB" and square.size == (30, 30)
    assert tuple(np.asarray(square)[0, 0]) == tuple(int(m * 255) for m in CLIP_MEAN)
    assert tuple(np.asarray(square)[15, 15]) == (200, 200, 200)


@pytest.mark.parametrize("size", SIZES)
def test_crop_mode_is_the_processors_own_pipeline(proc, size):
    image = _image(*size)
    assert Llava.prepare_images([image], {"image_aspect_ratio": "crop"}, proc) == [image]
    got = _inputs(proc, [image], {"image_aspect_ratio": "crop"})["pixel_values"]
    assert torch.equal(got, proc(images=[image], text=["<image>"], return_tensors="pt")["pixel_values"])


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("size", SIZES + [(640, 480), (500, 333)])
def test_pad_token_boxes_tile_the_image_and_agree_with_the_padding_mask(proc, size):
    width, height = size
    boxes = Llava.token_boxes(size, [(24, 24)], proc).double()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # the 24x24 cells of the padded square, clipped to the image, cover it exactly once
    assert float(areas.sum()) == pytest.approx(width * height, rel=1e-9)
    cell = (max(width, height) / 24) ** 2
    fraction = areas / cell  # of each token's patch, the part that is the image
    mask = pad_to_square_token_mask(width, height, 24)
    clear = (fraction - 0.5).abs() > 1e-6  # away from exact halves, float geometry decides the same
    assert torch.equal(mask[clear], (fraction <= 0.5)[clear])
    assert bool(mask[areas == 0].all())
    if width == height:
        assert not mask.any()


def test_crop_token_boxes_are_unchanged(proc):
    from lmms_prune.families.llava import crop_region
    from lmms_prune.geometry import raster

    size = (640, 480)
    boxes = Llava.token_boxes(size, [(24, 24)], proc, image_aspect_ratio="crop")
    expected = raster(crop_region(size, proc), (24, 24))
    expected[:, 0::2] = expected[:, 0::2].clamp(0, 640)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, 480)
    assert torch.equal(boxes, expected.float())


def test_padding_tokens_hold_the_mean_colour(proc):
    """Read back from pixel_values: a token whose patch is entirely padding is the mean colour (0 after
    normalisation, up to int(m * 255) / 255), a token entirely inside the image is not."""
    image = _image(300, 150)
    pixels = _inputs(proc, [image])["pixel_values"][0]  # [3, 336, 336]
    cells = pixels.reshape(3, 24, 14, 24, 14).permute(1, 3, 0, 2, 4).reshape(576, -1)
    boxes = Llava.token_boxes(image.size, [(24, 24)], proc)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # padding cells away from the image edge (the resize's bicubic kernel reaches one cell past it)
    zero = torch.nn.functional.pad((areas == 0).view(1, 1, 24, 24).float(), (1, 1, 1, 1), value=1.0)
    far = torch.nn.functional.max_pool2d(1 - zero, 3, stride=1).view(576) == 0
    assert bool(far.any()) and float(cells[far].abs().max()) < 0.02
    assert float(cells[areas == areas.max()].abs().amax(1).min()) > 0.1


# ------------------------------------------------------------------------------------------------ masks
def test_padding_masks_follow_the_option(toy):
    model, proc = toy
    adapter = lmms_prune.apply(model, "none").adapter
    images = [[_image(300, 220), _image(220, 220)], [_image(100, 337)]]
    masks = adapter.padding_masks(images, Llava.parse_model_args({}), proc)
    assert [len(m) for m in masks] == [2, 1]
    for sample, got in zip(images, masks):
        for image, mask in zip(sample, got):
            assert torch.equal(mask, pad_to_square_token_mask(*image.size, 24))
    assert adapter.padding_masks(images, Llava.parse_model_args({"image_aspect_ratio": "crop"}), proc) is None


def test_a_processor_that_crops_the_square_is_refused_under_pad(toy):
    model, _ = toy
    proc = build_processor("llava")
    proc.image_processor.size = {"shortest_edge": 400}
    adapter = lmms_prune.apply(model, "none").adapter
    with pytest.raises(ValueError, match="image_aspect_ratio=pad: .*crop cuts the square.*image_aspect_ratio=crop"):
        adapter.padding_masks([[_image(300, 220)]], {"image_aspect_ratio": "pad"}, proc)


def test_the_engine_checks_the_masks_it_is_given(toy):
    model, proc = toy
    inputs = _inputs(proc, [_image(300, 220)])
    with torch.no_grad(), lmms_prune.apply(model, "fastv") as handle:
        handle.image_padding = [[torch.zeros(100, dtype=torch.bool)]]
        with pytest.raises(ValueError, match=r"image_padding: a mask must be bool \[576\]"):
            model(**inputs)
        handle.image_padding = [[None, None]]
        with pytest.raises(ValueError, match="image_padding of sample 0 has 2 masks for its 1 images"):
            model(**inputs)


# ------------------------------------------------------------------------------------------------ trend
def _scores(model, inputs, method, padding=None, **params):
    with torch.no_grad(), lmms_prune.apply(model, method, **params) as handle:
        handle.image_padding = padding
        model(**inputs)
        assert handle.image_padding is None  # taken by the prefill
        record = handle.records[0]
    return record.scores[0].double(), record.kept[0]


def _weights(tmp_path, values, name="w.npy"):
    path = tmp_path / name
    np.save(path, np.asarray(values, dtype=np.float64))
    return str(path)


def test_trend_weights_property_tests(toy, tmp_path):
    model, proc = toy
    image = _image(300, 220)
    inputs = _inputs(proc, [image])
    attention, fastv_kept = _scores(model, inputs, "fastv")  # the raw attention row of layer 1
    # a constant vector is no debiasing: the attention scaled, the same selection
    scores, kept = _scores(model, inputs, "trend", trend_weights=_weights(tmp_path, np.full(576, 0.25)))
    torch.testing.assert_close(scores, 0.25 * attention)
    assert torch.equal(kept, fastv_kept)
    # a vector of the exact token count is applied as it is
    w = np.random.default_rng(0).uniform(0.1, 1.0, 576)
    scores, kept = _scores(model, inputs, "trend", trend_weights=_weights(tmp_path, w, "exact.npy"))
    torch.testing.assert_close(scores, attention * torch.from_numpy(w))
    assert torch.equal(kept, torch.topk(attention * torch.from_numpy(w), 58).indices.sort().values)
    # a shorter one is resized linearly (the priors' rule)
    short = np.linspace(1.0, 0.3, 100) ** 2
    scores, _ = _scores(model, inputs, "trend", trend_weights=_weights(tmp_path, short, "short.npy"))
    torch.testing.assert_close(scores, attention * resize_prior(torch.from_numpy(short), 576))
    # padding is still zeroed
    pad = pad_to_square_token_mask(*image.size, 24)
    scores, kept = _scores(model, inputs, "trend", padding=[[pad]], trend_weights=_weights(tmp_path, w, "exact.npy"))
    assert pad.any() and bool((scores[pad] == 0).all())
    torch.testing.assert_close(scores[~pad], (attention * torch.from_numpy(w))[~pad])
    assert not set(kept.tolist()) & set(torch.nonzero(pad).flatten().tolist())


def test_fitted_trend_zeroes_padding_at_every_stage(toy, tmp_path):
    from lmms_prune.calibration import calibrate_prior
    from lmms_prune.engine.prior import save_prior
    from lmms_prune.scores import trend_debias

    model, proc = toy
    prior = calibrate_prior(model, proc, [_image(300, 220), _image(200, 310)], layer=1)
    path = str(save_prior(tmp_path / "p.pt", prior.means, prior.counts, prior.meta))
    image = _image(337, 150)
    inputs, pad = _inputs(proc, [image]), pad_to_square_token_mask(337, 150, 24)
    attention, _ = _scores(model, inputs, "fastv")
    scores, _ = _scores(model, inputs, "trend", padding=[[pad]], bias_prior=path)
    with torch.no_grad(), lmms_prune.apply(model, "trend", bias_prior=path) as handle:
        mu, sigma = handle.score.fit(576)
    torch.testing.assert_close(scores, trend_debias(attention, mu, sigma, pad_mask=pad))
    assert bool((scores[pad] == 0).all()) and bool((scores[~pad] > 0).all())
    # multi-stage (PyramidDrop with score=trend): every stage scores its padding tokens 0
    # (scored at K-1, the layer the prior was calibrated for; the preset's score_at='K' would need one at layer 2)
    with torch.no_grad(), lmms_prune.apply(model, "pyramiddrop", score="trend", bias_prior=path, score_at="K-1",
                                           prune_layers="2,6,10", stage_ratio=0.9) as handle:
        handle.image_padding = [[pad]]
        model(**inputs)
        st = handle.state
        present = st.stage_kept[-2][0][0]
        last = handle.records[0].scores[0]
    assert bool((last[pad[present]] == 0).all()) and bool(pad[present].any())
    before = torch.arange(576)
    for kept in (k[0][0] for k in st.stage_kept):  # a padding token survives a stage only after every other
        if bool(pad[kept].any()):
            assert set(before[~pad[before]].tolist()) <= set(kept.tolist())
        before = kept


# ------------------------------------------------------------------------------------------------ end to end
def _runner(method, **args):
    options, config = parse_options(Llava, f"llava_{method}", method, pretrained=str(tiny_model_dir("llava")),
                                    device="cpu", **args)
    runner = Runner(Llava, options, config, f"llava_{method}")
    runner.setup_device()
    runner.load()
    runner.install()
    return runner


def _run(runner, images):
    seen = []  # the pixels the vision tower encodes (generate encodes the images before the first forward)
    hook = runner.handle.adapter.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0] if args else kwargs["pixel_values"]).clone()),
        with_kwargs=True)
    try:
        conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "What is it?"}]}]
                         for image in images]
        runner.generate(conversations, {"max_new_tokens": 2}, None)
    finally:
        hook.remove()
    return seen[0], runner.handle.records


def test_padding_tokens_score_zero_end_to_end(tmp_path, proc):
    images = [_image(300, 180), _image(150, 260)]
    weights = _weights(tmp_path, np.linspace(1.0, 0.5, 576))
    runner = _runner("trend", trend_weights=weights, keep_ratio=0.5, batch_size=2)
    try:
        pixels, records = _run(runner, images)
        squares = [Image.fromarray(_reference_square(i, proc.image_processor.image_mean)) for i in images]
        expected = proc(images=squares, text=["<image>"] * 2, return_tensors="pt")["pixel_values"]
        assert torch.equal(pixels.float(), expected)
        for image, record in zip(images, records):
            pad = pad_to_square_token_mask(*image.size, 24)
            assert pad.any() and bool((record.scores[0][pad] == 0).all())
            assert bool((record.scores[0][~pad] > 0).all())
            assert not set(record.kept[0].tolist()) & set(torch.nonzero(pad).flatten().tolist())
    finally:
        runner.close()
    crop = _runner("trend", trend_weights=weights, keep_ratio=0.5, image_aspect_ratio="crop")
    try:
        pixels, records = _run(crop, images[:1])
        expected = proc(images=images[:1], text=["<image>"], return_tensors="pt")["pixel_values"]
        assert torch.equal(pixels.float(), expected)  # the processor's own output, as before
        assert crop.handle.state.image_padding is None
        assert bool((records[0].scores[0] > 0).all())
    finally:
        crop.close()


def test_overlays_see_the_padding_too(toy, tmp_path):
    """``viz.select_tokens`` (lmms-prune visualize) runs the default pipeline, pad-to-square, with its masks."""
    from lmms_prune.presets import resolve_config
    from lmms_prune.viz import select_tokens

    model, proc = toy
    image = _image(337, 100)
    config = resolve_config("trend", trend_weights=_weights(tmp_path, np.ones(576)), keep_ratio=0.2)
    selection = select_tokens(model, proc, image, "What is it?", {"trend": config})
    pad = pad_to_square_token_mask(337, 100, 24)
    assert int((~pad).sum()) > 0.2 * 576 and not bool(pad[selection.kept["trend"]].any())
    areas = (selection.boxes[:, 2] - selection.boxes[:, 0]) * (selection.boxes[:, 3] - selection.boxes[:, 1])
    assert float(areas.sum()) == pytest.approx(337 * 100, rel=1e-5)  # the pad geometry: cells tile the image
