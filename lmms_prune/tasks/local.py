"""The base of this package's lmms-eval tasks that read a local data folder (``pope_local``, ``tinyvideo``)."""

from __future__ import annotations

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
