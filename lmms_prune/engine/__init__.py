"""Model surgery: apply a visual-token selection inside a transformers VLM (hooks + attention interface)."""

from lmms_prune.engine.core import PruneHandle, PruneRecord, apply

__all__ = ["PruneHandle", "PruneRecord", "apply"]
