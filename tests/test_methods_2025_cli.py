"""The 2025-26 methods through the lmms-eval command line on tiny models: ``--model <family>_<preset>`` for each
new preset on InternVL and Qwen2.5-VL, and GAP's ``positions=gap`` on a pre-LLM method. Two samples per run
(CI time): each run must write its results and one efficiency record per sample with the method's budget."""

from __future__ import annotations

import pytest
from cli_runs import run_lmms_eval

from lmms_prune.toy.models import tiny_model_dir

RUNS = [
    # (--model, tiny model, extra --model_args, expected visual tokens after pruning: fn of visual_before)
    ("internvl_prumerge_plus", "internvl3", "keep_tokens=9,max_num=2", lambda n: 9),
    ("qwen2_5_vl_prumerge_plus", "qwen2_5_vl", "keep_tokens=9", lambda n: 9),
    ("qwen2_5_vl_vispruner", "qwen2_5_vl", "keep_ratio=0.25,positions=gap", lambda n: max(1, round(0.25 * n))),
]


@pytest.mark.cli
@pytest.mark.parametrize(("model", "toy", "args", "after"), RUNS, ids=[r[0] + "-" + r[2] for r in RUNS])
def test_new_presets_run_through_lmms_eval(tmp_path, model, toy, args, after):
    run = run_lmms_eval(tmp_path, model, f"pretrained={tiny_model_dir(toy)},{args}", limit=2)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    samples = run.efficiency["samples"]
    assert len(samples) == 2
    for s in samples:
        assert s["visual_after"] == after(s["visual_before"]) < s["visual_before"]
