"""``lmms-prune data check``: sample counts of the eight RefCOCO grounding splits against the official counts.

The data source is chosen as the tasks choose it (`lmms_prune.tasks.refcoco.data`): InternVL jsonl files
(``--jsonl-dir`` / ``LMMS_PRUNE_REFCOCO_JSONL_DIR``), else a local copy of the hub layout (``--local-dir`` /
``LMMS_PRUNE_REFCOCO_DIR``), else the hub datasets, read from the local cache only (nothing is downloaded).
A split that cannot be read is reported as missing. Each present split is also checked row by row: ground-truth
boxes that cannot be scored (zero width or height, outside the image, NaN or inf, not four numbers;
`data.degenerate_box`, the rule of the evaluation's ``bad_gt`` count), images that cannot be used (every image
of a hub-layout split is fully decoded as the evaluation decodes it, so truncated files and decompression bombs
are caught; jsonl images live under the COCO root and are not opened: their written sizes are checked), and rows
with an empty expression list (they yield no sample) are counted, and the first few ids of each are printed.

``--splits`` names the splits to check (``refcoco`` for a family's splits, ``refcoco/testB`` for one; default
all eight). Exit status: 1 if a requested split is missing, its count differs from the official one, or it
holds degenerate boxes, unreadable images or empty expression lists; else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHOW_IDS = 5
"""Ids printed per kind of problem."""


@dataclass(frozen=True)
class SplitCount:
    """One row of the report: ``count`` is None when the split's data is missing (``detail`` says why)."""

    family: str
    split: str
    source: str
    count: int | None
    official: int
    detail: str = ""
    problems: dict[str, list[str]] = field(default_factory=dict)  # kind -> row ids (see `row_problems`)

    @property
    def status(self) -> str:
        if self.count is None:
            return "missing"
        if any(self.problems.values()):
            return "problems"
        return "ok" if self.count == self.official else "mismatch"


PROBLEM_KINDS = ("degenerate box", "unusable image", "unreadable image size", "no expression")

Row = tuple[str, Any, int, int, int, str | None]
"""``(id, box, width, height, expressions, image problem)``: the box ``[x1, y1, x2, y2]`` (as found when it is
not four numbers), the image size, the number of expressions, and why the image cannot be used (None: fine, or
not opened)."""


def row_problems(rows: Iterable[Row]) -> dict[str, list[str]]:
    """Row ids per problem kind (`PROBLEM_KINDS`); a box is judged by ``data.degenerate_box``, the rule the
    evaluation's ``bad_gt`` count applies."""
    from lmms_prune.tasks.refcoco import data

    out: dict[str, list[str]] = {kind: [] for kind in PROBLEM_KINDS}
    for row_id, box, width, height, expressions, image_problem in rows:
        if expressions == 0:
            out["no expression"].append(row_id)
        if image_problem is not None:
            out["unusable image"].append(f"{row_id} ({image_problem})")
            continue
        if width <= 0 or height <= 0:
            out["unreadable image size"].append(row_id)
            continue
        reason = data.degenerate_box(box, width, height)
        if reason is not None:
            out["degenerate box"].append(f"{row_id} ({reason})")
    return out


def decode_check(image: dict[str, Any]) -> tuple[int, int, str | None]:
    """``(width, height, problem)`` of a hub image record, fully decoded by ``lmms_prune.images.load_image``
    (as the evaluation decodes it: truncated files, decompression bombs and undecodable data are caught, not
    only unreadable headers); ``(0, 0, reason)`` when it cannot be used."""
    from lmms_prune.images import ImageLoadError, load_image

    try:
        decoded = load_image(image, "check")
    except ImageLoadError as err:
        return 0, 0, err.reason
    return decoded.width, decoded.height, None


def _hub_rows(dataset) -> Iterable[Row]:
    """`row_problems` rows of a hub-layout split: each distinct image decoded once (`decode_check`), boxes
    from ``[x, y, w, h]``."""
    import hashlib

    from datasets import Image

    from lmms_prune.tasks.refcoco import data

    rows = dataset.select_columns(["question_id", "image", "answer", "bbox"]).cast_column("image", Image(decode=False))
    seen: dict[str, tuple[int, int, str | None]] = {}  # rows of one image share it: decode it once
    for batch in rows.iter(batch_size=256):
        for qid, image, answers, bbox in zip(batch["question_id"], batch["image"], batch["answer"], batch["bbox"]):
            data_bytes = image.get("bytes")
            key = hashlib.sha256(data_bytes).hexdigest() if data_bytes else f"path:{image.get('path')}"
            if key not in seen:
                seen[key] = decode_check(image)
            width, height, problem = seen[key]
            box = data.as_xyxy(bbox, xywh=True)
            n = 1 if isinstance(answers, str) else len(answers or [])
            yield str(qid), bbox if box is None else box, width, height, n, problem


def _jsonl_rows(records: list[dict], name: str) -> Iterable[Row]:
    """`row_problems` rows of InternVL jsonl records (pixel ``[x1, y1, x2, y2]`` boxes, sizes as written; the
    images live under the COCO root and are not opened here)."""
    for index, record in enumerate(records):
        sentence = record.get("sent")
        yield (f"{name}/{index}", record.get("bbox"), int(record.get("width") or 0), int(record.get("height") or 0),
               int(isinstance(sentence, str) and bool(sentence.strip())), None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="count samples per split against the official counts; flag boxes "
                                         "that cannot be scored and rows without an expression")
    check.add_argument("--splits", default=None,
                       help="comma-separated splits to check: a family (refcoco, refcoco+, refcocog) or "
                            "FAMILY/SPLIT (refcoco/testB); default all eight")
    check.add_argument("--jsonl-dir", default=None,
                       help="InternVL jsonl directory (default: $LMMS_PRUNE_REFCOCO_JSONL_DIR)")
    check.add_argument("--local-dir", default=None,
                       help="local hub-layout root with RefCOCO/, RefCOCOplus/, RefCOCOg/ "
                            "(default: $LMMS_PRUNE_REFCOCO_DIR)")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def count_split(family_name: str, split: str, jsonl_dir: str | None, local_dir: str | None) -> SplitCount:
    """Count one split's referring expressions from the chosen source; missing data gives ``count=None``."""
    from lmms_prune.tasks.refcoco import data

    family = data.FAMILIES[family_name]
    official = data.OFFICIAL_COUNTS[(family_name, split)]
    if jsonl_dir:
        path = data.jsonl_path(family, split, jsonl_dir)
        if not path.is_file():
            return SplitCount(family_name, split, str(path), None, official, "file not found")
        records = data.read_jsonl(path)
        return SplitCount(family_name, split, str(path), len(records), official,
                          problems=row_problems(_jsonl_rows(records, f"{family_name}_{split}")))
    if local_dir:
        source = str(data.local_hub_path(family, local_dir))
        if not os.path.isdir(source):
            return SplitCount(family_name, split, source, None, official, "directory not found")
    else:
        source = family.hub_path
    import datasets

    try:
        if local_dir:  # by absolute file paths: see data.local_data_files on datasets' cache of local dirs
            files = sorted(str(p.resolve()) for p in (Path(source) / "data").glob(f"{split}-*.parquet"))
            if not files:
                return SplitCount(family_name, split, source, None, official, "no parquet files for this split")
            dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split)
        else:
            dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # any failure to read means the data is not usable here
        return SplitCount(family_name, split, source, None, official, _first_line(error))
    return SplitCount(family_name, split, source, data.count_hub_expressions(dataset), official,
                      problems=row_problems(_hub_rows(dataset)))


def format_table(rows: list[SplitCount]) -> str:
    """A plain-text table: family, split, count, official, status, source."""
    header = ("family", "split", "samples", "official", "status", "source")
    lines = [(r.family, r.split, "-" if r.count is None else str(r.count), str(r.official), r.status,
              r.source + (f" ({r.detail})" if r.detail else "")) for r in rows]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]
    render = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1]
        for row in [header, *lines]
    ]
    for r in rows:
        for kind, ids in r.problems.items():
            if ids:
                more = f" and {len(ids) - SHOW_IDS} more" if len(ids) > SHOW_IDS else ""
                render.append(f"{r.family} {r.split}: {len(ids)} row(s) with {kind}: "
                              f"{', '.join(ids[:SHOW_IDS])}{more}")
    return "\n".join(render)


def parse_splits(spec: str | None) -> list[tuple[str, str]]:
    """``"refcoco,refcocog/val"`` -> [(family, split)] in the papers' order; None means all eight."""
    from lmms_prune.tasks.refcoco import data

    every = [(f.name, s) for f in data.FAMILIES.values() for s in f.splits]
    if spec is None:
        return every
    wanted = set()
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        family, _, split = item.partition("/")
        if family not in data.FAMILIES or (split and split not in data.FAMILIES[family].splits):
            raise ValueError(f"--splits {item!r}: not a RefCOCO split; choose from "
                             f"{', '.join(data.FAMILIES)} or one of {', '.join(f'{f}/{s}' for f, s in every)}")
        wanted.update((family, s) for s in ([split] if split else data.FAMILIES[family].splits))
    return [pair for pair in every if pair in wanted]


def check(jsonl_dir: str | None, local_dir: str | None, splits: Sequence[tuple[str, str]] | None = None
          ) -> list[SplitCount]:
    """Counts and row problems for ``splits`` (default all eight), in the papers' order."""
    return [count_split(family, split, jsonl_dir, local_dir) for family, split in (splits or parse_splits(None))]


def run(args: argparse.Namespace) -> int:
    from lmms_prune.tasks.refcoco import data

    # Reading the hub cache must never turn into a multi-gigabyte download.
    if "datasets" not in sys.modules:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    jsonl_dir = args.jsonl_dir or os.environ.get(data.JSONL_DIR_ENV) or None
    local_dir = args.local_dir or os.environ.get(data.LOCAL_DIR_ENV) or None
    try:
        splits = parse_splits(args.splits)
    except ValueError as err:
        print(f"lmms-prune data check: {err}", file=sys.stderr)
        return 2
    rows = check(jsonl_dir, local_dir, splits)
    print(format_table(rows))
    present = [r for r in rows if r.count is not None]
    # counted apart: a split can hold both a wrong count and rows that cannot be scored
    mismatched = [r for r in present if r.count != r.official]
    flawed = [r for r in present if any(r.problems.values())]
    print(f"\n{len(present)}/{len(rows)} requested splits present, {len(mismatched)} with a count different from "
          f"the official one, {len(flawed)} with rows that cannot be scored")
    if len(present) < len(rows):
        print("missing: " + ", ".join(f"{r.family}/{r.split}" for r in rows if r.count is None)
              + " (check only the splits you have with --splits)")
    return 1 if len(present) < len(rows) or mismatched or flawed else 0
