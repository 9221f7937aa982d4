"""The static leaderboard page: one ``index.html`` built from bundles, readable offline.

Python does the numbers (``page_data``): per task, each cell's headline score, its % of the same model's
``none`` cell, the Pareto front per model of accuracy against each x-axis of :data:`AXES` (measured prefill
speed-up, prefill FLOPs ratio, kept visual tokens; ``pareto_front``) and the cross-task Spearman matrix
(``scipy.stats.spearmanr``). A measured speed-up exists only for cells timed side by side with their
baseline (one sweep invocation, one host); when some cell was not, the page opens on the FLOPs axis
(:func:`default_axis`). They are embedded as JSON in the page
(``template.html``, a package file), whose own script draws the sortable table and the two plots as SVG: no
server, no CDN, no plotting library.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import partial
from importlib import resources
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

DATA_MARK = "/*__LEADERBOARD_DATA__*/null"
AXES: dict[str, dict[str, Any]] = {
    "speedup": {"key": "speedup", "better": "higher", "label": "measured LLM prefill speed-up (vs. unpruned)"},
    "flops": {"key": "flops_ratio", "better": "lower", "label": "prefill FLOPs ratio (pruned / unpruned)"},
    "tokens": {"key": "kept_tokens", "better": "lower", "label": "visual tokens kept (mean per sample)"},
}
"""The scatter's x-axes: cell field, and which direction is better (the Pareto front maximises accuracy and
minimises cost, or maximises speed-up). Shared with ``lmms-prune report``'s plots."""


def pareto_front(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Mask of the Pareto-optimal rows of ``points`` (n, d), every column to be maximised.

    A point is on the front when no other point is at least as good in every column and better in one
    (equal points are all on the front). Returns a bool array of shape (n,)."""
    p = np.asarray(points, dtype=float).reshape(len(points), -1)
    if len(p) == 0:
        return np.zeros(0, dtype=bool)
    at_least = (p[None, :, :] >= p[:, None, :]).all(-1)  # [i, j]: j is at least as good as i everywhere
    better = (p[None, :, :] > p[:, None, :]).any(-1)  # [i, j]: j is better than i somewhere
    return ~(at_least & better).any(1)


def default_axis(cells: Sequence[Mapping[str, Any]]) -> str:
    """``speedup`` when every pruned cell that has a baseline has a speed-up measured side by side with it,
    else ``flops`` (the theoretical cost, comparable across runs and hosts)."""
    pruned = [c for c in cells if c["method"] != "none"]
    if pruned and all(c["speedup"] is not None for c in pruned):
        return "speedup"
    return "flops"


def front_of(items: Sequence[Any], x: Any, y: Any, x_better: str) -> list[Any]:
    """The items on the Pareto front of (x, y): ``x(item)`` a cost or a speed-up (``x_better`` ``"lower"`` or
    ``"higher"``), ``y(item)`` a (score, higher is better) pair; items lacking either are left out."""
    sign_x = 1.0 if x_better == "higher" else -1.0
    pts = [(it, x(it), y(it)) for it in items]
    pts = [(it, xv, yv) for it, xv, yv in pts if xv is not None and yv is not None and yv[0] is not None]
    if not pts:
        return []
    mask = pareto_front([[sign_x * xv, (1.0 if hib else -1.0) * v] for _, xv, (v, hib) in pts])
    return [it for (it, _, _), on in zip(pts, mask) if on]


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation of two equally long score lists (None below 3 pairs or for a constant list)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    rho = float(spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho


def _model_label(checkpoint: Mapping[str, Any], duplicate_families: set[str]) -> str:
    family = checkpoint["family"]
    if family not in duplicate_families:
        return family
    name = checkpoint["pretrained"].rstrip("/").split("/")[-1]
    rev = f"@{checkpoint['revision'][:7]}" if checkpoint.get("revision") else ""
    return f"{family} {name}{rev}"


def _model_key(bundle: Mapping[str, Any]) -> tuple[str, str, str]:
    c = bundle["checkpoint"]
    return c["family"], c["pretrained"], c.get("revision") or ""


def _headline_value(bundle: Mapping[str, Any], task: str) -> tuple[str | None, float | None, bool]:
    """(metric, value, higher is better) of the task's headline metric in ``bundle``."""
    info = bundle["tasks"].get(task)
    if info is None or not info["headline"]:
        return None, None, True
    metric = info["headline"]
    values = bundle["accuracies"].get(task, {})
    value = values.get(f"{metric},none")
    if value is None:
        value = next((v for k, v in values.items() if k.split(",")[0] == metric), None)
    hib = bundle.get("higher_is_better", {}).get(task, {}).get(metric, True)
    return metric, value, bool(hib)


def _changed_parameters(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """The method's parameters that differ from its preset's defaults (keep ratio aside). The defaults are
    ``PruneConfig``'s with the preset's settings laid over, unvalidated (d2pruner has no default prior)."""
    import dataclasses

    from lmms_prune.presets import PRESETS, PruneConfig

    m = bundle["method"]
    default = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    default.update(PRESETS[m["name"]].settings if m["name"] in PRESETS else {})
    return {k: v for k, v in m["parameters"].items()
            if k not in ("method", "keep_ratio") and default.get(k) != v}


def _baseline(bundles: Sequence[Mapping[str, Any]], bundle: Mapping[str, Any]) -> Mapping[str, Any] | None:
    nones = [b for b in bundles if b["method"]["name"] == "none" and _model_key(b) == _model_key(bundle)]
    same_limit = [b for b in nones if b["settings"].get("limit") == bundle["settings"].get("limit")]
    return (same_limit or nones or [None])[0]


def page_data(bundles: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (see the module docstring)."""
    names = list(names or [f"bundle {i}" for i in range(len(bundles))])
    seen: dict[str, str] = {}
    for b, name in zip(bundles, names):
        if b["fingerprint"] in seen:
            raise ValueError(f"{name} and {seen[b['fingerprint']]}: the same cell (fingerprint {b['fingerprint']}) "
                             "twice; give each cell's bundle once")
        seen[b["fingerprint"]] = name
    families: dict[str, set[tuple[str, str, str]]] = {}
    for b in bundles:
        families.setdefault(b["checkpoint"]["family"], set()).add(_model_key(b))
    duplicate_families = {f for f, keys in families.items() if len(keys) > 1}

    tasks: list[str] = []
    top_level: list[str] = []
    for b in bundles:
        grouped = {s for info in b["tasks"].values() for s in info["subtasks"]}
        for t in b["tasks"]:
            if t not in tasks:
                tasks.append(t)
            if t not in grouped and t not in top_level:
                top_level.append(t)
    cells = []
    for b in bundles:
        base = _baseline(bundles, b)
        eff = b["efficiency"]
        scores = {}
        for t in b["tasks"]:
            metric, value, hib = _headline_value(b, t)
            base_value = _headline_value(base, t)[1] if base is not None else None
            pct = 100.0 * value / base_value if value is not None and base_value else None
            scores[t] = {"metric": metric, "value": value, "pct": pct, "higher_is_better": hib,
                         "samples": b["tasks"][t]["samples"]}
        cells.append({
            "id": b["fingerprint"], "model": _model_label(b["checkpoint"], duplicate_families),
            "pretrained": b["checkpoint"]["pretrained"], "method": b["method"]["name"],
            "keep": b["method"]["keep_ratio"], "params": _changed_parameters(b), "scores": scores,
            "kept_tokens": eff["visual_tokens_after"], "tokens_before": eff["visual_tokens_before"],
            "kept_ratio": eff["visual_kept_ratio"], "speedup": eff["prefill_speedup"],
            "speedup_note": eff.get("speedup_note"),
            "flops_ratio": eff["prefill_flops_ratio"], "kv_ratio": eff["kv_cache_ratio"],
            "hardware": b["hardware"]["device_name"], "world_size": b["hardware"]["world_size"],
            "versions": b["versions"], "digest": b["logs"]["digest"],
        })
    pareto: dict[str, dict[str, dict[str, list[str]]]] = {axis: {} for axis in AXES}
    for axis, spec in AXES.items():
        for t in tasks:
            for model in sorted({c["model"] for c in cells}):
                front = front_of([c for c in cells if c["model"] == model], itemgetter(spec["key"]),
                                 partial(_score_of, task=t), spec["better"])
                if front:
                    pareto[axis].setdefault(t, {})[model] = [c["id"] for c in front]
    return {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tasks": tasks,
            "top_level_tasks": top_level, "cells": cells, "pareto": pareto, "axes": AXES,
            "default_axis": default_axis(cells), "cross_task": cross_task(cells, top_level)}


def _score_of(cell: Mapping[str, Any], task: str) -> tuple[float | None, bool] | None:
    s = cell["scores"].get(task)
    return None if s is None else (s["value"], s["higher_is_better"])


def _cross_value(cell: Mapping[str, Any], task: str, use_pct: bool) -> float | None:
    s = cell["scores"].get(task)
    if s is None:
        return None
    v = s["pct"] if use_pct else s["value"]
    if v is None:
        return None
    return v if s["higher_is_better"] else -v


def cross_task(cells: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Spearman rank correlation, for each pair of tasks, of the pruned cells' scores on the two (as % of
    the unpruned run where every cell has one, else the raw score), and each cell's rank per task."""
    from scipy.stats import rankdata

    pruned = [c for c in cells if c["method"] != "none"]
    use_pct = all(c["scores"].get(t, {}).get("pct") is not None for c in pruned for t in tasks if t in c["scores"])
    rho: list[list[float | None]] = []
    counts: list[list[int]] = []
    for a in tasks:
        rho.append([])
        counts.append([])
        for b in tasks:
            pairs = [(_cross_value(c, a, use_pct), _cross_value(c, b, use_pct)) for c in pruned]
            pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
            counts[-1].append(len(pairs))
            rho[-1].append(spearman([x for x, _ in pairs], [y for _, y in pairs]))
    ranks: dict[str, dict[str, float]] = {}
    for t in tasks:
        have = [(c["id"], _cross_value(c, t, use_pct)) for c in pruned]
        have = [(i, v) for i, v in have if v is not None]
        if have:
            r = rankdata([-v for _, v in have], method="min")
            ranks[t] = {i: float(k) for (i, _), k in zip(have, r)}
    return {"tasks": list(tasks), "rho": rho, "n": counts, "scale": "% of unpruned" if use_pct else "score",
            "ranks": ranks}


def render(data: Mapping[str, Any]) -> str:
    """The page's HTML with ``data`` embedded (``<`` escaped so no string in it can close the script)."""
    template = resources.files("lmms_prune.leaderboard").joinpath("template.html").read_text(encoding="utf-8")
    if DATA_MARK not in template:
        raise RuntimeError(f"template.html lost its data mark {DATA_MARK!r}")
    payload = json.dumps(data, allow_nan=False)  # bundles are finite (schema); a ratio of them could overflow.replace("<", "\\u003c").replace("\u2028", "\\u2028")
    return template.replace(DATA_MARK, payload)


def write_page(bundle_files: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Validate the bundles, build the page data and write ``out_dir/index.html``; returns its path."""
    from lmms_prune.leaderboard.bundle import bundle_paths, load_bundle

    paths = bundle_paths([str(p) for p in bundle_files])
    if not paths:
        raise FileNotFoundError("no bundles given: pass bundle files or folders of them")
    bundles = [load_bundle(p) for p in paths]
    data = page_data(bundles, [str(p) for p in paths])
    check_finite(data, paths)
    from lmms_prune.leaderboard.paths import write_inside

    return write_inside(out_dir, "index.html", render(data))


def check_finite(data: Mapping[str, Any], paths: Sequence[Path]) -> None:
    """Raise ``ValueError`` naming the bundle and field of any non-finite number the page would show (a
    ratio of two finite figures can still overflow: 1e15 / 1e-300)."""
    for cell, path in zip(data["cells"], paths):
        for name, value in _leaves(cell):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{path}: {name} is {value} on the page; the bundle's figures are out of range")


def _leaves(value: Any, name: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{name}.{k}" if name else str(k))]
    return [(name, value)]
