"""POPE-style questions about synthetic scenes (lmms_prune.toy.pope) and the ``pope_local`` task: yes questions
name objects in the scene, no questions objects that are not (POPE's random and adversarial samplings), and
lmms-eval reads the written split with its own ``pope`` prompt and scoring."""

from __future__ import annotations

import numpy as np
import pytest

from lmms_prune.toy.data import PALETTE, SHAPES, generate_scenes
from lmms_prune.toy.grounder import SCENE_KWARGS
from lmms_prune.toy.pope import (
    CATEGORIES,
    PopeQuestion,
    absent_combinations,
    pope_pairs,
    pope_prompt,
    present_combinations,
    write_pope_hub_layout,
)


@pytest.fixture(scope="module")
def scenes():
    return list(generate_scenes(60, 17, **SCENE_KWARGS))


def _combination(question: PopeQuestion) -> tuple[str, str]:
    colour, shape = question.object.split(" ")
    return colour, shape


def test_yes_questions_name_present_objects_and_no_questions_absent_ones(scenes):
    rng = np.random.default_rng(0)
    for scene in scenes:
        present = {(o.color, o.shape) for o in scene.objects}
        assert set(present_combinations(scene)) == present
        for share in (0.0, 0.5, 1.0):
            questions = pope_pairs(scene, rng, 3, share)
            assert len(questions) == 2 * min(3, len(present))
            yes, no = questions[0::2], questions[1::2]
            assert {q.answer for q in yes} == {"yes"} and {q.answer for q in no} == {"no"}
            assert all(_combination(q) in present for q in yes)
            assert all(_combination(q) not in present for q in no)
            assert len({q.object for q in yes}) == len(yes) and len({q.object for q in no}) == len(no)
            assert all(a.category == b.category in CATEGORIES for a, b in zip(yes, no))


def test_negative_sampling_random_and_adversarial(scenes):
    """random: any absent combination (also ones sharing nothing with the scene); adversarial: an absent
    combination with a present shape or a present colour, so that only the binding of the two tells it apart."""
    rng = np.random.default_rng(1)
    unrelated = 0
    for scene in scenes:
        colours = {o.color for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        everything = {(c, s) for c in PALETTE for s in SHAPES}
        assert set(absent_combinations(scene, "random")) == everything - set(present_combinations(scene))
        near = set(absent_combinations(scene, "adversarial"))
        assert near == {(c, s) for c, s in absent_combinations(scene, "random") if c in colours or s in shapes}
        for question in pope_pairs(scene, rng, 3, adversarial_share=1.0)[1::2]:
            assert question.category == "adversarial" and _combination(question) in near
        for question in pope_pairs(scene, rng, 3, adversarial_share=0.0)[1::2]:
            assert question.category == "random"
            unrelated += _combination(question) not in near
    assert unrelated > 0  # the random sampling is not restricted to near misses
    with pytest.raises(ValueError, match="category='popular'"):
        absent_combinations(scenes[0], "popular")


def test_question_text_is_popes_and_the_prompt_is_lmms_evals():
    from lmms_eval.tasks.pope.utils import pope_doc_to_text

    question = PopeQuestion("orange star", "yes", "random").question
    assert question == "Is there an orange star in the image?"
    assert PopeQuestion("red circle", "no", "random").question == "Is there a red circle in the image?"
    kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    assert pope_prompt(question) == pope_doc_to_text({"question": question}, kwargs)


def test_pope_local_reads_the_written_split_with_lmms_evals_prompt_and_scoring(tmp_path, monkeypatch):
    from lmms_eval.tasks import TaskManager
    from lmms_eval.tasks.pope import utils as pope_utils

    from lmms_prune.tasks import takeover
    from lmms_prune.tasks.pope.utils import POPE_DIR_ENV

    write_pope_hub_layout(tmp_path / "POPE", 4, seed=5, pairs_per_image=2, **SCENE_KWARGS)
    monkeypatch.setenv(POPE_DIR_ENV, str(tmp_path / "POPE"))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    manager = TaskManager("WARNING", include_path=[str(takeover.TASKS_DIR)], include_defaults=False)
    task = manager.load_task_or_group(["pope_local"], task_type="chat")["pope_local"]
    docs = list(task.test_docs())
    assert set(docs[0]) == {"question_id", "question", "answer", "image_source", "image", "category"}
    assert 4 <= len(docs) <= 4 * 4 and len({d["question_id"] for d in docs}) == len(docs)
    assert sum(d["answer"] == "yes" for d in docs) == sum(d["answer"] == "no" for d in docs)
    assert len({d["image_source"] for d in docs}) == 4
    for doc in docs:
        [turn] = task.doc_to_messages(doc)
        assert turn["content"][0]["type"] == "image" and turn["content"][0]["url"].size == (448, 448)
        assert turn["content"][1] == {"type": "text", "text": pope_prompt(doc["question"])}
    # lmms-eval's own scoring: answers as the grounder writes them ("Yes" / "No") score as the truth
    records = [task.process_results(d, ["Yes" if d["answer"] == "yes" else "No"]) for d in docs]
    assert pope_utils.pope_aggregate_accuracy([r["pope_accuracy"] for r in records]) == 1.0
    assert pope_utils.pope_aggregate_f1_score([r["pope_f1_score"] for r in records]) == 1.0
    always_yes = [task.process_results(d, ["Yes"]) for d in docs]
    assert pope_utils.pope_aggregate_accuracy([r["pope_accuracy"] for r in always_yes]) == 0.5

    monkeypatch.setenv(POPE_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="LMMS_PRUNE_POPE_DIR=.*nowhere"):
        manager.load_task_or_group(["pope_local"], task_type="chat")
