"""RefCOCO answer parsing and box geometry (lmms_prune.tasks.refcoco.parsing), methods.md section 6."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmms_prune.tasks.refcoco import (
    box_iou,
    clamp_box,
    order_corners,
    parse_box,
    qwen_box_to_original,
    smart_resize,
    xywh_to_xyxy,
)

W, H = 640, 480
# [[100, 200, 500, 800]] on InternVL's 0-1000 grid of a 640 x 480 image:
GRID_BOX = (64.0, 96.0, 320.0, 384.0)

PARSE_CASES = [
    # (id, answer, expected pixel box or None)
    ("internvl_grid", "<ref>the dog</ref><box>[[100, 200, 500, 800]]</box>", GRID_BOX),
    ("plain_list", "[100, 200, 500, 800]", GRID_BOX),
    ("no_spaces", "<box>[[100,200,500,800]]</box>", GRID_BOX),
    ("decimals_on_grid", "[[100.0, 200.0, 500.0, 800.0]]", GRID_BOX),
    ("relative_0_1", "[[0.1, 0.2, 0.5, 0.8]]", GRID_BOX),
    ("relative_plain", "[0.1, 0.2, 0.5, 0.8]", GRID_BOX),
    ("swapped_corners", "[[500, 800, 100, 200]]", GRID_BOX),
    ("swapped_x_only", "[[500, 200, 100, 800]]", GRID_BOX),
    ("negative_clamped", "[[-50, 200, 500, 800]]", (0.0, 96.0, 320.0, 384.0)),
    ("out_of_image_clamped", "[[100, 200, 1200, 1500]]", (64.0, 96.0, 640.0, 480.0)),
    ("fully_outside_collapses", "[[1100, 1100, 1200, 1200]]", (640.0, 480.0, 640.0, 480.0)),
    ("multiple_boxes_first_wins", "[[100, 200, 500, 800]] and [[0, 0, 10, 10]]", GRID_BOX),
    ("double_before_plain", "[0, 0, 10, 10] then [[100, 200, 500, 800]]", GRID_BOX),
    ("text_around", "Sure! It is here: <box>[[100, 200, 500, 800]]</box>. Anything else?", GRID_BOX),
    ("first_four_of_five", "[[100, 200, 500, 800, 900]]", GRID_BOX),
    ("plain_after_non_numeric_brackets", "[the dog] is at [100, 200, 500, 800]", GRID_BOX),
    ("sum_exactly_4_is_grid", "[[1, 1, 1, 1]]", (0.64, 0.48, 0.64, 0.48)),
    ("sum_below_4_is_relative", "[[0.5, 0.5, 1.0, 1.99]]", (320.0, 240.0, 640.0, 480.0)),
    ("empty", "", None),
    ("no_box", "I cannot find that object.", None),
    ("three_numbers", "[[100, 200, 500]]", None),
    ("three_numbers_plain", "[100, 200, 500]", None),
    ("non_numeric", "[[a, b, c, d]]", None),
    ("one_word_in_box", "[[100, 200, 500, eight hundred]]", None),
    ("no_commas", "[[100 200 500 800]]", None),
    ("unclosed", "[[100, 200, 500, 800", None),
    ("empty_brackets", "[[]]", None),
    ("five_plain_numbers", "[100, 200, 500, 800, 900]", None),
    ("overflow_to_infinity", "[[1e999, 200, 500, 800]]", None),
    ("overflow_plain", "[100, 200, 1e999, 800]", None),
    ("negative_overflow", "[[-1e999, 200, 500, 800]]", None),
]


@pytest.mark.parametrize(("answer", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_parse_box_table(answer, expected):
    got = parse_box(answer, W, H)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-9)


def test_qwen_bbox_2d_is_mapped_back_through_the_resize_rule():
    # 1000 x 700: Qwen2.5-VL sees 1008 x 700 (sides rounded to multiples of 28), so x shrinks by 1000/1008.
    width, height = 1000, 700
    assert smart_resize(height, width) == (700, 1008)
    answer = '```json\n[{"bbox_2d": [100.8, 70, 504, 350], "label": "the dog"}]\n```'
    assert parse_box(answer, width, height) == pytest.approx((100.0, 70.0, 500.0, 350.0))


def test_qwen_bbox_2d_wins_over_other_brackets_and_is_clamped():
    answer = 'Found [1 object]: {"bbox_2d": [-10, 20, 2000, 300]}'
    x1, y1, x2, y2 = parse_box(answer, 1000, 700)
    assert (x1, x2) == (0.0, 1000.0)
    assert (y1, y2) == pytest.approx((20.0, 300.0))


def test_nested_qwen_bbox_2d_is_read_in_resized_pixels_like_the_flat_one():
    width, height = 1000, 700
    flat = parse_box('[{"bbox_2d": [100.8, 70, 504, 350]}]', width, height)
    nested = parse_box('[{"bbox_2d": [[100.8, 70, 504, 350]], "label": "the dog"}]', width, height)
    assert nested == flat == pytest.approx((100.0, 70.0, 500.0, 350.0))
    # not the InternVL 0-1000 grid, which would read x1 = 100.8 / 1000 * 1000 and y1 = 70 / 1000 * 700
    assert nested != pytest.approx((100.8, 49.0, 504.0, 245.0))


@pytest.mark.parametrize("answer", [None, 5, 3.5, ["[[1, 2, 3, 4]]"], b"[[1, 2, 3, 4]]", {"bbox_2d": [1, 2, 3, 4]}])
def test_non_string_answers_are_unparseable(answer):
    assert parse_box(answer, W, H) is None


@pytest.mark.parametrize("answer", ['{"bbox_2d": [1, 2, 3]}', '{"bbox_2d": []}', '{"bbox_2d": [a, b, c, d]}',
                                    '{"bbox_2d": [1e999, 2, 3, 4]}', '{"bbox_2d": [[1, 2, 3]]}'])
def test_malformed_qwen_answer_is_none(answer):
    assert parse_box(answer, 640, 480) is None


@pytest.mark.parametrize(("width", "height"), [(0, 480), (640, 0), (-1, 5)])
def test_parse_box_rejects_bad_image_size(width, height):
    with pytest.raises(ValueError, match="image size must be positive"):
        parse_box("[[1, 2, 3, 4]]", width, height)


@given(
    st.integers(min_value=-200, max_value=1200),
    st.integers(min_value=-200, max_value=1200),
    st.integers(min_value=-200, max_value=1200),
    st.integers(min_value=-200, max_value=1200),
    st.integers(min_value=1, max_value=4000),
    st.integers(min_value=1, max_value=4000),
)
def test_parsed_boxes_are_ordered_and_inside_the_image(a, b, c, d, width, height):
    box = parse_box(f"<box>[[{a}, {b}, {c}, {d}]]</box>", width, height)
    assert box is not None
    x1, y1, x2, y2 = box
    assert 0 <= x1 <= x2 <= width
    assert 0 <= y1 <= y2 <= height


def test_box_iou_hand_computed():
    a = (0.0, 0.0, 10.0, 10.0)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, (5.0, 0.0, 15.0, 10.0)) == pytest.approx(50 / 150)  # half overlap along x
    assert box_iou(a, (2.0, 2.0, 4.0, 4.0)) == pytest.approx(4 / 100)  # contained
    assert box_iou(a, (10.0, 0.0, 20.0, 10.0)) == 0.0  # touching edges
    assert box_iou(a, (30.0, 30.0, 40.0, 40.0)) == 0.0  # disjoint
    assert box_iou(a, (5.0, 5.0, 15.0, 15.0)) == pytest.approx(25 / 175)  # corner overlap
    assert box_iou((1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0)) == 0.0  # zero-area union


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=8, max_size=8))
def test_box_iou_is_symmetric_and_in_unit_interval(v):
    a, b = order_corners(tuple(v[:4])), order_corners(tuple(v[4:]))
    assert box_iou(a, b) == pytest.approx(box_iou(b, a))
    assert 0.0 <= box_iou(a, b) <= 1.0 + 1e-12


def test_geometry_helpers():
    assert xywh_to_xyxy([10, 20, 30, 40]) == (10.0, 20.0, 40.0, 60.0)
    assert order_corners((5.0, 8.0, 1.0, 2.0)) == (1.0, 2.0, 5.0, 8.0)
    assert clamp_box((-5.0, -1.0, 700.0, 100.0), 640, 480) == (0.0, 0.0, 640.0, 100.0)


SIZES = [(480, 640), (700, 1000), (20, 30), (4000, 6000), (100, 2000), (1, 150), (427, 640), (28, 28)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_smart_resize_matches_transformers(height, width):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    assert smart_resize(height, width) == reference(height, width)
    assert smart_resize(height, width, min_pixels=256 * 28 * 28, max_pixels=1605632) == reference(
        height, width, min_pixels=256 * 28 * 28, max_pixels=1605632
    )


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_smart_resize_properties(height, width):
    resized_h, resized_w = smart_resize(height, width)
    assert resized_h % 28 == 0 and resized_w % 28 == 0
    assert resized_h * resized_w <= 28 * 28 * 1280
    assert resized_h * resized_w >= 56 * 56


def test_smart_resize_rejects_bad_sizes():
    with pytest.raises(ValueError, match="must be positive"):
        smart_resize(0, 10)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 1000)


def test_qwen_box_round_trip():
    width, height = 640, 427
    resized_h, resized_w = smart_resize(height, width)
    original = (32.0, 40.5, 300.0, 400.0)
    in_resized = (original[0] * resized_w / width, original[1] * resized_h / height,
                  original[2] * resized_w / width, original[3] * resized_h / height)
    back = qwen_box_to_original(in_resized, width, height, resized_w, resized_h)
    assert back == pytest.approx(original)
    assert all(math.isfinite(v) for v in back)
    with pytest.raises(ValueError, match="resized_width=0"):
        qwen_box_to_original(original, width, height, 0, resized_h)
