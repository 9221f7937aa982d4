"""``downsample`` (VTC-Bench's downsampling baseline) as a processor-level budget: per family, the images and
options :meth:`Family.budget_images` returns make the real (toy) processor yield about ``keep_ratio`` of the
tokens, against a re-creation of VTC-Bench's own resize (github.com/Chenfei-Liao/VTC-Bench, commit 983e443,
``external/DART/lmms-eval/lmms_eval/models/qwen2_vl.py``: ``resize((w // r, h // r), BICUBIC)``) and a brute
force over InternVL's tile counts; the families that cannot meet a budget refuse before any weights load."""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data as skdata

from lmms_prune.families import family_class
from lmms_prune.families.internvl import num_tiles
from lmms_prune.runner import parse_options
from lmms_prune.toy.models import build_processor

SIZES = [(640, 480), (1000, 333)]


def _image(size):
    return Image.fromarray(skdata.astronaut()).convert("RGB").resize(size)


def _qwen_tokens(proc, family, images, options):
    grid = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"] * len(images), images=images,
                return_tensors="pt", **family.processor_kwargs(options))["image_grid_thw"]
    merge = proc.image_processor.merge_size
    return [(int(h) // merge, int(w) // merge) for _, h, w in grid]


@pytest.fixture(scope="module")
def qwen():
    family = family_class("qwen2_5_vl")
    options = family.parse_model_args({"min_pixels": "3136", "max_pixels": "200704"})  # the toy's bounds
    return family, build_processor("qwen2_5_vl"), options


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("r", [2, 3])
def test_qwen_budget_matches_vtc_bench_resize(qwen, size, r):
    """keep_ratio = 1/r^2 gives VTC-Bench's integer factor r: the token grid equals, to one token per side,
    the grid of VTC-Bench's resize of the image the processor would have taken; full/after ~= r^2."""
    family, proc, options = qwen
    full_image = family.prepare_images([_image(size)], options)[0]
    (rows, cols), = _qwen_tokens(proc, family, [full_image], options)
    shrunk, new_options = family.budget_images([full_image], 1 / r**2, options, proc)
    (new_rows, new_cols), = _qwen_tokens(proc, family, shrunk, new_options)
    side = proc.image_processor.patch_size * proc.image_processor.merge_size
    vtc = full_image.resize((cols * side // r, rows * side // r), resample=Image.BICUBIC)  # VTC-Bench's rule
    low = {**options, "min_pixels": side * side}
    (vtc_rows, vtc_cols), = _qwen_tokens(proc, family, [vtc], low)
    assert abs(new_rows - vtc_rows) <= 1 and abs(new_cols - vtc_cols) <= 1
    assert abs(new_rows - rows / r) <= 0.5 and abs(new_cols - cols / r) <= 0.5  # nearest token per side


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_internvl_budget_is_the_closest_tile_count(size, keep_ratio):
    family = family_class("internvl")
    proc = build_processor("internvl3")
    options = family.parse_model_args({"max_patches": "6"})
    image = _image(size)
    same, new_options = family.budget_images([image], keep_ratio, options, proc)
    assert same == [image]
    counts = {m: num_tiles(*size, max_num=m) for m in range(1, 7)}  # brute force over max_patches
    best = min(abs(c - keep_ratio * counts[6]) for c in counts.values())
    chosen = new_options["max_patches"]
    assert abs(counts[chosen] - keep_ratio * counts[6]) == best
    pixel_values = proc.image_processor(images=[image], return_tensors="pt",
                                        **family.processor_kwargs(new_options))["pixel_values"]
    assert pixel_values.shape[0] == counts[chosen]  # the processor really cuts that many tiles


@pytest.mark.parametrize(("family", "args", "match"), [
    ("llava", {}, "fixed input"),
    ("llava_next", {}, "anyres grid"),
    ("llava_onevision", {}, "anyres grid"),
    ("internvl", {"crop_to_patches": "false"}, "crop_to_patches=true"),
    ("internvl", {"keep_ratio": "0.05"}, "raise keep_ratio to >= 0.0769"),
    ("qwen2_5_vl", {"keep_tokens": "16"}, "give keep_ratio instead"),
])
def test_downsample_refused_before_loading_with_the_reason(family, args, match):
    with pytest.raises(ValueError, match=match):
        parse_options(family_class(family), f"{family}_downsample", "downsample", pretrained="unused", **args)
