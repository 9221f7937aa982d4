"""The registry of pruning methods: the built-in method modules, then external ones.

Each method module declares its parameters (``PARAMS``), score and selector plug-ins (``SCORES``,
``SELECTORS``) and named presets (``PRESETS``) with the classes of :mod:`lmms_prune.api`. A built-in method is
one module under ``lmms_prune.methods``, its row in :data:`MODULES`, and its tests. A method that lives outside
the package is found in two ways (docs/extending.md, "Write your own method"):

* an installed distribution's entry point in the group ``lmms_prune.methods`` (:data:`ENTRY_POINT_GROUP`)
  whose value is the module, e.g. ``[project.entry-points."lmms_prune.methods"] mine = "my_pkg.method"``;
* the environment variable ``LMMS_PRUNE_METHODS`` (:data:`ENV_VAR`): module names or ``.py`` files, separated
  by ``os.pathsep`` (``:`` on Linux), for work in progress (``LMMS_PRUNE_METHODS=./my_method.py:pkg.other``).

The tables (``PARAMS``, ``SCORES``, ``SELECTORS``, ``PRESETS``) are built on first access, built-ins first, so
``import lmms_prune.methods`` (and ``lmms_prune.methods.base``) stays light. Two modules that declare the same
preset, parameter, score or selector name are refused with an error naming both. :data:`ORIGINS` says which
module declared each name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from lmms_prune.methods.base import MethodModule

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
    "lmms_prune.methods.evs",
    "lmms_prune.methods.feather",
    "lmms_prune.methods.mustdrop",
    "lmms_prune.methods.vscan",
    "lmms_prune.methods.dycoke",
    "lmms_prune.methods.holitom",
    "lmms_prune.methods.vidcom2",
    "lmms_prune.methods.fastvid",
)
ENTRY_POINT_GROUP = "lmms_prune.methods"
ENV_VAR = "LMMS_PRUNE_METHODS"
# ``<family>_prune`` is the lmms-eval model that takes ``method=``: no preset may take its name
RESERVED_PRESETS = ("prune",)
# preset names become lmms-eval model ids and Python class names (``InternVLPrune_<preset>``)
_PRESET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TABLES = ("PARAMS", "SCORES", "SELECTORS", "PRESETS", "ORIGINS", "EXTERNAL")


def _declared(module: ModuleType, source: str) -> MethodModule:
    """The four tables of a method module; a module that declares none of them is refused."""
    names = ("PARAMS", "SCORES", "SELECTORS", "PRESETS")
    if not any(hasattr(module, n) for n in names):
        raise ImportError(f"method module {module.__name__} ({source}) declares none of {', '.join(names)}; a "
                          "method module lists its Param rows, Score and Selector classes and Preset rows "
                          "(see lmms_prune.api)")
    return MethodModule(params=tuple(getattr(module, "PARAMS", ())), scores=tuple(getattr(module, "SCORES", ())),
                        selectors=tuple(getattr(module, "SELECTORS", ())), presets=tuple(getattr(module, "PRESETS", ())))


def _load_file(path: Path) -> ModuleType:
    """A ``.py`` file as a module named after its stem and path (the same name in every process, so that its
    classes pickle; registered in ``sys.modules``, which dataclasses need)."""
    if not path.is_file():
        raise ImportError(f"{ENV_VAR}: {str(path)!r} is not a file; give a module name or an existing .py file")
    name = f"lmms_prune_file_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def external_sources() -> list[tuple[str, str]]:
    """``(how it was named, module or file)`` of every external method: entry points, then :data:`ENV_VAR`."""
    from importlib.metadata import entry_points

    out = [(f"entry point {ep.name!r} of {ep.dist.name if ep.dist else '?'}", ep.value)
           for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)]
    out += [(ENV_VAR, item) for item in os.environ.get(ENV_VAR, "").split(os.pathsep) if item.strip()]
    return out


def _import_external(how: str, target: str) -> ModuleType:
    target = target.strip()
    try:
        if target.endswith(".py") or os.sep in target:
            return _load_file(Path(target).expanduser().resolve())
        return importlib.import_module(target.split(":")[0])  # an entry point's "module:attr" names the module
    except ImportError as err:
        raise ImportError(f"external method {target!r} ({how}) cannot be imported: {err}") from err


def _module_name(module: ModuleType) -> str:
    file = getattr(module, "__file__", None)
    return module.__name__ if module.__name__.startswith("lmms_prune.") or not file else f"{module.__name__} ({file})"


def _collect() -> dict[str, Any]:
    params: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    selectors: dict[str, Any] = {}
    presets: dict[str, Any] = {}
    origins: dict[tuple[str, str], str] = {}
    external: list[str] = []
    modules = [(importlib.import_module(name), "built-in") for name in MODULES]
    modules += [(_import_external(how, target), how) for how, target in external_sources()]
    seen: set[str] = set()
    for module, how in modules:
        if module.__name__ in seen:  # named twice (an entry point and the environment variable): load once
            continue
        seen.add(module.__name__)
        owner = _module_name(module)
        if how != "built-in":
            external.append(owner)
        part = _declared(module, how)
        for kind, table, items in (("parameter", params, part.params), ("score", scores, part.scores),
                                   ("selector", selectors, part.selectors), ("preset", presets, part.presets)):
            for item in items:
                ident = item.name
                if kind == "preset" and (ident in RESERVED_PRESETS or not _PRESET_NAME.match(ident)):
                    raise ValueError(f"preset {ident!r} of {owner}: a preset name is lower-case letters, digits "
                                     f"and '_', starting with a letter, and not {', '.join(RESERVED_PRESETS)}; "
                                     "rename it")
                if (kind, ident) in origins:
                    raise ValueError(f"{kind} name {ident!r} is declared by both {origins[kind, ident]} and {owner}; "
                                     f"rename the one in {owner}")
                origins[kind, ident] = owner
                table[ident] = item
    return {"PARAMS": params, "SCORES": scores, "SELECTORS": selectors, "PRESETS": presets, "ORIGINS": origins,
            "EXTERNAL": tuple(external)}


def __getattr__(name: str) -> Any:
    """The registry tables, built on first access (PEP 562)."""
    if name not in _TABLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    tables = _collect()
    globals().update(tables)
    return tables[name]


__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "EXTERNAL", "MODULES", "ORIGINS", "PARAMS", "PRESETS", "SCORES",
           "SELECTORS", "external_sources"]
