"""The shipped tiny grounding model through the real lmms-eval command line and the package's RefCOCO and POPE
task code equals direct evaluation (processor + chat template + greedy generate + parse_box + IoU, or lmms-eval's
yes/no rule) on the same held-out splits: tiling, prompt, box scaling, parsing and metric aggregation agree end
to end; and it really grounds (at least 70% acc@0.5, far above the best constant box for the slice) and answers
POPE questions (at least 70%, chance 50%). And the demo's data, table and cross-task rank correlation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from lmms_prune.demo import (
    GROUNDING_PROMPT,
    HELD_OUT_SEED,
    POPE_PAIRS,
    POPE_TASK,
    TASK,
    TASKS,
    leaderboard,
    rank_correlation,
    write_demo_data,
)
from lmms_prune.loading import load_model
from lmms_prune.report import Table
from lmms_prune.tasks.refcoco import box_iou, parse_box
from lmms_prune.toy.data import write_refcoco_hub_layout
from lmms_prune.toy.grounder import SCENE_KWARGS
from lmms_prune.toy.pope import pope_prompt, write_pope_hub_layout

REPO = Path(__file__).resolve().parents[1]


def _direct_scores(data: Path) -> list[tuple[float, bool, tuple[float, float, float, float]]]:
    """(IoU, parsed, ground-truth box) of every referring expression of the split, evaluated without
    lmms-eval."""
    model, processor = load_model("tiny-grounder", device="cpu", dtype="float32")
    files = [str(p) for p in sorted((data / "RefCOCO" / "data").glob("val-*.parquet"))]
    rows = datasets.load_dataset("parquet", data_files={"val": files}, split="val", cache_dir=str(data / "hf_cache"))
    out = []
    for row in rows:
        image = row["image"].convert("RGB")
        x, y, w, h = row["bbox"]
        for expression in row["answer"]:
            messages = [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": GROUNDING_PROMPT.format(expression)}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(images=[image], text=[text], return_tensors="pt", images_kwargs={"max_patches": 6})
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=100, do_sample=False)
            answer = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            box = parse_box(answer, image.width, image.height)
            truth = (x, y, x + w, y + h)
            out.append((0.0 if box is None else box_iou(box, truth), box is not None, truth))
    return out


def _direct_pope_answers(data: Path) -> list[tuple[str, str]]:
    """(answer, truth) of every question of the POPE split, answered without lmms-eval (the processor, the chat
    template, greedy decoding) and normalised as lmms-eval's ``pope_process_results`` does."""
    model, processor = load_model("tiny-grounder", device="cpu", dtype="float32")
    files = [str(p) for p in sorted((data / "POPE" / "data").glob("test-*.parquet"))]
    rows = datasets.load_dataset("parquet", data_files={"test": files}, split="test", cache_dir=str(data / "hf_cache"))
    out = []
    for row in rows:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": pope_prompt(row["question"])}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[row["image"].convert("RGB")], text=[text], return_tensors="pt",
                           images_kwargs={"max_patches": 6})
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=128, do_sample=False)
        answer = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append((answer.lower().strip(), row["answer"]))
    return out


SLICE_IMAGES = 12
POPE_SLICE_IMAGES = 8
POPE_FLOOR = 70.0  # yes/no accuracy (percent) the slice must reach through the CLI (chance: 50)
MARGIN = 25.0  # acc@0.5 points above the best-constant-box baseline
SLICE_FLOOR = 70.0  # acc@0.5 (percent) the slice must reach through the CLI (issue 8)


def _constant_box_accuracy(boxes: list[tuple[float, float, float, float]]) -> float:
    """acc@0.5 of the best single box for the whole slice, among the slice's own ground-truth boxes and their
    mean: what a model that ignores the image and the expression could at most score."""
    mean = tuple(sum(b[i] for b in boxes) / len(boxes) for i in range(4))
    candidates = [*boxes, mean]
    return max(100.0 * sum(box_iou(c, b) >= 0.5 for b in boxes) / len(boxes) for c in candidates)


@pytest.mark.cli
def test_lmms_eval_path_equals_direct_evaluation_and_grounds(tmp_path):
    data = tmp_path / "data"
    write_refcoco_hub_layout(data / "RefCOCO", SLICE_IMAGES, seed=HELD_OUT_SEED, splits=("val",), **SCENE_KWARGS)
    write_pope_hub_layout(data / "POPE", POPE_SLICE_IMAGES, seed=HELD_OUT_SEED, pairs_per_image=POPE_PAIRS,
                          **SCENE_KWARGS)
    env = {**os.environ, "LMMS_PRUNE_REFCOCO_DIR": str(data), "LMMS_PRUNE_POPE_DIR": str(data / "POPE"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "internvl_none", "--model_args",
           "pretrained=tiny-grounder,max_num=6", "--tasks", f"{TASK},{POPE_TASK}", "--output_path", str(out)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = out.rglob("*_results.json")
    metrics = json.loads(results.read_text())["results"][TASK]
    direct = _direct_scores(data)
    assert json.loads(results.read_text())["n-samples"][TASK]["effective"] == len(direct)
    assert metrics["acc@0.5,none"] == pytest.approx(100.0 * sum(iou >= 0.5 for iou, _, _ in direct) / len(direct))
    assert metrics["mean_iou,none"] == pytest.approx(sum(iou for iou, _, _ in direct) / len(direct), abs=1e-6)
    assert metrics["unparseable,none"] == sum(not ok for _, ok, _ in direct)  # counted, scored as misses
    assert len(direct) >= 2 * SLICE_IMAGES
    baseline = _constant_box_accuracy([truth for _, _, truth in direct])
    assert metrics["acc@0.5,none"] >= baseline + MARGIN, (metrics, baseline)
    assert metrics["acc@0.5,none"] >= SLICE_FLOOR, metrics  # issue 8: at least 70% on a slice of the split

    # POPE: lmms-eval's prompt and yes/no rule through the wrapper equal the direct answers, and they are right
    pope = json.loads(results.read_text())["results"][POPE_TASK]
    answers = _direct_pope_answers(data)
    assert json.loads(results.read_text())["n-samples"][POPE_TASK]["effective"] == len(answers) >= 2 * POPE_SLICE_IMAGES
    assert pope["pope_accuracy,none"] == pytest.approx(sum(a == t for a, t in answers) / len(answers))
    assert sum(t == "yes" for _, t in answers) == len(answers) / 2  # balanced pairs
    assert {a for a, _ in answers} <= {"yes", "no"}  # the grounder answers the question asked, in one word
    assert 100.0 * pope["pope_accuracy,none"] >= POPE_FLOOR, pope


def test_leaderboard_lists_every_method_with_its_share_of_the_unpruned_score():
    rows = [
        {"method": "none", "keep": 1.0, TASK: 90.0, f"{TASK} %": 100.0, "visual kept": 256.0,
         "prefill speed-up": 1.0},
        {"method": "fastv", "keep": 0.1, TASK: 45.0, f"{TASK} %": 50.0, "visual kept": 26.0,
         "prefill speed-up": 3.5},
        {"method": "random", "keep": 0.1, TASK: 30.0, f"{TASK} %": None, "visual kept": None,
         "prefill speed-up": None},
        {"method": "cdpruner", "keep": 0.1, TASK: 40.0, f"{TASK} %": 44.4, "visual kept": 26.0,
         "prefill speed-up": None, "speed-up note": "not comparable: the baseline was measured in another "
                                                   "sweep invocation (a, this run b)"},
    ]
    lines = leaderboard([Table(TASK, [TASK], rows)]).splitlines()
    assert lines[2].split(" | ")[1:] == ["1", "90.00", "100.0", "256.0", "1.00x |"]
    assert lines[3].split(" | ")[1:] == ["0.1", "45.00", "50.0", "26.0", "3.50x |"]
    assert lines[4].split(" | ")[1:] == ["0.1", "30.00", "n/a", "n/a", "n/a |"]
    assert lines[5].split(" | ")[1:] == ["0.1", "40.00", "44.4", "26.0", "not comparable |"]  # not 89.85x
    # POPE's accuracy is a fraction in lmms-eval: the table shows it in percent, under its own name
    pope_rows = [{"method": "none", "keep": 1.0, POPE_TASK: 0.875, f"{POPE_TASK} %": 100.0, "visual kept": 256.0,
                  "prefill speed-up": 1.0}]
    lines = leaderboard([Table(POPE_TASK, [POPE_TASK], pope_rows)], POPE_TASK).splitlines()
    assert "yes/no accuracy" in lines[0] and lines[2].split(" | ")[2] == "87.50"


def test_demo_starts_afresh_when_the_model_or_settings_change(tmp_path):
    """The demo resumes its runs, so results of another model (e.g. a retrained grounder) must not be reused."""
    from lmms_prune.demo import demo_fingerprint, reset_stale_outputs

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights-1")
    first = demo_fingerprint(model, 16, SCENE_KWARGS)
    assert first == demo_fingerprint(model, 16, SCENE_KWARGS)
    assert first != demo_fingerprint(model, 8, SCENE_KWARGS)
    assert first != demo_fingerprint(model, 16, {**SCENE_KWARGS, "n_objects": (2, 4)})
    out = tmp_path / "demo"
    reset_stale_outputs(out, first)
    (out / "runs").mkdir()
    (out / "runs" / "result.json").write_text("{}")
    (out / "d2pruner_prior_layer1.pt").write_bytes(b"prior")
    (out / "notes.txt").write_text("the user's own file")
    reset_stale_outputs(out, first)  # same inputs: everything kept
    assert (out / "runs" / "result.json").is_file() and (out / "d2pruner_prior_layer1.pt").is_file()
    (model / "model.safetensors").write_bytes(b"weights-2")
    second = demo_fingerprint(model, 16, SCENE_KWARGS)
    assert second != first
    reset_stale_outputs(out, second)  # new weights: the demo's outputs go, other files stay
    assert not (out / "runs").exists() and not (out / "d2pruner_prior_layer1.pt").exists()
    assert (out / "notes.txt").is_file() and (out / "inputs.sha256").read_text().strip() == second


def test_demo_writes_a_refcoco_split_and_a_balanced_pope_split_on_other_images(tmp_path):
    """Two tasks: RefCOCO val (one row per object) and POPE test (yes/no pairs, lmms-lab/POPE's columns), each
    of the training distribution, no image shared."""
    assert TASKS == (TASK, POPE_TASK)
    write_demo_data(tmp_path, 8)
    (refcoco,) = (tmp_path / "RefCOCO" / "data").glob("val-*.parquet")
    (pope,) = (tmp_path / "POPE" / "data").glob("test-*.parquet")

    def load(path):
        return datasets.load_dataset("parquet", data_files=str(path), split="train",
                                     cache_dir=str(tmp_path / "hf_cache"))

    refcoco_rows, pope_rows = load(refcoco), load(pope)
    assert set(pope_rows.column_names) == {"question_id", "question", "answer", "image_source", "image", "category"}
    assert len(set(refcoco_rows["file_name"])) == 8 and len(set(pope_rows["image_source"])) == 8
    assert pope_rows["answer"].count("yes") == pope_rows["answer"].count("no") >= 8
    assert len(pope_rows) <= 2 * POPE_PAIRS * 8 and set(pope_rows["category"]) <= {"random", "adversarial"}
    pixels = {row["image"].tobytes() for row in refcoco_rows}
    assert not pixels & {row["image"].tobytes() for row in pope_rows}


def _tables(val: dict[str, float], pope: dict[str, float]) -> list[Table]:
    def rows(task, scores):
        return [{"method": m, "keep": 1.0 if m == "none" else 0.1, task: v} for m, v in scores.items()]

    return [Table(TASK, [TASK], rows(TASK, val)), Table(POPE_TASK, [POPE_TASK], rows(POPE_TASK, pope))]


def test_rank_correlation_compares_the_methods_rankings_across_the_two_tasks():
    val = {"none": 90.0, "fastv": 40.0, "random": 20.0, "vispruner": 70.0, "cdpruner": 60.0}
    same_order = {"none": 50.0, "fastv": 20.0, "random": 5.0, "vispruner": 45.0, "cdpruner": 30.0}
    assert rank_correlation(_tables(val, same_order)) == {"rho": 1.0, "methods": 4}  # none is not ranked
    reversed_order = {m: -v for m, v in same_order.items()}
    assert rank_correlation(_tables(val, reversed_order))["rho"] == -1.0
    swapped = {**same_order, "fastv": 31.0, "cdpruner": 19.0}  # one adjacent pair swapped: 1 - 6*2/(4*15)
    assert rank_correlation(_tables(val, swapped))["rho"] == pytest.approx(0.8)
    assert rank_correlation(_tables(val, {"none": 1.0, "fastv": 2.0, "random": 3.0}))["rho"] is None  # 2 methods
    assert rank_correlation(_tables(val, {m: 7.0 for m in val}))["rho"] is None  # a constant task ranks nothing
