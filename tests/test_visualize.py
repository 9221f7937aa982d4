"""Token geometry, token-box IoU, overlays and ``lmms-prune visualize``.

* ``token_boxes`` agrees with each family's real processor: as many boxes as the processor makes visual
  tokens, and every token's box holds the colours the processor fed that token (a gradient image: the
  pixels one token sees, de-normalised, average to the gradient at its box centre), which pins down tile
  order, raster order, the LLaVA centre crop and the thumbnail;
* boxes tile the image (or LLaVA's crop) exactly: no overlap inside a grid, areas sum to the covered area, the
  pixel mask of their union is full;
* token-box IoU equals hand-computed values on a toy grid;
* ``visualize`` runs end to end on the tiny InternVL model and its JSON agrees with the library functions.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lmms_prune.calibration import single_image_inputs
from lmms_prune.cli import visualize as cli_visualize
from lmms_prune.cli.main import COMMANDS
from lmms_prune.families.internvl import tiles_of as internvl_tiles
from lmms_prune.toy.models import build_processor, tiny_model_dir
from lmms_prune.viz import (
    box_mask,
    grid_labels,
    overlay_kept_tokens,
    parse_box,
    token_box_iou,
    token_boxes,
    token_views,
)

torch.set_num_threads(1)

SIZES = [(800, 400), (500, 700)]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def _gradient(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y (linear at pixel centres), blue constant."""
    x = (np.arange(width) + 0.5) / width
    y = (np.arange(height) + 0.5) / height
    rgb = np.stack([np.broadcast_to(x[None, :], (height, width)) * 255,
                    np.broadcast_to(y[:, None], (height, width)) * 255,
                    np.full((height, width), 128.0)], -1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def _expected_colours(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The gradient's (R, G) at each box centre: what a token seeing exactly that box averages to."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / width * 255
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / height * 255
    return torch.stack([cx, cy], -1)


def _denorm(pixels: torch.Tensor, stats, channel_dim: int) -> torch.Tensor:
    shape = [1] * pixels.dim()
    shape[channel_dim] = 3
    mean, std = (torch.tensor(v).reshape(shape) for v in stats)
    return (pixels * std + mean) * 255


def _processed_token_colours(family: str, inputs) -> torch.Tensor:
    """Mean (R, G) of the pixels each visual token was made from, read back from ``pixel_values``."""
    pv = inputs["pixel_values"].float()
    if family == "internvl":  # [tiles, 3, 448, 448] -> 16x16 tokens of 28x28 pixels per tile, row-major
        img = _denorm(pv, IMAGENET, 1)
        cells = img.reshape(img.shape[0], 3, 16, 28, 16, 28).mean((3, 5))  # [T, 3, 16, 16]
        return cells.permute(0, 2, 3, 1).reshape(-1, 3)[:, :2]
    if family.startswith("llava"):  # [1, 3, 336, 336] -> 24x24 tokens of 14x14
        img = _denorm(pv, CLIP, 1)
        cells = img.reshape(3, 24, 14, 24, 14).mean((2, 4))
        return cells.permute(1, 2, 0).reshape(-1, 3)[:, :2]
    # Qwen2.5-VL: rows are patches ordered (t, h/2, w/2, 2, 2), columns (C, temporal 2, 14, 14); a merged
    # token is 4 consecutive rows.
    patches = pv.reshape(-1, 4, 3, 2, 14, 14)
    return _denorm(patches.mean((1, 3, 4, 5)), CLIP, 1)[:, :2]


def _grids(family: str, inputs) -> list[tuple[int, int]]:
    if family == "internvl":
        return [(16, 16)] * inputs["pixel_values"].shape[0]
    if family.startswith("llava"):
        return [(24, 24)]
    _, h, w = inputs["image_grid_thw"][0].tolist()
    return [(h // 2, w // 2)]


def _overlap_area(boxes: torch.Tensor) -> float:
    """Total pairwise intersection area (each unordered pair once)."""
    b = boxes.double()
    lo, hi = torch.maximum(b[:, None, :2], b[None, :, :2]), torch.minimum(b[:, None, 2:], b[None, :, 2:])
    w, h = (hi - lo).clamp(min=0).unbind(-1)
    return float(torch.triu(w * h, diagonal=1).sum())


def _area(boxes: torch.Tensor) -> float:
    b = boxes.double()
    return float(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum())


@pytest.fixture(scope="module")
def processors():
    return {"internvl": build_processor("internvl_qwen2"), "qwen2_5_vl": build_processor("qwen2_5_vl"),
            "llava": build_processor("llava")}


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl", "llava", "llava_crop"])
def test_each_token_box_holds_the_pixels_the_processor_gave_that_token(processors, family, size):
    proc = processors[family.removesuffix("_crop")]
    image = _gradient(*size)
    if family == "llava_crop":  # image_aspect_ratio=crop: the processor's own resize + centre crop
        from lmms_prune.families.llava import Llava

        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        inputs = proc(images=[image], text=[proc.apply_chat_template(messages, add_generation_prompt=True)],
                      return_tensors="pt")
        boxes = Llava.token_boxes(size, [(24, 24)], proc, image_aspect_ratio="crop")
    else:  # LLaVA: the default image_aspect_ratio=pad (pad-to-square with the mean colour)
        inputs = single_image_inputs(proc, image, "Describe.", max_num=2)
        boxes = token_boxes(family, size, _grids(family, inputs), proc, max_num=2)
    grids = _grids(family, inputs)
    n_tokens = int((inputs["input_ids"] == proc.tokenizer.convert_tokens_to_ids(proc.image_token)).sum())
    assert boxes.shape == (n_tokens, 4) == (sum(r * c for r, c in grids), 4)
    got = _processed_token_colours(family, inputs)
    expected = _expected_colours(boxes, *size)
    if family == "llava":  # tokens whose cell lies wholly in the image (the others hold padding too)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        whole = areas > 0.999 * areas.max()
        assert int(whole.sum()) >= 24 * 24 * min(size) // max(size) - 2 * 24
        got, expected = got[whole], expected[whole]
    # Measured: < 0.3 levels everywhere; shifting every box by half a cell moves some token by >= 2.7 levels.
    assert (got - expected).abs().max() < 1.0


@pytest.mark.parametrize("size", SIZES + [(640, 480), (1000, 200)])
def test_internvl_boxes_tile_the_image_once_with_tiles_and_once_with_the_thumbnail(processors, size):
    width, height = size
    for max_num in (2, 6):
        pixels = single_image_inputs(processors["internvl"], _gradient(*size), "x", max_num)["pixel_values"]
        grids = [(16, 16)] * pixels.shape[0]
        boxes = token_boxes("internvl", size, grids, processors["internvl"], max_num=max_num)
        views = token_views("internvl", grids)
        for view in views.values():
            part = boxes[view]
            assert math.isclose(_area(part), width * height, rel_tol=1e-9)
            assert _overlap_area(part) < 1e-6
            assert bool(box_mask(part, size).all())
        if len(grids) > 1:
            assert set(views) == {"tiles", "thumbnail"} and int(views["thumbnail"].sum()) == 256
            cols, rows = internvl_tiles(size, grids, processors["internvl"], max_num=max_num)
            labels = grid_labels("internvl", size, grids, processors["internvl"], max_num=max_num)
            assert labels[-1] == "thumbnail" and labels[cols] == ("tile r2 c1" if rows > 1 else "thumbnail")
            # tile k covers column k % cols, row k // cols of a cols x rows split of the image
            for k in range(cols * rows):
                tile = boxes[256 * k: 256 * (k + 1)]
                r, c = divmod(k, cols)
                assert torch.allclose(tile[:, 0].min(), torch.tensor(c * width / cols))
                assert torch.allclose(tile[:, 3].max(), torch.tensor((r + 1) * height / rows))


@pytest.mark.parametrize("size", SIZES + [(333, 333)])
def test_qwen_boxes_tile_the_whole_image(size):
    grid = [(7, 13)]
    boxes = token_boxes("qwen2_5_vl", size, grid)
    assert boxes.shape == (91, 4)
    assert math.isclose(_area(boxes), size[0] * size[1], rel_tol=1e-9)
    assert _overlap_area(boxes) < 1e-6
    assert bool(box_mask(boxes, size).all())


@pytest.mark.parametrize("size", SIZES + [(336, 336)])
def test_llava_boxes_tile_the_centre_crop_only(processors, size):
    from lmms_prune.families.llava import Llava

    width, height = size
    boxes = Llava.token_boxes(size, [(24, 24)], processors["llava"], image_aspect_ratio="crop")
    side = min(width, height)  # the 336 crop of the shortest-edge resize is a centred square of this side
    x1, y1 = boxes[:, 0].min().item(), boxes[:, 1].min().item()
    x2, y2 = boxes[:, 2].max().item(), boxes[:, 3].max().item()
    assert abs((x2 - x1) - side) <= 2 and abs((y2 - y1) - side) <= 2
    assert abs(x1 - (width - x2)) <= 2 and abs(y1 - (height - y2)) <= 2  # centred
    assert math.isclose(_area(boxes), (x2 - x1) * (y2 - y1), rel_tol=1e-9)
    assert _overlap_area(boxes) < 1e-6
    assert int(box_mask(boxes, size).sum()) == pytest.approx((x2 - x1) * (y2 - y1), abs=2 * (side + 2))


def test_internvl_boxes_need_the_budget_the_image_was_tiled_with():
    # 640x480 with max_num=6 is 3x2 tiles + thumbnail = 7 grids; 3 grids came from max_num=2.
    with pytest.raises(ValueError, match=r"max_num=6: .*7 grids, but the image has 3"):
        token_boxes("internvl", (640, 480), [(16, 16)] * 3, max_num=6)
    with pytest.raises(ValueError, match="family='blip'"):
        token_boxes("blip", (640, 480), [(16, 16)])


# ------------------------------------------------------------------------------------------------ IoU, masks
def test_token_box_iou_hand_computed_on_a_4x4_grid():
    boxes = token_boxes("qwen2_5_vl", (40, 40), [(4, 4)])  # 10 px cells, row-major
    assert boxes[1].tolist() == [10.0, 0.0, 20.0, 10.0] and boxes[4].tolist() == [0.0, 10.0, 10.0, 20.0]
    # kept = cells 0, 1 (x 0..20, y 0..10: 200 px); box x 0..10, y 0..20 (200 px); overlap 100 px
    assert token_box_iou(boxes, [0, 1], (0, 0, 10, 20), (40, 40)) == pytest.approx(100 / 300)
    assert token_box_iou(boxes, [0, 1], (0, 0, 20, 10), (40, 40)) == 1.0
    assert token_box_iou(boxes, [15], (0, 0, 20, 10), (40, 40)) == 0.0
    # fractional box: pixel centres in [5, 15) are pixels 5..14 -> 100 px; cell 0 is pixels 0..9; overlap 5x5
    assert token_box_iou(boxes, [0], (5, 5, 15, 15), (40, 40)) == pytest.approx(25 / 175)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 1]] = True
    assert token_box_iou(boxes, mask, (0, 0, 10, 20), (40, 40)) == pytest.approx(100 / 300)
    assert token_box_iou(boxes, [], (0, 0, 10, 20), (40, 40)) == 0.0


def test_box_mask_uses_pixel_centres_and_bad_inputs_are_named():
    mask = box_mask(torch.tensor([[0.4, 0.0, 2.6, 1.0]]), (4, 2))  # centres 0.5, 1.5, 2.5 inside; 3.5 not
    assert mask.tolist() == [[True, True, True, False], [False, False, False, False]]
    boxes = token_boxes("qwen2_5_vl", (40, 40), [(4, 4)])
    with pytest.raises(ValueError, match=r"kept indices must be in \[0, 15\]"):
        token_box_iou(boxes, [16], (0, 0, 10, 10), (40, 40))
    with pytest.raises(ValueError, match="x1 < x2"):
        parse_box("10,10,5,20")
    with pytest.raises(ValueError, match="four numbers"):
        parse_box("1,2,3")
    with pytest.raises(ValueError, match="outside the 40x40 image"):
        parse_box("50,50,60,60", (40, 40))


def test_overlay_keeps_kept_cells_and_dims_the_rest():
    image = Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8))
    boxes = token_boxes("qwen2_5_vl", (40, 40), [(4, 4)])
    out = np.asarray(overlay_kept_tokens(image, boxes, [5], outline=False, dim=0.5))
    assert out.shape == (40, 40, 3)
    assert (out[10:20, 10:20] == 200).all()  # cell 5 = row 1, col 1
    assert (out[:10] == 100).all() and (out[20:] == 100).all()
    outlined = np.asarray(overlay_kept_tokens(image, boxes, [5], box=(0, 0, 40, 40)))
    assert (outlined[10, 10:20] != 200).any()  # kept cell outlined
    assert (outlined[0, :] != 100).all()  # box drawn over the image border


# ------------------------------------------------------------------------------------------------ CLI
def test_method_configs_validate_methods_and_json():
    method_args = '{"r_pivot": 0.5, "fastv": {"prune_layer": 3}}'
    configs = cli_visualize.method_configs("fastv,deepprune", 0.25, method_args)
    assert configs["fastv"].prune_layer == 3 and configs["fastv"].keep_ratio == 0.25
    assert configs["deepprune"].r_pivot == 0.5 and configs["deepprune"].prune_layer == 12
    with pytest.raises(ValueError, match="lmms-prune calibrate"):
        cli_visualize.method_configs("d2pruner", 0.1, None)
    with pytest.raises(ValueError, match="unknown method 'fastvv'"):
        cli_visualize.method_configs("fastvv", 0.1, None)
    with pytest.raises(ValueError, match="not valid JSON"):
        cli_visualize.method_configs("fastv", 0.1, "{bad")
    with pytest.raises(ValueError, match="dart, which is not in --methods"):
        cli_visualize.method_configs("fastv", 0.1, '{"dart": {"num_pivots": 2}}')
    assert COMMANDS["visualize"][0] == "visualize" and COMMANDS["diagnose"][0] == "diagnose"


def test_visualize_end_to_end_on_the_tiny_internvl(tmp_path):
    from lmms_prune.calibration import calibrate_to_file
    from lmms_prune.loading import load_model
    from lmms_prune.toy.data import generate_scenes

    model_dir = tiny_model_dir("internvl_qwen2")
    scene = next(generate_scenes(1, seed=3, width=800, height=400))
    image_path = tmp_path / "scene.png"
    scene.image.save(image_path)
    target = scene.objects[0]
    model, processor = load_model(str(model_dir), device="cpu")
    prior = calibrate_to_file(model, processor, [image_path], 1, tmp_path / "prior.pt", max_num=2,
                              model_name=str(model_dir))
    parser = argparse.ArgumentParser()
    cli_visualize.add_arguments(parser)
    out = tmp_path / "vis"
    args = parser.parse_args([
        "--model", str(model_dir), "--image", str(image_path), "--text", f"Where is {target.expression}?",
        "--methods", "fastv,d2pruner,deepprune", "--keep", "0.1", "--box", ",".join(map(str, target.box)),
        "--method-args", json.dumps({"d2pruner": {"bias_prior": str(prior)}}), "--max-num", "2",
        "--out", str(out), "--device", "cpu",
    ])
    assert cli_visualize.run(args) == 0
    with Image.open(out / "visualize.png") as png:
        assert png.size[0] > png.size[1] > 100
    summary = json.loads((out / "visualize.json").read_text())
    assert summary["views"] == ["tiles", "thumbnail"] and len(summary["grids"]) == 3  # 2x1 tiles + thumbnail
    boxes = token_boxes("internvl", scene.image.size, summary["grids"], processor, max_num=2)
    for method in ("fastv", "d2pruner", "deepprune"):
        res = summary["methods"][method]
        assert res["visual_tokens"] == 768 and res["kept"] == len(res["kept_indices"]) == round(0.1 * 768)
        assert sum(res["kept_per_view"].values()) == res["kept"]
        iou = token_box_iou(boxes, res["kept_indices"], target.box, scene.image.size)
        assert res["token_box_iou"] == pytest.approx(iou) and 0.0 <= iou <= 1.0
    assert len({tuple(summary["methods"][m]["kept_indices"]) for m in summary["methods"]}) > 1
