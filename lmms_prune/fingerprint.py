"""Fingerprints of what determines a result: the key of sweep cells, leaderboard bundles and priors.

A fingerprint is the first 16 hex digits of the SHA-256 of the canonical JSON (sorted keys, no spaces) of a
settings mapping. Two runs with equal settings share a fingerprint; any changed setting (a model argument,
the task list, ``--limit``, a package version) changes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any


def canonical_json(settings: Mapping[str, Any]) -> str:
    """``settings`` as canonical JSON: sorted keys, compact separators, non-JSON values as ``str``."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings: Mapping[str, Any]) -> str:
    """16 hex digits identifying ``settings`` (see the module docstring)."""
    import hashlib

    return hashlib.sha256(canonical_json(settings).encode("utf-8")).hexdigest()[:16]


def package_versions(names: Sequence[str] = ("lmms-prune", "lmms-eval", "transformers", "torch")) -> dict[str, str]:
    """Installed versions of ``names`` (``"not installed"`` for a missing one)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_settings(model: str, pretrained: str, model_args: Mapping[str, Any], tasks: Sequence[str],
                 limit: int | float | None = None, revision: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings that determine an lmms-eval run's result, in the form that :func:`fingerprint` keys.

    ``model``: the lmms-eval model name (``internvl_fastv``); ``pretrained``: the resolved checkpoint (hub id
    or absolute local path); ``model_args``: every other ``--model_args`` key and value, as strings;
    ``revision``: the hub revision, when one is pinned; ``extra``: anything else the result depends on (other
    lmms-eval options, the data source), stored under ``"extra"`` when given.
    """
    settings = {
        "model": model,
        "pretrained": pretrained,
        "revision": revision,
        "model_args": {str(k): str(v) for k, v in model_args.items()},
        "tasks": sorted(tasks),
        "limit": limit,
        "versions": package_versions(),
    }
    if extra:
        settings["extra"] = dict(extra)
    return settings


def settings_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf where two settings mappings differ (nested keys joined by dots)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_differences(a, b, f"{name}.")
        elif canonical_json({"v": a}) != canonical_json({"v": b}):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
