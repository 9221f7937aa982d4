"""Leaderboard tables from lmms-eval result files: methods x keep ratios x tasks, absolute and % of unpruned.

``collect(folder)`` reads every ``*_results.json`` below ``folder`` (a sweep's output or any lmms-eval output
folder) and the efficiency JSON written next to it by this package's models. Rows are (model, method, keep
ratio); for each task family (an lmms-eval group such as ``refcoco_ground``, or a lone task) the columns are its
splits and its average, each shown as the absolute score and the % of the unpruned run of the same model
(method ``none``, same checkpoint). Efficiency columns: mean visual tokens kept, the final count and the
prefill FLOPs as % of the unpruned run's, LLM prefill and time-to-first-token (TTFT) speed-ups and KV-cache
reduction against that same unpruned run, and the samples these rest on.

Matched budgets (``match``): multi-stage methods (pyramiddrop, sparsevlm) keep a different number of tokens at
each layer, and their ``keep_ratio`` is the AVERAGE per layer (the FLOPs equivalent), not the final count.
``match="keep"`` (default) labels rows by the budget parameter as run (``keep_ratio``; for runs given
``stage_ratio`` or ``keep_tokens``, the measured equivalent: the mean visual tokens per layer for multi-stage
runs, the final count otherwise, as a fraction of the visual tokens); ``match="count"`` labels every row by its
measured final count fraction and ``match="flops"`` by its measured prefill FLOPs fraction, both rounded to
two decimals, so that methods at equal final count or at equal FLOPs share a keep value (and the cross-task
view compares them there).

One result per cell: runs are keyed by their fingerprint (the sweep's ``cell.json`` in a folder above the
results file, else the fingerprint of the results file's own model, model arguments without
``efficiency_path``, tasks and ``--limit``). When a cell holds several results (an interrupted run that wrote
late, two copies of a folder), the newest (lmms-eval's ``date`` stamp, then the file time) is kept and the
report lists every result it dropped.

Speed-ups side by side: a prefill speed-up divides the baseline's timing by the row's, which means something
only when both were measured in one sweep invocation on one host (the ``measured_with`` record of each
efficiency JSON, `lmms_prune.efficiency.side_by_side`). Otherwise the row says "not comparable" and the notes
say why; the plots then default to the prefill FLOPs axis (``x_axis``: ``speedup``, ``flops`` or ``tokens``,
each plot with its Pareto front per model on that axis).

Junk is skipped, never fatal: a ``*_results.json`` that is not UTF-8 JSON holding an object with a
``results`` object, a dangling link, or a result whose headline score is not a finite number (a stray NaN
would otherwise add a row and turn "% of unpruned" into n/a) is left out, and the notes name the file and why.

Warm-up: a process's first batch pays its cold start (kernel compilation, allocator growth, lazy imports),
which once made a 2-sample fastv run read 27x faster. Timing means (LLM prefill seconds, hence the speed-up)
therefore leave out, per process, the first batch of every task: lmms-eval gives rank ``r`` of ``W`` processes
the samples whose ``doc_id`` is ``r`` modulo ``W`` and each process answers a task's samples in ``doc_id``
order in batches of ``batch_size``, so the first ``batch_size`` such ``doc_id`` of each (task, rank) are
dropped (one batch per task rather than only the very first one, because the records do not say in which
order the tasks ran). When the records carry ``rank`` and ``position`` (0-based order within the process), the
first batch by ``position`` of each rank is dropped instead. Token counts and the KV-cache reduction are
deterministic and use every sample. The report shows, per row, how many samples were scored for efficiency
and how many of them are timed.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Headline metric of known tasks, in order of preference; other tasks use their first numeric metric.
HEADLINE_METRICS = ("acc@0.5", "pope_accuracy", "mme_perception_score", "mme_cognition_score", "accuracy",
                    "acc", "exact_match", "anls", "relaxed_overall")


@dataclass
class Run:
    """One lmms-eval run: its model, pruning settings, task scores and efficiency summary."""

    path: Path
    model: str
    family: str
    method: str
    keep: float
    pretrained: str
    scores: dict[str, float]  # task or group name -> headline score
    metric: dict[str, str]  # task -> the metric used
    groups: dict[str, list[str]]
    efficiency: dict[str, Any] = field(default_factory=dict)  # `efficiency_figures` of the run
    fingerprint: str = ""
    date: str = ""
    skipped: int = 0
    multi_stage: bool = False  # several pruning layers: keep_ratio is the average kept per layer
    measured_with: dict[str, Any] = field(default_factory=dict)  # {"invocation", "host"} of its timings

    @property
    def key(self) -> tuple[str, str]:
        return self.family, self.pretrained


def parse_model_args(text: str | None) -> dict[str, str]:
    """An lmms-eval ``--model_args`` string as key -> value text (lmms-eval's own parser)."""
    from lmms_eval.utils import simple_parse_args_string

    return {str(k): str(v) for k, v in simple_parse_args_string(text or "").items()}


def _headline(metrics: dict[str, Any]) -> tuple[str, float] | None:
    values = {}
    for name, value in metrics.items():
        if "," not in name or "stderr" in name or isinstance(value, (str, bool)) or value is None:
            continue
        try:
            values[name.split(",")[0]] = float(value)
        except (TypeError, ValueError):  # a list or an object where lmms-eval writes a number
            continue
    for m in HEADLINE_METRICS:
        if m in values:
            return m, values[m]
    return next(iter(values.items()), None)


def _family_and_method(model: str, args: dict[str, str]) -> tuple[str, str]:
    from lmms_prune.presets import PRESETS

    for preset in sorted(PRESETS, key=len, reverse=True):
        if model.endswith(f"_{preset}"):
            return model[: -len(preset) - 1], preset
    if model.endswith("_prune"):
        return model[: -len("_prune")], args.get("method", "fastv")
    return model, args.get("method", "none")


def _efficiency_document(results_path: Path, args: dict[str, str]) -> dict[str, Any]:
    """The efficiency JSON this package's wrapper wrote for the run of ``results_path`` ({} if none)."""
    candidates = []
    if args.get("efficiency_path"):
        p = Path(args["efficiency_path"])
        candidates += [p] if p.suffix == ".json" else sorted(p.glob("*_efficiency.json"))
    candidates += sorted(results_path.parent.glob("*_efficiency.json"))
    candidates += sorted(results_path.parent.parent.glob("efficiency.json"))
    candidates += sorted(results_path.parent.parent.parent.glob("efficiency.json"))
    from lmms_prune.leaderboard.bundle import read_json

    for c in candidates:
        if c.is_file():
            return read_json(c)
    return {}


def efficiency_figures(document: dict[str, Any]) -> dict[str, Any]:
    """Means of a wrapper's efficiency JSON: token and KV means over every sample, timing means over the
    samples left by `warm_samples`; ``samples`` and ``timed_samples`` say how many each rests on. A document
    without per-sample records gives its summary's means (``timed_samples`` None: warm-up not excluded)."""
    summary = dict(document.get("summary", {}))
    records = document.get("samples")
    if not records:
        return {**summary, "timed_samples": None}
    out: dict[str, Any] = {"samples": len(records), "skipped": summary.get("skipped", 0)}
    for key in ("visual_before", "visual_after", "kv_cache_bytes", "kv_cache_bytes_unpruned", "prefill_flops",
                "prefill_flops_unpruned"):
        values = [float(r[key]) for r in records if r.get(key) is not None]
        out[f"mean_{key}"] = sum(values) / len(values) if values else None
    per_layer = [sum(t - (r["seq_len_before"] - r["visual_before"]) for t in r["tokens_per_layer"])
                 / len(r["tokens_per_layer"]) for r in records
                 if r.get("tokens_per_layer") and r.get("seq_len_before") is not None
                 and r.get("visual_before") is not None]
    out["mean_visual_per_layer"] = sum(per_layer) / len(per_layer) if per_layer else None
    from lmms_prune.efficiency import warm_samples

    timed = warm_samples(records, document.get("world_size", 1))
    out["timed_samples"] = len(timed)
    for key in ("llm_prefill_seconds", "select_seconds", "decode_seconds", "end_to_end_seconds", "ttft_seconds"):
        values = [float(r[key]) for r in timed if r.get(key) is not None]
        out[f"mean_{key}"] = sum(values) / len(values) if values else None
    return out


def run_fingerprint(path: Path, data: dict[str, Any], root: Path | None = None) -> str:
    """The cell fingerprint of a results file: ``cell.json`` of the nearest folder above it (up to ``root``),
    else a fingerprint of its model, model arguments (without ``efficiency_path``), tasks and limit."""
    from lmms_prune.fingerprint import fingerprint

    for folder in path.parents:
        cell = folder / "cell.json"
        if cell.is_file():
            try:
                return str(json.loads(cell.read_text())["fingerprint"])
            except (OSError, ValueError, KeyError):
                break
        if root is not None and folder == root:
            break
    config = data.get("config", {})
    args = parse_model_args(config.get("model_args"))
    args.pop("efficiency_path", None)
    return fingerprint({"model": config.get("model"), "model_args": args, "limit": config.get("limit"),
                        "tasks": sorted(data.get("results", {}))})


def read_results(path: Path) -> dict[str, Any]:
    """An lmms-eval results file; ``ValueError`` naming it when it is not UTF-8 JSON (a dangling link, bad
    bytes, bad syntax), not an object, or its ``results`` is not an object of task objects."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable lmms-eval results file ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an lmms-eval results object")
    results = data.get("results")
    if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
        raise ValueError(f"{path}: its 'results' is not an object of task -> metrics objects")
    if not isinstance(data.get("config", {}), dict):
        raise ValueError(f"{path}: its 'config' is not an object")
    return data


def load_run(path: Path, root: Path | None = None) -> Run:
    """One run from its results file (`read_results`) and efficiency JSON; ``ValueError`` naming the file when
    a headline score is not a finite number."""
    from lmms_prune.presets import PRESETS

    data = read_results(path)
    config = data.get("config", {})
    model = str(config.get("model", "unknown"))
    args = parse_model_args(config.get("model_args"))
    family, method = _family_and_method(model, args)
    settings = PRESETS[method].settings if method in PRESETS else {}
    multi = _given(args.get("prune_layers", settings.get("prune_layers")))
    document = _efficiency_document(path, args)
    figures = efficiency_figures(document)
    keep = _budget(method, args, settings, multi, figures)
    scores, metric = {}, {}
    for task, metrics in data.get("results", {}).items():
        head = _headline(metrics)
        if head:
            metric[task], scores[task] = head
            if not math.isfinite(head[1]):
                raise ValueError(f"{path}: {task} {head[0]} is {head[1]}, not a score; a stray or broken result")
    groups = {g: list(subs) for g, subs in data.get("group_subtasks", {}).items() if subs}
    return Run(path, model, family, method, keep, args.get("pretrained", ""), scores, metric, groups,
               figures, run_fingerprint(path, data, root), str(data.get("date", "")),
               int(document.get("summary", {}).get("skipped", 0) or 0), multi,
               dict(document.get("measured_with") or {}))


def _given(value: Any) -> bool:
    return value is not None and str(value).strip().lower() not in ("", "none", "null")


def _budget(method: str, args: dict[str, str], settings: dict[str, Any], multi: bool,
            figures: dict[str, Any]) -> float:
    """A run's keep label (see ``match`` in the module docstring): ``keep_ratio`` as run, else the measured
    equivalent (NaN when the run has no efficiency records to measure it from)."""
    if method == "none":
        return 1.0
    if _given(args.get("keep_ratio")):
        return float(args["keep_ratio"])
    own = not (_given(args.get("stage_ratio")) or _given(args.get("keep_tokens")))
    if own and settings.get("keep_ratio", 0.1) is not None:
        return float(settings.get("keep_ratio", 0.1))
    before = figures.get("mean_visual_before")
    after = figures.get("mean_visual_per_layer" if multi else "mean_visual_after")
    return after / before if before and after is not None else math.nan


@dataclass
class Dropped:
    """A result the report left out because a newer one of the same cell exists."""

    path: Path
    kept: Path


@dataclass
class Skipped:
    """A results file the report left out because it cannot be used, and why."""

    path: Path
    reason: str


def collect_runs(folder: str | Path) -> tuple[list[Run], list[Dropped], list[Skipped]]:
    """Every ``*_results.json`` below ``folder``, one per cell fingerprint (the newest); the dropped ones; and
    the files skipped as unusable (each naming the file and why)."""
    folder = Path(folder)
    files = sorted(folder.rglob("*_results.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no lmms-eval *_results.json files below it")
    runs, skipped = [], []
    for f in files:
        try:
            runs.append(load_run(f, folder))
        except ValueError as err:
            skipped.append(Skipped(f, str(err)))
    if not runs:
        raise FileNotFoundError(f"{folder}: no usable lmms-eval results below it; skipped: "
                                + "; ".join(s.reason for s in skipped))
    newest: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: (r.date, _mtime(r.path), str(r.path))):
        newest[run.fingerprint] = run
    kept = [r for r in runs if newest[r.fingerprint] is r]
    dropped = [Dropped(r.path, newest[r.fingerprint].path) for r in runs if newest[r.fingerprint] is not r]
    return kept, dropped, skipped


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def collect(folder: str | Path) -> list[Run]:
    """The runs below ``folder``, one per cell (`collect_runs`)."""
    return collect_runs(folder)[0]


def _families(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Task family -> its columns (splits, then the group itself as the average)."""
    families: dict[str, list[str]] = {}
    grouped = set()
    for run in runs:
        for group, subs in run.groups.items():
            cols = families.setdefault(group, [])
            for s in subs:
                if s not in cols:
                    cols.append(s)
            grouped.update(subs)
    for run in runs:
        for task in run.scores:
            if task not in grouped and task not in families:
                families[task] = []
    return families


def _baseline(runs: Sequence[Run], run: Run) -> Run | None:
    return next((r for r in runs if r.method == "none" and r.key == run.key), None)


def _pct(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return 100.0 * value / base


@dataclass
class Table:
    family: str
    columns: list[str]
    rows: list[dict[str, Any]]


MATCHES = ("keep", "count", "flops")
MATCH_TEXT = {"count": "final visual-token count (keep = final kept fraction, measured)",
              "flops": "prefill FLOPs (keep = FLOPs fraction of the unpruned prefill, measured)"}


def _fraction(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def build_tables(runs: Sequence[Run], match: str = "keep") -> list[Table]:
    """One table per task family; ``match`` chooses the rows' keep label (module docstring)."""
    from lmms_prune.efficiency import side_by_side

    if match not in MATCHES:
        raise ValueError(f"match={match!r}: must be one of {', '.join(MATCHES)}")
    tables = []
    order = {"none": 0}
    for family, subs in _families(runs).items():
        columns = [*subs, family] if subs else [family]
        rows = []
        ranked = sorted(runs, key=lambda r: (r.family, r.pretrained, order.get(r.method, 1), r.method,
                                             -r.keep if not math.isnan(r.keep) else 0.0))
        for run in ranked:
            if not any(c in run.scores for c in columns):
                continue
            base = _baseline(runs, run)
            eff = run.efficiency
            count = _fraction(eff.get("mean_visual_after"), eff.get("mean_visual_before"))
            flops = _fraction(eff.get("mean_prefill_flops"), eff.get("mean_prefill_flops_unpruned"))
            keep = run.keep
            if match != "keep" and run.method != "none":
                measured = count if match == "count" else flops
                keep = round(measured, 2) if measured is not None else math.nan
            row: dict[str, Any] = {"model": run.family, "pretrained": run.pretrained, "method": run.method,
                                   "keep": keep, "has_baseline": base is not None,
                                   "final kept %": None if count is None else 100 * count,
                                   "FLOPs %": None if flops is None else 100 * flops}
            for c in columns:
                value = run.scores.get(c)
                if c == family and value is None and subs:
                    parts = [run.scores[s] for s in subs if s in run.scores]
                    value = sum(parts) / len(parts) if parts else None
                row[c] = value
                base_value = None
                if base is not None:
                    base_value = base.scores.get(c)
                    if c == family and base_value is None and subs:
                        bparts = [base.scores[s] for s in subs if s in base.scores]
                        base_value = sum(bparts) / len(bparts) if bparts else None
                row[f"{c} %"] = _pct(value, base_value)
            beff = base.efficiency if base else {}
            row["samples"] = eff.get("samples")
            row["timed"] = eff.get("timed_samples")
            row["visual kept"] = eff.get("mean_visual_after")
            bp, rp = beff.get("mean_llm_prefill_seconds"), eff.get("mean_llm_prefill_seconds")
            compared = base is not None and base is not run
            row["speed-up note"] = side_by_side(run.measured_with, base.measured_with) if compared else None
            row["prefill speed-up"] = bp / rp if bp and rp and row["speed-up note"] is None else None
            # time to first token (preprocessing, vision, hand-over, prefill): what a user waits for
            bt, rt = beff.get("mean_ttft_seconds"), eff.get("mean_ttft_seconds")
            row["TTFT speed-up"] = bt / rt if bt and rt and row["speed-up note"] is None else None
            bk, rk = beff.get("mean_kv_cache_bytes"), eff.get("mean_kv_cache_bytes")
            row["KV reduction %"] = 100.0 * (1 - rk / bk) if bk and rk else None
            rows.append(row)
        tables.append(Table(family, columns, rows))
    return tables


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _cell(row: dict[str, Any], col: str) -> str:
    value, pct = row.get(col), row.get(f"{col} %")
    if value is None:
        return "n/a"
    if not row["has_baseline"]:
        return f"{value:.2f} (no unpruned run)"
    return f"{value:.2f} ({_fmt(pct, 1)}%)"


def _speedup(row: dict[str, Any], column: str = "prefill speed-up") -> str:
    return "not comparable" if row.get("speed-up note") else _fmt(row.get(column))


def to_markdown(tables: Sequence[Table]) -> str:
    out = []
    for t in tables:
        head = ["model", "method", "keep", *t.columns, "visual kept", "final kept %", "FLOPs %",
                "prefill speed-up", "TTFT speed-up", "KV reduction %", "samples (timed)"]
        out += [f"### {t.family}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in t.rows:
            timed = "all, warm-up included" if r.get("timed") is None else str(r["timed"])
            counted = "n/a" if r.get("samples") is None else f"{r['samples']} ({timed})"
            cells = [r["model"], r["method"], _fmt(r["keep"], 2), *[_cell(r, c) for c in t.columns],
                     _fmt(r["visual kept"], 1), _fmt(r.get("final kept %"), 1), _fmt(r.get("FLOPs %"), 1),
                     _speedup(r), _speedup(r, "TTFT speed-up"), _fmt(r["KV reduction %"], 1), counted]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def to_csv(tables: Sequence[Table], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task_family", "model", "pretrained", "method", "keep", "column", "score", "pct_of_unpruned",
                    "visual_kept", "final_kept_pct", "flops_pct", "prefill_speedup", "kv_reduction_pct",
                    "efficiency_samples", "timed_samples", "ttft_speedup"])
        for t in tables:
            for r in t.rows:
                for c in t.columns:
                    w.writerow([t.family, r["model"], r["pretrained"], r["method"], r["keep"], c, r.get(c),
                                r.get(f"{c} %"), r["visual kept"], r.get("final kept %"), r.get("FLOPs %"),
                                r["prefill speed-up"], r["KV reduction %"],
                                r.get("samples"), r.get("timed"), r.get("TTFT speed-up")])
    return path


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def to_latex(tables: Sequence[Table]) -> str:
    out = []
    for t in tables:
        cols = ["Method", "Keep", *t.columns, "Tokens", "Speed-up", "TTFT speed-up"]
        out += [r"\begin{table}[t]", r"\centering", r"\caption{" + _tex(t.family) + "}",
                r"\begin{tabular}{ll" + "c" * (len(cols) - 2) + "}", r"\toprule",
                " & ".join(_tex(c) for c in cols) + r" \\", r"\midrule"]
        for r in t.rows:
            vals = []
            for c in t.columns:
                v, p = r.get(c), r.get(f"{c} %")
                vals.append("n/a" if v is None else (f"{v:.2f}" + (f" ({p:.1f}\\%)" if p is not None else "")))
            out.append(" & ".join([_tex(r["method"]), _fmt(r["keep"], 2), *vals, _fmt(r["visual kept"], 0),
                                   _speedup(r), _speedup(r, "TTFT speed-up")]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def cross_task(tables: Sequence[Table], keep: float) -> str:
    """% of unpruned per task family for each method at one keep ratio (generalisation check)."""
    methods: dict[tuple[str, str], dict[str, Any]] = {}
    for t in tables:
        for r in t.rows:
            if math.isclose(r["keep"], keep, abs_tol=1e-9) and r["method"] != "none":
                methods.setdefault((r["model"], r["method"]), {})[t.family] = r.get(f"{t.family} %")
    families = [t.family for t in tables]
    lines = [f"### % of unpruned at keep={keep:g}", "", "| model | method | " + " | ".join(families) + " |",
             "|" + "---|" * (len(families) + 2)]
    for (model, method), vals in sorted(methods.items()):
        lines.append(f"| {model} | {method} | " + " | ".join(_fmt(vals.get(f), 1) for f in families) + " |")
    return "\n".join(lines) + "\n"


X_AXES: dict[str, dict[str, str]] = {
    "speedup": {"column": "prefill speed-up", "better": "higher", "label": "measured LLM prefill speed-up (x)"},
    "flops": {"column": "FLOPs %", "better": "lower", "label": "prefill FLOPs, % of unpruned"},
    "tokens": {"column": "visual kept", "better": "lower", "label": "visual tokens kept (mean per sample)"},
}
"""The plots' x-axes (the leaderboard page's, `lmms_prune.leaderboard.page.AXES`), as report columns."""


def default_x_axis(tables: Sequence[Table]) -> str:
    """``speedup`` when every pruned row has a speed-up measured side by side with its baseline, else
    ``flops``."""
    pruned = [r for t in tables for r in t.rows if r["method"] != "none"]
    return "speedup" if pruned and all(r["prefill speed-up"] is not None for r in pruned) else "flops"


def plot_fronts(table: Table, axis: str) -> dict[str, list[dict[str, Any]]]:
    """Per model, the rows of ``table`` on the Pareto front of its average score against ``axis``."""
    from lmms_prune.leaderboard.page import front_of

    spec = X_AXES[axis]
    fronts = {}
    for model in sorted({r["model"] for r in table.rows}):
        rows = [r for r in table.rows if r["model"] == model]
        fronts[model] = front_of(rows, lambda r: r[spec["column"]],
                                 lambda r: (r.get(table.family), True), spec["better"])
    return fronts


def plot(tables: Sequence[Table], out_dir: Path, axis: str = "flops") -> list[Path]:
    """One PNG per task family: its average score against ``axis`` (:data:`X_AXES`), one line per method,
    each model's Pareto front marked and joined; files ``accuracy_vs_<axis>_<family>.png``."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmms_prune.leaderboard.paths import safe_name, write_inside

    if axis not in X_AXES:
        raise ValueError(f"x_axis={axis!r}: must be one of {', '.join(X_AXES)}")
    spec = X_AXES[axis]
    paths = []
    for t in tables:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        by_method: dict[str, list[tuple[float, float]]] = {}
        for r in t.rows:
            value, x = r.get(t.family), r.get(spec["column"])
            if value is None or x is None:
                continue
            by_method.setdefault(f"{r['model']} {r['method']}", []).append((x, value))
        for name, pts in sorted(by_method.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linestyle=":" if name.endswith(" none") else "-")
        for model, front in plot_fronts(t, axis).items():
            pts = sorted((r[spec["column"]], r[t.family]) for r in front)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="black", linewidth=2.5, alpha=0.25,
                    marker="D", label=f"{model} Pareto front")
        better = "higher is faster" if spec["better"] == "higher" else "lower is cheaper"
        ax.set(xlabel=f"{spec['label']} ({better})", ylabel=t.family, title=f"{t.family} vs {axis}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, dpi=120, format="png")
        plt.close(fig)
        paths.append(write_inside(out_dir, safe_name(f"accuracy_vs_{axis}_{t.family.replace('+', 'plus')}.png"),
                                  png.getvalue()))
    return paths


def notes(runs: Sequence[Run], dropped: Sequence[Dropped], folder: Path, skipped: Sequence[Skipped] = (),
          tables: Sequence[Table] = ()) -> str:
    """The report's notes: files skipped as unusable, results dropped as older copies of a cell, speed-ups not
    comparable, runs with skipped samples."""
    lines = [f"- skipped {_relative(s.path, folder)}: {s.reason}" for s in skipped]
    seen = set()
    for t in tables:
        for r in t.rows:
            key = (r["model"], r["pretrained"], r["method"], r["keep"])
            if r.get("speed-up note") and key not in seen:
                seen.add(key)
                lines.append(f"- {r['model']} {r['method']} keep {_fmt(r['keep'], 2)}: prefill speed-up "
                             f"{r['speed-up note']}")
    for d in dropped:
        lines.append(f"- dropped {_relative(d.path, folder)}: an older result of the same cell as "
                     f"{_relative(d.kept, folder)}")
    for run in runs:
        if run.skipped:
            lines.append(f"- {run.family} {run.method} keep {run.keep:g}: {run.skipped} sample(s) skipped "
                         "(on_error=skip), scored as wrong answers")
    return "### Notes\n\n" + "\n".join(lines) + "\n" if lines else ""


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def write_report(folder: str | Path, out: str | Path | None = None, cross_keep: float | None = None,
                 match: str = "keep", x_axis: str = "auto") -> dict[str, Any]:
    """Tables, notes and plots of the runs below ``folder`` into ``out`` (default ``folder/report``);
    ``x_axis``: the plots' x-axis (:data:`X_AXES`), ``auto`` = `default_x_axis`."""
    if x_axis != "auto" and x_axis not in X_AXES:
        raise ValueError(f"x_axis={x_axis!r}: must be auto or one of {', '.join(X_AXES)}")
    runs, dropped, skipped = collect_runs(folder)
    out_dir = Path(out) if out else Path(folder) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs, match)
    keeps = sorted({r["keep"] for t in tables for r in t.rows if r["method"] != "none" and not math.isnan(r["keep"])})
    cross_keep = cross_keep if cross_keep is not None else (min(keeps) if keeps else 1.0)
    markdown = (f"Rows matched by {MATCH_TEXT[match]}.\n\n" if match != "keep" else "") + to_markdown(tables) + \
        "\n" + cross_task(tables, cross_keep)
    extra = notes(runs, dropped, Path(folder), skipped, tables)
    if extra:
        markdown += "\n" + extra
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv", "latex": out_dir / "report.tex"}
    paths["markdown"].write_text(markdown)
    to_csv(tables, paths["csv"])
    paths["latex"].write_text(to_latex(tables))
    axis = default_x_axis(tables) if x_axis == "auto" else x_axis
    for old in out_dir.glob("accuracy_vs_*.png"):  # an earlier report's plots (maybe another axis): replaced
        old.unlink()
    plots = plot(tables, out_dir, axis)
    return {"tables": tables, "markdown": markdown, "paths": paths, "plots": plots, "runs": runs, "dropped": dropped,
            "skipped": skipped, "x_axis": axis, "fronts": {t.family: plot_fronts(t, axis) for t in tables}}
