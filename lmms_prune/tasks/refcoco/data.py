"""Where RefCOCO samples come from, and how rows become one sample per referring expression.

Three sources, chosen by environment variables (read when a task loads its data):

- default: the hub datasets lmms-eval's own RefCOCO tasks load (`FAMILIES`), one row per object with
  ``answer`` = list of expressions and ``bbox`` = ``[x, y, w, h]`` pixels, through lmms-eval's usual
  ``datasets.load_dataset(path, ...)`` call.
- ``LMMS_PRUNE_REFCOCO_DIR=/data/refcoco``: the same hub layout from a local directory, one sub-directory per
  family named like the hub repository (``RefCOCO``, ``RefCOCOplus``, ``RefCOCOg``) holding
  ``data/<split>-*.parquet``, read by lmms-eval's same ``load_dataset`` call through the ``parquet`` builder with
  the files' absolute paths (`local_data_files`).
- ``LMMS_PRUNE_REFCOCO_JSONL_DIR=/data/internvl``: InternVL's grounding files ``{family}_{split}.jsonl``
  (``refcoco_val.jsonl``, ``refcoco+_testA.jsonl``, ``refcocog_test.jsonl``, ...), one line per expression
  with ``image`` (relative path), ``sent``, ``bbox`` = ``[x1, y1, x2, y2]`` pixels, ``width``, ``height``.
  Image paths are joined to ``LMMS_PRUNE_COCO_ROOT`` (default: the jsonl directory; absolute paths are
  kept). InternVL opens them relative to its ``internvl_chat/`` working directory (COCO train2014 under
  ``data/coco/``), so point ``LMMS_PRUNE_COCO_ROOT`` there for its files. Takes precedence over
  ``LMMS_PRUNE_REFCOCO_DIR``.

Every source yields the same sample columns (`SAMPLE_COLUMNS`): ``sample_id``, ``image`` (an undecoded
``{"bytes", "path"}`` record or a file path), ``expression``, ``box`` (``[x1, y1, x2, y2]`` pixels),
``width`` and ``height`` of the original image. Images are decoded only when a model asks for one; an image
whose size cannot be read from its header (an empty or broken file) keeps its sample, with ``width`` and
``height`` 0, so that one bad file is counted as that sample's image error instead of failing the data
loading (see ``utils.process_results``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL_DIR_ENV = "LMMS_PRUNE_REFCOCO_DIR"
JSONL_DIR_ENV = "LMMS_PRUNE_REFCOCO_JSONL_DIR"
COCO_ROOT_ENV = "LMMS_PRUNE_COCO_ROOT"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One RefCOCO dataset: its hub repository (as in lmms-eval's own task YAMLs) and evaluation splits."""

    name: str
    hub_path: str
    splits: tuple[str, ...]

    @property
    def local_name(self) -> str:
        """Sub-directory name under ``LMMS_PRUNE_REFCOCO_DIR``: the hub repository's name."""
        return self.hub_path.rsplit("/", 1)[-1]


FAMILIES: dict[str, Family] = {
    "refcoco": Family("refcoco", "lmms-lab-encoder/RefCOCO", ("val", "testA", "testB")),
    "refcoco+": Family("refcoco+", "lmms-lab-encoder/RefCOCOplus", ("val", "testA", "testB")),
    "refcocog": Family("refcocog", "lmms-lab-encoder/RefCOCOg", ("val", "test")),
}

OFFICIAL_COUNTS: dict[tuple[str, str], int] = {
    ("refcoco", "val"): 10834,
    ("refcoco", "testA"): 5657,
    ("refcoco", "testB"): 5095,
    ("refcoco+", "val"): 10758,
    ("refcoco+", "testA"): 5726,
    ("refcoco+", "testB"): 4889,
    ("refcocog", "val"): 4896,
    ("refcocog", "test"): 9602,
}
"""Referring expressions per split in the standard evaluation sets (InternVL's jsonl files)."""

SAMPLE_COLUMNS = ("sample_id", "image", "expression", "box", "width", "height")


def family_of(dataset_path: str) -> Family:
    """The family whose hub path is ``dataset_path`` (as written in a task YAML)."""
    for family in FAMILIES.values():
        if family.hub_path == dataset_path:
            return family
    known = ", ".join(f.hub_path for f in FAMILIES.values())
    raise ValueError(f"dataset_path={dataset_path!r}: not a RefCOCO family; expected one of {known}")


def jsonl_path(family: Family, split: str, jsonl_dir: str | os.PathLike) -> Path:
    """InternVL's file name for a split: ``{jsonl_dir}/{family}_{split}.jsonl``."""
    return Path(jsonl_dir) / f"{family.name}_{split}.jsonl"


def local_hub_path(family: Family, local_dir: str | os.PathLike) -> Path:
    """The family's directory under a local copy of the hub layout: ``{local_dir}/{RefCOCO|RefCOCOplus|RefCOCOg}``."""
    return Path(local_dir) / family.local_name


def local_data_files(family: Family) -> dict[str, list[str]] | None:
    """``{split: [absolute parquet paths]}`` of ``LMMS_PRUNE_REFCOCO_DIR``'s copy of ``family`` (None without it).

    Loading goes through the ``parquet`` builder with these absolute paths rather than
    ``load_dataset(<dir>)``: ``datasets`` caches a local directory that carries a README by the README's
    dataset name, not by its files, so two different local copies would share (and return) one stale cache.
    """
    if not os.environ.get(LOCAL_DIR_ENV):
        return None
    root = Path(resolve_dataset_path(family)) / "data"
    files: dict[str, list[str]] = {}
    for path in sorted(root.glob("*.parquet")):
        split = path.name.split("-", 1)[0]
        files.setdefault(split, []).append(str(path.resolve()))
    if not files:
        raise FileNotFoundError(f"{LOCAL_DIR_ENV}: no {root}/<split>-*.parquet files for {family.name}")
    return files


def resolve_dataset_path(family: Family) -> str:
    """What lmms-eval's ``datasets.load_dataset(path=...)`` should load: the hub id or ``LMMS_PRUNE_REFCOCO_DIR``'s copy."""
    local_dir = os.environ.get(LOCAL_DIR_ENV)
    if not local_dir:
        return family.hub_path
    path = local_hub_path(family, local_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{LOCAL_DIR_ENV}={local_dir}: no directory {path} for {family.name}; write the hub layout there "
            f"(one sub-directory per family: {', '.join(f.local_name for f in FAMILIES.values())}) or unset it"
        )
    return str(path)


def require_split(family: Family, split: str, present: Iterable[str], source: str) -> None:
    """Raise one clear ``FileNotFoundError`` when ``split`` is not among the ``present`` splits of ``source``."""
    present = list(present)
    if split not in present:
        raise FileNotFoundError(
            f"{family.name} split {split!r} is missing from {source} (it holds: {', '.join(present) or 'nothing'}); "
            f"add the split's data there, or run only the splits present (`lmms-prune data check` lists them)"
        )


def image_size(image: dict[str, Any] | str) -> tuple[int, int]:
    """``(width, height)`` read from the image header only (no pixel decoding); ``(0, 0)`` when it cannot be
    read (empty, missing or not an image: the sample then counts as an image error when it is scored)."""
    from PIL import Image

    from lmms_prune.images import refuse_bomb

    if isinstance(image, dict):
        source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image.get("path")
    else:
        source = image
    try:
        with Image.open(source) as opened:
            refuse_bomb(opened)
            return opened.size
    # PIL's failures to identify a file; DecompressionBombError (over 2 x Image.MAX_IMAGE_PIXELS) is raised by
    # the header read already, and derives from Exception alone
    except (OSError, SyntaxError, ValueError, TypeError, AttributeError, Image.DecompressionBombError):
        return (0, 0)


def as_xyxy(values: Any, xywh: bool = False) -> list[float] | None:
    """A ground-truth box as ``[x1, y1, x2, y2]`` floats (from ``[x, y, w, h]`` when ``xywh``); None when
    ``values`` is not a sequence of four numbers."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if len(numbers) != 4:
        return None
    if xywh:
        x, y, w, h = numbers
        return [x, y, x + w, y + h]
    return numbers


def sample_box(values: Any, row: str, xywh: bool = False) -> list[float]:
    """The ``box`` column of a row's samples: `as_xyxy`, or four NaNs (with a warning naming the row) when the
    row's box is not four numbers, so the sample is kept and counted under ``bad_gt`` when it is scored."""
    box = as_xyxy(values, xywh)
    if box is None:
        logger.warning(f"RefCOCO row {row}: bbox {values!r} is not four numbers; its samples are counted under "
                       "bad_gt when scored (`lmms-prune data check` lists such rows)")
        return [math.nan] * 4
    return box


def degenerate_box(box: Sequence[float], width: int, height: int, tolerance: float = 1.0) -> str | None:
    """Why an ``(x1, y1, x2, y2)`` ground-truth box cannot be scored on a ``width x height`` image, or None.

    Degenerate: not four numbers, zero (or negative) width or height, a non-finite coordinate, an unknown image
    size, or a corner outside the image by more than ``tolerance`` pixels (COCO boxes may touch the border).
    The evaluation (``utils.process_results``, metric ``bad_gt``) and ``lmms-prune data check`` both use it.
    """
    values = as_xyxy(box)
    if values is None:
        count = len(box) if hasattr(box, "__len__") else 0
        return f"{count} numbers, not 4 (x1, y1, x2, y2)" if count != 4 else "not numbers"
    x1, y1, x2, y2 = values
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return "non-finite coordinate"
    if x2 <= x1 or y2 <= y1:
        return "zero width or height"
    if width <= 0 or height <= 0:
        return "image size unreadable"
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        return f"outside the {width}x{height} image"
    return None


def explode_rows(batch: dict[str, list]) -> dict[str, list]:
    """Batched ``Dataset.map`` function: hub rows (one per object) -> one sample per referring expression.

    Reads ``question_id``, ``image`` (undecoded), ``answer`` (list of expressions, or one string) and
    ``bbox`` (``[x, y, w, h]`` pixels); writes `SAMPLE_COLUMNS`. ``sample_id`` is
    ``{question_id}/{k}`` for the row's k-th expression. A row with an empty expression list has no
    sample to give; its ``question_id`` is logged as a warning.
    """
    out: dict[str, list] = {name: [] for name in SAMPLE_COLUMNS}
    empty = []
    for question_id, image, answers, bbox in zip(batch["question_id"], batch["image"], batch["answer"], batch["bbox"]):
        width, height = image_size(image)
        box = sample_box(bbox, str(question_id), xywh=True)
        expressions = [answers] if isinstance(answers, str) else list(answers or [])
        if not expressions:
            empty.append(str(question_id))
        for k, expression in enumerate(expressions):
            out["sample_id"].append(f"{question_id}/{k}")
            out["image"].append(image)
            out["expression"].append(expression)
            out["box"].append(list(box))
            out["width"].append(width)
            out["height"].append(height)
    if empty:
        logger.warning(f"{len(empty)} RefCOCO row(s) without any referring expression give no sample: "
                       f"{', '.join(empty)} (`lmms-prune data check` lists every such row)")
    return out


def sample_features():
    """`datasets.Features` of the exploded samples (the image stays an undecoded ``Image`` column)."""
    from datasets import Features, Image, Sequence, Value

    return Features(
        {
            "sample_id": Value("string"),
            "image": Image(decode=False),
            "expression": Value("string"),
            "box": Sequence(Value("float64"), length=4),
            "width": Value("int32"),
            "height": Value("int32"),
        }
    )


def explode_dataset(dataset):
    """One sample per referring expression from a hub-layout split, without decoding any image's pixels."""
    from datasets import Image

    rows = dataset.cast_column("image", Image(decode=False))
    return rows.map(explode_rows, batched=True, remove_columns=rows.column_names, features=sample_features())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """InternVL jsonl records (blank lines skipped)."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def jsonl_samples(records: Iterable[dict[str, Any]], image_root: str | os.PathLike, name: str) -> dict[str, list]:
    """InternVL jsonl records -> `SAMPLE_COLUMNS` (images as absolute paths under ``image_root``)."""
    out: dict[str, list] = {column: [] for column in SAMPLE_COLUMNS}
    for index, record in enumerate(records):
        out["sample_id"].append(f"{name}/{index}")
        out["image"].append(str(Path(image_root) / record["image"]))
        out["expression"].append(record["sent"])
        out["box"].append(sample_box(record.get("bbox"), f"{name}/{index}"))
        out["width"].append(int(record["width"]))
        out["height"].append(int(record["height"]))
    return out


def load_jsonl_split(family: Family, split: str, jsonl_dir: str | os.PathLike, image_root: str | os.PathLike | None = None):
    """A `datasets.Dataset` of samples from InternVL's ``{family}_{split}.jsonl``."""
    from datasets import Dataset

    path = jsonl_path(family, split, jsonl_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{JSONL_DIR_ENV}={jsonl_dir}: no file {path}; InternVL names it {path.name}")
    root = image_root if image_root is not None else jsonl_dir
    return Dataset.from_dict(jsonl_samples(read_jsonl(path), root, f"{family.name}_{split}"))


def jsonl_source() -> tuple[str, str] | None:
    """``(jsonl_dir, image_root)`` when ``LMMS_PRUNE_REFCOCO_JSONL_DIR`` selects InternVL's files, else None."""
    jsonl_dir = os.environ.get(JSONL_DIR_ENV)
    if not jsonl_dir:
        return None
    return jsonl_dir, os.environ.get(COCO_ROOT_ENV) or jsonl_dir


def count_hub_expressions(dataset) -> int:
    """Referring expressions in a hub-layout split: the total length of its ``answer`` lists."""
    answers = dataset.select_columns(["answer"])["answer"]
    return sum(1 if isinstance(a, str) else len(a) for a in answers)
