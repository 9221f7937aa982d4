"""The new methods through the lmms-eval command line: multi-stage pyramiddrop and merging visionzip on the
tiny InternVL, with their efficiency records (per-layer token counts)."""

from __future__ import annotations

import sys

import pytest
from test_models import _env, _lmms_eval_args, _outputs, _run

from lmms_prune import selection as sel


@pytest.mark.cli
@pytest.mark.parametrize(("model", "extra"), [("internvl_pyramiddrop", ",keep_ratio=0.3"),
                                              ("internvl_visionzip", ",keep_ratio=0.1")])
def test_cli_pyramiddrop_and_visionzip(tmp_path, model, extra):
    args = _lmms_eval_args(model, "internvl_llama", "pope_tiny", tmp_path / "out", extra)
    _run([sys.executable, "-m", "lmms_eval", *args], _env(tmp_path))
    metrics, answers, report = _outputs(tmp_path / "out")
    assert "pope_accuracy,none" in metrics["pope_tiny"] and len(answers) == 4
    assert report["method"] == model.split("_", 1)[1]
    assert 0 < report["summary"]["prefill_flops_ratio"] < 1
    for s in report["samples"]:
        n, layers = s["visual_before"], s["tokens_per_layer"]
        text = s["seq_len_before"] - n
        visual = [t - text for t in layers]
        if model.endswith("pyramiddrop"):  # all tokens, then the three stages' counts; average = keep_ratio
            depth = len(visual)
            layers = sel.depth_scaled_layers(depth)
            counts = sel.stage_budgets(n, sel.stage_ratio_for_average(0.3, layers, depth), len(layers), "int")
            assert visual == [n if i < layers[0] else counts[sum(k <= i for k in layers) - 1] for i in range(depth)]
            assert visual[-1] == s["visual_after"] and abs(sum(visual) / depth / n - 0.3) < 0.02
        else:
            assert s["visual_after"] == max(1, round(0.1 * n)) and visual == [s["visual_after"]] * len(visual)


@pytest.mark.cli
@pytest.mark.parametrize(("model", "family", "tasks"), [
    ("internvl_sparsevlm", "internvl_llama", "pope_tiny,mme_tiny"),  # two tasks, one run
    ("qwen2_5_vl_cdpruner", "qwen2_5_vl", "pope_tiny"),
    ("llava_fastervlm", "llava", "pope_tiny"),
])
def test_cli_sparsevlm_cdpruner_fastervlm(tmp_path, model, family, tasks):
    """SparseVLM's per-layer counts: every token before its first stage, then one non-increasing count per
    stage (rank-adaptive, so at least the schedule's), the last one the sample's visual_after; the pre-LLM
    CDPruner and FasterVLM keep round(0.1 N) at every layer."""
    extra = ",keep_ratio=0.3" if model.endswith("sparsevlm") else ",keep_ratio=0.1"
    args = _lmms_eval_args(model, family, tasks, tmp_path / "out", extra)
    _run([sys.executable, "-m", "lmms_eval", *args], _env(tmp_path))
    metrics, answers, report = _outputs(tmp_path / "out")
    for task in tasks.split(","):
        assert task in metrics and sum(t == task for t, _ in answers) == 4
    assert report["method"] == model.split("_")[-1]
    assert 0 < report["summary"]["prefill_flops_ratio"] < 1
    for s in report["samples"]:
        n = s["visual_before"]
        visual = [t - (s["seq_len_before"] - n) for t in s["tokens_per_layer"]]
        if model.endswith("sparsevlm"):
            depth = len(visual)
            layers = sel.depth_scaled_layers(depth, (3 / 32, 7 / 32, 16 / 32))
            counts = sel.stage_budgets(n, sel.stage_ratio_for_average(0.3, layers, depth), len(layers))
            stage = [sum(k <= i for k in layers) - 1 for i in range(depth)]
            assert all(v == n for v, s_ in zip(visual, stage) if s_ < 0)
            for s_ in range(len(layers)):
                level = {v for v, t in zip(visual, stage) if t == s_}
                assert len(level) == 1 and counts[s_] <= level.pop() <= n
            assert visual == sorted(visual, reverse=True) and visual[-1] == s["visual_after"]
        else:
            assert s["visual_after"] == max(1, round(0.1 * n)) and visual == [s["visual_after"]] * len(visual)
