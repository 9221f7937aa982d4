"""scripts/gpu_check.sh, the prepared GPU evidence run, proven end to end on the CPU (--device cpu --small)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_small_on_cpu_writes_its_summary(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), "--device", "cpu", "--small"],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    # the equivalence proofs ran in both dtypes and all passed
    assert [e["dtype"] for e in report["equivalence"]] == ["float32", "bfloat16"]
    for eq in report["equivalence"]:
        assert eq["tests"] >= 4 and eq["passed"] == eq["tests"], eq
    for row in report["argmax_bf16"].values():
        assert 0.0 <= row["max_abs_diff"] < 0.1 and row["argmax_agreement"] >= 0.9
    # every geometry has the unpruned cell and each method at both budgets, with consistent figures
    for geo in report["bench"]:
        cells = geo["cells"]
        assert cells[0]["method"] == "none" and cells[0]["kept_tokens"] == geo["spec"]["tokens"]
        methods = {c["method"] for c in cells[1:]}
        assert {"fastv", "d2pruner", "deepprune", "vispruner"} <= methods
        for c in cells[1:]:
            if c["method"] == "pyramiddrop":  # keep_ratio = the average kept per layer: fewer after the last stage
                assert 1 <= c["kept_tokens"] < round(c["keep_ratio"] * geo["spec"]["tokens"])
            else:
                assert c["kept_tokens"] == max(1, round(c["keep_ratio"] * geo["spec"]["tokens"]))
            assert c["theoretical_speedup"] > 1 and c["flops"] < c["flops_unpruned"]
            assert c["measured_over_theoretical"] == c["speedup"] / c["theoretical_speedup"]
            # the end-to-end columns: the unpruned tower caps the whole request's FLOPs ratio below the prefill's
            assert 1 < c["e2e_theoretical_speedup"] < c["theoretical_speedup"] and c["ttft_speedup"] > 0
            assert math.isclose(sum(c["ttft_parts"].values()), c["ttft_s"]["min"], rel_tol=1e-9)
        # batch 1: the pruned layers get no mask, so SDPA is free to choose its fast kernel
        assert geo["sdpa"]["pruned_layers"] > 0 and geo["sdpa"]["pruned_layers_with_mask"] == 0
        assert any("scaled_dot_product" in name for name in geo["sdpa"]["sdpa_ops"])
    summary = (out / "gpu_check.md").read_text()
    for eq in report["equivalence"]:
        assert f"| {eq['dtype']} | {eq['tests']} | {eq['tests']} | 0 |" in summary
    assert "Bench: toy-internvl" in summary and "SDPA in the pruned layers" in summary
    assert "| TTFT speed-up | e2e theory |" in summary
