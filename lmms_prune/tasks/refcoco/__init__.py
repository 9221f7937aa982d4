"""RefCOCO grounding with InternVL's protocol: answer parsing, IoU, data sources and lmms-eval tasks.

Importing this package is light (pure Python parsing only); the lmms-eval glue lives in ``utils`` and the
task YAMLs next to it.
"""

from lmms_prune.tasks.refcoco.parsing import (
    Box,
    box_iou,
    clamp_box,
    order_corners,
    parse_box,
    qwen_box_to_original,
    smart_resize,
    xywh_to_xyxy,
)

__all__ = [
    "Box",
    "box_iou",
    "clamp_box",
    "order_corners",
    "parse_box",
    "qwen_box_to_original",
    "smart_resize",
    "xywh_to_xyxy",
]
