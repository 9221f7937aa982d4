"""lmms-eval glue of ``mme_local``: lmms-eval's own MME functions (named in the YAML) on a local data copy."""

from __future__ import annotations

from lmms_prune.tasks.local import LocalHubTask

MME_DIR_ENV = "LMMS_PRUNE_MME_DIR"


class LocalMmeTask(LocalHubTask):
    """lmms-eval's ``mme`` chat task with one change: it reads ``LMMS_PRUNE_MME_DIR`` (lmms-lab/MME's layout)
    when that is set (the YAML's hub dataset otherwise)."""

    ENV = MME_DIR_ENV
    WRITER = "lmms_prune.toy.mme.write_mme_hub_layout"
