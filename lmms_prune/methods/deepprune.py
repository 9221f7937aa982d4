"""Deep-layer attention pruning (the seed paper): raw attention of layer 11 + pivot-MIS, no prior (K=12)."""

from __future__ import annotations

from lmms_prune.methods.base import Preset

PRESETS = (
    Preset("deepprune", "deep-layer attention pruning: raw attention of layer 11 + pivot-MIS, no prior (K=12)",
           dict(stage="llm", selector="pivot_mis", score="attention", prune_layer=12, alpha=0.5)),
)
