"""scripts/train_grounding.py: the training targets are right (they are what the shipped model learned from),
the training sequences are the evaluation prompt plus supervised answers, and a run is deterministic."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmms_prune.toy.data import generate_scenes
from lmms_prune.toy.grounder import SCENE_KWARGS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_grounding.py"


@pytest.fixture(scope="module")
def tg():
    spec = importlib.util.spec_from_file_location("train_grounding", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_grounding"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scenes():
    return list(generate_scenes(12, 31, **{**SCENE_KWARGS, "n_objects": (2, 3)}))


def test_edge_cells_hold_the_pixels_the_box_edges_come_from(tg, scenes):
    cell = tg.CELL
    for scene in scenes:
        targets = tg.cell_targets(scene)
        width, height = scene.image.size
        rows, cols = torch.arange(256) // 16, torch.arange(256) % 16
        for k, obj in enumerate(scene.objects):
            x1, y1, x2, y2 = obj.box
            edges = targets.edges[k]
            assert all(bool(edges[part].any()) for part in range(4)), obj
            assert set(cols[edges[0]].tolist()) == {x1 // cell}
            assert set(rows[edges[1]].tolist()) == {y1 // cell}
            assert set(cols[edges[2]].tolist()) == {(x2 - 1) // cell}
            assert set(rows[edges[3]].tolist()) == {(y2 - 1) // cell}
            # edge cells are cells of the object, and the object's cells are exactly those inside its box
            # that hold its pixels (at least its edge rows and columns)
            assert bool((edges <= targets.cells[k]).all())
            inside = ((cols >= x1 // cell) & (cols <= (x2 - 1) // cell) & (rows >= y1 // cell)
                      & (rows <= (y2 - 1) // cell))
            assert bool((targets.cells[k] <= inside).all())
            # where the object is the cell's main content, the in-cell extent lies in the cell and in the box,
            # and on its edge cells it is the box edge itself
            mine = targets.owner == k
            assert bool((targets.color[mine] == 1 + tg.COLORS.index(obj.color)).all())
            assert bool((targets.shape[mine] == 1 + tg.SHAPES.index(obj.shape)).all())
            assert bool((mine <= targets.cells[k]).all())
            ext = targets.extent * torch.tensor([width, height, width, height])
            for i in mine.nonzero()[:, 0].tolist():
                ex1, ey1, ex2, ey2 = ext[i].round().tolist()
                c0, r0 = cols[i].item() * cell, rows[i].item() * cell
                assert c0 <= ex1 < ex2 <= c0 + cell and r0 <= ey1 < ey2 <= r0 + cell
                assert x1 <= ex1 and ex2 <= x2 and y1 <= ey1 and ey2 <= y2
                for part, value in enumerate((x1, y1, x2, y2)):
                    if edges[part, i]:
                        assert (ex1, ey1, ex2, ey2)[part] == value
                assert targets.box[i].tolist() == pytest.approx([x1 / width, y1 / height, x2 / width,
                                                                 y2 / height])
        background = ~targets.cells.any(0)
        assert bool((background == (targets.owner == -1)).all())
        assert bool((targets.color[background] == 0).all()) and bool((targets.shape[background] == 0).all())


def test_training_sequence_is_the_eval_prompt_with_every_answer_supervised(tg, scenes):
    processor = tg.toy_models.build_processor(tg.FAMILY)
    builder = tg.SequenceBuilder(processor, questions_per_object=2)
    tg.check_prompt_tokens(builder)  # raises if the first turn differs from the processor's prompt
    batch = builder.batch(scenes[:3], np.random.default_rng(0))
    tokenizer = processor.tokenizer
    for row, scene in enumerate(scenes[:3]):
        labels = batch.labels[row]
        supervised = labels != tg.IGNORE
        assert bool((labels[supervised] == batch.input_ids[row][supervised]).all())
        # split the supervised positions into contiguous answer spans
        spans, current = [], []
        for i, flag in enumerate(supervised.tolist()):
            if flag:
                current.append(i)
            elif current:
                spans.append(current)
                current = []
        answers = [tokenizer.decode(batch.input_ids[row, s]) for s in spans]
        width, height = scene.image.size
        expected = {tg.box_answer(o.box, width, height) + "<|im_end|>" for o in scene.objects}
        assert set(answers) <= expected and len(answers) >= len(scene.objects)
        for answer in answers:
            assert answer.startswith("<box>[[") and answer.endswith("]]</box><|im_end|>")
    # every supervised digit is tagged with its coordinate (0-3), every other answer token with -1
    digit_ids = builder.digit_ids
    targets = batch.input_ids[batch.query_rows, batch.query_positions + 1]
    is_digit = torch.tensor([int(t) in digit_ids for t in targets])
    assert bool(((batch.query_parts >= 0) == is_digit).all())
    assert set(batch.query_parts[is_digit].tolist()) == {0, 1, 2, 3}
    assert int(batch.n_questions) == len(batch.query_rows[targets == builder.box_id])


def test_box_answer_is_internvl_format_on_the_0_1000_grid(tg):
    assert tg.box_answer((0, 112, 224, 448), 448, 448) == "<box>[[0, 250, 500, 1000]]</box>"


def test_two_runs_with_one_seed_give_identical_weights(tg, tmp_path):
    """Deterministic for a seed: the whole pipeline (data, init, losses, optimiser, EMA, save) twice."""
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        args = ["--seed", "3", "--steps", "3", "--batch", "1", "--eval-images", "1", "--threads", "1",
                "--vision-steps", "1", "--vision-batch", "1", "--out", str(out)]
        metrics = tg.main(args)
        assert metrics["steps_done"] == 3 and not metrics["stopped_by_time_cap"]
        assert (out / "loss.png").stat().st_size > 0 and (out / "metrics.json").is_file()
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
