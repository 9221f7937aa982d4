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
@pytest.mark.parametrize(("model", "toy", "args", "below"), [
    ("internvl_downsample", "internvl3", "keep_ratio=0.5,max_num=6", 10**9),
    # lmms-eval's Qwen2.5-VL min_pixels gives every unshrunken image >= 256 tokens
    ("qwen2_5_vl_downsample", "qwen2_5_vl", "keep_ratio=0.25", 256)])
def test_downsample_runs_through_lmms_eval(tmp_path, model, toy, args, below):
    """Nothing is pruned: each sample keeps every token its shrunken image gave (the token counts against the
    processor are proven in tests/test_downsample.py, without a model)."""
    run = run_lmms_eval(tmp_path, model, f"pretrained={tiny_model_dir(toy)},{args}", limit=2)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    samples = run.efficiency["samples"]
    assert len(samples) == 2 and all(below > s["visual_after"] == s["visual_before"] > 0 for s in samples)


@pytest.mark.cli
@pytest.mark.parametrize(("model", "toy", "args"), [("internvl_feather", "internvl3", "max_num=2"),
                                                    ("qwen2_5_vl_feather", "qwen2_5_vl", "")])
def test_feather_runs_through_lmms_eval(tmp_path, model, toy, args):
    """The preset as released (its own 0.3 / 0.09 stage schedule): the cache of the last stage's layers is
    shorter than the first layers' by the tokens pruned (the counts are proven in tests/test_feather.py)."""
    extra = f",{args}" if args else ""
    run = run_lmms_eval(tmp_path, model, f"pretrained={tiny_model_dir(toy)}{extra}", limit=2)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    samples = run.efficiency["samples"]
    assert len(samples) == 2 and all(0 < s["visual_after"] < 0.3 * s["visual_before"] for s in samples)


@pytest.mark.cli
@pytest.mark.parametrize(("model", "toy", "args"), [("internvl_mustdrop", "internvl3", "keep_ratio=0.25,max_num=2"),
                                                    ("qwen2_5_vl_mustdrop", "qwen2_5_vl", "keep_ratio=0.25")])
def test_mustdrop_runs_through_lmms_eval(tmp_path, model, toy, args):
    """Whole 3x3 windows merged before the LLM: at least the budget remains, fewer tokens than the image gave
    (the window arithmetic is proven in tests/test_mustdrop.py)."""
    run = run_lmms_eval(tmp_path, model, f"pretrained={tiny_model_dir(toy)},{args}", limit=2)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    samples = run.efficiency["samples"]
    assert len(samples) == 2 and all(0.25 * s["visual_before"] - 1 <= s["visual_after"] < s["visual_before"]
                                     for s in samples)


@pytest.mark.cli
@pytest.mark.parametrize(("model", "toy", "args"), [("internvl_vscan", "internvl3", "max_num=2"),
                                                    ("qwen2_5_vl_vscan", "qwen2_5_vl", "positions=original")])
def test_vscan_runs_through_lmms_eval(tmp_path, model, toy, args):
    """The preset as released: round(0.167 N) tokens enter the LLM (scans + merge), int(0.333 of them) stay from
    the middle layer, whose cache is that much shorter (the arithmetic is proven in tests/test_vscan.py)."""
    run = run_lmms_eval(tmp_path, model, f"pretrained={tiny_model_dir(toy)},{args}", limit=2)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    samples = run.efficiency["samples"]
    assert len(samples) == 2
    for s in samples:
        entered = max(1, round(0.167 * s["visual_before"]))
        assert s["visual_after"] == max(1, int(0.333 * entered))
        per_layer = s["tokens_per_layer"]
        assert per_layer[0] - per_layer[-1] == entered - s["visual_after"] > 0


@pytest.mark.cli
def test_mustdrop_authors_runs_through_lmms_eval(tmp_path):
    """The authors' whole path on LLaVA-1.5 (the family whose tower hosts the in-tower merge): fewer tokens than
    the image gave, at least the key set's 8% (its arithmetic is proven in tests/test_mustdrop_tower.py)."""
    run = run_lmms_eval(tmp_path, "llava_mustdrop_authors", f"pretrained={tiny_model_dir('llava')}", limit=2)
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    samples = run.efficiency["samples"]
    assert len(samples) == 2 and all(0.08 * s["visual_before"] < s["visual_after"] < s["visual_before"]
                                     for s in samples)
