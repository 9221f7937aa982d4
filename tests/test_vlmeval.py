"""VLMEvalKit layer (lmms_prune.harness.vlmeval, lmms-prune vlmeval) on the tiny InternVL model.

One VLMEvalKit run (its own run.py, its custom-MCQ TSV format with base64 images, its exact-matching scorer) of
``none`` and two pruned presets; the same samples through the lmms-eval wrapper give the same answers.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_prune.harness import vlmeval as harness
from lmms_prune.models.wrappers import InternVLPrune_fastv
from lmms_prune.presets import resolve_config
from lmms_prune.toy.models import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
DATASET = "TinyMCQ"
MODELS = ("internvl_none", "internvl_fastv", "internvl_deepprune")
PHOTOS = (("coffee", (300, 200), "B"), ("chelsea", (200, 300), "C"))
OPTIONS = ("a cup of coffee", "a cup on a table", "a cat")


def _tsv(root: Path) -> Path:
    """A VLMEvalKit image-MCQ TSV (index, base64 image, question, options A-C, answer, category)."""
    path = root / f"{DATASET}.tsv"
    rows = []
    for index, (photo, size, answer) in enumerate(PHOTOS):
        image = Image.fromarray(np.asarray(getattr(skimage.data, photo)())).resize(size)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append({"index": index, "image": base64.b64encode(buf.getvalue()).decode(),
                     "question": "What does the picture show?", "A": OPTIONS[0], "B": OPTIONS[1], "C": OPTIONS[2],
                     "answer": answer, "category": "toy"})
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _model_args() -> str:
    return f"pretrained={tiny_model_dir('internvl_llama')},max_num=2,device=cpu"


@pytest.fixture(scope="module")
def lmudata(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("LMUData")
    _tsv(root)
    return root


@pytest.fixture(scope="module")
def run(lmudata, tmp_path_factory):
    """One ``lmms-prune vlmeval`` run of the three models on the tiny dataset: (process, work dir)."""
    work = tmp_path_factory.mktemp("vlmeval_out")
    env = {**os.environ, "LMUData": str(lmudata), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lmms_prune.cli.main", "vlmeval", "--model", *MODELS, "--model-args", _model_args(),
           "--data", DATASET, "--work-dir", str(work), "--judge", "exact_matching", "--max-new-tokens", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=lmudata, env=env, timeout=600)
    return proc, work


def _predictions(work: Path, model: str) -> list[str]:
    from vlmeval.smp import load

    data = load(str(work / model / f"{model}_{DATASET}.xlsx"))
    return [str(p) for p in data.sort_values("index")["prediction"]]


def test_vlmeval_run_writes_scores_and_efficiency(run):
    proc, work = run
    assert proc.returncode == 0, proc.stderr[-4000:]
    for model in MODELS:
        assert harness.check_outputs(work, model, [DATASET]) == []
        status = json.loads((work / model / "status.json").read_text())["datasets"][DATASET]
        assert status["judge_model"] == "exact_matching" and status["metrics"]
        assert len(_predictions(work, model)) == len(PHOTOS)
        report = json.loads((work / model / f"{model}_{DATASET}_efficiency.json").read_text())
        method = model.removeprefix("internvl_")
        config = resolve_config(method)
        assert (report["harness"], report["dataset"], report["method"]) == ("vlmeval", DATASET, method)
        assert report["summary"]["samples"] == len(PHOTOS) == len(report["samples"])
        assert [r["images"] for r in report["samples"]] == [[f"{i}.png"] for i in range(len(PHOTOS))]
        for record in report["samples"]:
            assert record["task_kind"] == "understanding"
            tiles = len(record["visual_after_per_image"])
            assert tiles == 1 and record["visual_before"] > 0
            if method == "none":
                assert record["visual_after"] == record["visual_before"]
                assert record["prefill_flops"] == record["prefill_flops_unpruned"]
            else:
                expected = max(1, round(config.keep_ratio * record["visual_before"]))
                assert record["visual_after"] == expected
                assert record["prefill_flops"] < record["prefill_flops_unpruned"]
        summary = report["summary"]
        assert summary["visual_kept_ratio"] == pytest.approx(
            sum(r["visual_after"] for r in report["samples"]) / sum(r["visual_before"] for r in report["samples"]))


def _lmms_eval_answers(model, images: list[Image.Image], texts: list[str]) -> list[str]:
    docs = [{"image": im, "text": tx} for im, tx in zip(images, texts)]
    model.task_dict = {"tiny": {"test": docs}}

    def doc_to_messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": doc["text"]}]}]

    gen = {"max_new_tokens": 5, "temperature": 0}
    requests = [Instance("generate_until", ("", doc_to_messages, dict(gen), i, "tiny", "test"), idx=0,
                         metadata={"task": "tiny", "doc_id": i, "repeats": 1}) for i in range(len(docs))]
    return [r.text for r in model.generate_until(requests)]


def test_same_answers_through_both_harnesses(run, lmudata, monkeypatch):
    """VLMEvalKit's prompts (its own build_prompt) answered by its runner, by PrunedVLM directly and by the
    lmms-eval wrapper given the same messages: identical answers and identical pruning."""
    from vlmeval.dataset import build_dataset

    _, work = run
    monkeypatch.setenv("LMUData", str(lmudata))
    dataset = build_dataset(DATASET)
    messages = [dataset.build_prompt(dataset.data.iloc[i]) for i in range(len(dataset.data))]
    assert all([m["type"] for m in msg] == ["image", "text"] for msg in messages)
    images = [Image.open(msg[0]["value"]).convert("RGB") for msg in messages]
    texts = [msg[1]["value"] for msg in messages]

    vlm = harness.PrunedVLM("internvl_fastv", model_args=_model_args(), max_new_tokens=5)
    direct = [vlm.generate(msg, dataset=DATASET) for msg in messages]
    vlm_records = vlm.records[DATASET]
    vlm.finish()
    lmms = InternVLPrune_fastv(pretrained=str(tiny_model_dir("internvl_llama")), device="cpu", max_num=2)
    try:
        via_lmms_eval = _lmms_eval_answers(lmms, images, texts)
        lmms_records = lmms.records
    finally:
        lmms.handle.remove()
    assert direct == via_lmms_eval == _predictions(work, "internvl_fastv")
    for mine, theirs in zip(vlm_records, lmms_records):
        for key in ("visual_before", "visual_after", "visual_after_per_image", "seq_len_before", "seq_len_after",
                    "prefill_flops", "kv_cache_bytes", "output_tokens"):
            assert mine[key] == theirs[key], key


# ------------------------------------------------------------------------------------------- no model loaded
def test_model_names_and_options():
    assert harness.split_model_name("internvl_deepprune") == ("internvl", "deepprune")
    assert harness.split_model_name("qwen2_vl_fastv") == ("qwen2_vl", "fastv")
    assert harness.split_model_name("qwen2_5_vl_prune") == ("qwen2_5_vl", None)
    assert set(harness.model_names()) >= {"internvl_none", "llava_fastv", "qwen2_vl_prune"}
    with pytest.raises(ValueError, match="InternVL2-8B.*not a pruned model"):
        harness.split_model_name("InternVL2-8B")
    assert harness.parse_model_args(" keep_ratio=0.1, max_num=6 ,") == {"keep_ratio": "0.1", "max_num": "6"}
    engine = '{"max_model_len":2048,"limit_mm_per_prompt":{"image":1,"video":0}}'  # commas inside braces stay
    assert harness.parse_model_args(f"backend=vllm,vllm_engine_args={engine},keep_ratio=0.25") == {
        "backend": "vllm", "vllm_engine_args": engine, "keep_ratio": "0.25"}
    with pytest.raises(ValueError, match="'keep_ratio': expected key=value"):
        harness.parse_model_args("keep_ratio")
    with pytest.raises(ValueError, match="keep_ratio=1.5"):
        harness.validate("internvl_deepprune", "keep_ratio=1.5")
    with pytest.raises(ValueError, match="batch_size=2"):
        harness.validate("internvl_fastv", f"{_model_args()},batch_size=2")


def test_register_adds_entries(tmp_path):
    from vlmeval.config import supported_VLM

    assert not set(harness.model_names()) & set(supported_VLM)
    entries = harness.register(["internvl_fastv"], _model_args(), tmp_path)
    entry = supported_VLM["internvl_fastv"]
    assert entry is entries["internvl_fastv"] and entry.func is harness.PrunedVLM
    assert entry.keywords["model_args"].endswith(f"efficiency_path={tmp_path / 'internvl_fastv'}")
    with pytest.raises(ValueError, match="not a pruned model"):  # VLMEvalKit's own names are never shadowed
        harness.register([next(iter(supported_VLM))])


def test_messages_keep_order_and_refuse_video(tmp_path):
    paths = []
    for i, colour in enumerate(("red", "blue")):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 6), colour).convert("P").save(paths[-1])
    out = harness.to_runner_messages([
        {"type": "text", "value": "Be brief.", "role": "system"}, {"type": "image", "value": str(paths[0])},
        {"type": "text", "value": "and"}, {"type": "image", "value": str(paths[1])}, {"type": "text", "value": "?"}])
    assert [m["role"] for m in out] == ["system", "user"]
    assert out[0]["content"] == [{"type": "text", "text": "Be brief."}]
    user = out[1]["content"]
    assert [p["type"] for p in user] == ["image", "text", "image", "text"]
    assert [p["image"].mode for p in user[::2]] == ["RGB", "RGB"]
    assert [p["image"].getpixel((0, 0)) for p in user[::2]] == [(255, 0, 0), (0, 0, 255)]
    with pytest.raises(ValueError, match="'video'"):
        harness.to_runner_messages([{"type": "video", "value": "clip.mp4"}])


def test_check_outputs_reports_failed_combinations(tmp_path):
    """VLMEvalKit records a failed combination in status.json and exits 0: the launcher must read it."""
    from vlmeval.smp import upsert_dataset_status

    run_dir = tmp_path / "internvl_fastv"
    upsert_dataset_status(run_dir, "internvl_fastv", DATASET, status="done", error_message="CUDA out of memory")
    upsert_dataset_status(run_dir, "internvl_fastv", "Other", status="done", skip_reason="invalid_dataset")
    problems = harness.check_outputs(tmp_path, "internvl_fastv", [DATASET, "Other", "Missing"])
    text = "\n".join(problems)
    assert "TinyMCQ: failed: CUDA out of memory" in text and "Other: skipped (invalid_dataset)" in text
    assert "Missing: not in" in text and "no prediction file" in text and "no efficiency records" in text
    assert harness.check_outputs(tmp_path, "internvl_none", [DATASET]) == [
        f"internvl_none: no {tmp_path / 'internvl_none' / 'status.json'} (VLMEvalKit did not run this model)"]


def test_compare_refcoco_pairs_splits(tmp_path):
    """VLMEvalKit's RefCOCO score file (Precision@1 in %) next to an lmms-eval results file (fractions)."""
    scores = tmp_path / "m_RefCOCO_acc.csv"
    scores.write_text("Split,Precision@1,Average IoU,Samples\nRefCOCO_val,62.5,0.55,8\n"
                      "RefCOCO_testA,50.0,0.5,4\nAverage,56.25,0.525,12\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "results": {"refcoco_ground_val": {"acc@0.5,none": 0.5, "mean_iou,none": 0.45, "alias": "x"},
                    "refcocog_ground_val": {"acc@0.5,none": 0.25, "mean_iou,none": 0.2}},
        "n-samples": {"refcoco_ground_val": {"original": 10, "effective": 8}}}))
    rows = harness.compare_refcoco(scores, results)
    assert [(r["split"], r["lmms_eval_task"]) for r in rows] == [("RefCOCO_val", "refcoco_ground_val")]
    row = rows[0]
    assert (row["vlmeval_acc"], row["lmms_eval_acc"], row["vlmeval_n"], row["lmms_eval_n"]) == (0.625, 0.5, 8, 8)
    assert row["delta_acc"] == pytest.approx(0.125)
    table = harness.format_comparison(rows)
    assert "| RefCOCO_val | 62.50 | 50.00 | +12.50 | 0.5500 | 0.4500 | 8 / 8 |" in table
    results.write_text(json.dumps({"results": {"refcocog_ground_val": {"acc@0.5,none": 0.25}}}))
    with pytest.raises(ValueError, match="no RefCOCO split is in both"):
        harness.compare_refcoco(scores, results)
