"""``lmms-prune data check``: sample counts of the eight RefCOCO grounding splits against the official counts.

The data source is chosen as the tasks choose it (`lmms_prune.tasks.refcoco.data`): InternVL jsonl files
(``--jsonl-dir`` / ``LMMS_PRUNE_REFCOCO_JSONL_DIR``), else a local copy of the hub layout (``--local-dir`` /
``LMMS_PRUNE_REFCOCO_DIR``), else the hub datasets, read from the local cache only (nothing is downloaded).
A split that cannot be read is reported as missing. Exit status: 1 if a present split's count differs from
the official one, else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SplitCount:
    """One row of the report: ``count`` is None when the split's data is missing (``detail`` says why)."""

    family: str
    split: str
    source: str
    count: int | None
    official: int
    detail: str = ""

    @property
    def status(self) -> str:
        if self.count is None:
            return "missing"
        return "ok" if self.count == self.official else "mismatch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="count samples per split against the official counts")
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
        return SplitCount(family_name, split, str(path), len(data.read_jsonl(path)), official)
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
    return SplitCount(family_name, split, source, data.count_hub_expressions(dataset), official)


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
    return "\n".join(render)


def check(jsonl_dir: str | None, local_dir: str | None) -> list[SplitCount]:
    """Counts for all eight splits, in the papers' order."""
    from lmms_prune.tasks.refcoco import data

    return [count_split(family.name, split, jsonl_dir, local_dir)
            for family in data.FAMILIES.values() for split in family.splits]


def run(args: argparse.Namespace) -> int:
    from lmms_prune.tasks.refcoco import data

    # Reading the hub cache must never turn into a multi-gigabyte download.
    if "datasets" not in sys.modules:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    jsonl_dir = args.jsonl_dir or os.environ.get(data.JSONL_DIR_ENV) or None
    local_dir = args.local_dir or os.environ.get(data.LOCAL_DIR_ENV) or None
    rows = check(jsonl_dir, local_dir)
    print(format_table(rows))
    present = [r for r in rows if r.count is not None]
    mismatched = [r for r in present if r.status == "mismatch"]
    print(f"\n{len(present)}/{len(rows)} splits present, {len(mismatched)} with a count different from the official one")
    return 1 if mismatched else 0
