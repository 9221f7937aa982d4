"""Smoke run of the efficiency benchmark on a tiny model: every figure is present and self-consistent (no
timing assertions: timings belong to benchmark runs, not unit tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmms_prune import selection as sel
from lmms_prune.bench import Bench, build_geometry, markdown_table, synthetic_inputs, write_results
from lmms_prune.efficiency import DecoderDims, kv_cache_bytes, prefill_flops
from lmms_prune.toy.models import build_tiny_model

torch.set_num_threads(1)


def test_bench_grid_on_a_tiny_model(tmp_path):
    model = build_tiny_model("internvl_qwen2")
    bench = Bench(model, repeats=1, warmup=0, decode_tokens=2, eager_reference=True, progress=lambda _: None)
    cells = bench.run(["fastv", "divprune"], [0.1, 0.5], [512])
    assert [(c.method, c.keep_ratio) for c in cells] == [
        ("none", 1.0), ("fastv", 0.1), ("fastv", 0.5), ("divprune", 0.1), ("divprune", 0.5)]
    dims = DecoderDims.from_config(model.config.text_config, ffn_matrices=3)
    base = cells[0]
    full = base.visual_tokens + (base.flops and 0) + (synthetic_inputs(model, 512)["input_ids"].shape[1] - 512)
    assert base.kept_tokens == 512 and base.flops == base.flops_unpruned == prefill_flops(dims, [full] * 14)
    for c in cells[1:]:
        assert c.kept_tokens == round(c.keep_ratio * 512)
        after = full - 512 + c.kept_tokens
        k = 2 if c.method == "fastv" else 0
        counts = [full] * k + [after] * (14 - k)
        assert c.flops == prefill_flops(dims, counts)
        assert c.kv_bytes == kv_cache_bytes(dims, counts, 4)
        assert math.isclose(c.theoretical_speedup, c.flops_unpruned / c.flops)
        assert c.speedup > 0 and c.llm_prefill_s["min"] <= c.llm_prefill_s["median"]
        assert c.ttft_s["min"] > 0 and c.decode_per_token_s >= 0 and c.select_s > 0
        assert bool(c.eager_reference) == (c.method == "fastv")
    paths = write_results(cells, tmp_path, {"source": "tiny"}, extrapolated=False)
    data = json.loads(paths["json"].read_text())
    assert len(data["cells"]) == 5 and paths["plot"].stat().st_size > 0
    assert paths["markdown"].read_text().count("\n| ") == 5


def test_truncated_geometry_extrapolates_to_full_depth():
    model = build_geometry("llava-1.5-7b", layers=2)
    assert len(model.model.language_model.layers) == 2
    bench = Bench(model, full_depth=32, repeats=1, warmup=0, e2e=False, progress=lambda _: None)
    bench.dims = DecoderDims.from_config(model.config.text_config, ffn_matrices=3)
    layer_times = [1.0, 3.0]
    # K=1: one full-length layer, 31 pruned layers at the truncated stack's pruned-layer time
    assert bench._extrapolate(layer_times, total=4.5, counts=[100, 20]) == pytest.approx(0.5 + 1.0 + 31 * 3.0)
    assert bench._full_depth_counts([100, 20]) == [100] + [20] * 31


def test_truncated_multistage_extrapolates_every_stage():
    """Stages at 1 and 3 of a stack (the tiny model standing for the first layers of a 32-layer one): layers
    0..4 keep their own counts and times, layers 5..31 the last stage's count and the mean time of the stack's
    layers at that count."""
    bench = Bench(build_tiny_model("internvl_qwen2"), full_depth=32, repeats=1, warmup=0, e2e=False,
                  progress=lambda _: None)
    counts, times = [100, 60, 60, 30, 30], [5.0, 3.0, 3.2, 1.0, 1.4]
    assert bench._full_depth_counts(counts) == [100, 60, 60, 30, 30] + [30] * 27
    assert bench._extrapolate(times, total=sum(times) + 0.5, counts=counts) == pytest.approx(
        0.5 + 5.0 + 2 * 3.1 + 29 * 1.2)
    with pytest.raises(ValueError, match="prune_layers='auto' would scale to the 14 layers run"):
        bench.run_cell("pyramiddrop", 0.5, synthetic_inputs(bench.model, 512), {})


def test_bench_multistage_and_merging_cells_on_a_tiny_model(tmp_path):
    model = build_tiny_model("internvl_qwen2")
    bench = Bench(model, repeats=1, warmup=0, e2e=False, progress=lambda _: None)
    cells = bench.run(["pyramiddrop", "visionzip"], [0.5], [512], {"pyramiddrop": {"prune_layers": "2,5,9"}})
    dims = DecoderDims.from_config(model.config.text_config, ffn_matrices=3)
    full = synthetic_inputs(model, 512)["input_ids"].shape[1]
    text = full - 512
    pdrop, vzip = cells[1], cells[2]
    counts = sel.stage_budgets(512, sel.stage_ratio_for_average(0.5, (2, 5, 9), 14), 3, rounding="int")
    visual = [512] * 2 + [counts[0]] * 3 + [counts[1]] * 4 + [counts[2]] * 5
    assert pdrop.prune_layers == [2, 5, 9] and pdrop.kept_tokens == counts[-1] and pdrop.keep_ratio == 0.5
    assert pdrop.flops == prefill_flops(dims, [text + v for v in visual])
    assert pdrop.visual_per_layer == pytest.approx(sum(visual) / 14) and abs(pdrop.visual_per_layer - 256) < 3
    assert vzip.prune_layers is None and vzip.kept_tokens == 256 and vzip.visual_per_layer == 256
    table = markdown_table(cells, extrapolated=False)
    assert "| pyramiddrop | 0.5 | 512 | " in table and " | 2,5,9 | " in table


def test_unknown_geometry_and_bad_token_count_are_clear_errors():
    with pytest.raises(ValueError, match="unknown; choose one of"):
        build_geometry("gpt-5")
    with pytest.raises(ValueError, match="multiple of 256"):
        synthetic_inputs(build_tiny_model("internvl_llama"), 300)
