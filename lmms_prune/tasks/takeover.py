"""The task-name takeover: ``--tasks refcoco`` (and ``refcoco+``, ``refcocog``) run this package's grounding groups.

What the user sees
    With lmms-prune installed, ``lmms-eval --tasks refcoco`` runs ``refcoco_ground`` (RefCOCO val/testA/testB
    with InternVL's grounding protocol), ``refcoco+`` runs ``refcoco+_ground`` and ``refcocog`` runs
    ``refcocog_ground``; ``refcoco_ground_all`` runs all eight splits. lmms-eval's region-captioning groups
    that normally own those names stay reachable as ``refcoco_caption``, ``refcoco+_caption`` and
    ``refcocog_caption``. The takeover is logged once per process when a ``TaskManager`` first uses it.

Switching it off
    ``LMMS_PRUNE_TAKEOVER=0`` (also ``false``/``no``/``off``): lmms-eval is left untouched and the names mean
    what lmms-eval says. The tasks themselves remain usable with ``--include_path <this folder>`` under their
    own names (``refcoco_ground``, ``refcoco_ground_val``, ..., ``refcoco_ground_all``, ``refcoco_caption``);
    plain ``refcoco`` then stays lmms-eval's, because lmms-eval lets its default tasks win name clashes.

When it happens (lmms-eval 0.7.3)
    lmms-eval reads the ``lmms_eval.models`` entry points once, when ``lmms_eval.models`` is first imported
    (``MODEL_REGISTRY_V2 = _initialize_model_registry()`` at module level). On the command line
    (``python -m lmms_eval``, ``lmms-eval``, ``accelerate launch -m lmms_eval``) that import comes from
    ``lmms_eval/__main__.py``'s ``from lmms_eval import evaluator``: ``evaluator`` imports ``lmms_eval.models``
    before ``lmms_eval.tasks``, and ``cli_evaluate_single`` builds its ``TaskManager`` later still. So our
    entry-point callable (``lmms_prune.models.registry.manifests``) runs before any ``TaskManager`` exists,
    but also before ``lmms_eval.tasks`` is imported, and importing it there would cost seconds (datasets,
    torch). `install` therefore patches ``TaskManager`` right away if ``lmms_eval.tasks`` is already imported,
    and otherwise adds a one-shot import hook that patches it the moment lmms-eval imports it, then removes
    itself. Start-up cost: a list insert. ``lmms-eval tasks ...`` (the listing sub-command) imports only
    ``lmms_eval.tasks``, never the model registry, so it lists lmms-eval's own names.

The patch
    ``TaskManager.initialize_tasks`` (which builds the name -> YAML index) is wrapped: after lmms-eval has
    indexed its own folders, this package's task folder is indexed and laid over the result (our names win),
    and ``refcoco``/``refcoco+``/``refcocog`` are pointed at our grounding groups (`merge_index`). The wrapper
    re-reads ``LMMS_PRUNE_TAKEOVER`` each time, is installed at most once (`install` is idempotent), and
    `uninstall` restores the original method and removes the hook. Nothing in lmms-eval's files changes.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import sys
from pathlib import Path
from typing import Any

TAKEOVER_ENV = "LMMS_PRUNE_TAKEOVER"
TASKS_DIR = Path(__file__).resolve().parent
"""This package's lmms-eval task folder (the one to pass as ``--include_path`` without the takeover)."""

TAKEN_OVER: dict[str, str] = {
    "refcoco": "refcoco_ground",
    "refcoco+": "refcoco+_ground",
    "refcocog": "refcocog_ground",
}
"""lmms-eval name -> our grounding group that answers to it while the takeover is on."""

CAPTION_GROUPS: dict[str, str] = {
    "refcoco": "refcoco_caption",
    "refcoco+": "refcoco+_caption",
    "refcocog": "refcocog_caption",
}
"""lmms-eval name -> the name its captioning group keeps while the takeover is on."""

_TASKS_MODULE = "lmms_eval.tasks"
_MARK = "_lmms_prune_takeover"
_announced = False


def takeover_enabled() -> bool:
    """False when ``LMMS_PRUNE_TAKEOVER`` is ``0``/``false``/``no``/``off`` (case-insensitive); on by default."""
    return os.environ.get(TAKEOVER_ENV, "1").strip().lower() not in {"0", "false", "no", "off"}


def merge_index(index: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """lmms-eval's task index with ``ours`` laid over it and the `TAKEN_OVER` names pointing at our groups.

    Both arguments map a task/group/tag name to lmms-eval's index entry (``{"type", "yaml_path", "task"}``).
    """
    missing = [target for target in TAKEN_OVER.values() if target not in ours]
    if missing:
        raise ValueError(f"task folder {TASKS_DIR} lacks the groups {missing}; reinstall lmms-prune")
    merged = {**index, **ours}
    for name, target in TAKEN_OVER.items():
        merged[name] = dict(ours[target])
    return merged


def _announce() -> None:
    global _announced
    if _announced:
        return
    _announced = True
    from loguru import logger

    taken = ", ".join(f"{name} -> {target}" for name, target in TAKEN_OVER.items())
    captions = ", ".join(CAPTION_GROUPS.values())
    logger.info(
        f"lmms-prune task takeover: {taken} (InternVL grounding; all 8 splits: refcoco_ground_all). "
        f"lmms-eval's captioning groups: {captions}. Set {TAKEOVER_ENV}=0 to turn this off."
    )


def _patch(task_manager_cls: type) -> None:
    """Wrap ``task_manager_cls.initialize_tasks`` once (see the module docstring)."""
    original = task_manager_cls.initialize_tasks
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def initialize_tasks(self, include_path=None, include_defaults=True):
        index = original(self, include_path=include_path, include_defaults=include_defaults)
        if not takeover_enabled():
            return index
        _announce()
        return merge_index(index, self._get_task_and_group(str(TASKS_DIR)))

    setattr(initialize_tasks, _MARK, True)
    task_manager_cls.initialize_tasks = initialize_tasks


def _unpatch(task_manager_cls: type) -> None:
    current = task_manager_cls.initialize_tasks
    if getattr(current, _MARK, False):
        task_manager_cls.initialize_tasks = current.__wrapped__


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """One-shot import hook: lets the real loader run ``lmms_eval.tasks``, then patches its ``TaskManager``."""

    def __init__(self) -> None:
        self._loader: importlib.abc.Loader | None = None

    def find_spec(self, fullname, path, target=None):
        if fullname != _TASKS_MODULE:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None and spec.loader is not None:
                self._loader = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        loader = self._loader
        module.__spec__.loader = module.__loader__ = loader
        _remove_hook()
        loader.exec_module(module)
        _patch(module.TaskManager)


_HOOK = _PatchOnImport()


def _remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> bool:
    """Turn the takeover on (idempotent); returns False, changing nothing, when ``LMMS_PRUNE_TAKEOVER`` is off."""
    if not takeover_enabled():
        return False
    module = sys.modules.get(_TASKS_MODULE)
    if module is not None and hasattr(module, "TaskManager"):
        _patch(module.TaskManager)
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
    return True


def uninstall() -> None:
    """Undo `install`: restore ``TaskManager.initialize_tasks`` and drop the import hook."""
    _remove_hook()
    module = sys.modules.get(_TASKS_MODULE)
    if module is not None and hasattr(module, "TaskManager"):
        _unpatch(module.TaskManager)


def is_installed() -> bool:
    """Whether ``TaskManager`` is patched or the import hook is waiting for ``lmms_eval.tasks``."""
    module = sys.modules.get(_TASKS_MODULE)
    patched = module is not None and getattr(getattr(module, "TaskManager", None), "initialize_tasks", None)
    return _HOOK in sys.meta_path or bool(getattr(patched, _MARK, False))
