"""``grounding_oracle``: an lmms-eval chat model that answers grounding requests from the ground truth.

It exists to test the RefCOCO grounding tasks end to end through lmms-eval, without a network:

- ``mode=exact``: the sample's true box in InternVL's answer format (0-1000 grid), so acc@0.5 must be 100%;
- ``mode=shift,iou=t``: the true box moved (horizontally if it fits, else vertically) by the distance that
  leaves IoU ``t`` with the truth (`shift_for_iou`), so acc@0.5 is 100% for ``t >= 0.5`` and 0% below,
  and mean IoU is ``t`` up to the grid rounding;
- ``mode=garbage``: text with digits and brackets but no box, so every answer must count as unparseable.

It reads each sample from ``self.task_dict[task][split][doc_id]`` (the exploded sample with ``box``,
``width``, ``height``, ``expression``) and checks what the task would send a real chat model: the
``doc_to_messages`` turn must hold the sample's image (at its original size) followed by a prompt quoting
the expression in ``<ref>...</ref>``.

Usage: ``lmms-eval --model grounding_oracle --model_args mode=shift,iou=0.6 --tasks refcoco``.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

Box = tuple[float, float, float, float]

MODES = ("exact", "shift", "garbage")
GARBAGE_ANSWER = "There are 2 of them [near the top], maybe 3."
"""An answer with numbers and brackets but no four-number box."""


def shift_for_iou(box: Box, iou: float, width: int, height: int) -> Box:
    """``box`` translated so that its IoU with the original is exactly ``iou`` and it stays inside the image.

    Moving a ``w x h`` box by ``d`` along x leaves an overlap of ``(w - d) h`` and a union of ``(w + d) h``,
    so IoU ``t`` needs ``d = w (1 - t) / (1 + t)``. Tries right, left, down, up, in that order.
    """
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou={iou}: must be in (0, 1]")
    x1, y1, x2, y2 = box
    dx = (x2 - x1) * (1.0 - iou) / (1.0 + iou)
    dy = (y2 - y1) * (1.0 - iou) / (1.0 + iou)
    if x2 + dx <= width:
        return (x1 + dx, y1, x2 + dx, y2)
    if x1 - dx >= 0:
        return (x1 - dx, y1, x2 - dx, y2)
    if y2 + dy <= height:
        return (x1, y1 + dy, x2, y2 + dy)
    if y1 - dy >= 0:
        return (x1, y1 - dy, x2, y2 - dy)
    raise ValueError(f"box={box} in a {width}x{height} image: too large to shift to iou={iou} inside the image")


def internvl_answer(expression: str, box: Box, width: int, height: int) -> str:
    """InternVL's grounding answer: ``<ref>expression</ref><box>[[x1, y1, x2, y2]]</box>`` on the 0-1000 grid."""
    grid = [round(1000 * v / size) for v, size in zip(box, (width, height, width, height))]
    return f"<ref>{expression}</ref><box>[[{grid[0]}, {grid[1]}, {grid[2]}, {grid[3]}]]</box>"


def _check_messages(messages: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    """Raise unless ``messages`` is one user turn: the sample's image, then a prompt with ``<ref>expression</ref>``."""
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise ValueError(f"doc_to_messages gave {len(messages)} turns; expected one user turn")
    content = messages[0]["content"]
    kinds = [item.get("type") for item in content]
    if kinds != ["image", "text"]:
        raise ValueError(f"doc_to_messages content types {kinds}: expected ['image', 'text'] (image first)")
    size = getattr(content[0]["url"], "size", None)
    if size != (doc["width"], doc["height"]):
        raise ValueError(f"image size {size} != the sample's ({doc['width']}, {doc['height']})")
    if f"<ref>{doc['expression']}</ref>" not in content[1]["text"]:
        raise ValueError(f"prompt {content[1]['text']!r} does not quote <ref>{doc['expression']}</ref>")


class GroundingOracle(lmms):
    """Chat model answering from the ground truth (see the module docstring); ``mode`` and ``iou`` are model_args."""

    is_simple = False

    def __init__(self, mode: str = "exact", iou: float = 0.6, **kwargs: Any) -> None:
        super().__init__()
        del kwargs  # batch_size, device, ...: nothing to configure
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {MODES}")
        if not 0.0 < float(iou) <= 1.0:
            raise ValueError(f"iou={iou}: must be in (0, 1]")
        self.mode = mode
        self.iou = float(iou)

    def answer(self, doc: dict[str, Any]) -> str:
        """The oracle's answer for one exploded grounding sample."""
        if self.mode == "garbage":
            return GARBAGE_ANSWER
        x1, y1, x2, y2 = (float(v) for v in doc["box"])
        box = (x1, y1, x2, y2)
        if self.mode == "shift":
            box = shift_for_iou(box, self.iou, doc["width"], doc["height"])
        return internvl_answer(doc["expression"], box, doc["width"], doc["height"])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in requests:
            _ctx, doc_to_messages, _gen_kwargs, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            _check_messages(doc_to_messages(doc), doc)
            answers.append(self.answer(doc))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("grounding_oracle only answers generate_until requests")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("grounding_oracle only answers single-round generate_until requests")
