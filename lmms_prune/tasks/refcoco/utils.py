"""lmms-eval glue for the RefCOCO grounding tasks (InternVL's protocol, methods.md section 6).

The task YAMLs next to this file name these functions with absolute ``!function lmms_prune.tasks.refcoco.utils.X``
paths, so one module instance serves every task.

Per sample: the prompt ``Please provide the bounding box coordinate of the region this sentence describes:
<ref>{expression}</ref>`` after the image; the answer is parsed by `parse_box` and scored by IoU with the
ground-truth box. Per split: ``acc@0.5`` (percent of samples with IoU >= 0.5, the headline), ``mean_iou``
(in [0, 1]), ``unparseable`` (number of answers with no readable box; they score IoU 0) and
``image_errors`` (number of samples whose image could not be decoded: missing, empty, truncated or not an
image; they score IoU 0 and stay in the denominator of ``acc@0.5`` and ``mean_iou``, and their sample ids are
logged). Groups report the unweighted mean of ``acc@0.5`` and ``mean_iou`` over their splits (the papers'
"Avg" column) and the sums of ``unparseable`` and ``image_errors``.

Image errors: `doc_to_visual` decodes with `lmms_prune.images.load_image`, which raises ``ImageLoadError``
naming the sample id. With ``on_error=raise`` (the wrappers' default) the run stops there. With
``on_error=skip`` the wrapper skips the sample; `process_results` then finds the sample id among the failures
`doc_to_visual` recorded in this process (lmms-eval scores each rank's own samples on that rank, after its
generation) and counts an image error instead of an unparseable answer.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.task import ConfigurableMessagesTask
from loguru import logger as eval_logger

from lmms_prune.images import ImageLoadError, load_image
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
        split = self.config.test_split
        jsonl = data.jsonl_source()
        if jsonl is None:
            source = self.DATASET_PATH = data.resolve_dataset_path(family)
            files = data.local_data_files(family)
            if files is not None:
                data.require_split(family, split, sorted(files), source)
                self.DATASET_PATH = "parquet"
                dataset_kwargs = {**(dataset_kwargs or {}), "data_files": files}
            super().download(dataset_kwargs)
            data.require_split(family, split, sorted(self.dataset), source)
            return
        from datasets import DatasetDict

        jsonl_dir, image_root = jsonl
        self.dataset = DatasetDict({split: data.load_jsonl_split(family, split, jsonl_dir, image_root)})
        self.dataset_no_image = self.dataset  # images are paths here, nothing to strip


def process_docs(dataset):
    """lmms-eval ``process_docs``: hub rows (one per object) -> one sample per referring expression."""
    return data.explode_dataset(dataset)


_IMAGE_ERRORS: dict[str, str] = {}
"""sample_id -> the ``ImageLoadError`` message, for the samples whose image failed in this process."""


def doc_to_visual(doc: dict) -> list:
    """The sample's image, fully decoded now as RGB (one PIL image); ``ImageLoadError`` naming the sample id
    if it cannot be used (recorded for `process_results`)."""
    try:
        return [load_image(doc["image"], doc["sample_id"])]
    except ImageLoadError as err:
        _IMAGE_ERRORS[str(doc["sample_id"])] = str(err)
        raise


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


def score_answer(answer: Any, target: Box, width: int, height: int) -> dict[str, Any]:
    """``{"iou": float, "parsed": bool}`` for one answer; an unparseable answer (or not a string) has IoU 0."""
    predicted = parse_box(answer, width, height)
    if predicted is None:
        return {"iou": 0.0, "parsed": False}
    return {"iou": box_iou(predicted, target), "parsed": True}


def image_error_record(sample_id: str, error: str) -> dict[str, Any]:
    """The record of a sample whose image could not be used: IoU 0, counted under ``image_errors``."""
    return {"iou": 0.0, "parsed": False, "image_error": error, "sample_id": sample_id}


def process_results(doc: dict, results: list[Any]) -> dict[str, dict[str, Any]]:
    """lmms-eval ``process_results``: the same per-sample record for each of the four metrics.

    A sample whose image failed (recorded by `doc_to_visual`, or whose size could not be read when the data
    loaded) is an image error; any other answer is parsed, a missing or non-string one counting unparseable.
    """
    sample_id = str(doc.get("sample_id", ""))
    error = _IMAGE_ERRORS.get(sample_id)
    if error is None and (int(doc["width"]) <= 0 or int(doc["height"]) <= 0):
        error = f"sample {sample_id!r}: image size unreadable when the data loaded"
    if error is not None:
        record = image_error_record(sample_id, error)
    else:
        answer = results[0] if results else ""
        x1, y1, x2, y2 = doc["box"]
        record = score_answer(answer, (x1, y1, x2, y2), doc["width"], doc["height"])
    return {"acc@0.5": record, "mean_iou": record, "unparseable": record, "image_errors": record}


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
    """Number of answers with no readable box (image errors are counted apart, by `image_error_count`)."""
    return sum(not r["parsed"] and not r.get("image_error") for r in records)


def image_error_count(records: list[dict[str, Any]]) -> int:
    """Number of samples whose image could not be used; logs their sample ids and errors."""
    errors = [r for r in records if r.get("image_error")]
    if errors:
        eval_logger.warning(f"refcoco grounding: {len(errors)} of {len(records)} samples had an unusable image "
                            "(scored IoU 0, kept in the denominator): "
                            + "; ".join(str(r["image_error"]) for r in errors))
    return len(errors)


def sum_over_splits(values: list[float], sizes: list[int], weight_by_size: bool = False) -> float:
    """Group aggregation for counts: the total over splits (``sizes``, ``weight_by_size`` are unused)."""
    del sizes, weight_by_size
    return sum(values)
