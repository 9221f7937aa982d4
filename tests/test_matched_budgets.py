"""Matched budgets in the report: multi-stage runs (pyramiddrop with its own stage_ratio, keep_ratio None) get
their measured per-layer average as keep label, and the report compares at equal final count or equal FLOPs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmms_prune.efficiency import DecoderDims, prefill_flops
from lmms_prune.report import build_tables, collect, write_report

DIMS = DecoderDims(hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=16)
TEXT, N = 20, 100


def _write(folder: Path, model: str, model_args: str, visual_per_layer: list[int], date: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{date}_results.json").write_text(json.dumps({
        "config": {"model": model, "model_args": model_args, "limit": 2},
        "results": {"pope_tiny": {"alias": "pope_tiny", "pope_accuracy,none": 50.0}},
        "group_subtasks": {"pope_tiny": []}, "date": date}))
    tokens = [TEXT + v for v in visual_per_layer]
    samples = [{"task": "pope_tiny", "doc_id": i, "batch_size": 1, "visual_before": N,
                "visual_after": visual_per_layer[-1], "seq_len_before": TEXT + N, "tokens_per_layer": tokens,
                "prefill_flops": prefill_flops(DIMS, tokens),
                "prefill_flops_unpruned": prefill_flops(DIMS, [TEXT + N] * DIMS.num_layers),
                "llm_prefill_seconds": 0.01, "kv_cache_bytes": sum(tokens), "kv_cache_bytes_unpruned": 8 * (TEXT + N)}
               for i in range(2)]
    (folder / f"{date}_efficiency.json").write_text(json.dumps(
        {"summary": {"samples": 2, "skipped": 0}, "samples": samples, "world_size": 1}))


@pytest.fixture
def runs(tmp_path):
    _write(tmp_path / "none", "internvl_none", "pretrained=/m", [N] * 8, "20260101_000000")
    # pyramiddrop with its preset's stage_ratio (keep_ratio None), stages at 2, 4, 6
    pdrop = [100, 100, 50, 50, 25, 25, 12, 12]
    _write(tmp_path / "pdrop", "internvl_pyramiddrop", "pretrained=/m,prune_layers=2/4/6", pdrop, "20260101_000001")
    # fastv at layer 2 keeping 30: its final count differs from pyramiddrop's, its FLOPs nearly equal
    _write(tmp_path / "fastv", "internvl_fastv", "pretrained=/m,keep_ratio=0.3", [100, 100] + [30] * 6,
           "20260101_000002")
    return tmp_path, pdrop


def test_pyramiddrop_without_keep_ratio_is_labelled_by_its_average_per_layer(runs):
    folder, pdrop = runs
    by_method = {r.method: r for r in collect(folder)}
    assert by_method["pyramiddrop"].multi_stage and not by_method["fastv"].multi_stage
    assert by_method["pyramiddrop"].keep == pytest.approx(sum(pdrop) / len(pdrop) / N)
    assert by_method["fastv"].keep == 0.3


def test_report_matches_by_final_count_or_by_flops(runs, tmp_path):
    folder, pdrop = runs
    rows = {r["method"]: r for r in build_tables(collect(folder), "flops")[0].rows}
    for method, visual in (("pyramiddrop", pdrop), ("fastv", [100, 100] + [30] * 6)):
        tokens = [TEXT + v for v in visual]
        fraction = prefill_flops(DIMS, tokens) / prefill_flops(DIMS, [TEXT + N] * 8)
        assert rows[method]["FLOPs %"] == pytest.approx(100 * fraction)
        assert rows[method]["keep"] == round(fraction, 2)
        assert rows[method]["final kept %"] == pytest.approx(100 * visual[-1] / N)
    count = {r["method"]: r for r in build_tables(collect(folder), "count")[0].rows}
    assert count["pyramiddrop"]["keep"] == 0.12 and count["fastv"]["keep"] == 0.3 and count["none"]["keep"] == 1.0
    result = write_report(folder, tmp_path / "rep", match="flops")
    assert "Rows matched by prefill FLOPs" in result["markdown"] and "FLOPs %" in result["markdown"]
    with pytest.raises(ValueError, match="match='x': must be one of keep, count, flops"):
        build_tables(collect(folder), "x")


def test_stage_ratio_run_without_records_is_labelled_nan_not_an_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "20260101_000000_results.json").write_text(json.dumps({
        "config": {"model": "internvl_pyramiddrop", "model_args": "pretrained=/m,stage_ratio=0.4"},
        "results": {"pope_tiny": {"alias": "pope_tiny", "pope_accuracy,none": 50.0}}}))
    (run,) = collect(tmp_path)
    assert run.method == "pyramiddrop" and math.isnan(run.keep)
    assert "pyramiddrop" in write_report(tmp_path)["markdown"]
