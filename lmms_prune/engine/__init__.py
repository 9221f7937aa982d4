"""Model surgery: apply a visual-token selection inside a transformers VLM (hooks + attention interface)."""

from lmms_prune.engine.core import PruneHandle, apply
from lmms_prune.engine.state import PruneRecord

__all__ = ["PruneHandle", "PruneRecord", "apply"]
