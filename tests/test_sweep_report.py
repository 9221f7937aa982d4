"""A real sweep through the lmms-eval command line (tiny model, synthetic data): interrupted, resumed without
redoing finished cells; the report's numbers equal lmms-eval's own result files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmms_prune.report import build_tables, collect, cross_task, parse_model_args, write_report
from lmms_prune.sweep import DONE, Sweep, build_cells, parse_method_args, parse_models
from lmms_prune.toy.data import write_refcoco_hub_layout
from lmms_prune.toy.models import tiny_model_dir

TASKS_DIR = Path(__file__).parent / "tasks"


def test_cells_and_arguments(tmp_path):
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    cells = build_cells([("internvl", str(ckpt))], ["fastv", "deepprune"], [0.5, 0.1],
                        parse_method_args(["deepprune:r_pivot=0.5", "*:max_num=2"]))
    folder = cells[0].model_folder
    assert folder.startswith("internvl-m-") and len(folder) == len("internvl-m-") + 8
    assert [c.name for c in cells] == [f"{folder}/none/keep1", f"{folder}/fastv/keep0.5", f"{folder}/fastv/keep0.1",
                                       f"{folder}/deepprune/keep0.5", f"{folder}/deepprune/keep0.1"]
    args = parse_model_args(cells[-1].lmms_eval_model_args(Path("e.json")))
    assert args == {"pretrained": str(ckpt), "keep_ratio": "0.1", "max_num": "2", "r_pivot": "0.5",
                    "efficiency_path": "e.json"}
    assert "keep_ratio" not in parse_model_args(cells[0].lmms_eval_model_args(Path("e.json")))
    assert parse_models("internvl,llava=/x") == [("internvl", "OpenGVLab/InternVL2_5-8B-MPO-hf"), ("llava", "/x")]
    with pytest.raises(ValueError, match="unknown family"):
        parse_models("gpt")
    with pytest.raises(ValueError, match="unknown; choose from"):
        build_cells([("internvl", "/m")], ["fastvv"], [0.1])
    with pytest.raises(ValueError, match="METHOD:KEY=VALUE"):
        parse_method_args(["bias_prior=x"])
    with pytest.raises(ValueError, match="fastvv: unknown method"):
        build_cells([("internvl", "/m")], ["fastv"], [0.1], parse_method_args(["fastvv:prune_layer=5"]))


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
    assert [resumed[c.name] for c in cells] == (["skipped (done)"] * 3
                                                 + ["done, rerun because earlier output without cell.json", "done"])
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
            if run.method == "fastv":  # timed by the first sweep invocation, like the none cell
                assert row["prefill speed-up"] > 0 and row["speed-up note"] is None
            else:  # deepprune: timed by the resumed sweep, another invocation: no ratio of the two
                assert row["prefill speed-up"] is None
                assert "another sweep invocation" in row["speed-up note"]
    assert "fastv" in cross_task(build_tables(runs), 0.1)
    assert result["x_axis"] == "flops"  # not every cell was measured side by side with its baseline
    assert "not comparable" in result["markdown"]


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


# ---------------------------------------------------------------------------------------------------------
# cells keyed by fingerprints, verified results, stopped children, one result per cell (issue 19)

FAKE = Path(__file__).parent / "data" / "fake_lmms_eval.py"


def _fake_sweep(out: Path, **kw) -> Sweep:
    return Sweep(out, ["pope_tiny"], launcher=f"{sys.executable} {FAKE}", retries=0, **kw)


@pytest.fixture
def fake_calls(tmp_path, monkeypatch):
    """The fake lmms_eval's call log (one JSON line per run); mode ``ok`` unless a test sets another."""
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LMMS_EVAL_CALLS", str(calls))
    monkeypatch.setenv("FAKE_LMMS_EVAL_MODE", "ok")

    def read() -> list[dict]:
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.is_file() else []

    return read


def _checkpoints(tmp_path, *names):
    paths = []
    for name in names:
        (tmp_path / name).mkdir(parents=True)
        paths.append(tmp_path / name)
    return paths


def test_changed_limit_reruns_the_cell_and_says_why(tmp_path, fake_calls):
    (ckpt,) = _checkpoints(tmp_path, "ckpt")
    cells = build_cells([("internvl", str(ckpt))], ["fastv"], [0.5])
    assert set(_fake_sweep(tmp_path / "s", limit=2).run(cells).values()) == {"done"}
    assert set(_fake_sweep(tmp_path / "s", limit=2).run(cells).values()) == {"skipped (done)"}
    statuses = _fake_sweep(tmp_path / "s", limit=3).run(cells)
    assert all(s == "done, rerun because settings changed: limit: 2 -> 3" for s in statuses.values()), statuses
    assert [c["limit"] for c in fake_calls()] == ["2", "2", "3", "3"]
    for cell in cells:
        d = tmp_path / "s" / cell.name
        record = json.loads((d / "cell.json").read_text())
        assert set(record) == {"fingerprint", "settings"} and record["settings"]["limit"] == 3
        assert len(list(d.rglob("*_results.json"))) == 1  # the old output was replaced


def test_changed_method_args_rerun_only_that_method(tmp_path, fake_calls):
    (ckpt,) = _checkpoints(tmp_path, "ckpt")
    first = build_cells([("internvl", str(ckpt))], ["fastv"], [0.5])
    _fake_sweep(tmp_path / "s").run(first)
    second = build_cells([("internvl", str(ckpt))], ["fastv"], [0.5], parse_method_args(["fastv:prune_layer=5"]))
    statuses = _fake_sweep(tmp_path / "s").run(second)
    none, fastv = (statuses[c.name] for c in second)
    assert none == "skipped (done)"
    assert fastv == "done, rerun because settings changed: model_args.prune_layer: None -> '5'"
    assert "prune_layer=5" in fake_calls()[-1]["model_args"]


def test_two_checkpoints_of_one_family_get_two_folders_and_both_run(tmp_path, fake_calls):
    a, b = _checkpoints(tmp_path, "A", "x/B")
    cells = build_cells(parse_models(f"internvl={a},internvl={b}"), ["fastv"], [0.5])
    statuses = _fake_sweep(tmp_path / "s").run(cells)
    assert list(statuses.values()) == ["done"] * 4
    folders = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert len(folders) == 2 and folders[0].startswith("internvl-A-") and folders[1].startswith("internvl-B-")
    assert sorted({parse_model_args(c["model_args"])["pretrained"] for c in fake_calls()}) == [str(a), str(b)]
    assert {r.pretrained for r in collect(tmp_path / "s")} == {str(a), str(b)}
    with pytest.raises(ValueError, match="given twice"):
        build_cells(parse_models(f"internvl={a},internvl={a}/"), ["fastv"], [0.5])


def test_a_cell_whose_samples_were_all_skipped_is_not_done(tmp_path, fake_calls, monkeypatch):
    (ckpt,) = _checkpoints(tmp_path, "ckpt")
    cells = build_cells([("internvl", str(ckpt))], [], [0.5])
    monkeypatch.setenv("FAKE_LMMS_EVAL_MODE", "skip_all")
    sweep = _fake_sweep(tmp_path / "s")
    (status,) = sweep.run(cells).values()
    assert status.startswith("FAILED: every sample was skipped (2 skipped, 0 answered")
    assert not sweep.is_done(cells[0]) and not (sweep.cell_dir(cells[0]) / DONE).exists()
    monkeypatch.setenv("FAKE_LMMS_EVAL_MODE", "ok")
    (status,) = _fake_sweep(tmp_path / "s").run(cells).values()
    assert status == "done, rerun because earlier run did not finish"


def test_exit_status_0_without_results_is_a_failure_and_the_cli_exits_1(tmp_path, fake_calls, monkeypatch, capsys):
    from lmms_prune.cli.main import main

    (ckpt,) = _checkpoints(tmp_path, "ckpt")
    monkeypatch.setenv("FAKE_LMMS_EVAL_MODE", "crash")
    code = main(["sweep", "--models", f"internvl={ckpt}", "--methods", "fastv", "--keep", "0.5", "--tasks",
                 "pope_tiny", "--include-path", str(TASKS_DIR), "--launcher", f"{sys.executable} {FAKE}",
                 "--retries", "0", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 1 and len(fake_calls()) == 2
    assert "FAILED: 0 results files (expected 1); Error during evaluation: generation failed on sample 0" in out
    assert "0/2 cells done" in out
    assert main(["sweep", "--models", "gpt", "--out", str(tmp_path / "s")]) == 2
    assert main(["report", str(tmp_path / "empty")]) == 1


def test_a_locked_cell_is_not_written(tmp_path, fake_calls):
    from lmms_prune.sweep import cell_lock

    (ckpt,) = _checkpoints(tmp_path, "ckpt")
    (cell,) = build_cells([("internvl", str(ckpt))], [], [0.5])
    sweep = _fake_sweep(tmp_path / "s")
    d = sweep.cell_dir(cell)
    with cell_lock(d.parent / f"{d.name}.lock") as held:
        assert held
        (status,) = sweep.run([cell]).values()
    assert status.startswith("BUSY") and fake_calls() == [] and not d.exists()
    assert sweep.run([cell])[cell.name] == "done"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"


def test_sigterm_to_the_sweep_stops_its_child_process_group(tmp_path, fake_calls, monkeypatch):
    (ckpt,) = _checkpoints(tmp_path, "ckpt")
    pids = tmp_path / "pids"
    env = {**os.environ, "FAKE_LMMS_EVAL_MODE": "hang", "FAKE_LMMS_EVAL_PIDS": str(pids)}
    cmd = [sys.executable, "-m", "lmms_prune.cli.main", "sweep", "--models", f"internvl={ckpt}", "--methods", "fastv",
           "--keep", "0.5", "--tasks", "pope_tiny", "--include-path", str(TASKS_DIR), "--launcher",
           f"{sys.executable} {FAKE}", "--out", str(tmp_path / "s")]
    sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not pids.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    child, grandchild = (int(p) for p in pids.read_text().split())
    assert _alive(child) and _alive(grandchild)
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert not _alive(child) and not _alive(grandchild)


def _write_run(folder: Path, model: str, model_args: str, prefill: list[float], date: str,
               world_size: int = 1, invocation: str | None = "sweep-1") -> Path:
    """A results file and its efficiency JSON; ``invocation``: the sweep invocation that timed it (one host)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{date}_results.json"
    path.write_text(json.dumps({"config": {"model": model, "model_args": model_args, "limit": len(prefill)},
                                "results": {"pope_tiny": {"alias": "pope_tiny", "pope_accuracy,none": 50.0}},
                                "group_subtasks": {"pope_tiny": []}, "date": date}))
    samples = [{"task": "pope_tiny", "doc_id": i, "batch_size": 1, "visual_before": 100, "visual_after": 10,
                "llm_prefill_seconds": t, "ttft_seconds": 1.0 + t, "kv_cache_bytes": 10, "kv_cache_bytes_unpruned": 100}
               for i, t in enumerate(prefill)]
    (folder / f"{date}_efficiency.json").write_text(json.dumps(
        {"summary": {"samples": len(samples), "skipped": 0}, "samples": samples, "world_size": world_size,
         "measured_with": {"invocation": invocation, "host": "0" * 16}}))
    return path


def test_report_speed_up_excludes_the_cold_start_and_says_what_it_rests_on(tmp_path):
    # a 2-sample run: the first sample of each process pays the cold start (27x at first sight)
    _write_run(tmp_path / "none", "internvl_none", "pretrained=/m", [2.70, 0.020], "20260101_000000")
    _write_run(tmp_path / "fastv", "internvl_fastv", "pretrained=/m,keep_ratio=0.1", [0.05, 0.010], "20260101_000001")
    result = write_report(tmp_path)
    (table,) = result["tables"]
    none, fastv = table.rows
    assert fastv["prefill speed-up"] == pytest.approx(0.020 / 0.010)  # not (2.72 / 2) / (0.06 / 2) = 45x
    # the time to first token adds the same 1 s of vision on both sides: its speed-up is the user's
    assert fastv["TTFT speed-up"] == pytest.approx(1.020 / 1.010)
    assert "| prefill speed-up | TTFT speed-up |" in result["markdown"]
    assert (fastv["samples"], fastv["timed"]) == (2, 1)
    assert "| 2 (1) |" in result["markdown"]
    assert fastv["KV reduction %"] == pytest.approx(0.0)  # deterministic figures use every sample
    assert fastv["visual kept"] == 10


def test_warm_samples_drop_the_first_batch_of_each_rank_and_task():
    from lmms_prune.efficiency import warm_samples

    records = [{"task": t, "doc_id": d, "batch_size": 1} for t in ("a", "b") for d in range(6)]
    kept = warm_samples(records, world_size=2)  # rank 0: doc 0, 2, 4; rank 1: doc 1, 3, 5
    assert sorted((r["task"], r["doc_id"]) for r in kept) == [(t, d) for t in ("a", "b") for d in (2, 3, 4, 5)]
    batched = [{"task": "a", "doc_id": d, "batch_size": 2} for d in range(5)]
    assert [r["doc_id"] for r in warm_samples(batched)] == [2, 3, 4]
    ordered = [{"rank": r, "position": p, "task": "a", "doc_id": 10 * r + p, "batch_size": 1}
               for r in (0, 1) for p in range(3)]
    assert sorted(r["doc_id"] for r in warm_samples(ordered)) == [1, 2, 11, 12]


def test_report_keeps_one_result_per_cell_and_says_what_it_dropped(tmp_path):
    cell = tmp_path / "internvl-m-0000/fastv/keep0.1"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_text(json.dumps({"fingerprint": "f" * 16, "settings": {}}))
    old = _write_run(cell / "lmms_eval" / "a", "internvl_fastv", "pretrained=/m,keep_ratio=0.1", [1, 1],
                     "20260101_000000")
    new = _write_run(cell / "lmms_eval" / "b", "internvl_fastv", "pretrained=/m,keep_ratio=0.1", [1, 1],
                     "20260101_000100")
    result = write_report(tmp_path)
    assert [r.path for r in result["runs"]] == [new]
    (table,) = result["tables"]
    assert len(table.rows) == 1
    assert f"dropped {old.relative_to(tmp_path)}: an older result of the same cell as " \
           f"{new.relative_to(tmp_path)}" in result["markdown"]


def _lmms_eval_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions ``marker`` (a sweep's output folder)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "lmms_eval" in cmdline and _alive(int(proc.name)):
            out.append(int(proc.name))
    return out


@pytest.mark.cli
def test_killed_sweep_leaves_no_child_and_an_immediate_rerun_gives_one_result(tmp_path):
    data = tmp_path / "refcoco"
    write_refcoco_hub_layout(data / "RefCOCO", 1, seed=4, splits=("val",))
    env = {**os.environ, "LMMS_PRUNE_REFCOCO_DIR": str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "lmms_prune.cli.main", "sweep", "--models",
           f"internvl={tiny_model_dir('internvl_qwen2')}", "--methods", "none", "--tasks", "refcoco_ground_val",
           "--limit", "1", "--method-args", "*:max_num=1", "--retries", "0", "--out", str(out)]
    sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _lmms_eval_processes(str(out)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _lmms_eval_processes(str(out)), "the sweep never started lmms_eval"
    time.sleep(3)  # lmms_eval is importing / loading: the moment a user loses patience
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert _lmms_eval_processes(str(out)) == []
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert "rerun because earlier run did not finish" in rerun.stdout
    (cell_dir,) = {p.parent for p in out.rglob("cell.json")}
    assert len(list(cell_dir.rglob("*_results.json"))) == 1
    time.sleep(2)  # nothing left over may write a second results file later
    assert len(list(out.rglob("*_results.json"))) == 1
    result = write_report(out)
    (table,) = result["tables"]
    assert len(table.rows) == 1 and result["dropped"] == []
