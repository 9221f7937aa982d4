"""The base of this package's lmms-eval tasks that read a local data folder (``pope_local``, ``mme_local``,
``tinyvideo``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmms_eval.api.task import ConfigurableMessagesTask


class LocalDataTask(ConfigurableMessagesTask):
    """lmms-eval's chat task (served to chat models: the visual, then the question, as one user turn) whose rows
    may come from a local folder: :meth:`local_dataset_kwargs` gives the ``datasets`` arguments that read it,
    or None to load what the YAML names. The YAML's ``class`` key (how lmms-eval found this class) is not a
    task setting and is dropped before the config is read."""

    def __init__(self, *args: Any, config: dict | None = None, **kwargs: Any) -> None:
        if config is not None:
            config = {key: value for key, value in config.items() if key != "class"}
        super().__init__(*args, config=config, **kwargs)

    def local_dataset_kwargs(self, dataset_kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The ``datasets`` arguments that read the local copy, or None where there is none to read."""
        raise NotImplementedError

    def download(self, dataset_kwargs: dict | None = None) -> None:
        local = self.local_dataset_kwargs(dict(dataset_kwargs or {}))
        super().download(dataset_kwargs if local is None else local)


def hub_layout_files(root: str | os.PathLike, env: str, writer: str) -> dict[str, list[str]]:
    """``{split: [absolute parquet paths]}`` of a folder in an lmms-lab hub layout (``data/<split>-*.parquet``);
    ``env`` and ``writer`` (the function that writes such a folder) name the fix when there is none.

    Read through the ``parquet`` builder with absolute paths (as the RefCOCO tasks do): ``datasets`` caches a
    local folder that carries a README by its dataset name, so two different local copies would share a cache.
    """
    files: dict[str, list[str]] = {}
    for path in sorted((Path(root) / "data").glob("*.parquet")):
        files.setdefault(path.name.split("-", 1)[0], []).append(str(path.resolve()))
    if not files:
        raise FileNotFoundError(f"{env}={root}: no {Path(root) / 'data'}/<split>-*.parquet files; write the "
                                f"layout there ({writer}) or unset it")
    return files


class LocalHubTask(LocalDataTask):
    """An lmms-eval chat task of an lmms-lab hub dataset that reads :attr:`ENV`'s folder (the same layout, written
    by :attr:`WRITER`) when that variable is set, and the YAML's hub dataset otherwise."""

    ENV = ""
    WRITER = ""

    def local_dataset_kwargs(self, dataset_kwargs: dict[str, Any]) -> dict[str, Any] | None:
        root = os.environ.get(self.ENV)
        if not root:
            return None
        files = hub_layout_files(root, self.ENV, self.WRITER)
        split = self.config.test_split
        if split not in files:
            raise FileNotFoundError(f"{self.ENV}={root}: no {split!r} split (it holds: "
                                    f"{', '.join(sorted(files))}); write the {split} split there")
        self.DATASET_PATH = "parquet"
        return {**dataset_kwargs, "data_files": files}
