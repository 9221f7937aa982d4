"""The shipped tiny InternVL grounding model: architecture, size, answer format on held-out scenes, and the
training run's recorded result (run to its last planned step in under an hour).

Issue 8 asks for 80% acc@0.5 held out: a test measures it on the training script's held-out split. Its accuracy
through the lmms-eval command line (equal to direct evaluation, at least 70% on a slice, and far above a
box-prior baseline) is checked in tests/test_demo.py."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmms_prune.tasks.refcoco import parse_box
from lmms_prune.toy.data import generate_scenes, split_seed
from lmms_prune.toy.grounder import SCENE_KWARGS, SHORT_NAME, grounder_dir
from lmms_prune.toy.models import internvl_num_tiles

PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: <ref>{expression}</ref>"
MAX_BYTES = 20 * 1024 * 1024
POPE_FLOOR = 70.0  # held-out POPE yes/no accuracy (percent) of the shipped weights; chance is 50
# A held-out seed: the training script draws training scenes from split_seed(seed, "train") and its own
# evaluation from split_seed(seed, "heldout"); this one is used by neither.
TEST_SEED = split_seed(2026, "test_grounder")


@pytest.fixture(scope="module")
def model() -> transformers.InternVLForConditionalGeneration:
    loaded = transformers.InternVLForConditionalGeneration.from_pretrained(grounder_dir())
    return loaded.eval()


@pytest.fixture(scope="module")
def processor() -> transformers.ProcessorMixin:
    return transformers.AutoProcessor.from_pretrained(grounder_dir())


def test_shipped_files_are_complete_and_small() -> None:
    folder = grounder_dir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "processor_config.json"):
        assert (folder / name).is_file(), name
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= MAX_BYTES
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"shipped folder is {total / 2**20:.1f} MiB"
    assert SHORT_NAME == "tiny-grounder"


def test_architecture_is_internvl_with_a_14_layer_qwen2(model, processor) -> None:
    config = model.config
    assert config.model_type == "internvl"
    assert config.text_config.model_type == "qwen2"
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    assert config.text_config.num_hidden_layers >= 14
    assert config.vision_config.image_size == [448, 448]
    assert config.vision_config.patch_size == [14, 14]
    assert config.downsample_ratio == 0.5
    assert config.image_seq_length == 256
    assert processor.image_seq_length == 256
    # the embedding table covers the whole tokenizer, so every generated id decodes
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)


def test_processor_tiles_like_internvl(processor) -> None:
    """A 448 px square is one tile (256 tokens); a wide image gets InternVL's grid plus a thumbnail."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>user\n<IMG_CONTEXT>\nhi<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    image_token = processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    for width, height in ((448, 448), (1200, 500)):
        image = Image.new("RGB", (width, height), (220, 220, 220))
        inputs = processor(text=[prompt], images=[image], return_tensors="pt", crop_to_patches=True,
                           min_patches=1, max_patches=6)
        tiles = internvl_num_tiles(width, height, max_num=6)
        assert inputs["pixel_values"].shape[0] == tiles
        assert int((inputs["input_ids"] == image_token).sum()) == 256 * tiles


def test_held_out_answers_all_parse(model, processor) -> None:
    """Greedy answers on 20 held-out expressions (batched, left padding) all parse as boxes inside the image."""
    samples = []
    for scene in generate_scenes(12, TEST_SEED, **SCENE_KWARGS):
        for obj in scene.objects:
            samples.append((scene.image, obj.expressions[0], obj.box))
    samples = samples[:20]
    assert len(samples) == 20
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": PROMPT.format(expression=expr)}]}],
            tokenize=False, add_generation_prompt=True)
        for _, expr, _ in samples
    ]
    inputs = processor(text=texts, images=[im for im, _, _ in samples], padding=True, padding_side="left",
                       return_tensors="pt", crop_to_patches=True, min_patches=1, max_patches=6)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False, num_beams=1,
                                pad_token_id=processor.tokenizer.pad_token_id)
    answers = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for (image, _, _), answer in zip(samples, answers):
        predicted = parse_box(answer, image.width, image.height)
        assert predicted is not None, answer
        x1, y1, x2, y2 = predicted
        assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height, (answer, predicted)


def test_answers_in_internvl_box_format(processor, model) -> None:
    """The raw answer (special tokens kept) is exactly ``<box>[[x1, y1, x2, y2]]</box>`` on the 0-1000 grid."""
    import re

    scene = next(generate_scenes(1, TEST_SEED + 1, **SCENE_KWARGS))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"},
                                      {"type": "text", "text": PROMPT.format(expression=scene.objects[0].expression)}]}],
        tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[scene.image], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=40, do_sample=False, num_beams=1)
    raw = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
    match = re.fullmatch(r"<box>\[\[(\d+), (\d+), (\d+), (\d+)\]\]</box><\|im_end\|>", raw.strip())
    assert match is not None, raw
    assert all(0 <= int(v) <= 1000 for v in match.groups())


def _stages() -> list[dict]:
    """The shipped metrics.json and the runs it continued (``init_metrics``, nested), the last run first."""
    stages = [json.loads((grounder_dir() / "metrics.json").read_text())]
    while "init_metrics" in stages[-1]:
        stages.append(stages[-1]["init_metrics"])
    return stages


def test_training_runs_finished_within_the_hour() -> None:
    """The training runs' own held-out numbers ship next to the weights: the run from scratch and each run
    continued from the previous one's weights (``--init``; their metrics nested as ``init_metrics``) ran to its
    planned last step (not cut by the time cap, so the result is reproducible for the seed) in under an hour of
    CPU, and was scored on hundreds of held-out referring expressions, malformed answers counted as misses."""
    stages = _stages()
    assert stages[-1].get("init") is None  # the first run started from random weights
    for metrics in stages:
        assert metrics["steps_done"] == metrics["steps_planned"] and not metrics["stopped_by_time_cap"]
        assert metrics["train_minutes"] <= 60.0
        assert metrics["heldout_expressions"] >= 200
        # a malformed answer is scored as a miss and counted; it must stay rare
        assert metrics["heldout_unparseable"] <= 0.01 * metrics["heldout_expressions"]
        assert 0.0 <= metrics["heldout_acc@0.5"] <= 100.0
    for later, earlier in zip(stages, stages[1:]):
        assert later["init"] is not None and later["seed"] == earlier["seed"]


def test_shipped_model_scores_at_least_80_percent_held_out(tg) -> None:
    """Issue 8's bar, measured now: the shipped weights, scored by the training script's own evaluation (the
    processor, chat template, greedy decoding, parse_box and IoU) on its held-out split (100 scenes from a seed
    no training scene comes from), reach 80% acc@0.5, and reproduce the figure the training run recorded in
    metrics.json (within one expression: greedy ties may break differently with another thread count)."""
    recorded = json.loads((grounder_dir() / "metrics.json").read_text())
    model = transformers.InternVLForConditionalGeneration.from_pretrained(grounder_dir())
    processor = transformers.AutoProcessor.from_pretrained(grounder_dir())
    samples = tg.heldout_samples(recorded["heldout_images"], recorded["seed"])
    metrics = tg.evaluate(model, processor, samples, progress=False)
    assert metrics["n"] == recorded["heldout_expressions"] >= 300
    assert metrics["acc@0.5"] >= 80.0, metrics
    assert abs(metrics["acc@0.5"] - recorded["heldout_acc@0.5"]) <= 100.0 / metrics["n"] + 1e-6, (metrics, recorded)
    assert metrics["unparseable"] <= 0.01 * metrics["n"]


def test_shipped_model_answers_pope_held_out(tg) -> None:
    """The yes/no questions the shipped weights were also trained on (lmms-eval's POPE prompt, half the
    negatives adversarial), scored by the training script's own evaluation on its held-out POPE questions:
    at least POPE_FLOOR percent (chance 50), every answer "yes" or "no", and the figure the training run recorded
    (within one question)."""
    recorded = json.loads((grounder_dir() / "metrics.json").read_text())
    model = transformers.InternVLForConditionalGeneration.from_pretrained(grounder_dir())
    processor = transformers.AutoProcessor.from_pretrained(grounder_dir())
    metrics = tg.evaluate_yes_no(model, processor, tg.heldout_pope_samples(recorded["heldout_images"], recorded["seed"]),
                                 progress=False)
    assert metrics["n"] == recorded["heldout_pope_questions"] >= 300
    assert metrics["accuracy"] >= POPE_FLOOR, metrics
    assert metrics["other"] == 0, metrics
    assert abs(metrics["accuracy"] - recorded["heldout_pope_accuracy"]) <= 100.0 / metrics["n"] + 1e-6, (
        metrics, recorded)


def test_shipped_tokenizer_is_the_grounder_tokenizer(processor) -> None:
    """The saved tokenizer is the one the training script builds (one token per grammar word), id for id."""
    from lmms_prune.toy.grounder import grounder_tokenizer

    assert processor.tokenizer.get_vocab() == grounder_tokenizer().get_vocab()
    assert len(processor.tokenizer("the purple hexagon", add_special_tokens=False).input_ids) == 3


def test_a_missing_shipped_model_names_its_own_training_script(monkeypatch) -> None:
    """Each shipped name has its training script, and the error for missing package data names that one."""
    from pathlib import Path

    from lmms_prune import loading

    root = Path(loading.__file__).resolve().parents[1]
    assert set(loading.TRAINED_BY) == set(loading.SHIPPED)
    assert all((root / script).is_file() for script in loading.TRAINED_BY.values())
    monkeypatch.setattr(loading, "SHIPPED", {name: "no_such_folder" for name in loading.SHIPPED})
    for name, script in loading.TRAINED_BY.items():
        with pytest.raises(FileNotFoundError, match=f"retrain it \\({script} --out") as err:
            loading.shipped_dir(name)
        others = set(loading.TRAINED_BY.values()) - {script}
        assert not any(other in str(err.value) for other in others)
