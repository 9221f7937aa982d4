"""Phase-0 diagnostics (deep-layer paper, section 4.4): the statistics against hand-computed values and scipy,
the one-pass attention recorder against the engine's own score, and ``lmms-prune diagnose`` end to end."""

from __future__ import annotations

import argparse
import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from lmms_prune import apply
from lmms_prune.calibration import single_image_inputs
from lmms_prune.cli import diagnose as cli_diagnose
from lmms_prune.diagnostics import (
    AttentionRecorder,
    ImageAttention,
    attention_entropy,
    layer_summary,
    mean_maps_by_layout,
    parse_layers,
    phase0_table,
    position_correlation,
    prompt_stability,
    read_prompts,
)
from lmms_prune.toy.data import generate_scenes
from lmms_prune.toy.models import build_processor, build_tiny_model, tiny_model_dir

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ statistics
def test_spearman_equals_hand_computed_values():
    # ranks [1, 3, 2, 4] vs [1, 2, 3, 4]: d^2 = 0 + 1 + 1 + 0 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert position_correlation([0.1, 0.3, 0.2, 0.4]) == pytest.approx(0.8)
    assert position_correlation([1.0, 2.0, 5.0, 9.0]) == pytest.approx(1.0)  # monotone, not linear
    assert position_correlation(torch.tensor([4.0, 3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ties take average ranks: [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> Pearson of ranks = 4.5 / sqrt(4.5 * 5)
    assert position_correlation([1.0, 2.0, 2.0, 3.0]) == pytest.approx(3 / math.sqrt(10))
    assert math.isnan(position_correlation([0.5, 0.5, 0.5]))  # undefined for a constant map


def test_spearman_equals_scipy_on_random_maps():
    rng = np.random.default_rng(0)
    for n in (5, 64, 256):
        a = rng.random(n)
        expected = stats.spearmanr(np.arange(n), a).statistic
        assert position_correlation(torch.tensor(a)) == pytest.approx(expected, abs=1e-12)


def test_entropy_hand_computed():
    assert attention_entropy(torch.full((256,), 1 / 256)) == pytest.approx(math.log(256))
    assert attention_entropy(torch.ones(7)) == pytest.approx(math.log(7))  # normalised over the tokens first
    one_hot = torch.zeros(100)
    one_hot[42] = 0.3
    assert attention_entropy(one_hot) == 0.0
    # p = [1/4, 1/4, 1/2]: H = -(2 * 1/4 * ln 1/4 + 1/2 * ln 1/2) = 1.5 ln 2
    assert attention_entropy([1.0, 1.0, 2.0]) == pytest.approx(1.5 * math.log(2))
    assert attention_entropy([2.0, 2.0, 4.0]) == pytest.approx(attention_entropy([1.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=">= 0 with a positive sum"):
        attention_entropy([0.5, -0.1, 0.6])


def test_prompt_stability_on_constructed_maps():
    a = torch.rand(50)
    assert prompt_stability(torch.stack([a, a, a])) == pytest.approx(1.0)
    assert prompt_stability(torch.stack([a, 3 * a])) == pytest.approx(1.0)  # cosine ignores scale
    assert prompt_stability(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.0)
    # pairs: cos(a, b) = 0, cos(a, c) = cos(b, c) = 1/sqrt(2) -> mean sqrt(2) / 3
    maps = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert prompt_stability(maps) == pytest.approx(math.sqrt(2) / 3)
    with pytest.raises(ValueError, match="P >= 2"):
        prompt_stability(torch.rand(1, 10))


def test_layer_summary_averages_per_image_and_per_map():
    up = torch.arange(1.0, 5.0)
    image1 = torch.stack([up, up])  # stability 1, rho +1 twice
    image2 = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 1.0], [1.0] * 6])  # the second map is constant
    row = layer_summary([image1, image2])
    rho2 = position_correlation(image2[0])
    assert row["prompt_stability"] == pytest.approx((1.0 + prompt_stability(image2)) / 2)
    assert row["position_correlation"] == pytest.approx((1.0 + 1.0 + rho2) / 3)  # the constant map is skipped
    assert row["position_correlation_abs"] == pytest.approx((1.0 + 1.0 + abs(rho2)) / 3)
    entropies = [attention_entropy(m) for m in (*image1, *image2)]
    assert row["entropy"] == pytest.approx(sum(entropies) / 4)
    assert row["max_entropy"] == pytest.approx((math.log(4) + math.log(6)) / 2)
    assert (row["num_images"], row["num_prompts"]) == (2, 2)
    with pytest.raises(ValueError, match="different numbers of prompt maps"):
        layer_summary([image1, torch.rand(3, 4)])


def test_layer_and_prompt_inputs_are_checked(tmp_path):
    assert parse_layers("12,1,2,2") == [1, 2, 12]
    with pytest.raises(ValueError, match=r"layer 15 must be in \[1, 14\]"):
        parse_layers("1,15", depth=14)
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_layers("1,two")
    path = tmp_path / "prompts.txt"
    path.write_text("Describe the image.\n\n")
    with pytest.raises(ValueError, match="needs at least 2"):
        read_prompts(path)
    path.write_text("Describe the image.\n\n  What is shown?  \n")
    assert read_prompts(path) == ["Describe the image.", "What is shown?"]


def test_mean_maps_are_averaged_within_each_layout_only():
    a = ImageAttention("a", (100, 50), [(2, 4)], {1: torch.tensor([[1.0] * 8, [3.0] * 8])})
    b = ImageAttention("b", (100, 50), [(2, 4)], {1: torch.tensor([[5.0] * 8, [7.0] * 8])})
    c = ImageAttention("c", (50, 100), [(4, 2)], {1: torch.full((2, 8), 9.0)})
    groups = mean_maps_by_layout([c, a, b], "qwen2_5_vl")
    assert list(groups) == ["grid2x4", "grid4x2"]  # the most common layout first
    example, means, count = groups["grid2x4"]
    assert count == 2 and example.grids == [(2, 4)] and torch.equal(means[1], torch.full((8,), 4.0))
    assert torch.equal(groups["grid4x2"][1][1], torch.full((8,), 9.0))
    rows = phase0_table([a, b, c])
    assert [(r["layer"], r["score_layer"], r["num_images"]) for r in rows] == [(1, 0, 3)]


# ------------------------------------------------------------------------------------------------ recorder
def test_recorder_gives_the_engine_score_of_each_layer_in_one_pass():
    model = build_tiny_model("internvl_qwen2", num_layers=4)
    processor = build_processor("internvl_qwen2")
    image = next(generate_scenes(1, seed=0, width=300, height=200)).image
    inputs = single_image_inputs(processor, image, "Where is the circle?", max_num=1)
    before = model.config.text_config._attn_implementation
    with torch.no_grad():
        plain = model(**inputs).logits
        with AttentionRecorder(model, [0, 2]) as recorder:
            observed = model(**inputs).logits
        rows = dict(recorder.rows)
        assert model.config.text_config._attn_implementation == before
        assert torch.equal(plain, observed)  # observing changes nothing
        for layer in (0, 2):
            with apply(model, "fastv", keep_ratio=1.0, prune_layer=layer + 1, score_layer=layer) as handle:
                model(**inputs)
                engine_row = handle.state.attention[layer]
            assert torch.allclose(rows[layer], engine_row.cpu(), atol=1e-6)
    assert set(rows) == {0, 2} and rows[0].shape == (1, inputs["input_ids"].shape[1])
    with pytest.raises(ValueError, match=r"decoder layer index 4: must be in \[0, 3\]"):
        AttentionRecorder(model, [4])


# ------------------------------------------------------------------------------------------------ CLI
def test_diagnose_end_to_end_on_the_tiny_internvl(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k, scene in enumerate(generate_scenes(2, seed=1, width=800, height=400)):
        scene.image.save(images / f"scene{k}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe the image.\nWhere is the red object?\n")
    parser = argparse.ArgumentParser()
    cli_diagnose.add_arguments(parser)
    out = tmp_path / "diag"
    args = parser.parse_args(["--model", str(tiny_model_dir("internvl_qwen2")), "--images", str(images),
                              "--prompts", str(prompts), "--layers", "1,2,12", "--max-num", "2",
                              "--out", str(out), "--device", "cpu"])
    assert cli_diagnose.run(args) == 0
    with (out / "diagnose.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == [1, 2, 12]
    assert [int(r["score_layer"]) for r in rows] == [0, 1, 11]
    for r in rows:
        assert 0.0 < float(r["prompt_stability"]) <= 1.0 + 1e-9
        assert -1.0 <= float(r["position_correlation"]) <= 1.0
        assert float(r["position_correlation_abs"]) >= abs(float(r["position_correlation"])) - 1e-12
        assert 0.0 <= float(r["entropy"]) <= float(r["max_entropy"]) + 1e-9
        assert float(r["max_entropy"]) == pytest.approx(math.log(768))  # 2x1 tiles + thumbnail, 256 each
        assert (int(r["num_images"]), int(r["num_prompts"])) == (2, 2)
    markdown = (out / "diagnose.md").read_text()
    assert markdown.count("\n| 1 | 0 |") == 1 and "\n| 12 | 11 |" in markdown
    assert "attention_maps_tiles2x1.png" in markdown
    with Image.open(out / "attention_maps_tiles2x1.png") as png:
        assert png.size[0] > 300 and png.size[1] > 300
