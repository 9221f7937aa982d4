"""lmms-eval glue for the RefCOCO grounding tasks (InternVL's protocol, methods.md section 6).

The task YAMLs next to this file name these functions with absolute ``!function lmms_prune.tasks.refcoco.utils.X``
paths, so one module instance serves every task.

Per sample: the prompt ``Please provide the bounding box coordinate of the region this sentence describes:
<ref>{expression}</ref>`` after the image; the answer is parsed by `parse_box` and scored by IoU with the
ground-truth box. Per split: ``acc@0.5`` (percent of samples with IoU >= 0.5, the headline), ``mean_iou``
(in [0, 1]) and ``unparseable`` (number of answers with no readable box; they score IoU 0). Groups report
the unweighted mean of ``acc@0.5`` and ``mean_iou`` over their splits (the papers' "Avg" column) and the
sum of ``unparseable``.
"""

from __future__ import annotations

import io
from typing import Any

from lmms_eval.api.task import ConfigurableMessagesTask

from lmms_prune.tasks.refcoco import data
from lmms_prune.tasks.refcoco.parsing import Box, box_iou, parse_box

PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{expression}</ref>"
IOU_THRESHOLD = 0.5


class RefcocoGroundingTask(ConfigurableMessagesTask):
    """A chat task whose data source follows `lmms_prune.tasks.refcoco.data` (hub, local copy or jsonl).

    Only ``download`` differs from lmms-eval's ``ConfigurableMessagesTask``: hub and local copies go
    through lmms-eval's own ``datasets.load_dataset`` call (with the local directory as the path when
    ``LMMS_PRUNE_REFCOCO_DIR`` is set) and the YAML's ``process_docs`` explodes expressions; InternVL jsonl
    files are read directly into the same sample columns.

    Being a messages task, it serves lmms-eval chat models (``is_simple = False``: this package's wrappers,
    ``internvl_hf``, ``qwen2_5_vl``, ...); lmms-eval's simple-model wrappers expect other request arguments.
    """

    def __init__(self, *args: Any, config: dict | None = None, **kwargs: Any) -> None:
        if config is not None:
            config = {key: value for key, value in config.items() if key != "class"}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        family = data.family_of(self.config.dataset_path)
        jsonl = data.jsonl_source()
        if jsonl is None:
            self.DATASET_PATH = data.resolve_dataset_path(family)
            files = data.local_data_files(family)
            if files is not None:
                self.DATASET_PATH = "parquet"
                dataset_kwargs = {**(dataset_kwargs or {}), "data_files": files}
            super().download(dataset_kwargs)
            return
        from datasets import DatasetDict

        jsonl_dir, image_root = jsonl
        split = self.config.test_split
        self.dataset = DatasetDict({split: data.load_jsonl_split(family, split, jsonl_dir, image_root)})
        self.dataset_no_image = self.dataset  # images are paths here, nothing to strip


def process_docs(dataset):
    """lmms-eval ``process_docs``: hub rows (one per object) -> one sample per referring expression."""
    return data.explode_dataset(dataset)


def load_image(image: dict[str, Any] | str):
    """Decode a sample's image (an undecoded ``{"bytes", "path"}`` record or a file path) to RGB."""
    from PIL import Image

    if isinstance(image, dict):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    else:
        source = image
    with Image.open(source) as opened:
        return opened.convert("RGB")


def doc_to_visual(doc: dict) -> list:
    """The sample's image, decoded now (one PIL image)."""
    return [load_image(doc["image"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """InternVL's grounding prompt for the sample's expression."""
    del lmms_eval_specific_kwargs  # the protocol fixes the prompt
    return PROMPT.format(expression=doc["expression"])


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    """One user turn: the image, then the prompt."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": doc_to_visual(doc)[0]},
                {"type": "text", "text": doc_to_text(doc, lmms_eval_specific_kwargs)},
            ],
        }
    ]


def score_answer(answer: str, target: Box, width: int, height: int) -> dict[str, Any]:
    """``{"iou": float, "parsed": bool}`` for one answer; an unparseable answer has IoU 0."""
    predicted = parse_box(answer, width, height)
    if predicted is None:
        return {"iou": 0.0, "parsed": False}
    return {"iou": box_iou(predicted, target), "parsed": True}


def process_results(doc: dict, results: list[str]) -> dict[str, dict[str, Any]]:
    """lmms-eval ``process_results``: the same per-sample record for each of the three metrics."""
    answer = results[0] if results else ""
    x1, y1, x2, y2 = doc["box"]
    record = score_answer(answer, (x1, y1, x2, y2), doc["width"], doc["height"])
    return {"acc@0.5": record, "mean_iou": record, "unparseable": record}


def accuracy_at_05(records: list[dict[str, Any]]) -> float:
    """Percent of samples whose IoU is at least 0.5 (0.0 for an empty split)."""
    if not records:
        return 0.0
    return 100.0 * sum(r["iou"] >= IOU_THRESHOLD for r in records) / len(records)


def mean_iou(records: list[dict[str, Any]]) -> float:
    """Mean IoU over samples, unparseable answers counting as 0 (0.0 for an empty split)."""
    if not records:
        return 0.0
    return sum(r["iou"] for r in records) / len(records)


def unparseable_count(records: list[dict[str, Any]]) -> int:
    """Number of answers with no readable box."""
    return sum(not r["parsed"] for r in records)


def sum_over_splits(values: list[float], sizes: list[int], weight_by_size: bool = False) -> float:
    """Group aggregation for counts: the total over splits (``sizes``, ``weight_by_size`` are unused)."""
    del sizes, weight_by_size
    return sum(values)
