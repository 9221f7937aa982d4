"""RefCOCO grounding tasks inside lmms-eval: metrics, oracle, data sources, the takeover and the CLI.

Data comes from ``lmms_prune.toy.data`` in the real hub and InternVL layouts; the CLI tests run
``python -m lmms_eval`` with the ``grounding_oracle`` model, whose answers imply known scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmms_eval
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmms_prune.models.oracle import GARBAGE_ANSWER, GroundingOracle, internvl_answer, shift_for_iou
from lmms_prune.tasks import takeover
from lmms_prune.tasks.refcoco import box_iou, data, parse_box, utils
from lmms_prune.toy.data import load_internvl_jsonl, write_internvl_jsonl, write_refcoco_hub_layout

LMMS_EVAL_TASKS = Path(lmms_eval.__file__).resolve().parent / "tasks"
BUILTIN_DIRS = [str(LMMS_EVAL_TASKS / name) for name in ("refcoco", "refcoco+", "refcocog")]
ALL_SPLITS = [(family.name, split) for family in data.FAMILIES.values() for split in family.splits]
TASK_NAMES = {(family, split): f"{family}_ground_{split}" for family, split in ALL_SPLITS}
N_IMAGES = 2  # per split: 16 small images in all


# ---------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """Hub-layout copies of the three families under one root, as ``LMMS_PRUNE_REFCOCO_DIR`` expects."""
    root = tmp_path_factory.mktemp("refcoco_hub")
    for seed, family in enumerate(data.FAMILIES.values()):
        write_refcoco_hub_layout(root / family.local_name, N_IMAGES, seed, splits=family.splits, width=320, height=240)
    return root


@pytest.fixture(scope="session")
def expected_counts(toy_root) -> dict[tuple[str, str], int]:
    """Referring expressions per split, read straight from the parquet files."""
    counts = {}
    for family_name, split in ALL_SPLITS:
        path = toy_root / data.FAMILIES[family_name].local_name / "data" / f"{split}-00000-of-00001.parquet"
        counts[(family_name, split)] = sum(len(a) for a in pq.read_table(path, columns=["answer"])["answer"].to_pylist())
    return counts


@pytest.fixture(autouse=True)
def _no_run_model(monkeypatch):
    """No box frames and no run model from earlier tests in this process: answers are read by text detection."""
    monkeypatch.setattr(utils, "_BOX_FRAMES", {})
    monkeypatch.setattr(utils, "_RUN", {"model": None})


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    os.environ.setdefault("LMMS_EVAL_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))


@pytest.fixture
def takeover_on(monkeypatch):
    """The takeover installed for this test (restored to its previous state afterwards)."""
    monkeypatch.delenv(takeover.TAKEOVER_ENV, raising=False)
    was_installed = takeover.is_installed()
    import lmms_eval.tasks  # noqa: F401  (so that install patches TaskManager directly)

    assert takeover.install()
    yield
    if not was_installed:
        takeover.uninstall()


def task_manager(include_path):
    from lmms_eval.tasks import TaskManager

    # lmms-eval's own RefCOCO folders stand in for its full default set (indexing all of it takes ~10 s).
    return TaskManager("WARNING", include_path=include_path, include_defaults=False)


# ---------------------------------------------------------------------------------------------------------
# metrics


def test_process_results_scores_one_answer_for_all_three_metrics():
    doc = {"box": [64.0, 96.0, 320.0, 384.0], "width": 640, "height": 480, "expression": "the dog"}
    exact = utils.process_results(doc, ["<ref>the dog</ref><box>[[100, 200, 500, 800]]</box>"])
    assert set(exact) == {"acc@0.5", "mean_iou", "unparseable", "image_errors", "bad_gt"}
    assert exact["acc@0.5"] is exact["mean_iou"] is exact["unparseable"] is exact["image_errors"] is exact["bad_gt"]
    assert exact["acc@0.5"] == {"iou": pytest.approx(1.0), "parsed": True}
    # the right half of the true box: IoU 0.5 exactly
    half = utils.process_results(doc, ["[[300, 200, 500, 800]]"])["acc@0.5"]
    assert half["iou"] == pytest.approx(0.5) and half["parsed"]
    assert utils.process_results(doc, ["no idea"])["unparseable"] == {"iou": 0.0, "parsed": False}
    assert utils.process_results(doc, [])["unparseable"] == {"iou": 0.0, "parsed": False}


def test_aggregations():
    records = [
        {"iou": 0.5, "parsed": True},  # counts: IoU >= 0.5
        {"iou": 0.4999, "parsed": True},
        {"iou": 0.0, "parsed": False},
        {"iou": 0.9, "parsed": True},
    ]
    assert utils.accuracy_at_05(records) == 50.0
    assert utils.mean_iou(records) == pytest.approx((0.5 + 0.4999 + 0.9) / 4)
    assert utils.unparseable_count(records) == 1
    assert (utils.accuracy_at_05([]), utils.mean_iou([]), utils.unparseable_count([])) == (0.0, 0.0, 0)
    assert utils.sum_over_splits([1, 2, 3], [10, 200, 3000], False) == 6


def test_yaml_tasks_and_groups_are_consistent():
    from lmms_eval.utils import load_yaml_config

    folder = takeover.TASKS_DIR / "refcoco"
    for (family, split), name in TASK_NAMES.items():
        config = load_yaml_config(str(folder / f"{name}.yaml"), mode="simple")
        assert (config["task"], config["dataset_path"], config["test_split"]) == (
            name, data.FAMILIES[family].hub_path, split)
        assert config["generation_kwargs"]["max_new_tokens"] == 100
        assert config["generation_kwargs"]["do_sample"] is False
    groups = {g: load_yaml_config(str(folder / f"{g}.yaml"), mode="simple")
              for g in ("refcoco_ground", "refcoco+_ground", "refcocog_ground", "refcoco_ground_all")}
    for family in data.FAMILIES:
        assert groups[f"{family}_ground"]["task"] == [TASK_NAMES[(family, s)] for s in data.FAMILIES[family].splits]
    assert groups["refcoco_ground_all"]["task"] == list(TASK_NAMES.values())
    for config in groups.values():
        counts = {"unparseable", "image_errors", "bad_gt"}
        assert counts <= {m["metric"] for m in config["aggregate_metric_list"]}
        means = {m["metric"]: m for m in config["aggregate_metric_list"] if m["metric"] not in counts}
        assert set(means) == {"acc@0.5", "mean_iou"}
        assert all(m["weight_by_size"] is False for m in means.values())  # the papers' unweighted "Avg"


# ---------------------------------------------------------------------------------------------------------
# oracle


@settings(max_examples=200, deadline=None)
@given(
    st.integers(10, 200), st.integers(10, 200), st.integers(0, 400), st.integers(0, 300),
    st.floats(0.05, 1.0),
)
def test_shift_for_iou_gives_exactly_that_iou_inside_the_image(w, h, x, y, target):
    width, height = 640, 480
    box = (float(min(x, width - w)), float(min(y, height - h)), 0.0, 0.0)
    box = (box[0], box[1], box[0] + w, box[1] + h)
    shifted = shift_for_iou(box, target, width, height)
    assert box_iou(shifted, box) == pytest.approx(target, abs=1e-9)
    assert 0 <= shifted[0] <= shifted[2] <= width and 0 <= shifted[1] <= shifted[3] <= height


def test_shift_for_iou_rejects_impossible_requests():
    with pytest.raises(ValueError, match="iou=0"):
        shift_for_iou((0.0, 0.0, 10.0, 10.0), 0.0, 100, 100)
    with pytest.raises(ValueError, match="too large"):
        shift_for_iou((0.0, 0.0, 100.0, 100.0), 0.5, 100, 100)


def test_oracle_answers_parse_back_to_the_truth():
    box = (33.0, 47.0, 211.0, 190.0)
    answer = internvl_answer("the dog", box, 320, 240)
    assert answer.startswith("<ref>the dog</ref><box>[[") and answer.endswith("]]</box>")
    parsed = parse_box(answer, 320, 240)
    assert parsed == pytest.approx(box, abs=0.5 * 320 / 1000)  # within half a grid step
    assert parse_box(GARBAGE_ANSWER, 320, 240) is None


def test_oracle_rejects_bad_model_args():
    with pytest.raises(ValueError, match="mode='nope'"):
        GroundingOracle(mode="nope")
    with pytest.raises(ValueError, match="iou=1.5"):
        GroundingOracle(mode="shift", iou=1.5)


# ---------------------------------------------------------------------------------------------------------
# takeover


def test_merge_index_lets_our_names_win_and_points_refcoco_at_our_groups():
    builtin = {
        "refcoco": {"type": "group", "task": -1, "yaml_path": "/lmms_eval/refcoco/_refcoco.yaml"},
        "refcoco_bbox_val": {"type": "task", "yaml_path": "/lmms_eval/refcoco/refcoco_bbox_val.yaml"},
        "clash": {"type": "task", "yaml_path": "/lmms_eval/clash.yaml"},
    }
    ours = {name: {"type": "group", "task": -1, "yaml_path": f"/ours/{name}.yaml"}
            for name in takeover.TAKEN_OVER.values()}
    ours["clash"] = {"type": "task", "yaml_path": "/ours/clash.yaml"}
    merged = takeover.merge_index(builtin, ours)
    for name, group in takeover.TAKEN_OVER.items():
        assert merged[name] == ours[group]
    assert merged["clash"] == ours["clash"]
    assert merged["refcoco_bbox_val"] == builtin["refcoco_bbox_val"]
    assert builtin["refcoco"]["yaml_path"] == "/lmms_eval/refcoco/_refcoco.yaml"  # inputs untouched
    with pytest.raises(ValueError, match="lacks the groups"):
        takeover.merge_index(builtin, {})


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("1", True), ("0", False), ("false", False),
                                                 ("OFF", False), ("no", False), ("yes", True)])
def test_takeover_env_var(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv(takeover.TAKEOVER_ENV, raising=False)
    else:
        monkeypatch.setenv(takeover.TAKEOVER_ENV, value)
    assert takeover.takeover_enabled() is enabled


def _python(code: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != takeover.TAKEOVER_ENV}
    proc = subprocess.run([sys.executable, "-c", code], env={**full_env, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_entry_point_installs_a_light_hook_that_patches_task_manager_on_import():
    out = _python(f"""
import sys, time
import lmms_eval.models  # runs the lmms_eval.models entry points, as lmms-eval's CLI does first
from lmms_prune.models import registry
from lmms_prune.tasks import takeover
heavy = [m for m in ("lmms_eval.tasks", "datasets", "torch", "transformers") if m in sys.modules]
installed = takeover.is_installed()
takeover.uninstall()
start = time.perf_counter()
registry.manifests()  # the entry point's own start-up cost
elapsed = time.perf_counter() - start
print("light", heavy == [], elapsed < 0.1, installed, "grounding_oracle" in lmms_eval.models.list_available_models())
from lmms_eval.tasks import TaskManager
hook_left = any(type(f).__name__ == "_PatchOnImport" for f in sys.meta_path)
tm = TaskManager("WARNING", include_path={BUILTIN_DIRS[0]!r}, include_defaults=False)
print("patched", hook_left, tm.task_index["refcoco"]["yaml_path"])
""")
    light, patched = out.strip().splitlines()[-2:]
    assert light == "light True True True True"
    assert patched == f"patched False {takeover.TASKS_DIR / 'refcoco' / 'refcoco_ground.yaml'}"


def test_entry_point_does_nothing_when_switched_off():
    out = _python("import lmms_eval.models\nfrom lmms_prune.tasks import takeover\nprint(takeover.is_installed())",
                  **{takeover.TAKEOVER_ENV: "0"})
    assert out.strip().splitlines()[-1] == "False"


def test_task_manager_resolves_refcoco_names_to_grounding_groups(takeover_on):
    tm = task_manager(BUILTIN_DIRS)
    for name, group in takeover.TAKEN_OVER.items():
        assert tm.task_index[name]["yaml_path"] == str(takeover.TASKS_DIR / "refcoco" / f"{group}.yaml")
        assert tm._get_config(name)["group"] == group
    assert {tm.task_index[name]["type"] for name in TASK_NAMES.values()} == {"python_task"}
    assert "refcoco_ground_all" in tm.all_groups


def test_caption_groups_keep_lmms_eval_builtin_subtasks(takeover_on, monkeypatch):
    tm = task_manager(BUILTIN_DIRS)
    monkeypatch.setenv(takeover.TAKEOVER_ENV, "0")
    builtin = task_manager(BUILTIN_DIRS)
    for name, caption in takeover.CAPTION_GROUPS.items():
        assert builtin.task_index[name]["yaml_path"].startswith(str(LMMS_EVAL_TASKS))
        assert tm._get_config(caption)["task"] == builtin._get_config(name)["task"]
        for subtask in tm._get_config(caption)["task"]:
            assert tm.task_index[subtask]["yaml_path"].startswith(str(LMMS_EVAL_TASKS))


def test_switching_off_gives_the_builtin_groups_back(takeover_on, monkeypatch):
    monkeypatch.setenv(takeover.TAKEOVER_ENV, "0")
    tm = task_manager(BUILTIN_DIRS)
    assert tm.task_index["refcoco"]["yaml_path"] == str(LMMS_EVAL_TASKS / "refcoco" / "_refcoco.yaml")
    assert "refcoco_ground" not in tm.task_index
    # explicit --include_path still finds our tasks by their own names; lmms-eval keeps `refcoco`
    tm = task_manager([*BUILTIN_DIRS, str(takeover.TASKS_DIR)])
    assert tm.task_index["refcoco"]["yaml_path"] == str(LMMS_EVAL_TASKS / "refcoco" / "_refcoco.yaml")
    assert tm._get_config("refcoco_ground_all")["task"] == list(TASK_NAMES.values())


def test_uninstall_restores_task_manager(takeover_on):
    from lmms_eval.tasks import TaskManager

    takeover.uninstall()
    assert not takeover.is_installed()
    assert not hasattr(TaskManager.initialize_tasks, "__wrapped__")
    takeover.install()
    takeover.install()  # idempotent: wrapped once
    assert not hasattr(TaskManager.initialize_tasks.__wrapped__, "__wrapped__")


# ---------------------------------------------------------------------------------------------------------
# data sources


def load_task(name: str):
    [(task_name, task)] = task_manager([str(takeover.TASKS_DIR)]).load_task_or_group([name], task_type="chat").items()
    assert task_name == name
    return task


def test_hub_layout_explodes_one_sample_per_expression_without_decoding(takeover_on, monkeypatch, toy_root,
                                                                        expected_counts):
    from datasets import Image

    monkeypatch.delenv(data.JSONL_DIR_ENV, raising=False)
    monkeypatch.setenv(data.LOCAL_DIR_ENV, str(toy_root))
    task = load_task("refcoco_ground_testB")
    docs = task.test_docs()
    assert len(docs) == expected_counts[("refcoco", "testB")]
    assert docs.features["image"] == Image(decode=False)
    assert "image" not in task.dataset_no_image["testB"].column_names
    rows = pq.read_table(toy_root / "RefCOCO" / "data" / "testB-00000-of-00001.parquet").to_pylist()
    expected = [(e, [r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]])
                for r in rows for e in r["answer"]]
    assert [(d["expression"], d["box"]) for d in docs] == [(e, pytest.approx(b)) for e, b in expected]
    doc = docs[0]
    assert isinstance(doc["image"], dict) and doc["image"]["bytes"]  # still undecoded
    [turn] = task.doc_to_messages(doc)
    image, text = turn["content"]
    assert image["url"].size == (doc["width"], doc["height"]) == (320, 240)
    assert text["text"] == ("Please provide the bounding box coordinate of the region this sentence describes: "
                            f"<ref>{doc['expression']}</ref>")


def test_local_dir_without_the_family_fails_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(data.LOCAL_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="RefCOCOg"):
        data.resolve_dataset_path(data.FAMILIES["refcocog"])
    monkeypatch.delenv(data.LOCAL_DIR_ENV)
    assert data.resolve_dataset_path(data.FAMILIES["refcocog"]) == "lmms-lab-encoder/RefCOCOg"


def test_internvl_jsonl_source(takeover_on, monkeypatch, tmp_path):
    path = write_internvl_jsonl(tmp_path, 2, seed=5, name="refcoco+_val", width=320, height=240)
    records = load_internvl_jsonl(path)
    monkeypatch.setenv(data.JSONL_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(data.COCO_ROOT_ENV, raising=False)
    task = load_task("refcoco+_ground_val")
    docs = task.test_docs()
    assert [(d["expression"], d["box"]) for d in docs] == [(r["sent"], r["bbox"]) for r in records]
    assert {(d["width"], d["height"]) for d in docs} == {(320, 240)}
    assert utils.doc_to_visual(docs[0])[0].size == (320, 240)


# ---------------------------------------------------------------------------------------------------------
# lmms-prune data check


def test_data_check_counts_local_hub_layout(toy_root, expected_counts, tmp_path):
    from lmms_prune.cli import data as data_cli

    rows = data_cli.check(jsonl_dir=None, local_dir=str(toy_root))
    assert [(r.family, r.split) for r in rows] == ALL_SPLITS
    assert {(r.family, r.split): r.count for r in rows} == expected_counts
    assert all(r.status == "mismatch" for r in rows)  # toy data is far smaller than the official splits
    assert [r.official for r in rows] == [10834, 5657, 5095, 10758, 5726, 4889, 4896, 9602]
    (tmp_path / "RefCOCO").symlink_to(toy_root / "RefCOCO")
    rows = data_cli.check(jsonl_dir=None, local_dir=str(tmp_path))
    assert [r.status for r in rows] == ["mismatch"] * 3 + ["missing"] * 5


def test_data_check_jsonl_and_exit_status(tmp_path, capsys):
    from lmms_prune.cli.main import main

    path = write_internvl_jsonl(tmp_path, 1, seed=0, name="refcocog_test", width=320, height=240)
    assert main(["data", "check", "--jsonl-dir", str(tmp_path)]) == 1  # present but not the official count
    table = capsys.readouterr().out
    [line] = [line for line in table.splitlines() if line.startswith("refcocog ") and " test " in line]
    assert line.split()[2:5] == [str(len(load_internvl_jsonl(path))), "9602", "mismatch"]
    assert sum(line.split()[4] == "missing" for line in table.splitlines()[1:9]) == 7
    assert main(["data", "check", "--jsonl-dir", str(tmp_path / "nothing")]) == 1  # all missing: fails, no crash


# ---------------------------------------------------------------------------------------------------------
# the lmms-eval command line with the oracle (slow: each run imports the evaluator)


def run_lmms_eval(tmp_path: Path, toy_root: Path, model_args: str, tasks: str, *extra: str,
                  env: dict[str, str] | None = None) -> tuple[dict, str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in (takeover.TAKEOVER_ENV, data.JSONL_DIR_ENV, data.COCO_ROOT_ENV)}
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", data.LOCAL_DIR_ENV: str(toy_root),
                     "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache"), **(env or {})})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "grounding_oracle", "--model_args", model_args,
           "--tasks", tasks, "--output_path", str(out), *extra]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    files = list(out.rglob("*results.json"))
    assert proc.returncode == 0 and len(files) == 1, log[-4000:]
    return json.loads(files[0].read_text()), log


def split_scores(results: dict, family: str, split: str) -> dict:
    return results["results"][TASK_NAMES[(family, split)]]


@pytest.mark.cli
def test_cli_refcoco_exact_oracle_scores_100(tmp_path, toy_root, expected_counts):
    results, log = run_lmms_eval(tmp_path, toy_root, "mode=exact", "refcoco")
    assert log.count("lmms-prune task takeover") == 1
    assert set(results["groups"]) == {"refcoco_ground"}
    for split in data.FAMILIES["refcoco"].splits:
        scores = split_scores(results, "refcoco", split)
        assert scores["acc@0.5,none"] == 100.0
        assert scores["mean_iou,none"] > 0.97  # grid rounding only
        assert scores["unparseable,none"] == 0
        assert results["n-samples"][TASK_NAMES[("refcoco", split)]]["effective"] == expected_counts[("refcoco", split)]
    assert results["groups"]["refcoco_ground"]["acc@0.5,none"] == 100.0


@pytest.mark.cli
def test_cli_all_splits_shifted_to_iou_04_scores_0(tmp_path, toy_root):
    results, _ = run_lmms_eval(tmp_path, toy_root, "mode=shift,iou=0.4", "refcoco_ground_all")
    for family, split in ALL_SPLITS:
        scores = split_scores(results, family, split)
        assert scores["acc@0.5,none"] == 0.0
        assert scores["mean_iou,none"] == pytest.approx(0.4, abs=0.02)
        assert scores["unparseable,none"] == 0
    group = results["groups"]["refcoco_ground_all"]
    assert group["acc@0.5,none"] == 0.0
    assert group["mean_iou,none"] == pytest.approx(0.4, abs=0.02)


@pytest.mark.cli
def test_cli_refcoco_plus_shifted_to_iou_06_scores_100(tmp_path, toy_root):
    results, _ = run_lmms_eval(tmp_path, toy_root, "mode=shift,iou=0.6", "refcoco+")
    splits = data.FAMILIES["refcoco+"].splits
    ious = [split_scores(results, "refcoco+", s)["mean_iou,none"] for s in splits]
    assert [split_scores(results, "refcoco+", s)["acc@0.5,none"] for s in splits] == [100.0] * 3
    assert ious == [pytest.approx(0.6, abs=0.02)] * 3
    # the group score is the unweighted mean over splits
    assert results["groups"]["refcoco+_ground"]["mean_iou,none"] == pytest.approx(sum(ious) / 3)


@pytest.mark.cli
def test_cli_garbage_with_takeover_off_via_include_path(tmp_path, toy_root, expected_counts):
    results, log = run_lmms_eval(tmp_path, toy_root, "mode=garbage", "refcocog_ground",
                                 "--include_path", str(takeover.TASKS_DIR), env={takeover.TAKEOVER_ENV: "0"})
    assert "lmms-prune task takeover" not in log
    total = 0
    for split in data.FAMILIES["refcocog"].splits:
        scores = split_scores(results, "refcocog", split)
        assert scores["acc@0.5,none"] == 0.0 and scores["mean_iou,none"] == 0.0
        assert scores["unparseable,none"] == expected_counts[("refcocog", split)]
        total += expected_counts[("refcocog", split)]
    assert results["groups"]["refcocog_ground"]["unparseable,none"] == total


# ---------------------------------------------------------------------------------------------------------
# bad answers, bad images, bad data (issue 19)


def _doc(**kw):
    return {"sample_id": "q/0", "box": [64.0, 96.0, 320.0, 384.0], "width": 640, "height": 480, **kw}


@pytest.mark.parametrize("answer", [None, 7, ["[[100, 200, 500, 800]]"], {"text": "x"}])
def test_non_string_answers_count_as_unparseable(answer):
    record = utils.process_results(_doc(), [answer])["unparseable"]
    assert record == {"iou": 0.0, "parsed": False}
    assert utils.unparseable_count([record]) == 1 and utils.image_error_count([record]) == 0


def test_image_errors_are_counted_apart_and_stay_in_the_denominator(caplog):
    hit = {"iou": 0.9, "parsed": True}
    bad = [utils.image_error_record(f"q{i}/0", f"sample 'q{i}/0': image 'x.jpg' cannot be used: empty")
           for i in range(3)]
    records = [hit, {"iou": 0.0, "parsed": False}, *bad]
    assert utils.accuracy_at_05(records) == 20.0  # 1 of 5: the 3 image errors count as misses
    assert utils.mean_iou(records) == pytest.approx(0.9 / 5)
    assert (utils.unparseable_count(records), utils.image_error_count(records)) == (1, 3)


def _truncated_jpeg() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[:-600]


def test_task_image_loading_refuses_truncated_files_and_scores_them_as_image_errors():
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # set by lmms-eval when its task module is imported
    doc = _doc(sample_id="trunc/0", image={"bytes": _truncated_jpeg(), "path": "t.jpg"}, width=80, height=60)
    with pytest.raises(utils.ImageLoadError, match="sample 'trunc/0'.*truncated"):
        utils.doc_to_visual(doc)
    # lmms-eval scores from the docs without their image column; the answer of a skipped sample is ""
    no_image = {k: v for k, v in doc.items() if k != "image"}
    record = utils.process_results(no_image, [""])["image_errors"]
    assert record["iou"] == 0.0 and "trunc/0" in record["image_error"]
    assert utils.image_error_count([record]) == 1 and utils.unparseable_count([record]) == 0


def test_zero_byte_image_keeps_its_samples_at_data_loading():
    batch = {"question_id": ["z"], "image": [{"bytes": b"", "path": "zero.jpg"}], "answer": [["a", "b"]],
             "bbox": [[1.0, 2.0, 3.0, 4.0]]}
    out = data.explode_rows(batch)
    assert out["sample_id"] == ["z/0", "z/1"] and out["width"] == [0, 0] and out["height"] == [0, 0]
    doc = {k: v[0] for k, v in out.items() if k != "image"}
    record = utils.process_results(doc, [""])["image_errors"]
    assert record["image_error"] and record["iou"] == 0.0


def test_rows_without_expressions_are_logged(caplog):
    import logging

    batch = {"question_id": ["e", "f"], "image": [{"bytes": b"", "path": "a.jpg"}] * 2, "answer": [[], ["x"]],
             "bbox": [[1.0, 2.0, 3.0, 4.0]] * 2}
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        out = data.explode_rows(batch)
    assert out["sample_id"] == ["f/0"]
    assert "1 RefCOCO row(s) without any referring expression" in caplog.text and "e" in caplog.text


def test_missing_split_gives_one_clear_message(takeover_on, monkeypatch, tmp_path):
    write_refcoco_hub_layout(tmp_path / "RefCOCO", 1, seed=3, splits=("val",), width=320, height=240)
    monkeypatch.delenv(data.JSONL_DIR_ENV, raising=False)
    monkeypatch.setenv(data.LOCAL_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"refcoco split 'testB' is missing from .*RefCOCO \(it holds: val\)"):
        load_task("refcoco_ground_testB")


@pytest.mark.parametrize(("box", "width", "height", "reason"), [
    ([10, 10, 10, 50], 100, 100, "zero width or height"),
    ([10, 50, 60, 40], 100, 100, "zero width or height"),
    ([10, 10, 150, 50], 100, 100, "outside the 100x100 image"),
    ([-5, 10, 50, 50], 100, 100, "outside"),
    ([10, 10, 50, 50], 0, 0, "image size unreadable"),
    ([0, 0, 100.5, 100], 100, 100, None),  # touching the border (within a pixel) is fine
])
def test_degenerate_box(box, width, height, reason):
    got = data.degenerate_box(box, width, height)
    assert (got is None) if reason is None else (reason in got)


def test_data_check_flags_degenerate_boxes_and_empty_expressions(tmp_path, capsys):
    from lmms_prune.cli import data as data_cli
    from lmms_prune.cli.main import main

    records = [{"image": "a.jpg", "sent": "the dog", "bbox": [10, 10, 10, 50], "width": 100, "height": 100},
               {"image": "a.jpg", "sent": "the cat", "bbox": [10, 10, 150, 50], "width": 100, "height": 100},
               {"image": "a.jpg", "sent": "", "bbox": [10, 10, 50, 50], "width": 100, "height": 100},
               {"image": "a.jpg", "sent": "fine", "bbox": [10, 10, 50, 50], "width": 100, "height": 100}]
    (tmp_path / "refcoco_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["data", "check", "--jsonl-dir", str(tmp_path), "--splits", "refcoco/val"]) == 1
    out = capsys.readouterr().out
    assert "refcoco val: 2 row(s) with degenerate box: refcoco_val/0 (zero width or height), refcoco_val/1 " \
           "(outside the 100x100 image)" in out
    assert "refcoco val: 1 row(s) with no expression: refcoco_val/2" in out
    (row,) = data_cli.check(str(tmp_path), None, [("refcoco", "val")])
    assert row.status == "problems" and row.count == 4


def test_data_check_hub_rows_with_empty_answers_and_degenerate_boxes(tmp_path):
    import pyarrow as pa

    from lmms_prune.cli import data as data_cli

    write_refcoco_hub_layout(tmp_path / "RefCOCO", 2, seed=1, splits=("val",), width=320, height=240)
    path = tmp_path / "RefCOCO" / "data" / "val-00000-of-00001.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["answer"] = []
    rows[1]["bbox"] = [10.0, 10.0, 0.0, 30.0]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    (row,) = data_cli.check(None, str(tmp_path), [("refcoco", "val")])
    assert row.problems["no expression"] == [rows[0]["question_id"]]
    assert row.problems["degenerate box"] == [f"{rows[1]['question_id']} (zero width or height)"]
    assert row.status == "problems"


def test_data_check_exits_1_when_a_requested_split_is_missing(toy_root, tmp_path, capsys):
    from lmms_prune.cli.main import main

    (tmp_path / "RefCOCO").symlink_to(toy_root / "RefCOCO")
    assert main(["data", "check", "--local-dir", str(tmp_path), "--splits", "refcocog/val"]) == 1
    assert "missing: refcocog/val" in capsys.readouterr().out
    assert main(["data", "check", "--local-dir", str(tmp_path), "--splits", "refcoco/nope"]) == 2


def write_bad_image_split(root: Path) -> dict[str, list[str]]:
    """A RefCOCO val split (hub layout under ``root/RefCOCO``) of five samples on four images: a truncated
    JPEG (1 sample), a zero-byte file (2 samples), a 16-bit grey PNG (1 sample) and a good JPEG (1 sample).
    Returns the sample ids by kind."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    write_refcoco_hub_layout(root / "RefCOCO", 4, seed=11, splits=("val",), width=320, height=240)
    path = root / "RefCOCO" / "data" / "val-00000-of-00001.parquet"
    table = pq.read_table(path)
    first_per_image = {}
    for row in table.to_pylist():
        first_per_image.setdefault(row["file_name"], row)
    rows = list(first_per_image.values())[:4]
    png = io.BytesIO()
    Image.fromarray(np.full((240, 320), 30000, dtype=np.uint16)).save(png, "PNG")
    rows[0]["image"] = {"bytes": rows[0]["image"]["bytes"][:-2000], "path": "cut.jpg"}
    rows[1]["image"] = {"bytes": b"", "path": "zero.jpg"}
    rows[2]["image"] = {"bytes": png.getvalue(), "path": "grey16.png"}
    answers = [["a"], ["b", "c"], ["d"], ["e"]]
    for row, answer in zip(rows, answers):
        row["answer"] = answer
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    ids = [f"{row['question_id']}/{k}" for row, answer in zip(rows, answers) for k in range(len(answer))]
    return {"errors": ids[:3], "grey16": [ids[3]], "good": [ids[4]]}


def test_16_bit_sample_reaches_the_model_grey_not_white(takeover_on, monkeypatch, tmp_path):
    ids = write_bad_image_split(tmp_path)
    monkeypatch.delenv(data.JSONL_DIR_ENV, raising=False)
    monkeypatch.setenv(data.LOCAL_DIR_ENV, str(tmp_path))
    docs = {d["sample_id"]: d for d in load_task("refcoco_ground_val").test_docs()}
    assert len(docs) == 5
    (image,) = utils.doc_to_visual(docs[ids["grey16"][0]])
    assert image.mode == "RGB" and image.getextrema() == ((117, 117),) * 3  # 30000 / 257 = 116.7


@pytest.mark.cli
def test_cli_bad_images_are_counted_as_errors_with_on_error_skip(tmp_path):
    from lmms_prune.toy.models import tiny_model_dir

    root = tmp_path / "data"
    ids = write_bad_image_split(root)
    model_args = f"pretrained={tiny_model_dir('internvl_qwen2')},on_error=skip,max_num=1,device=cpu"
    full_env = {k: v for k, v in os.environ.items()
                if k not in (takeover.TAKEOVER_ENV, data.JSONL_DIR_ENV, data.COCO_ROOT_ENV)}
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", data.LOCAL_DIR_ENV: str(root),
                     "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache")})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "internvl_none", "--model_args", model_args,
           "--tasks", "refcoco_ground_val", "--output_path", str(out), "--gen_kwargs", "max_new_tokens=4",
           "--log_samples"]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    files = list(out.rglob("*_results.json"))
    assert len(files) == 1, log[-4000:]
    results = json.loads(files[0].read_text())
    scores = results["results"]["refcoco_ground_val"]
    assert scores["image_errors,none"] == 3
    assert results["n-samples"]["refcoco_ground_val"]["effective"] == 5  # the 3 errors are in the denominator
    assert scores["unparseable,none"] <= 2
    for sample_id in ids["errors"]:
        assert log.count(sample_id) >= 2, sample_id  # the wrapper's SKIPPED line and the task's summary
    for sample_id in ids["grey16"] + ids["good"]:
        assert sample_id not in log
    [samples_file] = out.rglob("*_samples_refcoco_ground_val.jsonl")
    logged = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    assert len(logged) == 5
    assert sum(bool(s["image_errors"].get("image_error")) for s in logged) == 3
