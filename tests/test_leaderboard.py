"""Leaderboard bundles, their verification and the static page.

Two run folders: a real sweep through the lmms-eval command line (the shipped tiny grounder on the package's
``refcoco`` group, val/testA/testB, and lmms-eval's POPE code on a tiny split; ``--log_samples``), run once per
session; and a larger synthetic one written in lmms-eval's file formats (two models, a RefCOCO split and a
generic ``mean``-aggregated task, sweep ``cell.json`` files) for the page. The page is opened in Debian's
Chromium through Playwright.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmms_prune.cli.main import main
from lmms_prune.efficiency import host_id, identity_digest
from lmms_prune.fingerprint import fingerprint, package_versions, run_settings
from lmms_prune.leaderboard.bundle import build_bundles, bundle_filename, schema, write_bundles
from lmms_prune.leaderboard.page import page_data, pareto_front, write_page
from lmms_prune.leaderboard.verify import TaskConfigs, verify_bundle
from lmms_prune.models.base import summarize
from lmms_prune.tasks.refcoco.utils import (
    accuracy_at_05,
    bad_gt_count,
    image_error_count,
    mean_iou,
    unparseable_count,
)

TASKS_DIR = Path(__file__).parent / "tasks"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ---------------------------------------------------------------- the real run (lmms-eval CLI, once per session)
@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> Path:
    from lmms_prune.loading import resolve_pretrained
    from lmms_prune.sweep import Sweep, build_cells
    from lmms_prune.toy.data import write_refcoco_hub_layout
    from lmms_prune.toy.grounder import SCENE_KWARGS

    root = tmp_path_factory.mktemp("real_run")
    data = root / "refcoco"
    write_refcoco_hub_layout(data / "RefCOCO", 2, seed=20261122, splits=("val", "testA", "testB"), **SCENE_KWARGS)
    env = dict(os.environ, LMMS_PRUNE_REFCOCO_DIR=str(data), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cells = build_cells([("internvl", resolve_pretrained("tiny-grounder"))], ["fastv", "deepprune"], [0.25])
    sweep = Sweep(root / "sweep", ["refcoco", "pope_tiny"], limit=2, include_path=str(TASKS_DIR), retries=0,
                  env=env, extra_args=["--gen_kwargs", "max_new_tokens=24", "--log_samples"])
    statuses = sweep.run(cells)
    assert all(s == "done" for s in statuses.values()), statuses
    return root / "sweep"


@pytest.fixture(scope="session")
def real_bundles(real_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real_bundles")
    write_bundles(real_run, out)
    return out


@pytest.fixture(scope="session")
def configs() -> TaskConfigs:
    return TaskConfigs([TASKS_DIR])


def _bundles(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _results(run_dir: Path, bundle: dict) -> dict:
    return json.loads((run_dir / bundle["source"]["cell"] / bundle["source"]["results_file"]).read_text())


@pytest.mark.cli
def test_schema_validates_every_bundle_and_bundles_hold_the_runs_figures(real_run, real_bundles):
    validator = jsonschema.Draft202012Validator(schema(), format_checker=jsonschema.FormatChecker())
    jsonschema.Draft202012Validator.check_schema(schema())
    bundles = _bundles(real_bundles)
    assert len(bundles) == 3
    none = next(b for b in bundles.values() if b["method"]["name"] == "none")
    for name, b in bundles.items():
        assert not list(validator.iter_errors(b)), name
        assert name == bundle_filename(b)
        assert b["fingerprint"] == fingerprint(b["settings"])
        results = _results(real_run, b)
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                if "," in key and "stderr" not in key:
                    assert b["accuracies"][task][key] == value, (name, task, key)
        assert b["tasks"]["refcoco_ground"]["group"]
        assert b["tasks"]["refcoco_ground"]["subtasks"] == ["refcoco_ground_val", "refcoco_ground_testA",
                                                             "refcoco_ground_testB"]
        cell = real_run / b["source"]["cell"]
        eff = json.loads((cell / "efficiency.json").read_text())
        assert b["method"]["parameters"] == eff["config"]
        for task, info in b["tasks"].items():
            if not info["group"]:
                (log,) = cell.rglob(f"*_samples_{task}.jsonl")
                assert info["samples"] == len(log.read_text().splitlines()) == 2
        base = json.loads((real_run / none["source"]["cell"] / "efficiency.json").read_text())["summary"]
        assert math.isclose(b["efficiency"]["prefill_speedup"],
                            base["mean_llm_prefill_seconds"] / eff["summary"]["mean_llm_prefill_seconds"])
        assert b["efficiency"]["baseline_fingerprint"] == none["fingerprint"]
        assert b["checkpoint"]["model_type"] == "internvl"
        # the run's process recorded its identity; the sweep's invocation reached it through the environment
        assert (b["versions_source"], b["hardware"]["source"]) == ("efficiency.json", "efficiency.json")
        assert b["versions"] == eff["versions"] and b["efficiency"]["measured_with"] == eff["measured_with"]
        assert b["efficiency"]["measured_with"] == none["efficiency"]["measured_with"]
        assert b["efficiency"]["measured_with"]["invocation"] and b["efficiency"]["speedup_note"] is None
    # the schema is not vacuous: a wrong version, a missing field or a non-numeric metric are refused
    b = next(iter(bundles.values()))
    for broken in ({**b, "schema_version": "2.0"}, {k: v for k, v in b.items() if k != "logs"},
                   {**b, "accuracies": {"refcoco_ground_val": {"acc@0.5,none": "high"}}}):
        assert list(validator.iter_errors(broken))


@pytest.mark.cli
def test_verify_passes_on_the_real_runs(real_run, real_bundles, capsys):
    assert main(["submit", "--verify", str(real_bundles), str(real_run)]) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 3 and "FAIL" not in out


DIGEST = "digest (over the bundle's content)"


def _one_sample(bundle: dict, task: str, key: str) -> float:
    """The change one sample more or less correct makes to ``key`` of a leaf task."""
    n = bundle["tasks"][task]["samples"]
    metric = key.split(",")[0]
    return {"acc@0.5": 100.0 / n, "mean_iou": 1.0 / n, "unparseable": 1.0, "pope_accuracy": 1.0 / n}[metric]


@pytest.mark.cli
@pytest.mark.parametrize("task,key", [("refcoco_ground_val", "acc@0.5,none"), ("refcoco_ground_testB", "mean_iou,none"),
                                      ("refcoco_ground", "acc@0.5,none"), ("pope_tiny", "pope_accuracy,none"),
                                      ("refcoco_ground_testA", "unparseable,none")])
def test_verify_fails_on_a_metric_edited_by_one_sample(real_run, real_bundles, configs, tmp_path, capsys, task, key):
    name, bundle = next((n, b) for n, b in _bundles(real_bundles).items() if b["method"]["name"] == "fastv")
    assert verify_bundle(bundle, real_run, configs=configs).ok
    value = bundle["accuracies"][task][key]
    sub = "refcoco_ground_val" if task == "refcoco_ground" else task
    step = _one_sample(bundle, sub, key) / (3 if task == "refcoco_ground" else 1)  # a group: the mean of 3
    bundle["accuracies"][task][key] = value - step if value >= step else value + step
    result = verify_bundle(bundle, real_run, configs=configs)
    assert not result.ok
    assert [m for m in result.mismatches if m.startswith(f"{task} {key}:")], result.mismatches
    assert [m.split(":")[0] for m in result.mismatches] == [DIGEST, f"{task} {key}"]  # the edit and the chain's end
    edited = tmp_path / name
    edited.write_text(json.dumps(bundle))
    assert main(["submit", "--verify", str(edited), str(real_run)]) == 1
    assert f"{task} {key}" in capsys.readouterr().out


@pytest.mark.cli
def test_digest_detects_an_edited_log(real_run, real_bundles, configs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(real_run, run)
    bundles = _bundles(real_bundles)
    bundle = next(b for b in bundles.values() if b["method"]["name"] == "deepprune")
    assert verify_bundle(bundle, run, configs=configs).ok  # the copy verifies like the original
    (log,) = (run / bundle["source"]["cell"]).rglob("*_samples_refcoco_ground_testA.jsonl")
    lines = log.read_text().splitlines()
    record = json.loads(lines[0])
    record["filtered_resps"] = record["filtered_resps"] + " "  # an edit that changes no metric
    log.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    result = verify_bundle(bundle, run, configs=configs)
    assert not result.ok
    assert any(m.startswith("log samples/refcoco_ground_testA sha256") for m in result.mismatches), result.mismatches
    assert any(m.startswith("logs digest (over the run's files)") for m in result.mismatches)
    assert not [m for m in result.mismatches if m.startswith("refcoco")]  # the metrics still recompute equal


@pytest.mark.cli
def test_submit_cli_writes_one_bundle_per_cell_and_refuses_what_it_cannot_check(real_run, tmp_path, capsys):
    assert main(["submit", str(real_run), "--out", str(tmp_path / "x.json")]) == 2  # 3 cells, one file
    assert "use --out-dir" in capsys.readouterr().err
    (cell,) = real_run.glob("internvl*/fastv/keep0.25")  # the sweep names model folders <family>-<checkpoint>-<hash>
    assert main(["submit", str(cell), "--out", str(tmp_path / "fastv.json")]) == 0
    bundle = json.loads((tmp_path / "fastv.json").read_text())
    assert bundle["source"]["cell"] == "."
    assert bundle["efficiency"]["prefill_speedup"] is None  # no unpruned cell in this RUN_DIR
    assert main(["submit", "--verify", str(tmp_path / "fastv.json"), str(cell)]) == 0
    no_logs = tmp_path / "no_logs"
    shutil.copytree(cell, no_logs)
    for log in no_logs.rglob("*_samples_*.jsonl"):
        log.unlink()
    assert main(["submit", str(no_logs), "--out", str(tmp_path / "y.json")]) == 1
    assert "--log_samples" in capsys.readouterr().err
    assert main(["submit", "--verify", str(tmp_path / "fastv.json"), str(no_logs)]) == 1


# ---------------------------------------------------------------- a synthetic sweep in lmms-eval's formats
GENERIC_TASK = "tiny_vqa"
GENERIC_YAML = f"""task: {GENERIC_TASK}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: tiny_vqa.parquet
test_split: test
output_type: generate_until
doc_to_target: answer
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""
QUALITY = {"none": 1.0, "fastv": 0.72, "deepprune": 0.9, "random": 0.45, "d2pruner": 0.8}


SLOWER = {"deepprune": 1.5}
"""Prefill time factor per method (its selection costs time): the speed-up and FLOPs axes then rank cells
differently, so their Pareto fronts differ."""


def _records(n: int, quality: float, keep: float, rng: random.Random, dims: tuple[int, int],
             slower: float = 1.0) -> list[dict]:
    visual, text = dims
    out = []
    for doc in range(n):
        kept = max(1, round(visual * keep))
        seconds = 0.002 * (kept + text) * rng.uniform(0.95, 1.05) * slower
        out.append({"task": "", "doc_id": doc, "visual_before": visual, "visual_after": kept,
                    "seq_len_before": visual + text, "seq_len_after": kept + text, "llm_prefill_seconds": seconds,
                    "select_seconds": 0.0001, "decode_seconds": 0.05, "end_to_end_seconds": seconds + 0.06,
                    "prefill_flops": 1e6 * (kept + text), "prefill_flops_unpruned": 1e6 * (visual + text),
                    "kv_cache_bytes": 512 * (kept + text), "kv_cache_bytes_unpruned": 512 * (visual + text),
                    "output_tokens": 8})
    return out


def write_synthetic_cell(root: Path, family: str, pretrained: str, method: str, keep: float, include_path: Path,
                         n: int = 12, dims: tuple[int, int] = (256, 30), invocation: str = "sweep-1") -> Path:
    """One sweep cell as lmms-eval and this package write it: results, per-sample logs, efficiency records (with
    the run's identity record, as `PrunedChatModel.efficiency_report` writes it), command.txt, cell.json, DONE.
    Scores are drawn from a quality per method (keep lowers it); ``invocation``: the sweep that measured it."""
    rng = random.Random(f"{family}{pretrained}{method}{keep}")
    cell = root / family / method / f"keep{keep:g}"
    model_dir = cell / "lmms_eval" / pretrained.strip("/").replace("/", "__")
    model_dir.mkdir(parents=True)
    date = "20260101_000000"
    quality = QUALITY[method] * (1.0 if method == "none" else 0.7 + 0.3 * keep) * (0.9 if "b" in pretrained else 1)
    refcoco = []
    for doc in range(n):
        iou = min(1.0, max(0.0, rng.gauss(0.75 * quality, 0.25)))
        parsed = rng.random() > 0.05
        record = {"iou": iou if parsed else 0.0, "parsed": parsed}
        refcoco.append({"doc_id": doc, "target": "[0, 0, 1, 1]", "filtered_resps": "[1, 2, 3, 4]",
                        "acc@0.5": record, "mean_iou": record, "unparseable": record, "image_errors": record,
                        "bad_gt": record, "input": "Please ..."})
    vqa = [{"doc_id": doc, "target": "yes", "filtered_resps": "yes",
            "exact_match": float(rng.random() < 0.3 + 0.6 * quality), "input": "Is it?"} for doc in range(n)]
    for task, rows in (("refcoco_ground_val", refcoco), (GENERIC_TASK, vqa)):
        (model_dir / f"{date}_samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = [r["acc@0.5"] for r in refcoco]
    args = {"pretrained": pretrained, **({} if method == "none" else {"keep_ratio": f"{keep:g}"}),
            "efficiency_path": str(cell / "efficiency.json")}
    model_args = ",".join(f"{k}={v}" for k, v in args.items())
    tasks = ["refcoco_ground_val", GENERIC_TASK]
    results = {
        "results": {
            "refcoco_ground_val": {"alias": "refcoco_ground_val", "acc@0.5,none": accuracy_at_05(ref),
                                   "acc@0.5_stderr,none": "N/A", "mean_iou,none": mean_iou(ref),
                                   "unparseable,none": unparseable_count(ref),
                                   "image_errors,none": image_error_count(ref), "bad_gt,none": bad_gt_count(ref)},
            GENERIC_TASK: {"alias": GENERIC_TASK, "exact_match,none": float(np.mean([r["exact_match"] for r in vqa]))},
        },
        "group_subtasks": {t: [] for t in tasks},
        "higher_is_better": {"refcoco_ground_val": {"acc@0.5": True, "mean_iou": True, "unparseable": False,
                                                   "image_errors": False, "bad_gt": False},
                             GENERIC_TASK: {"exact_match": True}},
        "n-samples": {t: {"original": 40, "effective": n} for t in tasks},
        "config": {"model": f"{family}_{method}", "model_args": model_args, "limit": float(n),
                   "gen_kwargs": {}, "batch_size": "1",
                   "resolved_cli_args": {"tasks": ",".join(tasks), "include_path": str(include_path)}},
        "date": date,
    }
    (model_dir / f"{date}_results.json").write_text(json.dumps(results))
    from lmms_prune.presets import resolve_config

    records = []
    for task in tasks:
        for r in _records(n, quality, 1.0 if method == "none" else keep, rng, dims, SLOWER.get(method, 1.0)):
            records.append({**r, "task": task})
    config = resolve_config(method, **({} if method == "none" else {"keep_ratio": keep})).to_dict()
    identity = {"model": f"{family}_{method}", "pretrained": pretrained, "method": method, "config": config,
                "dtype": "float32", "revision": "main", "model_type": family, "world_size": 1,
                "hardware": {"device": "cpu", "device_name": "x86_64", "cpu": "x86_64", "gpu": None},
                "versions": package_versions(), "measured_with": {"invocation": invocation, "host": host_id()}}
    report = {**identity, "identity_digest": identity_digest(identity), "summary": summarize(records), "skipped": [],
              "samples": records}
    (cell / "efficiency.json").write_text(json.dumps(report))
    run_args = {k: v for k, v in args.items() if k not in ("pretrained", "efficiency_path")}
    cell_settings = run_settings(f"{family}_{method}", pretrained, run_args, tasks, limit=n)
    (cell / "cell.json").write_text(json.dumps({"fingerprint": fingerprint(cell_settings), "settings": cell_settings}))
    (cell / "command.txt").write_text("python -m lmms_eval ...\n")
    (cell / "DONE").write_text("{}\n")
    return cell


SYNTHETIC_CELLS = [(m, k) for m in ("fastv", "deepprune", "random") for k in (0.5, 0.25)] + [("none", 1.0)]


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    (root / "tasks").mkdir()
    (root / "tasks" / f"{GENERIC_TASK}.yaml").write_text(GENERIC_YAML)
    for family, pretrained in (("internvl", "org/model-a"), ("qwen2_5_vl", "org/model-b")):
        for method, keep in SYNTHETIC_CELLS:
            write_synthetic_cell(root / "sweep", family, pretrained, method, keep, root / "tasks")
    return root / "sweep"


@pytest.fixture(scope="session")
def synthetic_bundles(synthetic_run, tmp_path_factory) -> list[Path]:
    return write_bundles(synthetic_run, tmp_path_factory.mktemp("synthetic_bundles"))


def test_synthetic_bundles_use_cell_json_and_verify_generic_mean_tasks(synthetic_run, synthetic_bundles):
    assert len(synthetic_bundles) == 2 * len(SYNTHETIC_CELLS)
    configs = TaskConfigs()
    for path in synthetic_bundles:
        bundle = json.loads(path.read_text())
        cell = json.loads((synthetic_run / bundle["source"]["cell"] / "cell.json").read_text())
        assert (bundle["settings_source"], bundle["fingerprint"]) == ("cell.json", cell["fingerprint"])
        assert verify_bundle(bundle, synthetic_run, configs=configs).ok
        n = bundle["tasks"][GENERIC_TASK]["samples"]
        bundle["accuracies"][GENERIC_TASK]["exact_match,none"] += 1.0 / n  # one more sample right
        result = verify_bundle(bundle, synthetic_run, configs=configs)
        assert [m.split(":")[0] for m in result.mismatches] == [DIGEST, f"{GENERIC_TASK} exact_match,none"]


def test_build_bundles_refuses_an_edited_cell_json(synthetic_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    cell = run / "internvl" / "fastv" / "keep0.5" / "cell.json"
    data = json.loads(cell.read_text())
    data["settings"]["limit"] = 99
    cell.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="the file was edited"):
        build_bundles(run)


# ---------------------------------------------------------------- pure functions of the page
def _dominated(p: list[tuple[float, float]], i: int) -> bool:
    return any(all(q[k] >= p[i][k] for k in range(2)) and any(q[k] > p[i][k] for k in range(2))
               for j, q in enumerate(p) if j != i)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25))
def test_pareto_front_is_exactly_the_undominated_points(points):
    mask = pareto_front(points)
    assert list(mask) == [not _dominated(points, i) for i in range(len(points))]
    assert mask.any()  # the best point in the first column, ties broken by the second, is always on it
    for i in np.flatnonzero(~mask):  # every point off the front is dominated by one on it
        assert any(all(points[j][k] >= points[i][k] for k in range(2)) for j in np.flatnonzero(mask))


def test_cross_task_matrix_is_spearman_of_the_pruned_cells(synthetic_bundles):
    from scipy.stats import spearmanr

    bundles = [json.loads(p.read_text()) for p in synthetic_bundles]
    data = page_data(bundles)
    cross = data["cross_task"]
    assert cross["tasks"] == ["refcoco_ground_val", GENERIC_TASK] and cross["scale"] == "% of unpruned"
    pruned = [c for c in data["cells"] if c["method"] != "none"]
    a = [c["scores"]["refcoco_ground_val"]["pct"] for c in pruned]
    b = [c["scores"][GENERIC_TASK]["pct"] for c in pruned]
    assert cross["n"][0][1] == len(pruned) == 12
    assert math.isclose(cross["rho"][0][1], spearmanr(a, b).statistic)
    assert cross["rho"][0][1] == cross["rho"][1][0] and math.isclose(cross["rho"][0][0], 1.0)
    for c in data["cells"]:  # % of unpruned is against the same model's none cell
        base = next(x for x in data["cells"] if x["method"] == "none" and x["model"] == c["model"])
        s, bs = c["scores"]["refcoco_ground_val"], base["scores"]["refcoco_ground_val"]
        assert math.isclose(s["pct"], 100 * s["value"] / bs["value"])


# ---------------------------------------------------------------- the page in a real browser
def _browser(playwright):
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run scripts/env.sh (installs Debian's chromium)"
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _open(browser, page_path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(page_path.as_uri())
    page.wait_for_selector("#scatter circle.point")
    return page, errors


def _column(page, key: str) -> list[str]:
    return page.eval_on_selector_all(f"#board tbody td[data-key='{key}']", "tds => tds.map(td => td.dataset.value)")


AXIS_KEYS = {"speedup": ("speedup", 1.0), "flops": ("flops_ratio", -1.0), "tokens": ("kept_tokens", -1.0)}
"""x-axis -> (cell field, +1 when higher is better, -1 when lower is)."""


def _python_front(cells: list[dict], task: str, axis: str = "speedup") -> set[str]:
    """The Pareto front per model on one x-axis, computed here from the bundles' figures by the definition."""
    key, sign = AXIS_KEYS[axis]
    front = set()
    for model in {c["model"] for c in cells}:
        pts = [c for c in cells if c["model"] == model and c[key] is not None]
        xy = [(sign * c[key], c["scores"][task]["value"]) for c in pts]
        front |= {c["id"] for i, c in enumerate(pts) if not _dominated(xy, i)}
    return front


def test_page_in_chromium_sorts_plots_every_cell_and_marks_the_pareto_front(synthetic_bundles, tmp_path):
    from playwright.sync_api import sync_playwright

    site = write_page(synthetic_bundles, tmp_path / "site")
    html = site.read_text()
    assert "<script src" not in html and "http" not in html.split("<script", 1)[1].replace(
        "http://www.w3.org/2000/svg", "")  # offline: nothing to fetch
    cells = page_data([json.loads(p.read_text()) for p in synthetic_bundles])["cells"]
    with sync_playwright() as pw:
        browser = _browser(pw)
        page, errors = _open(browser, site)
        for task in ("refcoco_ground_val", GENERIC_TASK):
            page.select_option("#task", task)
            ids = page.eval_on_selector_all("#scatter circle.point", "cs => cs.map(c => c.dataset.id)")
            assert sorted(ids) == sorted(c["id"] for c in cells)  # one point per cell
            marked = page.eval_on_selector_all("#scatter circle.point.pareto", "cs => cs.map(c => c.dataset.id)")
            assert set(marked) == _python_front(cells, task), task
            assert page.locator("#scatter path.front").count() == 2  # one front line per model
            # the front's points lie on its line: the path passes through each marked circle
            for model in ("internvl", "qwen2_5_vl"):
                d = page.get_attribute(f"#scatter path.front[data-model='{model}']", "d")
                xy = page.eval_on_selector_all(f"#scatter circle.pareto[data-model='{model}']",
                                               "cs => cs.map(c => c.getAttribute('cx') + ',' + c.getAttribute('cy'))")
                assert all(p in d for p in xy)
        # the x-axis: every cell was timed side by side, so the page opens on the measured speed-up; switching
        # to the FLOPs ratio or the kept tokens redraws the points and the front on that axis
        assert page.input_value("#axis") == "speedup"
        fronts = {}
        for axis in ("speedup", "flops", "tokens"):
            page.select_option("#axis", axis)
            for task in ("refcoco_ground_val", GENERIC_TASK):
                page.select_option("#task", task)
                marked = page.eval_on_selector_all("#scatter circle.point.pareto", "cs => cs.map(c => c.dataset.id)")
                assert set(marked) == _python_front(cells, task, axis), (axis, task)
                fronts[axis, task] = set(marked)
            assert page.eval_on_selector_all("#scatter circle.point", "cs => cs.length") == len(cells)
            assert axis != "flops" or "FLOPs" in page.text_content("#scatter-title")
        assert fronts["speedup", GENERIC_TASK] != fronts["flops", GENERIC_TASK]  # the front follows the axis
        page.select_option("#axis", "speedup")
        page.select_option("#task", "refcoco_ground_val")
        speed = "#board thead th[data-key='speedup']"
        page.click(speed)
        values = [float(v) for v in _column(page, "speedup")]
        assert values == sorted(values, reverse=True) and page.get_attribute(speed, "aria-sort") == "descending"
        page.click(speed)
        values = [float(v) for v in _column(page, "speedup")]
        assert values == sorted(values) and page.get_attribute(speed, "aria-sort") == "ascending"
        page.click("#board thead th[data-key='method']")
        methods = _column(page, "method")
        assert methods == sorted(methods) and len(methods) == len(cells)
        page.click("#board thead th[data-key='accuracy']")
        acc = [float(v) for v in _column(page, "accuracy")]
        assert acc == sorted(acc, reverse=True)
        assert page.locator("#matrix g.cell").count() == 4
        page.screenshot(path=str(tmp_path / "leaderboard.png"), full_page=True)
        assert errors == []
        browser.close()
    assert (tmp_path / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cli
def test_real_run_page_loads_without_errors(real_bundles, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    assert main(["leaderboard", str(real_bundles), "--out", str(tmp_path / "site")]) == 0
    assert f"leaderboard page: {tmp_path / 'site' / 'index.html'}" in capsys.readouterr().out
    with sync_playwright() as pw:
        browser = _browser(pw)
        page, errors = _open(browser, tmp_path / "site" / "index.html")
        assert page.locator("#scatter circle.point").count() == 3
        assert page.locator("#board tbody tr").count() == 3
        assert errors == []
        browser.close()
    assert main(["leaderboard", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1


def test_page_lists_the_parameters_that_differ_from_the_preset(synthetic_bundles):
    """d2pruner has no default prior (resolve_config refuses it): its page row still builds, naming the prior."""
    import dataclasses

    from lmms_prune.presets import PRESETS, PruneConfig

    bundle = json.loads(synthetic_bundles[0].read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    params = {**defaults, **PRESETS["d2pruner"].settings, "method": "d2pruner", "keep_ratio": 0.25,
              "bias_prior": "/priors/p.pt", "prune_layer": 7}
    bundle["method"] = {**bundle["method"], "name": "d2pruner", "parameters": params}
    (cell,) = page_data([bundle])["cells"]
    assert cell["params"] == {"bias_prior": "/priors/p.pt", "prune_layer": 7}


# ---------------------------------------------------------------- identity bound to the run's records (issue 31)
def _set(bundle: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        bundle = bundle[key]
    bundle[last] = value


TAMPER = [  # (field edited, new value, the field the failure must name)
    ("method.name", "deepprune", "method.name"),
    ("method.parameters.prune_layer", 12, "method.parameters.prune_layer"),
    ("method.keep_ratio", 0.05, "method.keep_ratio"),
    ("method.parameters.keep_ratio", 0.05, "method.parameters.keep_ratio"),
    ("checkpoint.pretrained", "org/a-much-better-model", "checkpoint.pretrained"),
    ("checkpoint.revision", "0123456789abcdef", "checkpoint.revision"),
    ("checkpoint.family", "qwen2_5_vl", "checkpoint.family"),
    ("checkpoint.lmms_eval_model", "internvl_deepprune", "checkpoint.lmms_eval_model"),
    ("checkpoint.model_type", "qwen2_vl", "checkpoint.model_type"),
    ("fingerprint", "0123456789abcdef", "fingerprint"),
    ("settings.limit", 500, "settings.limit"),
    ("versions.torch", "9.9.9", "versions.torch"),
    ("versions_source", "submit host", "versions"),
    ("hardware.device", "cuda", "hardware.device"),
    ("hardware.gpu", "NVIDIA H100 80GB HBM3", "hardware.gpu"),
    ("hardware.world_size", 8, "hardware.world_size"),
    ("run.dtype", "bfloat16", "run.dtype"),
    ("tasks.tiny_vqa.headline", "exact_match_strict", "tasks.tiny_vqa.headline"),
    ("higher_is_better.tiny_vqa.exact_match", False, "higher_is_better.tiny_vqa.exact_match"),
    ("accuracies.mme", {"mme_perception_score,none": 1800.0}, "accuracies.mme"),
    ("efficiency.measured_with.invocation", "another-sweep", "efficiency.measured_with.invocation"),
    ("source.model_args", "pretrained=org/model-a,keep_ratio=0.05", "source.model_args"),
]


@pytest.mark.parametrize("field,value,named", TAMPER, ids=[t[0] for t in TAMPER])
def test_verify_fails_on_every_edited_identifying_field_naming_it(synthetic_run, synthetic_bundles, configs,
                                                                   field, value, named):
    """An edit a forger would make: the field changed and the bundle's digest recomputed to match."""
    from lmms_prune.leaderboard.bundle import bundle_digest

    bundle = next(json.loads(p.read_text()) for p in synthetic_bundles if "internvl__fastv__keep0.5" in p.name)
    assert verify_bundle(bundle, synthetic_run, configs=configs).ok
    _set(bundle, field, value)
    bundle["digest"] = bundle_digest(bundle)
    result = verify_bundle(bundle, synthetic_run, configs=configs)
    assert not result.ok
    assert any(m.startswith(f"{named}:") or m.startswith(f"{named} ") for m in result.mismatches), result.mismatches


def test_verify_cli_names_the_edited_field_and_the_digest(synthetic_run, synthetic_bundles, tmp_path, capsys):
    path = next(p for p in synthetic_bundles if "qwen2_5_vl__deepprune__keep0.25" in p.name)
    bundle = json.loads(path.read_text())
    bundle["method"]["name"] = "fastv"  # the digest left as it was: the chain's end fails too
    edited = tmp_path / path.name
    edited.write_text(json.dumps(bundle))
    include = str(synthetic_run.parent / "tasks")
    assert main(["submit", "--verify", str(path), str(synthetic_run), "--include-path", include]) == 0
    assert main(["submit", "--verify", str(edited), str(synthetic_run), "--include-path", include]) == 1
    out = capsys.readouterr().out
    assert "- method.name: bundle says 'fastv', the run gives 'deepprune'" in out
    assert "- digest (over the bundle's content)" in out


def test_verify_fails_when_the_runs_own_records_disagree(synthetic_run, synthetic_bundles, configs, tmp_path):
    """The efficiency JSON (written by the run's process) edited to claim a GPU: its identity digest no longer
    matches, the logs digest neither, and the rebuilt hardware differs from the bundle's."""
    run = tmp_path / "run"
    shutil.copytree(synthetic_run, run)
    bundle = next(json.loads(p.read_text()) for p in synthetic_bundles if "internvl__random__keep0.5" in p.name)
    eff_path = run / bundle["source"]["cell"] / "efficiency.json"
    eff = json.loads(eff_path.read_text())
    eff["hardware"] = {**eff["hardware"], "device": "cuda", "gpu": "NVIDIA H100"}
    eff_path.write_text(json.dumps(eff))
    names = [m.split(":")[0] for m in verify_bundle(bundle, run, configs=configs).mismatches]
    assert "hardware.device" in names and "hardware.gpu" in names
    assert "efficiency JSON identity_digest (efficiency.json)" in names
    assert "log efficiency sha256 (efficiency.json)" in names


def test_bundles_hold_a_digest_chain_and_where_they_were_measured(synthetic_run, synthetic_bundles):
    from lmms_prune.leaderboard.bundle import bundle_digest, logs_digest, sha256_file

    for path in synthetic_bundles:
        bundle = json.loads(path.read_text())
        cell = synthetic_run / bundle["source"]["cell"]
        files = bundle["logs"]["files"]
        assert files["results"]["sha256"] == sha256_file(cell / bundle["source"]["results_file"])
        assert files["cell"]["sha256"] == sha256_file(cell / "cell.json")
        assert bundle["logs"]["digest"] == logs_digest(files)
        assert bundle["digest"] == bundle_digest(bundle)
        assert (bundle["versions_source"], bundle["hardware"]["source"]) == ("efficiency.json", "efficiency.json")
        assert bundle["efficiency"]["measured_with"] == {"invocation": "sweep-1", "host": host_id()}
        assert bundle["efficiency"]["speedup_note"] is None
        assert bundle["efficiency"]["prefill_speedup"] is not None  # measured side by side with its none cell


# ---------------------------------------------------------------- nothing written outside --out-dir (issue 31)
def _files_below(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("kind", ["relative", "absolute", "symlink"])
def test_submit_writes_nothing_outside_out_dir(tmp_path, kind, capsys):
    """A results file whose ``config.model`` is ``../../../../<x>/x_fastv`` or an absolute path, or an out-dir
    holding a link named like the bundle: every file that appears is inside --out-dir, and nothing is written
    through the link."""
    (tmp_path / "tasks").mkdir()
    cell = write_synthetic_cell(tmp_path / "run", "internvl", "org/model-a", "fastv", 0.5, tmp_path / "tasks")
    (results,) = cell.rglob("*_results.json")
    out = tmp_path / "deep" / "down" / "in" / "out"
    escape = tmp_path / "escape"
    escape.mkdir()
    if kind != "symlink":
        data = json.loads(results.read_text())
        data["config"]["model"] = {"relative": "../../../../escape/x_fastv",
                                   "absolute": f"{escape}/x_fastv"}[kind]
        results.write_text(json.dumps(data))
    else:
        (bundle,) = build_bundles(cell)
        out.mkdir(parents=True)
        (out / bundle_filename(bundle)).symlink_to(escape / "target.json")
    before = _files_below(tmp_path)
    code = main(["submit", str(cell), "--out-dir", str(out)])
    new = _files_below(tmp_path) - before
    assert all(out.resolve() in p.resolve().parents for p in new), new
    assert not list(escape.iterdir())  # nothing written there, not even through the link
    if kind == "symlink":
        assert code == 1 and "a symbolic link" in capsys.readouterr().err
    else:
        assert code == 0 and len(new) == 1
        (written,) = new
        assert "/" not in written.relative_to(out).as_posix() and not written.name.startswith(".")


def test_safe_name_makes_one_plain_file_name_of_any_text():
    from hypothesis import given as given_
    from hypothesis import strategies as st_

    from lmms_prune.leaderboard.paths import path_inside, safe_name

    @settings(max_examples=300, deadline=None)
    @given_(st_.text(max_size=300))
    def check(text):
        name = safe_name(text)
        assert name and "/" not in name and "\\" not in name and "\0" not in name and not name.startswith(".")
        assert len(name) <= 200 and safe_name(name) == name  # idempotent: path_inside accepts it
        assert path_inside(Path("/x"), name) == Path("/x") / name

    check()
    for bad in ("../x", "/etc/passwd", "a/b", ".."):
        with pytest.raises(ValueError, match="not a plain file name"):
            path_inside(Path("/x"), bad)


# ---------------------------------------------------------------- numbers out of range (issue 31, poor 11)
@pytest.mark.parametrize("text,field", [("NaN", "NaN"), ("Infinity", "Infinity"), ("1e999", "accuracies"),
                                        ("1e308", "accuracies")])
def test_leaderboard_refuses_a_bundle_with_non_finite_or_huge_numbers_naming_it(synthetic_bundles, tmp_path,
                                                                                capsys, text, field):
    bundle = json.loads(synthetic_bundles[0].read_text())
    bundle["accuracies"][GENERIC_TASK]["exact_match,none"] = "@@VALUE@@"
    bad = tmp_path / "bad_bundle.json"
    bad.write_text(json.dumps(bundle).replace('"@@VALUE@@"', text))
    assert main(["leaderboard", str(synthetic_bundles[1]), str(bad), "--out", str(tmp_path / "site")]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and field in err and "Traceback" not in err
    assert not (tmp_path / "site" / "index.html").exists()


def test_leaderboard_names_a_figure_that_overflows_on_the_page(synthetic_bundles, tmp_path, capsys):
    """Both bundles in range, but % of unpruned = 1e15 / 1e-300 is infinite: named, with its bundle."""
    paths = {}
    for path in synthetic_bundles:
        bundle = json.loads(path.read_text())
        if bundle["checkpoint"]["family"] == "internvl" and bundle["method"]["name"] in ("none", "fastv"):
            bundle["accuracies"][GENERIC_TASK]["exact_match,none"] = 1e-300 if bundle["method"]["name"] == "none" \
                else 1e15
            paths[bundle["method"]["name"]] = tmp_path / path.name
            paths[bundle["method"]["name"]].write_text(json.dumps(bundle))
    assert main(["leaderboard", *map(str, paths.values()), "--out", str(tmp_path / "site")]) == 1
    err = capsys.readouterr().err
    assert f"{paths['fastv']}: scores.{GENERIC_TASK}.pct is inf" in err
