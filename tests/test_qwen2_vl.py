"""Qwen2-VL, the family added as one module (docs/extending.md's worked example).

The engine's equivalence proofs run on it through the parametrised tests (tests/test_engine.py,
tests/test_presets.py iterate over every toy family); here: it is found by ``model_type`` after a
``save_pretrained`` round trip, its geometry is Qwen2-VL's, and it runs through the lmms-eval command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_runs import run_lmms_eval
from PIL import Image
from skimage import data as skdata
from transformers import AutoModelForImageTextToText, AutoProcessor

import lmms_prune
from lmms_prune.families import family_of, get_adapter
from lmms_prune.models import registry
from lmms_prune.toy.models import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved():
    path = tiny_model_dir("qwen2_vl")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return path, model, processor


def test_reloaded_checkpoint_is_the_native_class_and_its_own_family(saved):
    _, model, processor = saved
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2VLProcessor"
    adapter = get_adapter(model)
    assert adapter.name == "qwen2_vl" and family_of("qwen2_vl") is type(adapter)
    assert {"qwen2_vl_prune", "qwen2_vl_fastv", "qwen2_vl_divprune"} <= set(registry.MODELS)


def test_grid_is_read_from_image_grid_thw_and_pruning_counts_match(saved):
    _, model, processor = saved
    image = Image.fromarray(skdata.astronaut()).resize((300, 200))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    t, h, w = inputs["image_grid_thw"][0].tolist()
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n == t * (h // 2) * (w // 2)
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.25) as handle:
        model(**inputs)
        rec = handle.records[0]
    assert rec.spans[0].grids == [(h // 2, w // 2)]
    assert rec.visual_after == round(0.25 * n) and rec.seq_len_after == rec.seq_len_before - n + rec.visual_after


@pytest.mark.cli
def test_cli_qwen2_vl_fastv_runs_with_efficiency_records(tmp_path):
    run = run_lmms_eval(tmp_path, "qwen2_vl_fastv", f"pretrained={tiny_model_dir('qwen2_vl')},keep_ratio=0.1")
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    report = run.efficiency
    assert report["model"] == "qwen2_vl_fastv" and report["summary"]["samples"] == 3
    for sample in report["samples"]:
        assert sample["visual_after"] == max(1, round(0.1 * sample["visual_before"]))
        assert sample["prefill_flops"] < sample["prefill_flops_unpruned"]
