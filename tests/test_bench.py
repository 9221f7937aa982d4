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
from lmms_prune.families import get_adapter
from lmms_prune.timing import PHASES
from lmms_prune.toy.models import build_tiny_model

torch.set_num_threads(1)


def test_bench_grid_on_a_tiny_model(tmp_path):
    model = build_tiny_model("internvl_qwen2")
    bench = Bench(model, repeats=1, warmup=0, decode_tokens=2, eager_reference=True, progress=lambda _: None)
    cells = bench.run(["fastv", "divprune"], [0.1, 0.5], [512])
    assert [(c.method, c.keep_ratio) for c in cells] == [
        ("none", 1.0), ("fastv", 0.1), ("fastv", 0.5), ("divprune", 0.1), ("divprune", 0.5)]
    vision = type(bench.adapter).vision_flops(model.config, synthetic_inputs(model, 512))
    for c in cells:
        # where the TTFT goes: disjoint phases in call order that add up to it
        assert set(c.ttft_parts) == set(PHASES) and min(c.ttft_parts.values()) >= 0
        assert math.isclose(sum(c.ttft_parts.values()), c.ttft_s["min"], rel_tol=1e-9)
        assert c.vision_s == c.ttft_parts["vision"] > 0
        # the whole request's theory: the same unpruned tower on both sides caps it below the prefill's
        assert c.vision_flops == vision
        assert c.e2e_theoretical_speedup == pytest.approx((vision + c.flops_unpruned) / (vision + c.flops))
        assert 1 <= c.e2e_theoretical_speedup <= c.theoretical_speedup
        assert c.ttft_speedup == cells[0].ttft_s["min"] / c.ttft_s["min"]
    assert cells[0].e2e_theoretical_speedup == cells[0].ttft_speedup == 1.0
    assert all(1 < c.e2e_theoretical_speedup < c.theoretical_speedup for c in cells[1:])
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
    assert "| TTFT speed-up | e2e theory |" in paths["markdown"].read_text()


@pytest.mark.parametrize("name,blocks,taps", [("internvl2_5-1b", "encoder.layer", None),
                                              ("qwen2_5_vl-7b", "blocks", ("fullatt_block_indexes", [1])),
                                              ("qwen3_vl-8b", "blocks", ("deepstack_visual_indexes", [1]))])
def test_vision_layers_builds_that_many_blocks(name, blocks, taps):
    """--vision-layers 2 builds a 2-block tower (taps past the cut move to its last block) and keeps the full
    geometry for the FLOPs; --llm-layers 1 one decoder layer. Built on the meta device: no weights."""
    with torch.device("meta"):
        model = build_geometry(name, layers=1, vision_layers=2)
    tower = get_adapter(model).vision_tower
    assert len(tower.get_submodule(blocks)) == 2 and len(model.model.language_model.layers) == 1
    if taps:
        assert getattr(model.config.vision_config, taps[0]) == taps[1]
    fam = type(get_adapter(model))
    assert fam.vision_depth(model.config) == 2 < fam.vision_depth(model.bench_full_config)
    with torch.device("meta"):
        bench = Bench(model, full_depth=24, progress=lambda _: None)
    full = fam.vision_depth(model.bench_full_config)
    # each missing block takes the mean time of the blocks run
    assert bench._missing_vision([1.0, 3.0]) == pytest.approx(2.0 * (full - 2))


def test_bench_depth_errors_come_before_any_weights(capsys):
    from lmms_prune.cli.main import main

    with pytest.raises(ValueError, match="--vision-layers 25: internvl2_5-1b's vision tower has 24 blocks"):
        build_geometry("internvl2_5-1b", vision_layers=25)
    with pytest.raises(ValueError, match="--layers 0: internvl2_5-1b has 24 decoder layers"):
        build_geometry("internvl2_5-1b", layers=0)
    with pytest.raises(SystemExit, match="--vision-layers 0: must be >= 1"):
        main(["bench", "--geometry", "internvl2_5-1b", "--vision-layers", "0"])
    with pytest.raises(SystemExit, match="work with --geometry only"):
        main(["bench", "--model", "some/checkpoint", "--llm-layers", "2"])


def test_truncated_geometry_extrapolates_to_full_depth():
    with torch.device("meta"):  # the arithmetic needs the geometry, not weights
        model = build_geometry("llava-1.5-7b", layers=2)
        bench = Bench(model, full_depth=32, repeats=1, warmup=0, e2e=False, progress=lambda _: None)
    assert len(model.model.language_model.layers) == 2
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


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("warmup", [0, 1])
def test_memory_sampler_never_shares_a_timed_prefill(warmup, exact, monkeypatch):
    """Where the kernel's high-water mark can be reset (Linux) every prefill is measured with no thread at all;
    elsewhere PeakRSS's sampler thread runs in one more, untimed, prefill after the timed ones, so the timed
    prefills have the cores to themselves either way. The memory figure comes back in both."""
    import threading

    from lmms_prune import bench as bench_module

    if not exact:
        monkeypatch.setattr(bench_module, "_reset_rss_peak", lambda: False)
    else:
        assert bench_module._reset_rss_peak(), "this Linux machine can reset VmHWM"
    model = build_tiny_model("internvl_qwen2")
    bench = Bench(model, repeats=2, warmup=warmup, e2e=False, eager_reference=True, progress=lambda _: None)
    adapter = get_adapter(model)
    calls: list[bool] = []  # per decoder prefill: is the sampler thread alive?

    def first_layer(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:  # a prefill, not a decode step
            calls.append(any(t.name == "lmms-prune-peak-rss" for t in threading.enumerate()))

    hook = adapter.layers[0].register_forward_pre_hook(first_layer, with_kwargs=True)
    try:
        cell = bench.run_cell("fastv", 0.25, synthetic_inputs(model, 256), {})
    finally:
        hook.remove()
    runs = warmup + 2 + (0 if exact else 1)  # per scoring path: the cell's sdpa prefills, then the eager ones
    assert len(calls) == 2 * runs
    for path in (calls[:runs], calls[runs:]):
        assert [i for i, alive in enumerate(path) if alive] == ([] if exact else [runs - 1])
    assert cell.peak_mem_bytes >= 0 and cell.eager_reference["peak_mem_bytes"] >= 0
    assert len(cell.llm_prefill_s) == 2 and cell.llm_prefill_s["min"] <= cell.llm_prefill_s["median"]


def test_peak_rss_is_the_blocks_own_peak():
    """The kernel high-water mark, reset at entry: a block that allocates and frees 256 MiB adds about 256 MiB
    at its peak, and a later empty block adds next to nothing (the earlier peak does not leak into it)."""
    import numpy as np

    from lmms_prune.bench import PeakRSS

    cpu = torch.device("cpu")
    with PeakRSS(cpu) as big:
        block = np.ones(32 * 2**20)  # 256 MiB of float64, touched
        del block
    with PeakRSS(cpu) as empty:
        pass
    assert not big.sampler
    assert 250 * 2**20 <= big.peak <= 300 * 2**20
    assert 0 <= empty.peak < 8 * 2**20
