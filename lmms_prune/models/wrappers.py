"""The lmms-eval chat models, generated from the family registry x the presets (no per-family code here).

``InternVLPrune`` is ``--model internvl_prune``, ``InternVLPrune_deepprune`` is ``--model internvl_deepprune``,
and so on for every family row of :data:`lmms_prune.families.FAMILIES`.
"""

from __future__ import annotations

from lmms_prune.families import FAMILIES
from lmms_prune.models.base import wrapper_classes

for _family, (_module, _stem) in FAMILIES.items():
    globals().update(wrapper_classes(_family, _stem, __name__))
