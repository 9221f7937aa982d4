"""``lmms-prune report`` on what a careless or hostile folder holds (issue 31): junk results files are skipped
and named, a stray NaN result adds no row; speed-ups only between cells measured side by side; the plots'
x-axis and its Pareto front (issue 35). Result files are written here in lmms-eval's format, no model runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmms_prune.cli.main import main
from lmms_prune.leaderboard.page import pareto_front
from lmms_prune.report import write_report

HOST = "0" * 16


def _run(folder: Path, method: str, keep: float, acc: float, seconds: float, flops: float, kept: int,
         invocation: str | None = "sweep-1", host: str = HOST, date: str = "20260101_000000") -> Path:
    """One run of ``internvl_<method>`` on pope_tiny: results file and efficiency JSON (2 samples: the first
    is the warm-up the timing means leave out), ``flops`` the pruned share of the prefill FLOPs."""
    folder.mkdir(parents=True, exist_ok=True)
    args = "pretrained=/m" + ("" if method == "none" else f",keep_ratio={keep}")
    path = folder / f"{date}_results.json"
    path.write_text(json.dumps({"config": {"model": f"internvl_{method}", "model_args": args, "limit": 2},
                                "results": {"pope_tiny": {"alias": "pope_tiny", "pope_accuracy,none": acc}},
                                "group_subtasks": {"pope_tiny": []}, "date": date}))
    samples = [{"task": "pope_tiny", "doc_id": i, "batch_size": 1, "visual_before": 100, "visual_after": kept,
                "llm_prefill_seconds": seconds, "prefill_flops": 1000.0 * flops, "prefill_flops_unpruned": 1000.0,
                "kv_cache_bytes": kept, "kv_cache_bytes_unpruned": 100} for i in range(2)]
    (folder / f"{date}_efficiency.json").write_text(json.dumps(
        {"summary": {"samples": 2, "skipped": 0}, "samples": samples, "world_size": 1,
         "measured_with": {"invocation": invocation, "host": host}}))
    return path


def _rows(result: dict) -> dict[str, dict]:
    (table,) = result["tables"]
    return {r["method"]: r for r in table.rows}


# ---------------------------------------------------------------- junk results files (poor 9)
def test_report_skips_junk_results_files_naming_each(tmp_path, capsys):
    _run(tmp_path / "none", "none", 1.0, 80.0, 1.0, 1.0, 100)
    _run(tmp_path / "fastv", "fastv", 0.3, 70.0, 0.5, 0.3, 30)
    junk = tmp_path / "junk"
    junk.mkdir()
    files = {"bad_json": b"{not json", "a_list": b"[1, 2, 3]", "latin1": '{"results": "caf\xe9"}'.encode("latin-1"),
             "results_a_string": b'{"results": "x"}', "task_not_object": b'{"results": {"pope_tiny": 3}}'}
    for name, data in files.items():
        (junk / f"{name}_results.json").write_bytes(data)
    (junk / "dangling_results.json").symlink_to(tmp_path / "nowhere.json")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    for name in [*files, "dangling"]:
        assert f"{name}_results.json" in captured.err, name
        assert f"skipped junk/{name}_results.json" in (tmp_path / "out" / "report.md").read_text(), name
    assert set(_rows(write_report(tmp_path, tmp_path / "out2"))) == {"none", "fastv"}


def test_report_task_name_with_a_slash_writes_its_plot_inside_the_out_folder(tmp_path):
    path = _run(tmp_path / "none", "none", 1.0, 80.0, 1.0, 1.0, 100)
    data = json.loads(path.read_text())
    data["results"] = {"../../escape/x": data["results"]["pope_tiny"]}
    data["group_subtasks"] = {"../../escape/x": []}
    path.write_text(json.dumps(data))
    out = tmp_path / "a" / "out"
    result = write_report(tmp_path, out)
    (plot,) = result["plots"]
    assert plot.parent == out and plot.is_file() and "/" not in plot.name
    assert not (tmp_path / "escape").exists() and not (tmp_path / "a" / "escape").exists()


# ---------------------------------------------------------------- a stray NaN result (poor 10)
def test_a_stray_nan_result_adds_no_row_and_keeps_the_percentage(tmp_path):
    _run(tmp_path / "sweep" / "none", "none", 1.0, 80.0, 1.0, 1.0, 100)
    _run(tmp_path / "sweep" / "fastv", "fastv", 0.3, 60.0, 0.5, 0.3, 30)
    stray = _run(tmp_path / "a_stray_copy", "none", 1.0, 0.0, 1.0, 1.0, 100, date="20250101_000000")
    data = json.loads(stray.read_text())
    data["config"]["limit"] = 3  # another cell's fingerprint: not dropped as an older copy, a row of its own
    stray.write_text(json.dumps(data).replace("0.0", "NaN", 1))
    assert math.isnan(json.loads(stray.read_text())["results"]["pope_tiny"]["pope_accuracy,none"])
    result = write_report(tmp_path)
    (table,) = result["tables"]
    assert [r["method"] for r in table.rows] == ["none", "fastv"]  # one none row
    assert _rows(result)["fastv"]["pope_tiny %"] == pytest.approx(75.0)
    assert "skipped a_stray_copy/20250101_000000_results.json" in result["markdown"]
    assert "pope_accuracy is nan" in result["markdown"]


# ---------------------------------------------------------------- speed-ups side by side (issue 31)
@pytest.mark.parametrize("baseline,why", [({"invocation": "sweep-0"}, "another sweep invocation"),
                                          ({"host": "f" * 16}, "another host"),
                                          ({"invocation": None}, "not measured side by side")])
def test_speed_up_only_against_a_baseline_measured_side_by_side(tmp_path, baseline, why):
    _run(tmp_path / "none", "none", 1.0, 80.0, 1.0, 1.0, 100, **baseline)
    _run(tmp_path / "fastv", "fastv", 0.3, 70.0, 0.5, 0.3, 30)
    result = write_report(tmp_path)
    fastv = _rows(result)["fastv"]
    assert fastv["prefill speed-up"] is None and why in fastv["speed-up note"]
    assert "| not comparable |" in result["markdown"]
    assert "- internvl fastv keep 0.30: prefill speed-up not comparable: " in result["markdown"]
    assert result["x_axis"] == "flops"  # the default when cells were not measured side by side
    assert _rows(result)["none"]["speed-up note"] is None  # the baseline against itself


def test_speed_up_shown_when_measured_side_by_side(tmp_path):
    _run(tmp_path / "none", "none", 1.0, 80.0, 1.0, 1.0, 100)
    _run(tmp_path / "fastv", "fastv", 0.3, 70.0, 0.5, 0.3, 30)
    result = write_report(tmp_path)
    assert _rows(result)["fastv"]["prefill speed-up"] == pytest.approx(2.0)
    assert result["x_axis"] == "speedup" and "not comparable" not in result["markdown"]


# ---------------------------------------------------------------- the plots' x-axis (issue 35)
CELLS = {  # method: (keep, acc, prefill seconds, FLOPs share, kept tokens)
    "none": (1.0, 80.0, 1.0, 1.0, 100),
    "fastv": (0.3, 70.0, 0.5, 0.3, 30),  # fastest
    "deepprune": (0.5, 75.0, 0.8, 0.5, 50),
    "visionzip": (0.2, 72.0, 0.9, 0.2, 20),  # cheapest in FLOPs and tokens, yet slow (its merging costs time)
}


def _definition_front(rows: dict[str, dict], column: str, higher: bool) -> set[str]:
    names = [m for m in rows if rows[m][column] is not None]
    pts = [((1 if higher else -1) * rows[m][column], rows[m]["pope_tiny"]) for m in names]
    return {m for m, on in zip(names, pareto_front(pts)) if on}


def test_report_plots_the_chosen_x_axis_with_its_pareto_front(tmp_path, capsys):
    for method, (keep, acc, seconds, flops, kept) in CELLS.items():
        _run(tmp_path / "runs" / method, method, keep, acc, seconds, flops, kept)
    fronts = {}
    for axis, column, higher in (("speedup", "prefill speed-up", True), ("flops", "FLOPs %", False),
                                 ("tokens", "visual kept", False)):
        assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / axis), "--x-axis", axis]) == 0
        assert f"plot ({axis} axis): {tmp_path / axis / f'accuracy_vs_{axis}_pope_tiny.png'}" in capsys.readouterr().out
        result = write_report(tmp_path / "runs", tmp_path / axis, x_axis=axis)
        assert [p.name for p in (tmp_path / axis).glob("*.png")] == [f"accuracy_vs_{axis}_pope_tiny.png"]
        fronts[axis] = {r["method"] for r in result["fronts"]["pope_tiny"]["internvl"]}
        assert fronts[axis] == _definition_front(_rows(result), column, higher), axis
    assert fronts["speedup"] == {"none", "fastv", "deepprune"}
    assert fronts["flops"] == fronts["tokens"] == {"none", "deepprune", "visionzip"}
    write_report(tmp_path / "runs", tmp_path / "flops", x_axis="tokens")  # a later report replaces the plots
    assert [p.name for p in (tmp_path / "flops").glob("*.png")] == ["accuracy_vs_tokens_pope_tiny.png"]
    with pytest.raises(ValueError, match="x_axis='time'"):
        write_report(tmp_path / "runs", tmp_path / "x", x_axis="time")
