"""Issue 31, inputs, data and conversion: each bad input is refused or counted before or while it happens,
with a message naming the value, the sample or the file, and the fix (docs/reliability.md lists the cases)."""

from __future__ import annotations

import pickle

import pytest
import torch

from lmms_prune.models.wrappers import InternVLPrune_d2pruner
from lmms_prune.toy.models import tiny_model_dir


def _no_weights(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load when an input is invalid")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)


# ---------------------------------------------------------------------------------------------------------
# Bad 3, Poor 3 and 4: corrupt bias priors


class _Payload:
    """An object a pickle can name but a weights-only load refuses."""


@pytest.mark.parametrize(("means", "shown"), [
    ({16: -torch.ones(16)}, r"means\[16\]: the smallest value is -1.0: values must be > 0"),
    ({16: torch.zeros(16)}, r"means\[16\]: every value is 0: the debiased scores would equal raw attention"),
    ({16: torch.ones(4, 4)}, r"means\[16\]: shape \(4, 4\): must be a non-empty 1-D vector"),
    ({16: torch.ones(0)}, r"means\[16\]: shape \(0,\): must be a non-empty 1-D vector"),
    ({16: torch.ones(16, dtype=torch.int64)}, r"means\[16\]: dtype torch.int64: the values must be floating"),
    ({16: [1.0] * 16}, r"means\[16\]: a list, not a tensor"),
    ({16: torch.full((16,), float("nan"))}, r"means\[16\]: 16 of 16 values are NaN or infinite"),
    ({16: torch.ones(8)}, r"means\[16\]: 8 values for 16 visual tokens"),
    ({}, r"means is empty"),
    ([torch.ones(16)], r"means is a list"),
])
def test_corrupt_prior_is_refused_before_the_weights_load_naming_file_value_and_fix(monkeypatch, tmp_path, means,
                                                                                     shown):
    _no_weights(monkeypatch)
    path = tmp_path / "bad.pt"
    torch.save({"format": 1, "means": means, "counts": {16: 3}, "meta": {}}, path)
    with pytest.raises(ValueError, match=r"bias_prior='.*bad.pt'") as caught:
        InternVLPrune_d2pruner(pretrained=str(tiny_model_dir("internvl_llama")), device="cpu",
                               bias_prior=str(path), on_error="skip")
    message = str(caught.value)
    assert caught.match(shown) and "lmms-prune calibrate" in message


def test_trend_weights_and_priors_share_one_validator(tmp_path):
    """The same vector is refused by both readers with the same reason."""
    import numpy as np

    from lmms_prune.engine.prior import load_prior
    from lmms_prune.scores import load_trend_weights

    for values, reason in [(-np.ones(4), "the smallest"), (np.zeros(4), "every"), (np.ones((2, 2)), "shape (2, 2)"),
                           (np.array([1.0, np.nan, 1.0, 1.0]), "1 of 4")]:
        np.save(tmp_path / "w.npy", values)
        torch.save({"format": 1, "means": {4: torch.from_numpy(values)}}, tmp_path / "p.pt")
        for read in (lambda: load_trend_weights(tmp_path / "w.npy"), lambda: load_prior(tmp_path / "p.pt")):
            with pytest.raises(ValueError) as caught:
                read()
            assert reason in str(caught.value)


def test_a_pickled_prior_is_refused_without_unpickling_and_without_torchs_unsafe_advice(tmp_path):
    from lmms_prune.engine.prior import load_prior

    path = tmp_path / "pickled.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": 1, "means": _Payload()}, handle)
    torch.save({"format": 1, "means": {4: torch.ones(4)}, "extra": _Payload()}, tmp_path / "object.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "object.pt").read_bytes()[:200])
    for name in ("pickled.pt", "object.pt", "cut.pt"):
        with pytest.raises(ValueError, match=rf"bias_prior='.*{name}': not a readable prior file") as caught:
            load_prior(tmp_path / name)
        assert "weights_only" not in str(caught.value) and "lmms-prune calibrate" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# RefCOCO data: Bad 4, 5, 6 and Poor 5, 6, 7


@pytest.fixture
def loguru_lines():
    """Lines logged through loguru (lmms-eval's logger) while the test runs."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    yield lines
    logger.remove(sink)


def _load_tasks(monkeypatch, tmp_path, names):
    from lmms_eval.tasks import TaskManager

    from lmms_prune.tasks import takeover
    from lmms_prune.tasks.refcoco import data

    monkeypatch.delenv(data.JSONL_DIR_ENV, raising=False)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    manager = TaskManager("WARNING", include_path=[str(takeover.TASKS_DIR)], include_defaults=False)
    return manager.load_task_or_group(names, task_type="chat")


def _rewrite_rows(path, edit):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = table.to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return rows


def test_an_image_error_in_one_task_does_not_mark_the_same_sample_id_in_another(monkeypatch, tmp_path):
    """Bad 4: refcoco and refcoco+ share question ids; errors are keyed by (task, sample id)."""
    from lmms_prune.images import ImageLoadError
    from lmms_prune.tasks.refcoco import data, utils
    from lmms_prune.toy.data import write_refcoco_hub_layout

    monkeypatch.setattr(utils, "_IMAGE_ERRORS", {})
    for family in ("refcoco", "refcoco+"):
        write_refcoco_hub_layout(tmp_path / data.FAMILIES[family].local_name, 1, seed=7, splits=("val",),
                                 width=320, height=240)
    broken = tmp_path / "RefCOCO" / "data" / "val-00000-of-00001.parquet"
    _rewrite_rows(broken, lambda rows: [r.update(image={"bytes": r["image"]["bytes"][:-2000], "path": "cut.jpg"})
                                        for r in rows])
    monkeypatch.setenv(data.LOCAL_DIR_ENV, str(tmp_path))
    tasks = _load_tasks(monkeypatch, tmp_path, ["refcoco_ground_val", "refcoco+_ground_val"])
    bad_task, good_task = tasks["refcoco_ground_val"], tasks["refcoco+_ground_val"]
    bad_doc, good_doc = bad_task.test_docs()[0], good_task.test_docs()[0]
    assert bad_doc["sample_id"] == good_doc["sample_id"]
    with pytest.raises(ImageLoadError, match=f"refcoco_ground_val/{bad_doc['sample_id']}"):
        bad_task.doc_to_messages(bad_doc)
    good_task.doc_to_messages(good_doc)
    x1, y1, x2, y2 = good_doc["box"]
    exact = f"[[{x1 / 320 * 1000:.3f}, {y1 / 240 * 1000:.3f}, {x2 / 320 * 1000:.3f}, {y2 / 240 * 1000:.3f}]]"
    good = good_task.process_results(good_doc, [exact])["image_errors"]
    bad = bad_task.process_results(bad_doc, [exact])["image_errors"]
    assert "image_error" not in good and good["iou"] == pytest.approx(1.0, abs=1e-3)
    assert "truncated" in bad["image_error"] and bad["iou"] == 0.0


@pytest.mark.parametrize(("box", "reason"), [
    ([10.0, 10.0, 10.0, 50.0], "zero width or height"),
    ([400.0, 10.0, 500.0, 50.0], "outside the 320x240 image"),
    ([float("nan"), 10.0, 50.0, 50.0], "non-finite coordinate"),
    ([10.0, 10.0, float("inf"), 50.0], "non-finite coordinate"),
])
def test_a_broken_ground_truth_box_is_counted_as_bad_gt_and_left_out_of_the_scores(box, reason, loguru_lines):
    """Bad 5: counted under bad_gt with a log line naming the sample, not scored as a model miss; data check
    flags the same row for the same reason."""
    from lmms_prune.cli import data as data_cli
    from lmms_prune.tasks.refcoco import utils

    good = {"sample_id": "good/0", "box": [0.0, 0.0, 160.0, 120.0], "width": 320, "height": 240}
    broken = {"sample_id": "broken/0", "box": box, "width": 320, "height": 240}
    answer = "[[0, 0, 500, 500]]"  # exactly the good box
    records = [utils.process_results(doc, [answer])["bad_gt"] for doc in (good, broken)]
    assert records[1]["bad_gt"] == reason
    assert utils.accuracy_at_05(records) == 100.0 and utils.mean_iou(records) == pytest.approx(1.0)
    assert (utils.bad_gt_count(records), utils.unparseable_count(records)) == (1, 0)
    assert any("broken/0" in line and reason in line for line in loguru_lines)
    flagged = data_cli.row_problems([("broken/0", box, 320, 240, 1, None), ("good/0", good["box"], 320, 240, 1, None)])
    assert flagged["degenerate box"] == [f"broken/0 ({reason})"]


def test_a_three_number_box_names_its_row_at_loading_scoring_and_data_check(caplog, tmp_path, capsys):
    """Poor 6: no unpack error; the row is named, its samples count under bad_gt."""
    import json
    import logging

    from lmms_prune.cli.main import main
    from lmms_prune.tasks.refcoco import data, utils

    batch = {"question_id": ["q3"], "image": [{"bytes": b"", "path": "a.jpg"}], "answer": [["the dog"]],
             "bbox": [[1.0, 2.0, 3.0]]}
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        out = data.explode_rows(batch)
        samples = data.jsonl_samples([{"image": "a.jpg", "sent": "x", "bbox": [1, 2, 3], "width": 9, "height": 9}],
                                     tmp_path, "refcoco_val")
    assert "RefCOCO row q3: bbox [1.0, 2.0, 3.0] is not four numbers" in caplog.text
    assert "RefCOCO row refcoco_val/0: bbox [1, 2, 3] is not four numbers" in caplog.text
    doc = {"sample_id": samples["sample_id"][0], "box": samples["box"][0], "width": 9, "height": 9}
    assert utils.process_results(doc, ["[[0, 0, 10, 10]]"])["bad_gt"]["bad_gt"] == "non-finite coordinate"
    assert len(out["box"][0]) == 4
    (tmp_path / "refcoco_val.jsonl").write_text(json.dumps(
        {"image": "a.jpg", "sent": "x", "bbox": [1, 2, 3], "width": 9, "height": 9}) + "\n")
    assert main(["data", "check", "--jsonl-dir", str(tmp_path), "--splits", "refcoco/val"]) == 1
    assert "refcoco_val/0 (3 numbers, not 4 (x1, y1, x2, y2))" in capsys.readouterr().out


def _bomb_png() -> bytes:
    """A 16000 x 12000 PNG (1-bit, 23 kB): over PIL's decompression-bomb limit, so opening it raises."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (16000, 12000)).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_oversized_image_is_an_image_error_naming_the_sample_never_a_crash(tmp_path, capsys, monkeypatch):
    """Bad 6 (data loading, decoding, data check), Poor 5 (a truncated JPEG with a good header is caught by
    data check) and Poor 7 (a split with both a wrong count and problems counts under both). The limit holds
    whatever PIL's global is: lmms-eval's task utilities raise it to 1e9 pixels when its task index is built."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1e9)
    from lmms_prune.cli import data as data_cli
    from lmms_prune.cli.main import main
    from lmms_prune.images import ImageLoadError, load_image
    from lmms_prune.tasks.refcoco import data
    from lmms_prune.toy.data import write_refcoco_hub_layout

    bomb = _bomb_png()
    batch = {"question_id": ["big"], "image": [{"bytes": bomb, "path": "big.png"}], "answer": [["a"]],
             "bbox": [[1.0, 2.0, 3.0, 4.0]]}
    out = data.explode_rows(batch)  # the task's data loading: the sample is kept, its size unknown
    assert (out["sample_id"], out["width"], out["height"]) == (["big/0"], [0], [0])
    with pytest.raises(ImageLoadError, match="sample 'big/0'.*DecompressionBombError"):
        load_image(batch["image"][0], "big/0")

    write_refcoco_hub_layout(tmp_path / "RefCOCO", 3, seed=5, splits=("val",), width=320, height=240)

    def edit(rows):
        rows[0]["image"] = {"bytes": bomb, "path": "big.png"}
        rows[1]["image"] = {"bytes": rows[1]["image"]["bytes"][:-1500], "path": "cut.jpg"}

    rows = _rewrite_rows(tmp_path / "RefCOCO" / "data" / "val-00000-of-00001.parquet", edit)
    (row,) = data_cli.check(None, str(tmp_path), [("refcoco", "val")])
    unusable = row.problems["unusable image"]
    assert any(item.startswith(f"{rows[0]['question_id']} (DecompressionBombError") for item in unusable)
    assert any(item.startswith(rows[1]["question_id"]) and "truncated" in item for item in unusable)
    assert main(["data", "check", "--local-dir", str(tmp_path), "--splits", "refcoco/val"]) == 1
    assert ("1/1 requested splits present, 1 with a count different from the official one, 1 with rows that "
            "cannot be scored") in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Bad 8, Poor 1 and 2: run arguments checked before the weights load


def test_an_unwritable_efficiency_path_is_refused_before_the_weights_load(monkeypatch, tmp_path):
    from lmms_prune.models.wrappers import InternVLPrune_fastv

    _no_weights(monkeypatch)
    model = str(tiny_model_dir("internvl_llama"))
    with pytest.raises(ValueError, match=r"efficiency_path='/proc/nope/x.json': cannot write there"):
        InternVLPrune_fastv(pretrained=model, device="cpu", efficiency_path="/proc/nope/x.json")
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(ValueError, match=r"efficiency_path='.*taken.json': is a folder"):
        InternVLPrune_fastv(pretrained=model, device="cpu", efficiency_path=str(tmp_path / "taken.json"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"efficiency_path='.*file/sub': cannot write there"):
        InternVLPrune_fastv(pretrained=model, device="cpu", efficiency_path=str(tmp_path / "file" / "sub"))
    # a writable one passes the check (and only then do the weights load)
    with pytest.raises(AssertionError, match="weights must not load"):
        InternVLPrune_fastv(pretrained=model, device="cpu", efficiency_path=str(tmp_path / "new" / "e.json"))
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []


@pytest.mark.parametrize(("value", "shown"), [
    ("/nonexistent/model", r"pretrained='/nonexistent/model': no such directory"),
    ("./no/such/model", r"pretrained='./no/such/model': no such directory"),
    ("a/b/c", r"pretrained='a/b/c': no such directory"),
])
def test_a_missing_local_checkpoint_says_no_such_directory(value, shown):
    from lmms_prune.models.wrappers import InternVLPrune_fastv

    with pytest.raises(ValueError, match=shown):
        InternVLPrune_fastv.parse_model_args(pretrained=value)


def test_a_hub_id_and_a_file_are_told_apart_from_a_missing_folder(tmp_path):
    from lmms_prune.runner import check_local_checkpoint, looks_like_path

    assert not looks_like_path("OpenGVLab/InternVL2_5-8B") and not looks_like_path("gpt2")
    check_local_checkpoint("OpenGVLab/InternVL2_5-8B")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="a file, not a checkpoint directory"):
        check_local_checkpoint(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize(("method", "key"), [("pyramiddrop", "prune_layers"), ("fastv", "prune_layer"),
                                             ("d2pruner", "bias_prior"), ("fastv", "keep_ratio")])
def test_an_empty_parameter_is_named(method, key):
    from lmms_prune.presets import resolve_config

    with pytest.raises(ValueError, match=rf"^{key}='': empty; give .*, or leave {key} out"):
        resolve_config(method, **{key: ""})


# ---------------------------------------------------------------------------------------------------------
# Poor 13 to 16: sweep, bench and calibrate check their arguments before any work

TASKS_DIR = __import__("pathlib").Path(__file__).parent / "tasks"
FAKE = __import__("pathlib").Path(__file__).parent / "data" / "fake_lmms_eval.py"


@pytest.fixture
def fake_launches(tmp_path, monkeypatch):
    """The number of lmms-eval runs the fake launcher was asked for (tests/data/fake_lmms_eval.py)."""
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LMMS_EVAL_CALLS", str(calls))
    monkeypatch.setenv("FAKE_LMMS_EVAL_MODE", "ok")
    return lambda: len(calls.read_text().splitlines()) if calls.is_file() else 0


def _sweep(tmp_path, *extra):
    import sys

    from lmms_prune.cli.main import main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    return main(["sweep", "--models", f"internvl={ckpt}", "--methods", "fastv,d2pruner", "--keep", "0.1",
                 "--include-path", str(TASKS_DIR), "--launcher", f"{sys.executable} {FAKE}", "--retries", "0",
                 "--out", str(tmp_path / "s"), *extra])


@pytest.mark.parametrize(("extra", "shown"), [
    (["--tasks", "pope_tiny", "--method-args", "fastv:theta_sim=0.5"],
     r"cell internvl-ckpt-\w+/fastv/keep0.1: theta_sim='0.5': method 'fastv' .* does not use theta_sim"),
    (["--tasks", "pope_tiny", "--method-args", "*:max_num=zero"], r"max_num='zero'"),
    (["--tasks", "pope_tiny", "--method-args", "fastv:keep_ratio=0.5"],
     r"--method-args fastv:keep_ratio=0.5: the budget of every cell is --keep .* give --keep 0.5"),
    (["--tasks", "pope_tiny", "--method-args", "*:keep_tokens=64"],
     r"\*:keep_tokens=64: .* so keep_tokens there would contradict it"),
    (["--tasks", "pope_tiny"], r"cell internvl-ckpt-\w+/d2pruner/keep0.1: method 'd2pruner' needs a calibrated"),
])
def test_sweep_refuses_bad_method_args_before_launching_any_cell(tmp_path, fake_launches, capsys, extra, shown):
    """Poor 14 (method args) and 15 (a budget contradicting the keep<ratio> folder)."""
    import re

    assert _sweep(tmp_path, *extra) == 2
    assert re.search(shown, capsys.readouterr().err)
    assert fake_launches() == 0 and not (tmp_path / "s").exists()


def test_sweep_refuses_a_corrupt_prior_and_an_unknown_task_before_launching(tmp_path, fake_launches, capsys,
                                                                           monkeypatch):
    """Poor 14 (tasks) and Bad 3 at the sweep: a prior is read before the first cell. lmms-eval's own task index
    (tens of seconds to build) is replaced by the folders given, to keep the test cheap."""
    import lmms_prune.sweep as sweep

    torch.save({"format": 1, "means": {16: -torch.ones(16)}}, tmp_path / "p.pt")
    prior = f"d2pruner:bias_prior={tmp_path / 'p.pt'}"
    assert _sweep(tmp_path, "--tasks", "pope_tiny", "--method-args", prior) == 2
    assert "d2pruner/keep0.1: bias_prior=" in capsys.readouterr().err
    real = sweep.task_names
    monkeypatch.setattr(sweep, "task_names", lambda paths, include_defaults: real(paths, False))
    assert _sweep(tmp_path, "--tasks", "pope_tny", "--methods", "fastv") == 2
    assert "--tasks: not lmms-eval tasks or groups: pope_tny (did you mean pope_tiny" in capsys.readouterr().err
    assert fake_launches() == 0


def test_a_failed_cells_status_has_no_terminal_codes(tmp_path):
    from lmms_prune.sweep import _last_error

    (tmp_path / "log.txt").write_text("\x1b[31m\x1b[1mERROR\x1b[0m | RuntimeError: \x1b[33mboom\x1b[0m\n")
    assert _last_error(tmp_path) == "ERROR | RuntimeError: boom"


@pytest.mark.parametrize(("extra", "shown"), [
    (["--methods", "fastv,fastvv"], r"--methods fastvv: unknown"),
    (["--keep", "0.1,1.5"], r"--methods fastv --keep 1.5: keep_ratio=1.5"),
    (["--keep", "abc"], r"--keep 'abc': write comma-separated numbers"),
    (["--tokens", "0"], r"--tokens 0: visual-token counts must be integers >= 1"),
    (["--method-args", '{"fastv": {"theta_sim": 0.5}}'], r"does not use theta_sim"),
    (["--method-args", '{"deepprune": {}}'], r"--method-args deepprune: not among --methods fastv"),
])
def test_bench_checks_its_plan_before_loading_the_model_or_timing_the_baseline(monkeypatch, tmp_path, capsys,
                                                                               extra, shown):
    """Poor 13."""
    import lmms_prune.bench as bench
    import lmms_prune.loading as loading
    from lmms_prune.cli.main import main

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may load or run before the plan is checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(bench, "build_geometry", refuse)
    assert main(["bench", "--model", "m", "--methods", "fastv", "--out", str(tmp_path), *extra]) == 1
    assert __import__("re").search(shown, capsys.readouterr().err)


def test_bench_plan_takes_a_keep_ratio_from_method_args_as_the_cells_do():
    """--method-args may set a method's keep_ratio (scripts/bench_readme.sh's matched-FLOPs table does): the plan
    check resolves each cell as Bench runs it, so the override is checked, not passed twice."""
    from lmms_prune.bench import Bench, check_plan

    check_plan(["fastv", "visionzip"], [0.25], [768], {"visionzip": {"keep_ratio": 0.3125}})
    assert Bench._params(None, "visionzip", 0.25, {"keep_ratio": 0.3125})["keep_ratio"] == 0.3125
    with pytest.raises(ValueError, match=r"--methods visionzip --keep 0.25: keep_ratio=1.5"):
        check_plan(["visionzip"], [0.25], [768], {"visionzip": {"keep_ratio": 1.5}})


def test_calibrate_refuses_zero_images(tmp_path, monkeypatch, capsys):
    """Poor 16: --num-images 0 used every image."""
    import lmms_prune.loading as loading
    from lmms_prune.calibration import list_images
    from lmms_prune.cli.main import main

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert main(["calibrate", "--model", "m", "--images", str(tmp_path), "--num-images", "0", "--layer", "1",
                 "--out", str(tmp_path / "p.pt")]) == 1
    assert "--num-images 0: must be an integer >= 1" in capsys.readouterr().err
    assert [p.name for p in list_images(tmp_path, 1)] == ["a.jpg"] and len(list_images(tmp_path)) == 2
