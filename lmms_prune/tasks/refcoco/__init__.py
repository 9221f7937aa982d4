"""RefCOCO grounding with InternVL's protocol: answer parsing (each family's box convention), IoU, data sources
and lmms-eval tasks.

Importing this package is light (pure Python parsing only); the lmms-eval glue lives in ``utils`` and the
task YAMLs next to it.
"""

from lmms_prune.tasks.refcoco.parsing import (
    Box,
    answer_values,
    box_iou,
    check_frame,
    clamp_box,
    order_corners,
    parse_box,
    parse_box_in_frame,
    qwen_box_to_original,
    smart_resize,
    xywh_to_xyxy,
)

__all__ = [
    "Box",
    "answer_values",
    "box_iou",
    "check_frame",
    "clamp_box",
    "order_corners",
    "parse_box",
    "parse_box_in_frame",
    "qwen_box_to_original",
    "smart_resize",
    "xywh_to_xyxy",
]
