"""lmms-eval glue of ``pope_local``: lmms-eval's own POPE functions (named in the YAML) on a local data copy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmms_prune.tasks.local import LocalDataTask

POPE_DIR_ENV = "LMMS_PRUNE_POPE_DIR"


def local_data_files(root: str | os.PathLike) -> dict[str, list[str]]:
    """``{split: [absolute parquet paths]}`` of a folder in lmms-lab/POPE's layout (``data/<split>-*.parquet``).

    Read through the ``parquet`` builder with absolute paths (as the RefCOCO tasks do): ``datasets`` caches a
    local folder that carries a README by its dataset name, so two different local copies would share a cache.
    """
    files: dict[str, list[str]] = {}
    for path in sorted((Path(root) / "data").glob("*.parquet")):
        files.setdefault(path.name.split("-", 1)[0], []).append(str(path.resolve()))
    if not files:
        raise FileNotFoundError(f"{POPE_DIR_ENV}={root}: no {Path(root) / 'data'}/<split>-*.parquet files; write "
                                "lmms-lab/POPE's layout there (lmms_prune.toy.pope.write_pope_hub_layout) or unset it")
    return files


class LocalPopeTask(LocalDataTask):
    """lmms-eval's ``pope`` chat task with one change: it reads ``LMMS_PRUNE_POPE_DIR`` when that is set (the
    YAML's hub dataset otherwise). Serves lmms-eval chat models (this package's wrappers, ``internvl_hf``,
    ``qwen2_5_vl``, ...)."""

    def local_dataset_kwargs(self, dataset_kwargs: dict[str, Any]) -> dict[str, Any] | None:
        root = os.environ.get(POPE_DIR_ENV)
        if not root:
            return None
        files = local_data_files(root)
        split = self.config.test_split
        if split not in files:
            raise FileNotFoundError(f"{POPE_DIR_ENV}={root}: no {split!r} split (it holds: "
                                    f"{', '.join(sorted(files))}); write the {split} split there")
        self.DATASET_PATH = "parquet"
        return {**dataset_kwargs, "data_files": files}
