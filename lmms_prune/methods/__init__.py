"""The registry of pruning methods: one row per method module.

Each module under ``lmms_prune.methods`` declares its parameters (``PARAMS``), score and selector plug-ins
(``SCORES``, ``SELECTORS``) and named presets (``PRESETS``) with :mod:`lmms_prune.methods.base`. A new method
is one module, its row below, and its tests. Importing this package is light (no torch).
"""

from __future__ import annotations

import importlib

from lmms_prune.methods.base import MethodModule, Param, Preset, Score, Selector

MODULES: tuple[str, ...] = (
    "lmms_prune.methods.baselines",
    "lmms_prune.methods.fastv",
    "lmms_prune.methods.d2pruner",
    "lmms_prune.methods.deepprune",
    "lmms_prune.methods.ratio",
    "lmms_prune.methods.trend",
    "lmms_prune.methods.vispruner",
    "lmms_prune.methods.divprune",
    "lmms_prune.methods.dart",
    "lmms_prune.methods.pyramiddrop",
    "lmms_prune.methods.visionzip",
    "lmms_prune.methods.fastervlm",
    "lmms_prune.methods.cdpruner",
    "lmms_prune.methods.sparsevlm",
    "lmms_prune.methods.temporal",
    "lmms_prune.methods.prumerge_plus",
    "lmms_prune.methods.downsample",
    "lmms_prune.methods.feather",
    "lmms_prune.methods.mustdrop",
)


def _load(name: str) -> MethodModule:
    module = importlib.import_module(name)
    return MethodModule(params=getattr(module, "PARAMS", ()), scores=getattr(module, "SCORES", ()),
                        selectors=getattr(module, "SELECTORS", ()), presets=getattr(module, "PRESETS", ()))


def _collect() -> tuple[dict[str, Param], dict[str, type[Score]], dict[str, type[Selector]], dict[str, Preset]]:
    params: dict[str, Param] = {}
    scores: dict[str, type[Score]] = {}
    selectors: dict[str, type[Selector]] = {}
    presets: dict[str, Preset] = {}
    for name in MODULES:
        part = _load(name)
        for table, items, key in ((params, part.params, "name"), (scores, part.scores, "name"),
                                  (selectors, part.selectors, "name"), (presets, part.presets, "name")):
            for item in items:
                ident = getattr(item, key)
                if ident in table:
                    raise RuntimeError(f"{name}: {ident!r} is declared twice in the method registry")
                table[ident] = item
    return params, scores, selectors, presets


PARAMS, SCORES, SELECTORS, PRESETS = _collect()

__all__ = ["MODULES", "PARAMS", "PRESETS", "SCORES", "SELECTORS"]
