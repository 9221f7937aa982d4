"""The 2025-26 presets through the lmms-eval command line on tiny models (``--model <family>_<preset>`` on
InternVL and Qwen2.5-VL). Two samples per run (CI time): each run writes its results and one efficiency record
per sample with the method's budget."""

from __future__ import annotations

import pytest
from cli_runs import run_lmms_eval

from lmms_prune.toy.models import tiny_model_dir

RUNS = [  # --model, tiny model, --model_args; visual tokens after = the fixed budget 9
    ("internvl_prumerge_plus", "internvl3", "keep_tokens=9,max_num=2"),
    ("qwen2_5_vl_prumerge_plus", "qwen2_5_vl", "keep_tokens=9"),
]


@pytest.mark.cli
@pytest.mark.parametrize(("model", "toy", "args"), RUNS, ids=[r[0] for r in RUNS])
def test_merging_presets_run_through_lmms_eval(tmp_path, model, toy, args):
    run = run_lmms_eval(tmp_path, model, f"pretrained={tiny_model_dir(toy)},{args}", limit=2)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    samples = run.efficiency["samples"]
    assert len(samples) == 2 and all(s["visual_after"] == 9 < s["visual_before"] for s in samples)


@pytest.mark.cli
def test_downsample_runs_through_lmms_eval_with_fewer_tokens(tmp_path):
    """InternVL at half its tiles, Qwen2.5-VL at a quarter of its pixels: nothing is pruned, and Qwen's images
    give about a quarter of the tokens of the unpruned run (within a factor 2: whole tokens per side on toy images)."""
    run = run_lmms_eval(tmp_path / "internvl", "internvl_downsample",
                        f"pretrained={tiny_model_dir('internvl3')},keep_ratio=0.5,max_num=6", limit=2)
    assert all(s["visual_after"] == s["visual_before"] for s in run.efficiency["samples"])
    qwen = f"pretrained={tiny_model_dir('qwen2_5_vl')}"
    full = run_lmms_eval(tmp_path / "full", "qwen2_5_vl_none", qwen, limit=2).efficiency["samples"]
    small = run_lmms_eval(tmp_path / "small", "qwen2_5_vl_downsample", f"{qwen},keep_ratio=0.25",
                          limit=2).efficiency["samples"]
    for s, f in zip(small, full):
        assert s["visual_after"] == s["visual_before"]
        assert 0.25 * f["visual_before"] / 2 < s["visual_before"] < 0.25 * f["visual_before"] * 2
