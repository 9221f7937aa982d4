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
            counts = sel.stage_budgets(n, sel.stage_ratio_for_average(0.3, layers, depth), len(layers))
            assert visual == [n if i < layers[0] else counts[sum(k <= i for k in layers) - 1] for i in range(depth)]
            assert visual[-1] == s["visual_after"] and abs(sum(visual) / depth / n - 0.3) < 0.02
        else:
            assert s["visual_after"] == max(1, round(0.1 * n)) and visual == [s["visual_after"]] * len(visual)
