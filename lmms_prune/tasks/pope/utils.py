"""lmms-eval glue of ``pope_local``: lmms-eval's own POPE functions (named in the YAML) on a local data copy."""

from __future__ import annotations

from lmms_prune.tasks.local import LocalHubTask

POPE_DIR_ENV = "LMMS_PRUNE_POPE_DIR"


class LocalPopeTask(LocalHubTask):
    """lmms-eval's ``pope`` chat task with one change: it reads ``LMMS_PRUNE_POPE_DIR`` (lmms-lab/POPE's layout)
    when that is set (the YAML's hub dataset otherwise). Serves lmms-eval chat models (this package's wrappers,
    ``internvl_hf``, ``qwen2_5_vl``, ...)."""

    ENV = POPE_DIR_ENV
    WRITER = "lmms_prune.toy.pope.write_pope_hub_layout"
