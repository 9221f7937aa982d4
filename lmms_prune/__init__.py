"""lmms-prune: training-free visual-token pruning for VLMs, evaluated with lmms-eval.

The top-level import is light on purpose (lmms-eval loads our entry point at start-up): torch and
transformers are imported only when ``apply`` is first called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lmms_prune.engine import PruneHandle


def apply(model: Any, method: str = "fastv", **params: Any) -> PruneHandle:
    """Patch a loaded transformers VLM in place so that it prunes visual tokens; see ``engine.apply``."""
    from lmms_prune.engine import apply as _apply

    return _apply(model, method=method, **params)


__all__ = ["apply", "__version__"]
