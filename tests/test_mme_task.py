"""MME-style position questions about synthetic scenes (lmms_prune.toy.mme) and the ``mme_local`` task: each pair
asks about one object's side and its opposite (one yes, one no), only where the side is plain, and lmms-eval
reads the written split with its own ``mme`` prompt and acc + acc+ scoring."""

from __future__ import annotations

import numpy as np
import pytest

from lmms_prune.toy.data import generate_scenes
from lmms_prune.toy.grounder import SCENE_KWARGS
from lmms_prune.toy.mme import (
    CATEGORY,
    MARGIN,
    SIDES,
    PositionQuestion,
    askable,
    mme_prompt,
    position_pairs,
    side_of,
    write_mme_hub_layout,
)


@pytest.fixture(scope="module")
def scenes():
    return list(generate_scenes(60, 23, **SCENE_KWARGS))


def _centre(box, axis, size):
    x1, y1, x2, y2 = box
    return ((x1 + x2) if axis == "x" else (y1 + y2)) / 2.0 / size[0 if axis == "x" else 1]


def test_pairs_ask_one_plain_side_and_its_opposite_of_an_object_named_alone(scenes):
    """Property, over 60 scenes and up to 3 pairs each: every pair is one object named by a colour and shape no
    other object shares, one axis, the side its box centre is on (yes) and the other side (no); the centre is
    at least MARGIN from the middle line; no object is asked twice in a scene."""
    rng = np.random.default_rng(0)
    asked = 0
    for scene in scenes:
        questions = position_pairs(scene, rng, 3)
        assert len(questions) % 2 == 0
        names = [f"{o.color} {o.shape}" for o in scene.objects]
        pair_objects = []
        for a, b in zip(questions[::2], questions[1::2]):
            assert a.object == b.object and names.count(a.object) == 1
            assert {a.answer, b.answer} == {"Yes", "No"}
            yes, no = (a, b) if a.answer == "Yes" else (b, a)
            (axis,) = [ax for ax, sides in SIDES.items() if yes.side in sides]
            assert {yes.side, no.side} == set(SIDES[axis])
            obj = scene.objects[names.index(a.object)]
            centre = _centre(obj.box, axis, scene.image.size)
            assert abs(centre - 0.5) >= MARGIN
            assert yes.side == SIDES[axis][int(centre > 0.5)]
            pair_objects.append(a.object)
            asked += 1
        assert len(pair_objects) == len(set(pair_objects)) <= 3
        assert len(pair_objects) == min(3, len({k for k, _ in askable(scene)}))
    assert asked > 60


def test_side_of_is_none_near_the_middle_and_refuses_an_unknown_axis(scenes):
    for scene in scenes[:20]:
        for k, obj in enumerate(scene.objects):
            for axis in SIDES:
                centre = _centre(obj.box, axis, scene.image.size)
                assert side_of(scene, k, axis) == (None if abs(centre - 0.5) < MARGIN else int(centre > 0.5))
    with pytest.raises(ValueError, match="axis='z'"):
        side_of(scenes[0], 0, "z")


def test_question_text_is_mmes_and_the_prompt_is_lmms_evals():
    from lmms_eval.tasks.mme.utils import mme_doc_to_text

    question = PositionQuestion("red circle", "on the left side", "Yes").question
    assert question == "Is the red circle on the left side of the image? Please answer yes or no."
    kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    assert mme_prompt(question) == mme_doc_to_text({"question": question}, kwargs)
    assert mme_prompt(question) == ("Is the red circle on the left side of the image?\n"
                                    "Answer the question using a single word or phrase.")


def test_mme_local_reads_the_written_split_with_lmms_evals_prompt_and_scoring(tmp_path, monkeypatch):
    from lmms_eval.tasks import TaskManager
    from lmms_eval.tasks.mme import utils as mme_utils

    from lmms_prune.tasks import takeover
    from lmms_prune.tasks.mme.utils import MME_DIR_ENV

    write_mme_hub_layout(tmp_path / "MME", 6, seed=5, **SCENE_KWARGS)
    monkeypatch.setenv(MME_DIR_ENV, str(tmp_path / "MME"))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    manager = TaskManager("WARNING", include_path=[str(takeover.TASKS_DIR)], include_defaults=False)
    task = manager.load_task_or_group(["mme_local"], task_type="chat")["mme_local"]
    docs = list(task.test_docs())
    assert set(docs[0]) == {"question_id", "image", "question", "answer", "category"}
    assert {d["category"] for d in docs} == {CATEGORY}
    ids = [d["question_id"] for d in docs]
    assert 2 <= len(docs) <= 2 * 6 and all(ids.count(i) == 2 for i in ids)  # MME's pairs
    assert sorted(d["answer"] for d in docs) == ["No"] * (len(docs) // 2) + ["Yes"] * (len(docs) // 2)
    for doc in docs:
        [turn] = task.doc_to_messages(doc)
        assert turn["content"][0]["type"] == "image" and turn["content"][0]["url"].size == (448, 448)
        assert turn["content"][1] == {"type": "text", "text": mme_prompt(doc["question"])}
    # lmms-eval's own scoring: acc + acc+ per category, out of 200
    score = lambda answers: mme_utils.mme_aggregate_results(  # noqa: E731
        [task.process_results(d, [a])["mme_perception_score"] for d, a in zip(docs, answers)])
    assert score([d["answer"] for d in docs]) == 200.0
    assert score(["Yes"] * len(docs)) == 50.0  # always yes: half right, no pair right
    first_wrong = [("No" if d["answer"] == "Yes" else "Yes") if k == 0 else d["answer"] for k, d in enumerate(docs)]
    pairs = len(docs) // 2
    assert score(first_wrong) == pytest.approx(100.0 * (len(docs) - 1) / len(docs) + 100.0 * (pairs - 1) / pairs)

    monkeypatch.setenv(MME_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="LMMS_PRUNE_MME_DIR=.*nowhere"):
        manager.load_task_or_group(["mme_local"], task_type="chat")
