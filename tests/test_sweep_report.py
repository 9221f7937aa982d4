"""A real sweep through the lmms-eval command line (tiny model, synthetic data): interrupted, resumed without
redoing finished cells; the report's numbers equal lmms-eval's own result files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmms_prune.report import build_tables, collect, cross_task, parse_model_args, write_report
from lmms_prune.sweep import DONE, Sweep, build_cells, parse_method_args, parse_models
from lmms_prune.toy.data import write_refcoco_hub_layout
from lmms_prune.toy.models import tiny_model_dir

TASKS_DIR = Path(__file__).parent / "tasks"


def test_cells_and_arguments():
    cells = build_cells([("internvl", "/m")], ["fastv", "deepprune"], [0.5, 0.1],
                        parse_method_args(["deepprune:r_pivot=0.5", "*:max_num=2"]))
    assert [c.name for c in cells] == ["internvl/none/keep1", "internvl/fastv/keep0.5", "internvl/fastv/keep0.1",
                                       "internvl/deepprune/keep0.5", "internvl/deepprune/keep0.1"]
    args = parse_model_args(cells[-1].lmms_eval_model_args(Path("e.json")))
    assert args == {"pretrained": "/m", "keep_ratio": "0.1", "max_num": "2", "r_pivot": "0.5", "efficiency_path": "e.json"}
    assert "keep_ratio" not in parse_model_args(cells[0].lmms_eval_model_args(Path("e.json")))
    assert parse_models("internvl,llava=/x") == [("internvl", "OpenGVLab/InternVL2_5-8B-MPO-hf"), ("llava", "/x")]
    with pytest.raises(ValueError, match="unknown family"):
        parse_models("gpt")
    with pytest.raises(ValueError, match="unknown; choose from"):
        build_cells([("internvl", "/m")], ["fastvv"], [0.1])
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        parse_method_args(["bias_prior=x"])


@pytest.mark.cli
def test_sweep_resumes_and_report_matches_lmms_eval(tmp_path, monkeypatch):
    data = tmp_path / "refcoco"
    write_refcoco_hub_layout(data / "RefCOCO", 1, seed=4, splits=("val", "testA", "testB"))
    monkeypatch.setenv("LMMS_PRUNE_REFCOCO_DIR", str(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_model_dir("internvl_qwen2")
    cells = build_cells([("internvl", str(model))], ["fastv", "deepprune"], [0.5, 0.1],
                        parse_method_args(["*:max_num=1"]))
    # `refcoco` is the package's grounding group (val/testA/testB) through the task-name takeover
    fast = ["--gen_kwargs", "max_new_tokens=8"]  # a random model never stops by itself
    sweep = Sweep(tmp_path / "sweep", ["refcoco", "pope_tiny"], limit=2,
                  include_path=str(TASKS_DIR), retries=0, extra_args=fast)

    # "interrupted": three cells finished, a fourth left half-written
    first = sweep.run(cells[:3])
    assert all(s == "done" for s in first.values()), first
    stamps = {c.name: (sweep.cell_dir(c) / DONE).stat().st_mtime_ns for c in cells[:3]}
    partial = sweep.cell_dir(cells[3])
    (partial / "lmms_eval").mkdir(parents=True)
    (partial / "lmms_eval" / "stale_results.json").write_text("{}")
    assert not sweep.is_done(cells[3])

    resumed = Sweep(tmp_path / "sweep", ["refcoco", "pope_tiny"], limit=2,
                    include_path=str(TASKS_DIR), retries=0, extra_args=fast).run(cells)
    assert [resumed[c.name] for c in cells] == ["skipped (done)"] * 3 + ["done"] * 2
    assert {c.name: (sweep.cell_dir(c) / DONE).stat().st_mtime_ns for c in cells[:3]} == stamps
    assert not (partial / "lmms_eval" / "stale_results.json").exists()

    result = write_report(tmp_path / "sweep")
    for kind in ("markdown", "csv", "latex"):
        assert result["paths"][kind].stat().st_size > 0
    assert result["plots"] and all(p.stat().st_size > 0 for p in result["plots"])
    tables = {t.family: t for t in result["tables"]}
    assert set(tables) == {"refcoco_ground", "pope_tiny"}
    splits = ["refcoco_ground_val", "refcoco_ground_testA", "refcoco_ground_testB"]
    assert tables["refcoco_ground"].columns == [*splits, "refcoco_ground"]
    runs = collect(tmp_path / "sweep")
    assert len(runs) == 5
    for run in runs:
        raw = json.loads(run.path.read_text())["results"]
        row = next(r for r in tables["pope_tiny"].rows if (r["method"], r["keep"]) == (run.method, run.keep))
        assert row["pope_tiny"] == raw["pope_tiny"]["pope_accuracy,none"]
        row = next(r for r in tables["refcoco_ground"].rows if (r["method"], r["keep"]) == (run.method, run.keep))
        for column in [*splits, "refcoco_ground"]:
            assert row[column] == raw[column]["acc@0.5,none"]
        assert row["has_baseline"]
        if run.method != "none":
            assert math.isclose(row["visual kept"], run.efficiency["mean_visual_after"])
            assert row["visual kept"] < next(r for r in runs if r.method == "none").efficiency["mean_visual_after"]
            assert row["prefill speed-up"] > 0
    assert "fastv" in cross_task(build_tables(runs), 0.1)


def test_report_says_when_the_unpruned_baseline_is_missing(tmp_path):
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "20260101_000000_results.json").write_text(json.dumps({
        "config": {"model": "internvl_fastv", "model_args": "pretrained=/m,keep_ratio=0.25"},
        "results": {"pope_tiny": {"alias": "pope_tiny", "pope_accuracy,none": 62.5}},
        "group_subtasks": {"pope_tiny": []},
    }))
    result = write_report(tmp_path)
    (table,) = result["tables"]
    (row,) = table.rows
    assert (row["method"], row["keep"], row["pope_tiny"], row["has_baseline"]) == ("fastv", 0.25, 62.5, False)
    assert "62.50 (no unpruned run)" in result["markdown"]
