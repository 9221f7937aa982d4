"""Answer parsing and box geometry for RefCOCO grounding (methods.md section 6), in pure Python.

Boxes are ``(x1, y1, x2, y2)`` tuples of floats in pixels of the original image, with ``x1 <= x2`` and
``y1 <= y2``; a box's area is ``(x2 - x1) * (y2 - y1)`` (continuous coordinates, as InternVL's evaluation
computes IoU with ``torchvision.ops.box_iou``).

Reading an answer is two steps: find its four numbers (`answer_values`: the first ``"bbox_2d": [...]`` of a
Qwen JSON answer, else the first ``[[...]]``, else the first plain ``[x1, y1, x2, y2]``, else Qwen2-VL's
``(x1,y1),(x2,y2)``), then map them to original pixels in the model family's **box convention**. Each family
states its convention (``Family.box_convention``); our lmms-eval wrappers record, per sample, a **box frame**
(`BoxFrame` as a dict: the convention plus the numbers of that sample's real input geometry) and
`parse_box_in_frame` reads the answer with it:

- ``grid1000`` (InternVL, Qwen2-VL, Qwen3-VL): a 0-1000 grid over the original image; InternVL's own rule
  picks the scale: four values summing to at least 4 are on the grid, smaller sums are 0-1 fractions
  (`grid1000_to_original`).
- ``resized_pixels`` (Qwen2.5-VL ``bbox_2d``): absolute pixels of the image *as the model saw it*, i.e. the
  processor's resized input (``image_grid_thw`` times the patch size), each axis scaled back independently
  (`resized_pixels_to_original`). The frame carries the real resized size, so any ``min_pixels`` /
  ``max_pixels`` of the run maps back correctly.
- ``unit_padded_square`` (LLaVA-1.5 with ``image_aspect_ratio=pad``, LLaVA-NeXT, LLaVA-OneVision):
  ``[0, 1]`` fractions of the image padded to a centred square (LLaVA's ``expand2square``;
  `unit_padded_square_to_original`).
- ``unit_region`` (LLaVA-1.5 with ``image_aspect_ratio=crop``): ``[0, 1]`` fractions of the region of the
  original image the model saw (the centre crop, ``families.llava.crop_region``; `unit_region_to_original`).

After mapping, swapped corners are ordered and the box is clamped to the image.

Without a frame (lmms-eval's own wrappers, VLMEvalKit, a re-score of old answers) `parse_box` detects the
convention from the text alone: a ``"bbox_2d"`` key means Qwen2.5-VL resized pixels, mapped back through
the resize rule with the pixel limits it is given (default: those of lmms-eval's ``qwen2_5_vl`` wrapper,
`FALLBACK_MIN_PIXELS` / `FALLBACK_MAX_PIXELS`: right for a typical 640x480 COCO image under the common limit
settings, wrong for images the run's limits resize differently); anything else is read on InternVL's 0-1000
grid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

Box = tuple[float, float, float, float]

GRID = 1000.0
"""InternVL's box grid: coordinates in ``[0, 1000]`` over the original image."""

QWEN_FACTOR = 28
"""Qwen2.5-VL's resize factor: patch size 14 times the 2x2 spatial merge."""

QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 1280
"""Pixel limits of transformers' ``Qwen2VLImageProcessor`` defaults (``smart_resize``'s default bounds)."""

FALLBACK_MIN_PIXELS = 256 * 28 * 28
FALLBACK_MAX_PIXELS = 1605632
"""Pixel limits `parse_box` assumes for a ``bbox_2d`` answer without a box frame: those of lmms-eval's own
``qwen2_5_vl`` wrapper (its defaults, and this package's Qwen2.5-VL defaults), the likeliest source of a
frameless Qwen2.5-VL answer in this harness."""

CONVENTIONS = ("grid1000", "resized_pixels", "unit_padded_square", "unit_region")
"""Box conventions a frame may name (module docstring)."""

_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_DOUBLE_BRACKETS = re.compile(r"\[\[([^\[\]]*)\]\]")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_QWEN_BOX = re.compile(r"""["']?bbox_2d["']?\s*:\s*\[\s*\[?([^\[\]]*)\]""")
"""``"bbox_2d": [x1, y1, x2, y2]`` or the nested ``"bbox_2d": [[x1, y1, x2, y2]]``; group 1 holds the numbers."""
_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*"
_POINT_PAIR = re.compile(rf"\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)")
"""Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (the special tokens are gone from decoded text)."""


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


def _qwen_values(text: str) -> tuple[bool, list[float] | None]:
    """``(found, values)`` of the first ``"bbox_2d": [...]``: found is False without the key; values is None
    when the key holds anything but four finite numbers."""
    match = _QWEN_BOX.search(text)
    if match is None:
        return False, None
    values = _numbers(match.group(1))
    return True, values if values is not None and len(values) == 4 else None


def answer_values(text: Any) -> list[float] | None:
    """The four numbers of a grounding answer in any family's text format (module docstring), or None.

    Order: the first ``"bbox_2d": [...]`` (if the key is there but holds anything but four finite numbers,
    None: a malformed JSON answer is not rescued from elsewhere in the text), else InternVL's first ``[[...]]``
    or plain ``[x1, y1, x2, y2]``, else Qwen2-VL's ``(x1,y1),(x2,y2)``. None also for a non-string ``text``
    (e.g. None from a failed generation).
    """
    if not isinstance(text, str):
        return None
    found, values = _qwen_values(text)
    if found:
        return values
    values = _internvl_values(text)
    if values is not None:
        return values
    match = _POINT_PAIR.search(text)
    if match is not None:
        values = [float(v) for v in match.groups()]
        return values if all(math.isfinite(v) for v in values) else None
    return None


def grid1000_to_original(values: Sequence[float], width: int, height: int) -> Box:
    """Four numbers on the 0-1000 grid over the ``width x height`` image -> pixels (not clamped).

    InternVL's rule picks the scale: values summing to at least 4 are on the grid, smaller sums are 0-1
    fractions of the image size (a grid box that small is under 4 thousandths of the image: no correct answer
    changes).
    """
    scale = 1.0 / GRID if sum(values) >= 4 else 1.0
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1 * scale * width, y1 * scale * height, x2 * scale * width, y2 * scale * height)


def resized_pixels_to_original(values: Sequence[float], width: int, height: int, resized_width: int,
                               resized_height: int) -> Box:
    """Pixels of the model's resized ``resized_width x resized_height`` input -> original pixels (not clamped):
    `qwen_box_to_original`."""
    return qwen_box_to_original(tuple(float(v) for v in values), width, height, resized_width, resized_height)


def unit_padded_square_to_original(values: Sequence[float], width: int, height: int) -> Box:
    """``[0, 1]`` fractions of the image padded to a centred square -> original pixels (not clamped):
    ``lmms_prune.families.llava_next.padded_square_box_to_original``."""
    from lmms_prune.families.llava_next import padded_square_box_to_original

    return padded_square_box_to_original(values, width, height)


def unit_region_to_original(values: Sequence[float], region: Sequence[float]) -> Box:
    """``[0, 1]`` fractions of ``region`` = ``(x1, y1, x2, y2)`` in original pixels (the part of the image the
    model saw, e.g. LLaVA's centre crop) -> original pixels (not clamped)."""
    rx1, ry1, rx2, ry2 = (float(v) for v in region)
    if not (rx2 > rx1 and ry2 > ry1):
        raise ValueError(f"region={list(region)!r}: needs x2 > x1 and y2 > y1")
    x1, y1, x2, y2 = (float(v) for v in values)
    w, h = rx2 - rx1, ry2 - ry1
    return (rx1 + x1 * w, ry1 + y1 * h, rx1 + x2 * w, ry1 + y2 * h)


def check_frame(frame: dict[str, Any]) -> dict[str, Any]:
    """``frame`` if it is a valid box frame, else a ValueError naming what is wrong.

    A frame is a JSON-serialisable dict: ``convention`` (one of `CONVENTIONS`), the original ``width`` and
    ``height`` of the image, plus ``resized_width`` / ``resized_height`` (``resized_pixels``) or ``region``
    (``unit_region``). Families build them (``Family.box_frame``) from the processor's real output.
    """
    if not isinstance(frame, dict) or frame.get("convention") not in CONVENTIONS:
        raise ValueError(f"box frame {frame!r}: needs a convention, one of {', '.join(CONVENTIONS)}")
    need = {"width", "height"} | {"resized_pixels": {"resized_width", "resized_height"},
                                  "unit_region": {"region"}}.get(frame["convention"], set())
    missing = sorted(need - set(frame))
    if missing:
        raise ValueError(f"box frame {frame!r}: a {frame['convention']} frame needs {', '.join(missing)}")
    if int(frame["width"]) <= 0 or int(frame["height"]) <= 0:
        raise ValueError(f"box frame {frame!r}: width and height must be positive")
    return frame


def frame_to_original(values: Sequence[float], frame: dict[str, Any]) -> Box:
    """Four answer numbers -> original pixels (not clamped, corners as given) in the frame's convention."""
    check_frame(frame)
    width, height, convention = int(frame["width"]), int(frame["height"]), frame["convention"]
    if convention == "grid1000":
        return grid1000_to_original(values, width, height)
    if convention == "resized_pixels":
        return resized_pixels_to_original(values, width, height, int(frame["resized_width"]),
                                          int(frame["resized_height"]))
    if convention == "unit_padded_square":
        return unit_padded_square_to_original(values, width, height)
    return unit_region_to_original(values, frame["region"])


def parse_box_in_frame(text: Any, frame: dict[str, Any]) -> Box | None:
    """Parse a grounding answer with the sample's box frame (module docstring) into a pixel box on the
    original ``frame["width"] x frame["height"]`` image: `answer_values`, then `frame_to_original`, then
    corners ordered and the box clamped to the image. None when no box can be read."""
    check_frame(frame)
    values = answer_values(text)
    if values is None:
        return None
    box = frame_to_original(values, frame)
    return clamp_box(order_corners(box), int(frame["width"]), int(frame["height"]))


def parse_box(text: Any, width: int, height: int, min_pixels: int = FALLBACK_MIN_PIXELS,
              max_pixels: int = FALLBACK_MAX_PIXELS) -> Box | None:
    """Parse a grounding answer without a box frame, detecting the format from the text alone, into a pixel
    box ``(x1, y1, x2, y2)`` on the ``width x height`` image.

    Qwen2.5-VL format: the first ``"bbox_2d": [...]`` (also the nested ``[[...]]``) in resized-input pixels,
    the resized size from `smart_resize` with ``min_pixels`` / ``max_pixels`` (default: lmms-eval's
    ``qwen2_5_vl`` wrapper's, `FALLBACK_MIN_PIXELS` / `FALLBACK_MAX_PIXELS`). Anything else: InternVL's format
    (the first four numbers of the first ``[[...]]``, or a plain ``[x1, y1, x2, y2]``, or Qwen2-VL's
    ``(x1,y1),(x2,y2)``) on the 0-1000 grid, sums below 4 as 0-1 fractions. Swapped corners are ordered and the
    box is clamped to the image. Returns None when no box can be read (no brackets, fewer than four numbers, a
    non-numeric or non-finite item, empty text, or ``text`` not a string at all).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width={width}, height={height}: image size must be positive")
    if not isinstance(text, str):
        return None
    found, values = _qwen_values(text)
    if found:
        if values is None:
            return None
        resized_h, resized_w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        frame = {"convention": "resized_pixels", "width": width, "height": height,
                 "resized_width": resized_w, "resized_height": resized_h}
    else:
        values = answer_values(text)
        if values is None:
            return None
        frame = {"convention": "grid1000", "width": width, "height": height}
    return clamp_box(order_corners(frame_to_original(values, frame)), width, height)
