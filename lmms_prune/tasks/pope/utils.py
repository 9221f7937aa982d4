"""lmms-eval glue of ``pope_local``: lmms-eval's own POPE functions (named in the YAML) on a local data copy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmms_eval.api.task import ConfigurableMessagesTask

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


class LocalPopeTask(ConfigurableMessagesTask):
    """lmms-eval's chat task with one change: ``download`` reads ``LMMS_PRUNE_POPE_DIR`` when it is set (the
    YAML's hub dataset otherwise). Serves lmms-eval chat models (this package's wrappers, ``internvl_hf``,
    ``qwen2_5_vl``, ...), which get the image, then the question, as one user turn."""

    def __init__(self, *args: Any, config: dict | None = None, **kwargs: Any) -> None:
        if config is not None:
            config = {key: value for key, value in config.items() if key != "class"}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        root = os.environ.get(POPE_DIR_ENV)
        if root:
            files = local_data_files(root)
            split = self.config.test_split
            if split not in files:
                raise FileNotFoundError(f"{POPE_DIR_ENV}={root}: no {split!r} split (it holds: "
                                        f"{', '.join(sorted(files))}); write the {split} split there")
            self.DATASET_PATH = "parquet"
            dataset_kwargs = {**(dataset_kwargs or {}), "data_files": files}
        super().download(dataset_kwargs)
