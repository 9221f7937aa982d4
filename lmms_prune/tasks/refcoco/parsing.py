"""Answer parsing and box geometry for RefCOCO grounding (methods.md section 6), in pure Python.

Boxes are ``(x1, y1, x2, y2)`` tuples of floats in pixels of the original image, with ``x1 <= x2`` and
``y1 <= y2``; a box's area is ``(x2 - x1) * (y2 - y1)`` (continuous coordinates, as InternVL's evaluation
computes IoU with ``torchvision.ops.box_iou``).

Two answer formats are understood:

- InternVL: ``<ref>the dog</ref><box>[[x1, y1, x2, y2]]</box>`` on a 0-1000 grid over the original image,
  or a plain ``[x1, y1, x2, y2]``. InternVL's own rule picks the scale: four values summing to at least 4 are
  on the 0-1000 grid, smaller sums are 0-1 fractions of the image size.
- Qwen2.5-VL: JSON such as ``[{"bbox_2d": [x1, y1, x2, y2], "label": "the dog"}]`` in absolute pixels of
  the image *as the model saw it*, i.e. after Qwen2.5-VL's `smart_resize`. The ``"bbox_2d"`` key identifies
  the format; the box is mapped back with `qwen_box_to_original`, using the resize rule with the Qwen2-VL
  image processor's default pixel limits (for COCO-sized images every published limit setting gives the
  same resized size).
"""

from __future__ import annotations

import math
import re

Box = tuple[float, float, float, float]

GRID = 1000.0
"""InternVL's box grid: coordinates in ``[0, 1000]`` over the original image."""

QWEN_FACTOR = 28
"""Qwen2.5-VL's resize factor: patch size 14 times the 2x2 spatial merge."""

QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
"""Pixel limits of transformers' ``Qwen2VLImageProcessor`` defaults (``smart_resize`` bounds)."""

_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_DOUBLE_BRACKETS = re.compile(r"\[\[([^\[\]]*)\]\]")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_QWEN_BOX = re.compile(r"""["']?bbox_2d["']?\s*:\s*\[\s*\[?([^\[\]]*)\]""")
"""``"bbox_2d": [x1, y1, x2, y2]`` or the nested ``"bbox_2d": [[x1, y1, x2, y2]]``; group 1 holds the numbers."""


def _numbers(items: str) -> list[float] | None:
    """The comma-separated finite numbers in ``items`` (``"1, 2.5, -3"``), or None if any item is not a number
    or overflows to infinity (``1e999``)."""
    parts = [part.strip() for part in items.split(",")]
    if not all(_NUMBER.match(part) for part in parts):
        return None
    values = [float(part) for part in parts]
    return values if all(math.isfinite(v) for v in values) else None


def order_corners(box: Box) -> Box:
    """The same rectangle with ``x1 <= x2`` and ``y1 <= y2`` (swapped corners are put in order)."""
    x1, y1, x2, y2 = box
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def _tensor(box):
    """``[1, 4]`` float64 tensor of one box (torch imported on first use: task modules load at start-up)."""
    import torch

    return torch.tensor([[float(v) for v in box]], dtype=torch.float64)


def clamp_box(box: Box, width: int, height: int) -> Box:
    """``box`` clipped to the image ``[0, width] x [0, height]`` (``torchvision.ops.clip_boxes_to_image``); a box
    fully outside collapses to an edge."""
    from torchvision.ops import clip_boxes_to_image

    return tuple(float(v) for v in clip_boxes_to_image(_tensor(box), (int(height), int(width)))[0])


def xywh_to_xyxy(box: tuple[float, float, float, float] | list[float]) -> Box:
    """COCO ``[x, y, w, h]`` (top-left corner plus size, pixels) -> ``(x1, y1, x2, y2)``
    (``torchvision.ops.box_convert``)."""
    from torchvision.ops import box_convert

    return tuple(float(v) for v in box_convert(_tensor(box), "xywh", "xyxy")[0])


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (``torchvision.ops.box_iou``, float64); 0.0
    when the union has zero area."""
    from torchvision.ops import box_iou as tv_box_iou

    iou = float(tv_box_iou(_tensor(a), _tensor(b))[0, 0])
    return 0.0 if math.isnan(iou) else iou


def smart_resize(
    height: int,
    width: int,
    factor: int = QWEN_FACTOR,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL / Qwen2.5-VL input size ``(resized_height, resized_width)`` for an image of ``height x width``:
    transformers' own ``smart_resize`` (``Qwen2VLImageProcessor``), with the bounds this module documents."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as qwen_smart_resize

    if height <= 0 or width <= 0:
        raise ValueError(f"height={height}, width={width}: both must be positive")
    return tuple(int(v) for v in qwen_smart_resize(height, width, factor=factor, min_pixels=min_pixels,
                                                    max_pixels=max_pixels))


def qwen_box_to_original(box: Box, width: int, height: int, resized_width: int, resized_height: int) -> Box:
    """Map a box in pixels of the resized model input (``resized_width x resized_height``) to the original image.

    Qwen2.5-VL answers in absolute pixels of the image it was fed; each axis scales independently.
    """
    if resized_width <= 0 or resized_height <= 0:
        raise ValueError(f"resized_width={resized_width}, resized_height={resized_height}: both must be positive")
    sx, sy = width / resized_width, height / resized_height
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _internvl_values(text: str) -> list[float] | None:
    """The four numbers of an InternVL answer: first ``[[...]]`` (first four of >= 4 numbers), else the first
    plain ``[...]`` holding exactly four numbers."""
    match = _DOUBLE_BRACKETS.search(text)
    if match is not None:
        values = _numbers(match.group(1))
        return values[:4] if values is not None and len(values) >= 4 else None
    for match in _BRACKETS.finditer(text):
        values = _numbers(match.group(1))
        if values is not None and len(values) == 4:
            return values
    return None


def parse_box(text: str, width: int, height: int) -> Box | None:
    """Parse a model's grounding answer into a pixel box ``(x1, y1, x2, y2)`` on the ``width x height`` image.

    InternVL format (see the module docstring): the first four numbers of the first ``[[...]]``, or a plain
    ``[x1, y1, x2, y2]``; values summing to >= 4 are on the 0-1000 grid, otherwise 0-1 fractions. Qwen2.5-VL
    format: the first ``"bbox_2d": [...]`` in resized-input pixels, mapped back by `qwen_box_to_original`.
    The nested ``"bbox_2d": [[...]]`` some Qwen answers give is read the same way (resized pixels).
    Swapped corners are ordered and the box is clamped to the image. Returns None when no box can be read
    (no brackets, fewer than four numbers, a non-numeric or non-finite item, empty text, or ``text`` not a
    string at all, e.g. None from a failed generation).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width={width}, height={height}: image size must be positive")
    if not isinstance(text, str):
        return None
    qwen = _QWEN_BOX.search(text)
    if qwen is not None:
        values = _numbers(qwen.group(1))
        if values is None or len(values) != 4:
            return None
        resized_h, resized_w = smart_resize(height, width)
        box = qwen_box_to_original((values[0], values[1], values[2], values[3]), width, height, resized_w, resized_h)
    else:
        values = _internvl_values(text)
        if values is None:
            return None
        scale = 1.0 / GRID if sum(values) >= 4 else 1.0
        box = (values[0] * scale * width, values[1] * scale * height, values[2] * scale * width,
               values[3] * scale * height)
    return clamp_box(order_corners(box), width, height)
