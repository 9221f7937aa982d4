"""Qwen3-VL: Qwen2.5-VL's layout with patch 16 and DeepStack.

The engine's equivalence proofs run on the tiny model through the parametrised tests (tests/test_engine.py,
tests/test_presets.py iterate over every toy family, so K=0, 2 and the last layer already equal mask mode);
here: the ``save_pretrained`` round trip, the geometry read from the config, DeepStack pruning below the last
injection (equal to mask mode, and unequal when the injections are dropped or land on the wrong tokens),
and one lmms-eval command-line run (VisPruner's mean received attention: tests/test_vispruner_no_cls.py).
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
from lmms_prune.bench import geometries
from lmms_prune.families import family_of, get_adapter
from lmms_prune.families.qwen3_vl import Qwen3VL
from lmms_prune.models import registry
from lmms_prune.toy.models import tiny_model_dir

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def saved():
    path = tiny_model_dir("qwen3_vl")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return path, model, processor


def _inputs(processor, size=(300, 200), text="Where is the cup?", images=1):
    image = Image.fromarray(skdata.coffee()).resize(size)
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=[image] * images, text=[prompt], return_tensors="pt")


def _generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=DECODE_STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def test_reloaded_checkpoint_is_the_native_class_and_its_own_family(saved):
    _, model, processor = saved
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor"
    adapter = get_adapter(model)
    assert adapter.name == "qwen3_vl" and family_of("qwen3_vl") is type(adapter) is Qwen3VL
    assert adapter.injected_layers() == len(model.config.vision_config.deepstack_visual_indexes) == 3
    assert {"qwen3_vl_prune", "qwen3_vl_fastv", "qwen3_vl_vispruner"} <= set(registry.MODELS)
    assert Qwen3VL.box_convention == "grid1000"


def test_grid_is_read_from_image_grid_thw_with_32_px_tokens(saved):
    _, model, processor = saved
    inputs = _inputs(processor, size=(300, 200))
    t, h, w = inputs["image_grid_thw"][0].tolist()
    vc = model.config.vision_config
    side = vc.patch_size * vc.spatial_merge_size
    assert side == 32  # Qwen3-VL: patch 16, merge 2
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n == t * (h // vc.spatial_merge_size) * (w // vc.spatial_merge_size)
    with torch.no_grad(), lmms_prune.apply(model, "fastv", keep_ratio=0.25) as handle:
        model(**inputs)
        rec = handle.records[0]
    assert rec.spans[0].grids == [(h // 2, w // 2)]
    assert rec.visual_after == round(0.25 * n) and rec.seq_len_after == rec.seq_len_before - n + rec.visual_after


def test_pixel_budget_arguments_are_validated_on_the_32_px_grid():
    options = Qwen3VL.parse_model_args({"min_pixels": "4096", "max_pixels": 65536})  # + lmms-eval's other keys
    assert (options["min_pixels"], options["max_pixels"]) == (4096, 65536)
    with pytest.raises(ValueError, match="min_pixels=900: must be an integer >= 1024"):
        Qwen3VL.parse_model_args({"min_pixels": 900})
    with pytest.raises(ValueError, match="swap them"):
        Qwen3VL.parse_model_args({"min_pixels": 8192, "max_pixels": 4096})


def _keep(n, k, seed):
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


@pytest.mark.parametrize("k_layer", [1, 2])
def test_deepstack_below_the_last_injection_equals_mask_mode(saved, k_layer):
    """Pruning at K in {1, 2} (DeepStack adds to the outputs of layers 0, 1, 2): the additions of layers >= K
    reach the kept tokens only, and prefill plus every cached decode step equal mask mode."""
    _, model, processor = saved
    inputs = _inputs(processor, images=2)
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    keep = _keep(n // 2, 7, seed=k_layer) + [n // 2 + i for i in _keep(n // 2, 5, seed=k_layer + 10)]  # per image
    with torch.no_grad():
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=k_layer, mode="mask"):
            mask_logits = model(**inputs).logits
            mask_tokens, mask_steps = _generate(model, inputs)
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=k_layer) as handle:
            logits = model(**inputs).logits
            index = handle.state.keep_index[0]
            assert sorted(handle.state.injections) == list(range(k_layer, 3))
            tokens, steps = _generate(model, inputs)
    assert logits.shape[1] == inputs["input_ids"].shape[1] - n + 12
    torch.testing.assert_close(logits[0], mask_logits[0, index], atol=ATOL, rtol=0)
    torch.testing.assert_close(steps, mask_steps, atol=ATOL, rtol=0)
    assert torch.equal(tokens, mask_tokens)


@pytest.mark.parametrize("fault", ["dropped", "misplaced"])
def test_deepstack_injections_dropped_or_misplaced_break_the_equivalence(saved, fault, monkeypatch):
    """The equivalence above is sensitive: without the additions of layers >= K, or with each kept token
    receiving its neighbour's, the pruned logits leave mask mode's."""
    _, model, processor = saved
    inputs = _inputs(processor)
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    keep = _keep(n, 9, seed=4)
    with torch.no_grad():
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=1, mode="mask"):
            mask_logits = model(**inputs).logits
        original = Qwen3VL.take_injections

        def faulty(self, lm_kwargs, first):
            taken = original(self, lm_kwargs, first)
            if fault == "dropped":
                return {}
            return {i: (pos, values.roll(1, 0)) for i, (pos, values) in taken.items()}

        monkeypatch.setattr(Qwen3VL, "take_injections", faulty)
        with lmms_prune.apply(model, "fixed", keep_indices=keep, prune_layer=1) as handle:
            logits = model(**inputs).logits
            index = handle.state.keep_index[0]
    assert (logits[0] - mask_logits[0, index]).abs().max() > 100 * ATOL


def test_bench_geometry_is_qwen3_vl_8b():
    fam, spec = geometries()["qwen3_vl-8b"]
    assert fam is Qwen3VL
    cls, config = fam.build_geometry(spec, layers=2)
    assert cls.__name__ == "Qwen3VLForConditionalGeneration"
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size) == (2, 4096, 32, 8, 128, 12288)
    assert (vision.depth, vision.hidden_size, vision.patch_size, vision.spatial_merge_size) == (27, 1152, 16, 2)
    assert vision.deepstack_visual_indexes == [8, 16, 24] and vision.out_hidden_size == 4096


@pytest.mark.cli
def test_cli_qwen3_vl_fastv_runs_with_efficiency_records(tmp_path):
    run = run_lmms_eval(tmp_path, "qwen3_vl_fastv",
                        f"pretrained={tiny_model_dir('qwen3_vl')},keep_ratio=0.1,max_pixels=65536")
    assert "pope_accuracy,none" in run.metrics["pope_tiny"]
    report = run.efficiency
    assert report["model"] == "qwen3_vl_fastv" and report["summary"]["samples"] == 3
    for sample in report["samples"]:
        assert sample["visual_after"] == max(1, round(0.1 * sample["visual_before"]))
        assert sample["visual_before"] <= 65536 // 32**2
        assert sample["prefill_flops"] < sample["prefill_flops_unpruned"]
