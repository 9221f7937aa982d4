"""Check a bundle against the run it came from: its identity against the run's own records, every figure
recomputed from the per-sample logs.

For the run in RUN_DIR that the bundle names (its ``source``: cell and results file, else the same results
file name, lmms-eval model and model_args):

1. the bundle is valid under the schema, its ``digest`` is that of its content, and its fingerprint is that of
   its settings (and of the cell's ``cell.json`` when the sweep wrote one);
2. every log file's sha256 (per-sample logs, efficiency records, results file, cell.json) and the digest over
   them equal the bundle's (an edited log is caught here);
3. identity: the bundle is rebuilt from the run (``build_bundle``) and every identifying field must be equal,
   by name: ``checkpoint`` (family, pretrained, revision, model_type, lmms-eval model), ``method`` (name,
   keep_ratio, every parameter), ``versions``, ``hardware``, ``run``, ``tasks``, ``higher_is_better``,
   ``source`` and where the timings were measured. Versions and hardware must have been recorded by the run
   itself (its efficiency JSON, or the sweep's ``cell.json`` for versions): a bundle that took them from the
   machine that wrote it fails. The run's records must agree with each other (the efficiency JSON's method
   and checkpoint with the results file's, its ``identity_digest`` with its identity fields). Accuracies for a
   task the run has no results and logs for are refused;
4. every metric of every task is recomputed from the ``--log_samples`` jsonl: the per-sample values that
   lmms-eval logged (each task's ``process_results`` output, e.g. RefCOCO's ``{"iou", "parsed"}`` record under
   ``acc@0.5``/``mean_iou``/``unparseable``) go through the task's own aggregation from its YAML
   (``metric_list[].aggregation``: a function such as ``accuracy_at_05``, or a registered name such as
   ``mean``), exactly as lmms-eval's ``TaskOutput.calculate_aggregate_metric`` does; a group's metrics are
   rebuilt from its subtasks' recomputed values with its ``aggregate_metric_list`` as lmms-eval's
   ``consolidate_group_results`` does; sample counts must equal the logs' line counts;
5. the efficiency figures are recomputed from the per-sample efficiency records (and the speed-up from the
   same model's ``none`` run in RUN_DIR, only when both were measured side by side).

Every mismatch is reported by name; ``lmms-prune submit --verify`` exits non-zero if there is any.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmms_prune.leaderboard.bundle import (
    RunFiles,
    baseline_of,
    build_bundle,
    bundle_digest,
    cell_settings,
    find_runs,
    log_files,
    logs_digest,
    read_json,
    validate,
)

REL_TOL = 1e-9
ABS_TOL = 1e-12


@dataclass
class Verification:
    """The outcome of :func:`verify_bundle`: how many figures were checked and every mismatch, by name."""

    name: str
    checked: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def check(self, what: str, claimed: Any, actual: Any, source: str = "the logs give") -> None:
        self.checked += 1
        if not same(claimed, actual):
            self.mismatches.append(f"{what}: bundle says {claimed!r}, {source} {actual!r}")

    def fail(self, message: str) -> None:
        self.checked += 1
        self.mismatches.append(message)


def same(a: Any, b: Any) -> bool:
    """Equal, numbers up to float rounding (relative 1e-9): the same aggregation over the same values in
    another order may differ in the last bits, never by one sample."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return a == b


class TaskConfigs:
    """Task and group YAML configs (``!function`` resolved) through lmms-eval's ``TaskManager``: this package's
    tasks, the run's ``--include_path`` and extra folders first; lmms-eval's own tasks only when needed."""

    def __init__(self, include_paths: Sequence[str | Path] = ()) -> None:
        from lmms_prune.tasks.takeover import TASKS_DIR

        self.paths = [str(TASKS_DIR)]
        self._managers: list[Any] = []
        self.add(include_paths)

    def add(self, include_paths: Sequence[str | Path]) -> None:
        """Search ``include_paths`` too (the task index is rebuilt on next use only if one is new)."""
        new = [str(p) for p in include_paths if str(p) not in self.paths]
        if new:
            self.paths += new
            self._managers = []

    def _manager(self, with_defaults: bool) -> Any:
        from lmms_eval.tasks import TaskManager

        index = 1 if with_defaults else 0
        while len(self._managers) <= index:
            defaults = len(self._managers) == 1
            self._managers.append(TaskManager(verbosity="ERROR", include_path=list(self.paths),
                                              include_defaults=defaults))
        return self._managers[index]

    def get(self, name: str) -> dict[str, Any]:
        for with_defaults in (False, True):
            manager = self._manager(with_defaults)
            if name in manager.task_index:
                return manager._get_config(name)
        raise KeyError(f"task {name!r}: no YAML in lmms-eval's tasks or in {', '.join(self.paths)}; pass "
                       "--include-path FOLDER (the folder the run used as lmms-eval --include_path)")


def aggregations(config: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """metric name -> aggregation function of a task config, as lmms-eval's
    ``ConfigurableTask._prepare_metric_and_aggregation`` resolves it."""
    from lmms_eval.api.registry import get_aggregation, get_metric_aggregation

    out = {}
    for entry in config.get("metric_list") or []:
        name = entry["metric"]
        agg = entry.get("aggregation")
        if callable(agg):
            out[name] = agg
        elif isinstance(agg, str):
            out[name] = get_aggregation(agg)
        else:
            out[name] = get_metric_aggregation(name)
    return out


def read_samples(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def recompute_task(samples: Sequence[Mapping[str, Any]], aggs: Mapping[str, Callable[..., Any]],
                   filters: Sequence[str] = ("none",)) -> dict[str, Any]:
    """``{"metric,filter": value}`` from the logged per-sample values of one task.

    ``samples``: the ``--log_samples`` jsonl records; a record holds each metric's per-sample value under the
    metric's name (and a ``filter`` key when the task has several filters)."""
    out: dict[str, Any] = {}
    for flt in filters:
        rows = [s for s in samples if s.get("filter", flt) == flt]
        for metric, fn in aggs.items():
            items = [s[metric] for s in rows if metric in s]
            if len(items) != len(rows):
                raise ValueError(f"metric {metric}: {len(rows) - len(items)} of {len(rows)} logged samples lack it")
            if fn is None:
                raise ValueError(f"metric {metric}: no aggregation registered for it")
            out[f"{metric},{flt}"] = fn(items, args=None) if "args" in inspect.signature(fn).parameters else fn(items)
    return out


def recompute_group(config: Mapping[str, Any], subtasks: Sequence[str], metrics: Mapping[str, Mapping[str, Any]],
                    sizes: Mapping[str, int]) -> dict[str, Any]:
    """A group's metrics from its subtasks' (recomputed) metrics and sample counts, the way lmms-eval's
    ``consolidate_group_results`` does: each ``aggregate_metric_list`` entry applies to the metric keys that
    contain its name; ``mean`` is ``aggregate_subtask_metrics`` (weighted by size when asked)."""
    from lmms_eval.api.group import GroupConfig
    from lmms_eval.api.metrics import aggregate_subtask_metrics

    group = GroupConfig(**{k: v for k, v in config.items() if k in GroupConfig.__dataclass_fields__})
    out: dict[str, Any] = {}
    if not group.aggregate_metric_list:
        return out
    keys = sorted({k for t in subtasks for k in metrics.get(t, {})})
    for key in keys:
        values = [metrics[t][key] for t in subtasks if key in metrics.get(t, {})]
        counts = [sizes[t] for t in subtasks if key in metrics.get(t, {})]
        for agg in group.aggregate_metric_list:
            if agg.metric not in key:
                continue
            fn = aggregate_subtask_metrics if agg.aggregation == "mean" else agg.aggregation
            out[key] = fn(values, counts, agg.weight_by_size)
    return out


def locate_run(bundle: Mapping[str, Any], run_dir: Path) -> RunFiles:
    """The run in ``run_dir`` the bundle was made from: the one at its ``source`` cell and results file (only
    among the runs below ``run_dir``: a ``source`` that leads out of it is not followed), else the one with the
    same results file name, lmms-eval model and ``--model_args`` (paths into the cell aside)."""
    from lmms_prune.report import parse_model_args

    def args_of(text: str) -> dict[str, str]:
        return {k: v for k, v in parse_model_args(text).items() if k != "efficiency_path"}

    runs = find_runs(run_dir)
    source = bundle["source"]
    named = (run_dir / source["cell"] / source["results_file"]).resolve()
    at_source = [f for f in runs if f.results.resolve() == named]
    if at_source:
        return at_source[0]
    name = Path(source["results_file"]).name
    want = args_of(source["model_args"])
    found = []
    for files in runs:
        if files.results.name != name:
            continue
        config = read_json(files.results).get("config", {})
        if config.get("model") == bundle["checkpoint"]["lmms_eval_model"] and args_of(config.get("model_args")) == want:
            found.append(files)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no run {name} of {bundle['checkpoint']['lmms_eval_model']} with "
                                f"model_args {bundle['source']['model_args']!r}; give the RUN_DIR the bundle was made from")
    return found[0]


def _check_settings(v: Verification, bundle: Mapping[str, Any], files: RunFiles) -> None:
    from lmms_prune.fingerprint import fingerprint

    v.check("fingerprint of the bundle's settings", bundle["fingerprint"], fingerprint(bundle["settings"]))
    settings, fp, source = cell_settings(files)  # cell.json, or rebuilt with the versions the run recorded
    v.check(f"fingerprint ({source})", bundle["fingerprint"], fp, f"the {source} gives")
    compare(v, "settings", bundle["settings"], settings, f"the {source} gives")


def _check_logs(v: Verification, bundle: Mapping[str, Any], files: RunFiles) -> None:
    claimed = bundle["logs"]["files"]
    actual = log_files(files)
    for name in sorted(set(claimed) | set(actual)):
        if name not in actual:
            v.fail(f"log {name}: in the bundle, not in the run ({claimed[name]['path']} is missing)")
        elif name not in claimed:
            v.fail(f"log {name}: in the run ({actual[name]['path']}), not in the bundle")
        else:
            v.check(f"log {name} sha256 ({actual[name]['path']})", claimed[name]["sha256"], actual[name]["sha256"])
            v.check(f"log {name} lines", claimed[name].get("lines"), actual[name].get("lines"))
    v.check("logs digest (over the bundle's file hashes)", bundle["logs"]["digest"], logs_digest(claimed))
    v.check("logs digest (over the run's files)", bundle["logs"]["digest"], logs_digest(actual))


def _check_metrics(v: Verification, bundle: Mapping[str, Any], files: RunFiles, configs: TaskConfigs) -> None:
    tasks = bundle["tasks"]
    recomputed: dict[str, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    for task, info in tasks.items():
        if info["group"]:
            continue
        path = files.samples.get(task)
        if path is None:
            v.fail(f"{task}: no per-sample log (<date>_samples_{task}.jsonl) in {files.results.parent}")
            continue
        samples = read_samples(path)
        sizes[task] = len(samples)
        v.check(f"{task} samples", info["samples"], len(samples))
        try:
            filters = sorted({k.split(",", 1)[1] for k in bundle["accuracies"].get(task, {})}) or ["none"]
            if len(filters) > 1 and not all("filter" in s for s in samples):
                raise ValueError(f"metrics under several filters ({', '.join(filters)}) but the logged samples "
                                 "do not say their filter")
            recomputed[task] = recompute_task(samples, aggregations(configs.get(task)), filters)
        except (KeyError, ValueError, TypeError) as err:
            v.fail(f"{task}: cannot recompute its metrics from {path.name}: {err}")
    for task, info in tasks.items():
        if not info["group"]:
            continue
        subs = info["subtasks"]
        if any(s not in recomputed for s in subs):
            v.fail(f"{task}: subtask(s) {', '.join(s for s in subs if s not in recomputed)} not recomputed")
            continue
        v.check(f"{task} samples", info["samples"], sum(sizes[s] for s in subs))
        try:
            recomputed[task] = recompute_group(configs.get(task), subs, recomputed, sizes)
        except (KeyError, ValueError, TypeError) as err:
            v.fail(f"{task}: cannot recompute the group's metrics: {err}")
    for task, claimed in bundle["accuracies"].items():
        if task not in tasks:
            v.fail(f"accuracies.{task}: metrics for a task the run has no results and no per-sample log for; "
                   "metrics without logs are refused")
            continue
        if task not in recomputed:
            continue
        actual = recomputed[task]
        for key in sorted(set(claimed) | set(actual)):
            if key not in actual:
                v.fail(f"{task} {key}: in the bundle, but the task has no such metric to recompute")
            elif key not in claimed:
                v.fail(f"{task} {key}: recomputed from the logs ({actual[key]!r}), missing from the bundle")
            else:
                v.check(f"{task} {key}", claimed[key], actual[key])


IDENTITY_FIELDS = ("settings_source", "checkpoint", "method", "versions", "versions_source", "hardware", "run",
                   "tasks", "higher_is_better", "source")
"""Top-level bundle fields compared, leaf by leaf, with the bundle rebuilt from the run (module docstring, 3)."""


def compare(v: Verification, name: str, claimed: Any, actual: Any, source: str = "the run gives") -> None:
    """Check ``claimed`` against ``actual`` leaf by leaf (mappings recursively), naming each leaf by its dotted
    path (``method.parameters.prune_layer``); a key on one side only is a mismatch of that key."""
    if isinstance(claimed, Mapping) and isinstance(actual, Mapping):
        for key in sorted(set(claimed) | set(actual), key=str):
            if key not in actual:
                v.fail(f"{name}.{key}: in the bundle ({claimed[key]!r}), not in the run's records")
            elif key not in claimed:
                v.fail(f"{name}.{key}: in the run's records ({actual[key]!r}), missing from the bundle")
            else:
                compare(v, f"{name}.{key}", claimed[key], actual[key], source)
        return
    v.check(name, claimed, actual, source)


def _check_identity(v: Verification, bundle: Mapping[str, Any], files: RunFiles, run_dir: Path) -> None:
    try:
        rebuilt = build_bundle(files, run_dir, baseline_of(files, find_runs(run_dir)))
    except (FileNotFoundError, ValueError) as err:
        v.fail(f"identity: the bundle cannot be rebuilt from the run ({err})")
        return
    for key in IDENTITY_FIELDS:
        compare(v, key, bundle[key], rebuilt[key])
    for key in ("measured_with", "speedup_note"):
        compare(v, f"efficiency.{key}", bundle["efficiency"][key], rebuilt["efficiency"][key])
    if bundle["versions_source"] == "submit host":
        v.fail("versions: taken from the machine that wrote the bundle (versions_source 'submit host'), not "
               "recorded by the run, so they cannot be verified; re-run with this lmms-prune (its efficiency JSON "
               "records them)")
    if bundle["hardware"]["source"] == "submit host":
        v.fail("hardware: taken from the machine that wrote the bundle (hardware.source 'submit host'), not "
               "recorded by the run, so it cannot be verified; re-run with this lmms-prune")
    _check_records_agree(v, files, rebuilt)


def _check_records_agree(v: Verification, files: RunFiles, rebuilt: Mapping[str, Any]) -> None:
    """The efficiency JSON (written by the run's process) agrees with the results file (written by lmms-eval)
    and with its own ``identity_digest``."""
    from lmms_prune.efficiency import identity_digest

    if files.efficiency is None:
        return
    from lmms_prune.loading import resolve_pretrained

    record = read_json(files.efficiency)
    name = files.efficiency.name
    v.checked += 2
    if record.get("method") != rebuilt["method"]["name"]:
        v.fail(f"method.name: the results file's model says {rebuilt['method']['name']!r}, the efficiency JSON "
               f"({name}) {record.get('method')!r}: the run's records disagree")
    pretrained = rebuilt["checkpoint"]["pretrained"]
    if record.get("pretrained") not in (pretrained, resolve_pretrained(pretrained)):  # a short name resolves
        v.fail(f"checkpoint.pretrained: the results file says {pretrained!r}, the efficiency JSON ({name}) "
               f"{record.get('pretrained')!r}: the run's records disagree")
    if "identity_digest" in record:
        v.check(f"efficiency JSON identity_digest ({files.efficiency.name})", record["identity_digest"],
                identity_digest(record), "its identity fields give")


def _summary(files: RunFiles) -> dict[str, Any]:
    from lmms_prune.models.base import summarize

    report = read_json(files.efficiency)
    return summarize(report.get("samples", []), len(report.get("skipped", [])))


EFFICIENCY_FIELDS = {"samples": "samples", "visual_tokens_before": "mean_visual_before",
                     "visual_tokens_after": "mean_visual_after", "visual_kept_ratio": "visual_kept_ratio",
                     "prefill_flops_ratio": "prefill_flops_ratio", "kv_cache_ratio": "kv_cache_ratio",
                     "mean_llm_prefill_seconds": "mean_llm_prefill_seconds",
                     "mean_end_to_end_seconds": "mean_end_to_end_seconds"}
"""bundle efficiency field -> key of ``lmms_prune.models.base.summarize``."""


def _check_efficiency(v: Verification, bundle: Mapping[str, Any], files: RunFiles, run_dir: Path) -> None:
    eff = bundle["efficiency"]
    if files.efficiency is None:
        v.fail(f"efficiency: no efficiency JSON in {files.cell}")
        return
    summary = _summary(files)
    for name, key in EFFICIENCY_FIELDS.items():
        v.check(f"efficiency {name}", eff[name], summary.get(key))
    if eff["baseline_fingerprint"] is None:
        if eff["prefill_speedup"] is not None:
            v.fail("efficiency prefill_speedup: given without a baseline_fingerprint")
        return
    baseline = baseline_of(files, find_runs(run_dir))
    if baseline is None:
        v.fail(f"efficiency prefill_speedup: the unpruned (none) run {eff['baseline_fingerprint']} is not in "
               f"{run_dir}; verify against the sweep folder that holds both cells")
        return
    v.check("efficiency baseline_fingerprint", eff["baseline_fingerprint"], cell_settings(baseline)[1])
    from lmms_prune.efficiency import side_by_side

    base = _summary(baseline)
    note = side_by_side(read_json(files.efficiency).get("measured_with"),
                        read_json(baseline.efficiency).get("measured_with"))
    bp, rp = base.get("mean_llm_prefill_seconds"), summary.get("mean_llm_prefill_seconds")
    v.check("efficiency prefill_speedup", eff["prefill_speedup"], bp / rp if bp and rp and note is None else None)


def verify_bundle(bundle: Mapping[str, Any], run_dir: str | Path, include_paths: Sequence[str | Path] = (),
                  name: str = "bundle", configs: TaskConfigs | None = None) -> Verification:
    """Recompute everything ``bundle`` claims from the run in ``run_dir`` (module docstring)."""
    run_dir = Path(run_dir)
    v = Verification(name)
    try:
        validate(bundle, name)
    except ValueError as err:
        v.fail(str(err))
        return v
    v.check("digest (over the bundle's content)", bundle["digest"], bundle_digest(bundle),
            "its content gives")
    files = locate_run(bundle, run_dir)
    _check_settings(v, bundle, files)
    _check_logs(v, bundle, files)
    _check_identity(v, bundle, files, run_dir)
    recorded = read_json(files.results).get("config", {}).get("resolved_cli_args") or {}
    paths = [*include_paths, *(p for p in str(recorded.get("include_path") or "").split(",") if p)]
    configs = configs or TaskConfigs()
    configs.add(paths)
    _check_metrics(v, bundle, files, configs)
    _check_efficiency(v, bundle, files, run_dir)
    return v

