"""``scripts/train_video_qa.py``: the tiny LLaVA-OneVision video QA model's data, training and shipped artefact.

* random scenes are the task's clips: a plain scene is :func:`motion_clip` on its grey, a cluttered one
  :func:`cluttered_clip` with two other colours, and no training texture seed is one of the task's;
* a training row is the task's prompt through the chat template, with exactly the answer letter and
  ``<|im_end|>`` supervised; the prompt's words and the letters are single tokens;
* a few training steps on a tiny pool are deterministic (two runs give identical weights) and change them.

``tests/test_video_demo.py`` runs a checkpoint the script saves through ``lmms-prune demo --video``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmms_prune.toy.data import PALETTE
from lmms_prune.toy.videos import (
    DIRECTIONS,
    cluttered_clip,
    motion_clip,
    sample_scene,
    scene_clip,
    tinyvideo_rows,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_video_qa.py"


@pytest.fixture(scope="module")
def tv():
    """``scripts/train_video_qa.py`` imported as a module (a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_video_qa", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_video_qa"] = module
    spec.loader.exec_module(module)
    return module


def test_random_scenes_are_the_tasks_clip_kinds_with_fresh_seeds():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(200)]
    assert {s["kind"] for s in scenes} == {"plain", "cluttered"}
    assert {s["direction"] for s in scenes} == set(DIRECTIONS) and {s["colour"] for s in scenes} == set(PALETTE)
    task_seeds = {int(r["video_id"]) for r in tinyvideo_rows()}
    for s in scenes:
        frames = scene_clip(s)
        if s["kind"] == "plain":
            assert s["distractors"] == [] and 180 <= s["background"] <= 230
            expected = motion_clip(s["direction"], s["colour"], background=s["background"])
        else:
            assert len({s["colour"], *s["distractors"]}) == 3 and s["seed"] not in task_seeds
            expected = cluttered_clip(s["direction"], s["colour"], tuple(s["distractors"]), seed=s["seed"])
        assert len(frames) == 8 and all((a == b).all() for a, b in zip(frames, expected))


def test_a_training_row_is_the_task_prompt_with_only_the_answer_supervised(tv, tmp_path):
    processor = tv.video_qa_processor()
    tv.check_answer_tokens(processor)
    tok = processor.tokenizer
    for word in [*PALETTE, *DIRECTIONS]:  # the words that carry the question are whole tokens
        assert len(tok(" " + word)["input_ids"]) == 1, word
    scenes = [sample_scene(np.random.default_rng(1), kind) for kind in ("plain", "cluttered")]
    inputs = tv.encode_batch(processor, scenes, tmp_path, True)
    assert inputs["pixel_values_videos"].shape == (2, 8, 3, 98, 98)
    for row, scene in enumerate(scenes):
        supervised = inputs["labels"][row] != tv.IGNORE
        assert supervised.sum() == 2 and supervised[-2:].all()
        assert tok.decode(inputs["labels"][row, -2:]) == tv.scene_doc(scene)["answer"] + "<|im_end|>"
        text = tok.decode(inputs["input_ids"][row][inputs["attention_mask"][row].bool()])
        assert text.count("<video>") == 8 * 16 + 1  # 8 frames of 4x4 pooled tokens, one newline
        assert f"Which way does the {scene['colour']} square move?" in text and "Answer with the option's" in text


def test_training_is_deterministic_and_changes_the_weights(tv):
    processor = tv.video_qa_processor()
    runs = []
    for _ in range(2):
        model = tv.build_model(3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        log: list = []
        result = tv.train(model, processor, steps=2, batch=2, lr=1e-3, seed=3, pool_size=3, log=log)
        assert result["steps_done"] == 2 and not result["stopped_by_time_cap"] and len(log) == 2
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(before[k], runs[0][k]) for k in before)


def test_shipped_video_qa_model_answers_held_out_clips_as_recorded(tv):
    """The shipped checkpoint (``tiny-video-qa``, lmms_prune/assets/tiny_video_qa): its training run reached its
    planned last step (not the time cap), and its weights, scored again now by the script's own evaluation on
    the recorded number of held-out clips of each kind (another seed than any training clip or task row),
    reach issue 33's 80% on each kind, with every answer a letter, and reproduce the recorded figures."""
    import json

    import transformers

    from lmms_prune.loading import resolve_pretrained

    folder = Path(resolve_pretrained("tiny-video-qa"))
    recorded = json.loads((folder / "metrics.json").read_text())
    assert recorded["steps_done"] == recorded["steps"] and not recorded["stopped_by_time_cap"]
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        metrics = tv.evaluate(model, processor, recorded["seed"], recorded["eval_clips_per_kind"])
    assert metrics["malformed"] == 0
    for kind in ("plain", "cluttered"):
        assert metrics[f"{kind}_accuracy"] >= 80.0, metrics
        assert abs(metrics[f"{kind}_accuracy"] - recorded[f"{kind}_accuracy"]) <= 100.0 / recorded[
            "eval_clips_per_kind"] + 1e-6, (metrics, recorded)
