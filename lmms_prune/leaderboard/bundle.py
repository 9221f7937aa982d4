"""Leaderboard submission bundles: one JSON per (model, method, parameters) cell of an lmms-eval run.

A bundle (schema ``bundle.schema.json`` next to this file, documented in docs/leaderboard.md) says what was run
(checkpoint, method with every ``PruneConfig`` field, the settings and their fingerprint), where (package
versions, hardware: as the run's own process recorded them in its efficiency JSON), on what (tasks and sample
counts), what came out (every metric of lmms-eval's ``*_results.json``, the efficiency summary and the measured
prefill speed-up against the same model's ``none`` cell, only when both were timed side by side) and from which
files (sha256 of each ``--log_samples`` jsonl, of the efficiency records, of the results file and of
``cell.json``, one digest over them, and a digest of the whole bundle: the digest chain).
``lmms_prune.leaderboard.verify`` checks the identity against the run's records and recomputes the figures.

A run is found by its ``*_results.json``; in a sweep (``lmms_prune.sweep``) its cell folder is the one
holding ``lmms_eval/<model dir>/<date>_results.json``, ``efficiency.json`` and, when the sweep wrote one,
``cell.json`` (``{"fingerprint", "settings"}``); elsewhere the cell folder is the results file's folder.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1.1"
SCHEMA_FILE = "bundle.schema.json"
RUN_ONLY_ARGS = ("pretrained", "revision", "efficiency_path")
"""``--model_args`` keys that are not part of ``run_settings``'s ``model_args`` (given separately, or a path
into the cell folder that does not change the result)."""


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The bundle JSON Schema shipped with the package."""
    return json.loads(resources.files("lmms_prune.leaderboard").joinpath(SCHEMA_FILE).read_text())


def validate(bundle: Mapping[str, Any], name: str = "bundle") -> None:
    """Raise ``ValueError`` naming the first schema violation of ``bundle`` (``jsonschema``, draft 2020-12)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(bundle), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ValueError(f"{name}: not a valid schema {SCHEMA_VERSION} bundle at {where}: {err.message}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def logs_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 of the canonical JSON ``{name: sha256}`` of the log files (names sorted)."""
    from lmms_prune.fingerprint import canonical_json

    return hashlib.sha256(canonical_json({k: v["sha256"] for k, v in files.items()}).encode()).hexdigest()


@dataclass
class RunFiles:
    """Where one lmms-eval run's files are."""

    results: Path  # <date>_results.json
    cell: Path  # the cell folder (a sweep cell, or the results file's folder)
    samples: dict[str, Path]  # task -> <date>_samples_<task>.jsonl
    efficiency: Path | None

    @property
    def date(self) -> str:
        return self.results.name[: -len("_results.json")]


def cell_folder(results: Path) -> Path:
    """The sweep cell holding ``results`` (``CELL/lmms_eval/<model dir>/X_results.json``), else its folder."""
    if results.parent.parent.name == "lmms_eval":
        return results.parent.parent.parent
    return results.parent


def efficiency_file(results: Path, model_args: Mapping[str, str]) -> Path | None:
    """The efficiency JSON of the run: ``<date>_efficiency.json`` next to ``results`` or ``efficiency.json`` in
    its cell (what ``lmms_prune.models`` writes), else the recorded ``efficiency_path`` (a run whose folder was
    moved keeps its own files first)."""
    cell = cell_folder(results)
    candidates = [results.parent / f"{results.name[:-len('_results.json')]}_efficiency.json",
                  cell / "efficiency.json"]
    if model_args.get("efficiency_path"):
        p = Path(model_args["efficiency_path"])
        candidates += [p] if p.suffix == ".json" else sorted(p.glob("*_efficiency.json"))
    return next((c for c in candidates if c.is_file()), None)


def run_files(results: Path) -> RunFiles:
    from lmms_prune.report import parse_model_args

    data = read_json(results)
    args = parse_model_args(data.get("config", {}).get("model_args"))
    date = results.name[: -len("_results.json")]
    samples = {p.name[len(f"{date}_samples_"): -len(".jsonl")]: p
               for p in sorted(results.parent.glob(f"{date}_samples_*.jsonl"))}
    return RunFiles(results, cell_folder(results), samples, efficiency_file(results, args))


def find_runs(run_dir: str | Path) -> list[RunFiles]:
    """Every lmms-eval run below ``run_dir`` (a sweep folder, a cell folder or any lmms-eval output folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR {run_dir}: not a folder; give a sweep folder or an lmms-eval output folder")
    files = sorted(run_dir.rglob("*_results.json"))
    if not files:
        raise FileNotFoundError(f"RUN_DIR {run_dir}: no lmms-eval *_results.json below it")
    return [run_files(f) for f in files]


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    return None


def _limit(value: Any) -> int | float | None:
    if value is None:
        return None
    value = float(value)
    return int(value) if value.is_integer() else value


def cell_settings(files: RunFiles) -> tuple[dict[str, Any], str, str]:
    """(settings, fingerprint, source) of a run: the sweep's ``cell.json`` when there is one, else
    ``run_settings`` rebuilt from the results file's ``config`` (model, model_args, tasks, limit)."""
    from lmms_prune.fingerprint import fingerprint, run_settings
    from lmms_prune.report import parse_model_args

    cell_json = files.cell / "cell.json"
    if cell_json.is_file():
        data = read_json(cell_json)
        if "settings" not in data or "fingerprint" not in data:
            raise ValueError(f"{cell_json}: expected {{'fingerprint': ..., 'settings': ...}}")
        if fingerprint(data["settings"]) != data["fingerprint"]:
            raise ValueError(f"{cell_json}: fingerprint {data['fingerprint']} is not that of its settings "
                             f"({fingerprint(data['settings'])}); the file was edited")
        return data["settings"], data["fingerprint"], "cell.json"
    config = read_json(files.results).get("config", {})
    args = parse_model_args(config.get("model_args"))
    cli = config.get("resolved_cli_args") or {}
    tasks = [t for t in str(cli.get("tasks") or "").split(",") if t]
    if not tasks:
        tasks = sorted(read_json(files.results).get("results", {}))
    settings = run_settings(
        model=str(config.get("model", "unknown")), pretrained=args.get("pretrained", ""),
        model_args={k: v for k, v in args.items() if k not in RUN_ONLY_ARGS}, tasks=tasks,
        limit=_limit(config.get("limit")), revision=args.get("revision"))
    recorded = _recorded_versions(files)
    if recorded is not None:  # the run's own versions, not this machine's: the fingerprint is reproducible
        settings["versions"] = recorded
    return settings, fingerprint(settings), "results config"


def _recorded_versions(files: RunFiles) -> dict[str, str] | None:
    """The package versions the run's process recorded in its efficiency JSON (None: it recorded none)."""
    if files.efficiency is None:
        return None
    versions = read_json(files.efficiency).get("versions")
    return dict(versions) if isinstance(versions, Mapping) else None


def _model_type(pretrained: str, revision: str | None) -> str | None:
    """``model_type`` from the checkpoint's config.json: a local folder, or the hub cache (never downloads)."""
    path = Path(pretrained) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(pretrained, "config.json", revision=revision)
        except Exception:  # not a hub id (e.g. a missing local path): nothing to read
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def host_hardware(world_size: int) -> dict[str, Any]:
    """This machine's CPU and GPU (the bundle says ``source: submit host``)."""
    import torch

    cpu = _cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"device": "cuda" if gpu else "cpu", "device_name": gpu or cpu, "cpu": cpu, "gpu": gpu,
            "world_size": int(world_size), "source": "submit host"}


def _hardware(report: Mapping[str, Any]) -> dict[str, Any]:
    world = int(report.get("world_size") or 1)
    recorded = report.get("hardware")
    if isinstance(recorded, Mapping):
        device = str(recorded.get("device", "other")).split(":")[0]
        return {"device": device if device in ("cpu", "cuda", "mps") else "other",
                "device_name": str(recorded.get("device_name") or recorded.get("gpu") or recorded.get("cpu") or ""),
                "cpu": str(recorded.get("cpu") or ""), "gpu": recorded.get("gpu"), "world_size": world,
                "source": "efficiency.json"}
    return host_hardware(world)


def _jsonl_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def log_files(files: RunFiles) -> dict[str, dict[str, Any]]:
    """``{"samples/<task>": {...}, "efficiency": {...}}``: path (relative to the cell), sha256, line count."""
    out = {}
    for task, path in sorted(files.samples.items()):
        out[f"samples/{task}"] = {"path": _relative(path, files.cell), "sha256": sha256_file(path),
                                  "lines": _jsonl_lines(path)}
    if files.efficiency is not None:
        records = read_json(files.efficiency).get("samples", [])
        out["efficiency"] = {"path": _relative(files.efficiency, files.cell), "sha256": sha256_file(files.efficiency),
                             "lines": len(records)}
    out["results"] = {"path": _relative(files.results, files.cell), "sha256": sha256_file(files.results)}
    if (files.cell / "cell.json").is_file():
        out["cell"] = {"path": "cell.json", "sha256": sha256_file(files.cell / "cell.json")}
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``ValueError`` naming the file when it is not readable UTF-8 JSON holding
    an object (``NaN`` and ``Infinity`` are refused: they are not JSON)."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=no_constant)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, expected an object")
    return data


def bundle_digest(bundle: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``bundle`` without its own ``digest``: the end of the digest chain
    (each log file's sha256 -> ``logs.digest`` -> this)."""
    from lmms_prune.fingerprint import canonical_json

    body = {k: v for k, v in bundle.items() if k != "digest"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def metrics_of(task_results: Mapping[str, Any]) -> dict[str, float]:
    """The numeric ``metric,filter`` entries of one task's lmms-eval results (no stderr, alias or samples)."""
    return {k: v for k, v in task_results.items()
            if "," in k and "_stderr" not in k and _number(v) is not None}


def _tasks(data: Mapping[str, Any], run: Any) -> dict[str, dict[str, Any]]:
    n_samples = data.get("n-samples", {})
    groups = {g: list(s) for g, s in data.get("group_subtasks", {}).items() if s}
    out = {}
    for task in data.get("results", {}):
        if task in groups:
            count = sum(int(n_samples.get(s, {}).get("effective", 0)) for s in groups[task])
            original = None
        else:
            count = int(n_samples.get(task, {}).get("effective", 0))
            original = n_samples.get(task, {}).get("original")
        out[task] = {"samples": count, "original_samples": None if original is None else int(original),
                     "group": task in groups, "subtasks": groups.get(task, []), "headline": run.metric.get(task)}
    return out


def _efficiency(report: Mapping[str, Any], baseline: tuple[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The bundle's efficiency block; the speed-up only against a baseline measured side by side (same sweep
    invocation, same host: `lmms_prune.efficiency.side_by_side`), else null with the reason in ``speedup_note``."""
    from lmms_prune.efficiency import side_by_side

    s = report.get("summary", {})
    speedup, base_fp, note = None, None, None
    if baseline is not None:
        base_fp, base_report = baseline
        note = side_by_side(report.get("measured_with"), base_report.get("measured_with"))
        bp = base_report.get("summary", {}).get("mean_llm_prefill_seconds")
        rp = s.get("mean_llm_prefill_seconds")
        speedup = bp / rp if bp and rp and note is None else None
    return {
        "samples": int(s.get("samples", 0)),
        "visual_tokens_before": s.get("mean_visual_before"),
        "visual_tokens_after": s.get("mean_visual_after"),
        "visual_kept_ratio": s.get("visual_kept_ratio"),
        "prefill_flops_ratio": s.get("prefill_flops_ratio"),
        "kv_cache_ratio": s.get("kv_cache_ratio"),
        "mean_llm_prefill_seconds": s.get("mean_llm_prefill_seconds"),
        "mean_end_to_end_seconds": s.get("mean_end_to_end_seconds"),
        "prefill_speedup": speedup,
        "baseline_fingerprint": base_fp,
        "measured_with": _measured_with(report),
        "speedup_note": note,
    }


def _measured_with(report: Mapping[str, Any]) -> dict[str, str | None]:
    m = report.get("measured_with") or {}
    return {"invocation": m.get("invocation"), "host": m.get("host")}


def _efficiency_report(files: RunFiles) -> dict[str, Any]:
    if files.efficiency is None:
        raise FileNotFoundError(f"{files.results}: no efficiency JSON next to it (efficiency.json in the cell, or "
                                "<date>_efficiency.json): run it with one of lmms-prune's models")
    return read_json(files.efficiency)


def build_bundle(files: RunFiles, run_dir: Path, baseline: RunFiles | None = None) -> dict[str, Any]:
    """The bundle of one run (``files``); ``baseline``: the same model's ``none`` run, for the speed-up."""
    from lmms_prune.report import load_run

    if not files.samples:
        raise FileNotFoundError(f"{files.results}: no per-sample logs (<date>_samples_<task>.jsonl) next to it; "
                                "re-run lmms-eval with --log_samples (lmms-prune sweep: pass it through "
                                "Sweep(extra_args=['--log_samples']))")
    data = read_json(files.results)
    run = load_run(files.results)
    settings, fp, settings_source = cell_settings(files)
    report = _efficiency_report(files)
    leaf = [t for t in data.get("results", {}) if not data.get("group_subtasks", {}).get(t)]
    missing = [t for t in leaf if t not in files.samples]
    if missing:
        raise FileNotFoundError(f"{files.results}: no per-sample log for task(s) {', '.join(missing)}; re-run with "
                                "--log_samples")
    base = None
    if baseline is not None:
        base = (cell_settings(baseline)[1], _efficiency_report(baseline))
    config = data.get("config", {})
    versions, versions_source = _versions(report, settings, settings_source)
    revision = settings.get("revision")
    model_type = report["model_type"] if "model_type" in report else _model_type(run.pretrained, revision)
    logs = log_files(files)
    bundle = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fp,
        "settings": settings,
        "settings_source": settings_source,
        "checkpoint": {"family": run.family, "pretrained": run.pretrained, "revision": revision,
                       "model_type": model_type, "lmms_eval_model": run.model},
        "method": {"name": run.method, "keep_ratio": run.keep,
                   "parameters": dict(report.get("config") or {"method": run.method})},
        "versions": versions,
        "versions_source": versions_source,
        "hardware": _hardware(report),
        "run": {"date": data.get("date"), "limit": _limit(config.get("limit")), "dtype": report.get("dtype"),
                "gen_kwargs": config.get("gen_kwargs"), "batch_size": config.get("batch_size")},
        "tasks": _tasks(data, run),
        "accuracies": {t: metrics_of(m) for t, m in data.get("results", {}).items()},
        "higher_is_better": {t: {k: bool(v) for k, v in m.items()}
                             for t, m in data.get("higher_is_better", {}).items()},
        "efficiency": _efficiency(report, base),
        "logs": {"files": logs, "digest": logs_digest(logs)},
        "source": {"cell": _relative(files.cell, run_dir) if files.cell != run_dir else ".",
                   "results_file": _relative(files.results, files.cell),
                   "model_args": str(config.get("model_args", ""))},
    }
    return {**bundle, "digest": bundle_digest(bundle)}


def _versions(report: Mapping[str, Any], settings: Mapping[str, Any],
              settings_source: str) -> tuple[dict[str, str], str]:
    """(versions, source): recorded by the run's process (efficiency JSON), else by the sweep that started it
    (``cell.json``), else this machine's (``submit host``: `--verify` cannot check those)."""
    if isinstance(report.get("versions"), Mapping):
        return dict(report["versions"]), "efficiency.json"
    if settings_source == "cell.json" and "versions" in settings:
        return dict(settings["versions"]), "cell.json"
    from lmms_prune.fingerprint import package_versions

    return package_versions(), "submit host"


@lru_cache(maxsize=4096)
def _method_and_model(results: Path, mtime_ns: int) -> tuple[str, tuple[str, str]]:
    from lmms_prune.report import load_run

    run = load_run(results)
    return run.method, run.key


def baseline_of(files: RunFiles, runs: list[RunFiles]) -> RunFiles | None:
    """The ``none`` run of the same model (family and checkpoint) among ``runs``, if any (the latest)."""

    def meta(r: RunFiles) -> tuple[str, tuple[str, str]]:
        return _method_and_model(r.results, r.results.stat().st_mtime_ns)

    key = meta(files)[1]
    nones = [r for r in runs if meta(r) == ("none", key)]
    return sorted(nones, key=lambda r: r.date)[-1] if nones else None


def build_bundles(run_dir: str | Path) -> list[dict[str, Any]]:
    """One validated bundle per run below ``run_dir``."""
    run_dir = Path(run_dir)
    runs = find_runs(run_dir)
    bundles = []
    for files in runs:
        bundle = build_bundle(files, run_dir, baseline_of(files, runs))
        validate(bundle, str(files.results))
        bundles.append(bundle)
    return bundles


def bundle_filename(bundle: Mapping[str, Any]) -> str:
    """``<family>__<method>__keep<ratio>__<fingerprint>.json``, every part through
    `lmms_prune.leaderboard.paths.safe_name` (the family and method come from the run's data)."""
    from lmms_prune.leaderboard.paths import safe_name

    m = bundle["method"]
    parts = (bundle["checkpoint"]["family"], m["name"], f"keep{m['keep_ratio']:g}", bundle["fingerprint"])
    return safe_name("__".join(safe_name(p) for p in parts) + ".json")


def bundle_text(bundle: Mapping[str, Any]) -> str:
    return json.dumps(bundle, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_bundle(bundle: Mapping[str, Any], path: Path) -> Path:
    """Write ``bundle`` to the file the user named (``submit --out``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bundle_text(bundle), encoding="utf-8")
    return path


def write_bundle_into(bundle: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``bundle`` as ``out_dir/<bundle_filename>``, never outside ``out_dir`` (`paths.write_inside`)."""
    from lmms_prune.leaderboard.paths import write_inside

    return write_inside(out_dir, bundle_filename(bundle), bundle_text(bundle))


def write_bundles(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write one bundle per run below ``run_dir`` into ``out_dir``; returns their paths."""
    return [write_bundle_into(b, out_dir) for b in build_bundles(run_dir)]


def load_bundle(path: str | Path) -> dict[str, Any]:
    """Read and schema-validate one bundle file."""
    path = Path(path)
    try:
        bundle = read_json(path)
    except ValueError as err:
        raise ValueError(f"cannot read a bundle: {err}") from err
    validate(bundle, str(path))
    return bundle


def bundle_paths(items: list[str]) -> list[Path]:
    """Bundle files from a list of files and folders (a folder contributes its *.json files)."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise FileNotFoundError(f"{p}: no *.json bundles in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such bundle file or folder")
    return out
