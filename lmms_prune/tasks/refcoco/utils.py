"""lmms-eval glue for the RefCOCO grounding tasks (InternVL's protocol, methods.md section 6).

The task YAMLs next to this file name these functions with absolute ``!function lmms_prune.tasks.refcoco.utils.X``
paths, so one module instance serves every task.

Per sample: the image, then the grounding prompt of the model's family for the sample's expression (the YAML's
``lmms_eval_specific_kwargs``, keyed by family, chosen by `specific_kwargs`; InternVL's ``Please provide the
bounding box coordinate of the region this sentence describes: <ref>{expression}</ref>`` by default). The
answer is parsed in the family's own box convention and scored by IoU with the ground-truth box:

- with a **box frame** (`record_box_frame`): our wrappers record one per sample from the processor's real
  output (``Family.box_frame``: e.g. Qwen2.5-VL's resized size from ``image_grid_thw``) before lmms-eval
  scores it; `process_results` reads the answer with it (``parsing.parse_box_in_frame``) and puts it in the
  sample's record (``box_frame``, in the ``--log_samples`` lines), so the answer can be re-scored later;
- without one (lmms-eval's own wrappers ``internvl_hf``, ``qwen2_5_vl``, ``qwen3_vl``, ``llava_hf``, ...): the
  family named by the run's ``--model`` (`model_family`) gives a frame from the original image size where its
  convention needs nothing else (`fallback_frame`); otherwise (Qwen2.5-VL, an unknown model, VLMEvalKit) the
  format is detected from the text alone (``parsing.parse_box``: ``bbox_2d`` = Qwen2.5-VL pixels of the
  resize under lmms-eval's ``qwen2_5_vl`` default pixel limits, anything else the 0-1000 grid).

Per split: ``acc@0.5`` (percent of samples with IoU >= 0.5, the headline), ``mean_iou``
(in [0, 1]), ``unparseable`` (number of answers with no readable box; they score IoU 0), ``bad_gt`` (number
of samples whose ground-truth box cannot be scored: zero-size, outside the image, NaN or inf, not four numbers;
``data.degenerate_box``, the rule `lmms-prune data check` applies; they are left out of ``acc@0.5`` and
``mean_iou`` and each is logged with its sample id) and ``image_errors`` (number of samples whose image could
not be decoded: missing, empty, truncated, too large or not an image; they score IoU 0 and stay in the denominator of ``acc@0.5`` and ``mean_iou``, and their sample ids are
logged). Groups report the unweighted mean of ``acc@0.5`` and ``mean_iou`` over their splits (the papers'
"Avg" column) and the sums of ``unparseable``, ``image_errors`` and ``bad_gt``.

Image errors: `doc_to_visual` decodes with `lmms_prune.images.load_image`, which raises ``ImageLoadError``
naming the sample id. With ``on_error=raise`` (the wrappers' default) the run stops there. With
``on_error=skip`` the wrapper skips the sample; `process_results` then finds the sample's (task, sample id)
among the failures `doc_to_visual` recorded in this process (`RefcocoGroundingTask` hands both functions its
task name: sample ids repeat across tasks) (lmms-eval scores each rank's own samples on that rank, after its
generation) and counts an image error instead of an unparseable answer. Box frames live in this process the
same way.
"""

from __future__ import annotations

import copy
from typing import Any

from lmms_eval.api.task import ConfigurableMessagesTask
from loguru import logger as eval_logger

from lmms_prune.images import ImageLoadError, load_image
from lmms_prune.tasks.refcoco import data
from lmms_prune.tasks.refcoco.parsing import Box, box_iou, check_frame, parse_box, parse_box_in_frame

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

    def _prepare_model_specific_config(self) -> None:
        """lmms-eval's, keeping the YAML's ``lmms_eval_specific_kwargs`` entries for the property below."""
        given = copy.deepcopy(self.config.lmms_eval_specific_kwargs)
        super()._prepare_model_specific_config()
        if given is not None:
            self.config.lmms_eval_specific_kwargs = given  # lmms-eval's default branch updates it in place
        self._specific_entries = given

    @property
    def lmms_eval_specific_kwargs(self) -> dict | None:
        """The entry of the run's model family (`specific_kwargs`), resolved when the prompts are built.

        lmms-eval builds tasks that name a ``class`` without the model's name, so the name comes from
        `run_model_name`; reading it here also tells `process_results` the run's family (`fallback_frame`)."""
        entries = self.__dict__.get("_specific_entries")
        if entries is None:
            return self.__dict__.get("_lmms_eval_specific_kwargs")
        name = run_model_name(getattr(self, "model_name", None))
        _RUN["model"] = name
        return specific_kwargs(entries, name)

    @lmms_eval_specific_kwargs.setter
    def lmms_eval_specific_kwargs(self, value: dict | None) -> None:
        self.__dict__["_lmms_eval_specific_kwargs"] = value

    def _tagged(self, doc: dict) -> dict:
        """``doc`` with this task's name under `TASK_FIELD`: the key of its image error (`error_key`)."""
        return {**doc, TASK_FIELD: self.config.task}

    def doc_to_messages(self, doc: dict, **kwargs: Any):
        """lmms-eval's, on the doc tagged with this task (`doc_to_visual` records image errors per task)."""
        return super().doc_to_messages(self._tagged(doc), **kwargs)

    def process_results(self, doc: dict, results: Any, full_docs: Any = None):
        """lmms-eval's, on the doc tagged with this task (`process_results` looks image errors up per task)."""
        return super().process_results(self._tagged(doc), results, full_docs)

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


TASK_FIELD = "lmms_prune_task"
"""The key under which `RefcocoGroundingTask` hands its task name to `doc_to_visual` and `process_results`."""

_IMAGE_ERRORS: dict[tuple[str, str], str] = {}
"""(task, sample_id) -> the ``ImageLoadError`` message, for the samples whose image failed in this process.
Sample ids repeat across tasks (refcoco and refcoco+ share question ids), so the task is part of the key."""


def error_key(doc: dict) -> tuple[str, str]:
    """``(task, sample_id)`` of a doc (the task is empty for a doc that no `RefcocoGroundingTask` tagged)."""
    return str(doc.get(TASK_FIELD) or ""), str(doc.get("sample_id", ""))


def doc_to_visual(doc: dict) -> list:
    """The sample's image, fully decoded now as RGB (one PIL image); ``ImageLoadError`` naming the sample id
    (and its task) if it cannot be used (recorded for `process_results`)."""
    task = doc.get(TASK_FIELD)
    sample = f"{task}/{doc['sample_id']}" if task else doc["sample_id"]
    try:
        return [load_image(doc["image"], sample)]
    except ImageLoadError as err:
        _IMAGE_ERRORS[error_key(doc)] = str(err)
        raise


# lmms-eval's own wrappers -> (family, the family options that describe how they feed images)
MODEL_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "internvl_hf": ("internvl", {}),
    "internvl2": ("internvl", {}),
    "internvl3": ("internvl", {}),
    "llava": ("llava", {"image_aspect_ratio": "pad"}),  # the original LLaVA code: pad-to-square
    "llava_hf": ("llava", {"image_aspect_ratio": "crop"}),  # transformers' processor: centre crop
}


def model_family(model_name: str | None) -> tuple[str | None, dict[str, Any]]:
    """``(family, options)`` of an lmms-eval ``--model`` name: our wrappers ``<family>_<preset>`` (the longest
    family name that prefixes it), lmms-eval's own wrappers named after a family (``qwen2_5_vl``, ``qwen3_vl``,
    ``llava_onevision``) or listed in `MODEL_ALIASES`; ``(None, {})`` for any other model."""
    from lmms_prune.families import FAMILIES

    name = str(model_name or "")
    if name in MODEL_ALIASES:
        family, options = MODEL_ALIASES[name]
        return family, dict(options)
    for family in sorted(FAMILIES, key=len, reverse=True):
        if name == family or name.startswith(family + "_"):
            return family, {}
    return None, {}


def specific_kwargs(entries: dict[str, Any], model_name: str | None) -> dict[str, Any]:
    """The ``lmms_eval_specific_kwargs`` of a run: ``default`` updated with the entry named exactly like the
    model, else with that of its family (`model_family`). lmms-eval itself matches exact model names only,
    which would miss our ``<family>_<preset>`` wrappers."""
    out = dict(entries.get("default") or {})
    name = str(model_name or "")
    key = name if name in entries else model_family(name)[0]
    out.update(entries.get(key) or {})
    return out


_RUN: dict[str, Any] = {"model": None}
"""The ``--model`` name of this process's run (set when the prompts are built) and, under ``"registered"``, the
name our wrapper registered (`register_run_model`)."""


def register_run_model(model_id: str) -> None:
    """Called by our lmms-eval wrappers when they are made: the run's model name (Python API runs too)."""
    _RUN["registered"] = str(model_id)


def run_model_name(given: str | None = None) -> str | None:
    """The run's model name: the one lmms-eval gave the task (``given``), else the one our wrapper registered,
    else the ``--model`` of the lmms-eval command line (or its ``--config`` YAML), else None."""
    if given:
        return str(given)
    if _RUN.get("registered"):
        return _RUN["registered"]
    return cli_model_name()


def cli_model_name(argv: list[str] | None = None) -> str | None:
    """``--model`` of the lmms-eval command line this process runs (``sys.argv``), else that of a one-run
    ``--config`` YAML, else None."""
    import argparse
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", default=None)
    parser.add_argument("--config", default=None)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if known.model is None and known.config and Path(known.config).is_file():
        import yaml

        config = yaml.safe_load(Path(known.config).read_text())
        if isinstance(config, dict) and config.get("model") is not None:
            return str(config["model"])
    return known.model


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The family's grounding prompt (``lmms_eval_specific_kwargs["prompt"]``, a template of ``{expression}``;
    InternVL's `PROMPT` when there is none) for the sample's expression."""
    template = (lmms_eval_specific_kwargs or {}).get("prompt") or PROMPT
    return template.format(expression=doc["expression"])


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


_BOX_FRAMES: dict[tuple[str, int, int], dict[str, Any]] = {}
"""(sample_id, width, height) -> the box frame our wrapper recorded for the sample in this process. A frame is a
function of the image size and the run's options, so two tasks' samples sharing an id and a size share it."""


def _frame_key(doc: dict) -> tuple[str, int, int]:
    return str(doc.get("sample_id", "")), int(doc.get("width", 0)), int(doc.get("height", 0))


def record_box_frame(doc: dict, frame: dict[str, Any]) -> None:
    """Record the box frame of ``doc``'s image (``Family.box_frame``, validated) for `process_results`."""
    _BOX_FRAMES[_frame_key(doc)] = dict(check_frame(frame))


def fallback_frame(width: int, height: int) -> dict[str, Any] | None:
    """A box frame from the run's model family alone (`model_family` of its ``--model``) where its convention
    needs only the original size (``grid1000``, ``unit_padded_square``, LLaVA's ``unit_region`` with the
    processor defaults); None for Qwen2.5-VL's resized pixels and for unknown models (text detection)."""
    from lmms_prune.families import family_class

    family, options = model_family(_RUN["model"])
    if family is None or family_class(family).box_convention == "resized_pixels":
        return None
    return family_class(family).box_frame((width, height), None, 0, options)


def score_answer(answer: Any, target: Box, width: int, height: int,
                 frame: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"iou": float, "parsed": bool}`` for one answer, read with ``frame`` when there is one (text
    detection otherwise); an unparseable answer (or not a string) has IoU 0."""
    predicted = parse_box(answer, width, height) if frame is None else parse_box_in_frame(answer, frame)
    if predicted is None:
        return {"iou": 0.0, "parsed": False}
    return {"iou": box_iou(predicted, target), "parsed": True}


def image_error_record(sample_id: str, error: str) -> dict[str, Any]:
    """The record of a sample whose image could not be used: IoU 0, counted under ``image_errors``."""
    return {"iou": 0.0, "parsed": False, "image_error": error, "sample_id": sample_id}


def process_results(doc: dict, results: list[Any]) -> dict[str, dict[str, Any]]:
    """lmms-eval ``process_results``: the same per-sample record for each of the five metrics.

    A sample whose image failed (recorded by `doc_to_visual`, or whose size could not be read when the data
    loaded) is an image error; any other answer is parsed (with the sample's recorded box frame, else the run's
    family's `fallback_frame`, else by text detection; module docstring), a missing or non-string one counting
    unparseable. A recorded frame goes into the record as ``box_frame`` (``--log_samples``).
    """
    sample_id = str(doc.get("sample_id", ""))
    error = _IMAGE_ERRORS.get(error_key(doc))
    if error is None and (int(doc["width"]) <= 0 or int(doc["height"]) <= 0):
        error = f"sample {sample_id!r}: image size unreadable when the data loaded"
    bad_box = None if error is not None else data.degenerate_box(doc["box"], int(doc["width"]), int(doc["height"]))
    if error is not None:
        record = image_error_record(sample_id, error)
    elif bad_box is not None:
        eval_logger.warning(f"refcoco grounding: sample {sample_id!r} ({doc.get(TASK_FIELD) or 'no task'}): its "
                            f"ground-truth box {list(doc['box'])} cannot be scored ({bad_box}); counted under "
                            "bad_gt and left out of acc@0.5 and mean_iou")
        record = {"iou": 0.0, "parsed": False, "bad_gt": bad_box, "sample_id": sample_id}
    else:
        answer = results[0] if results else ""
        x1, y1, x2, y2 = doc["box"]
        width, height = int(doc["width"]), int(doc["height"])
        recorded = _BOX_FRAMES.get(_frame_key(doc))
        frame = recorded if recorded is not None else fallback_frame(width, height)
        record = score_answer(answer, (x1, y1, x2, y2), width, height, frame)
        if recorded is not None:
            record["box_frame"] = recorded
    return {"acc@0.5": record, "mean_iou": record, "unparseable": record, "image_errors": record, "bad_gt": record}


def _scorable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records whose ground truth can be scored (those with ``bad_gt`` are counted by `bad_gt_count`)."""
    return [r for r in records if not r.get("bad_gt")]


def accuracy_at_05(records: list[dict[str, Any]]) -> float:
    """Percent of scorable samples whose IoU is at least 0.5 (0.0 when there are none)."""
    records = _scorable(records)
    if not records:
        return 0.0
    return 100.0 * sum(r["iou"] >= IOU_THRESHOLD for r in records) / len(records)


def mean_iou(records: list[dict[str, Any]]) -> float:
    """Mean IoU over scorable samples, unparseable answers counting as 0 (0.0 when there are none)."""
    records = _scorable(records)
    if not records:
        return 0.0
    return sum(r["iou"] for r in records) / len(records)


def unparseable_count(records: list[dict[str, Any]]) -> int:
    """Number of answers with no readable box (image errors and bad ground truth are counted apart)."""
    return sum(not r["parsed"] and not r.get("image_error") and not r.get("bad_gt") for r in records)


def bad_gt_count(records: list[dict[str, Any]]) -> int:
    """Number of samples whose ground-truth box cannot be scored; logs their sample ids and reasons."""
    bad = [r for r in records if r.get("bad_gt")]
    if bad:
        eval_logger.warning(f"refcoco grounding: {len(bad)} of {len(records)} samples have a ground-truth box that "
                            "cannot be scored (left out of acc@0.5 and mean_iou): "
                            + "; ".join(f"{r['sample_id']} ({r['bad_gt']})" for r in bad))
    return len(bad)


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
