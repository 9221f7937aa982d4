"""The lmms-eval wrappers of pruned VLMs: argument validation, generation on the tiny models, efficiency records,
and the lmms-eval command line (single process, ``accelerate launch``, two CPU processes)."""

from __future__ import annotations

import glob
import importlib
import json
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import lmms_eval.models  # noqa: F401  (lmms-eval's model package first, as its CLI does: no circular import)
import numpy as np
import pytest
import skimage.data
import torch
from cli_runs import cli_env as _env
from cli_runs import read_outputs as _outputs
from cli_runs import run_checked as _run
from lmms_eval.api.instance import Instance
from PIL import Image

from lmms_prune.efficiency import (
    INVOCATION_ENV,
    DecoderDims,
    host_id,
    identity_digest,
    kv_cache_bytes,
    pruned_prefill_flops,
)
from lmms_prune.fingerprint import package_versions
from lmms_prune.models import registry
from lmms_prune.models.base import PrunedChatModel, apply_until, lmms_eval_cli_options, summarize
from lmms_prune.models.wrappers import (
    InternVLPrune,
    InternVLPrune_d2pruner,
    InternVLPrune_deepprune,
    LlavaPrune,
    LlavaPrune_deepprune,
    Qwen3VLPrune,
    Qwen25VLPrune,
    Qwen25VLPrune_deepprune,
)
from lmms_prune.presets import PRESETS
from lmms_prune.toy.models import LLAVA_IMAGE_TOKENS, internvl_num_tiles, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "tasks"
DATA = REPO / "tests" / "data"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------
# --model_args parsing and validation (nothing is loaded)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "args", "message"),
    [
        (InternVLPrune, {"method": "nope"}, r"method='nope': unknown; choose one of none, fixed"),
        (InternVLPrune_deepprune, {"keep_ratio": 2}, r"keep_ratio=2: must be in \(0, 1\]"),
        (InternVLPrune_deepprune, {"keep_ratio": "2"}, r"keep_ratio=2.0: must be in \(0, 1\]"),
        (InternVLPrune_deepprune, {"foo": 1}, r"unknown --model_args key\(s\) foo\. Model options: .*max_num"),
        (InternVLPrune_d2pruner, {}, r"needs a calibrated attention prior: pass bias_prior=PATH.*lmms-prune calibrate"),
        (InternVLPrune, {}, r"needs method=NAME"),
        (InternVLPrune_deepprune, {"method": "fastv"}, r"runs method=deepprune; got method='fastv'.*internvl_prune"),
        (InternVLPrune_deepprune, {"max_num": 0}, r"max_num=0: must be an integer >= 1"),
        (InternVLPrune_deepprune, {"batch_size": "auto"}, r"batch_size='auto': automatic batch sizes"),
        (InternVLPrune_deepprune, {"dtype": "float8"}, r"dtype='float8': must be one of auto, bfloat16"),
        (InternVLPrune_deepprune, {"on_error": "ignore"}, r"on_error='ignore': must be one of raise, skip"),
        (InternVLPrune_deepprune, {"task_kind": "vqa"}, r"task_kind='vqa': must be one of auto, grounding"),
        (InternVLPrune_deepprune, {"prune_layer": "x"}, r"prune_layer='x': must be an integer"),
        (LlavaPrune_deepprune, {"max_num": 6}, r"unknown --model_args key\(s\) max_num"),
        (Qwen25VLPrune_deepprune, {"min_pixels": 8000, "max_pixels": 4000}, r"min_pixels=8000 > max_pixels=4000"),
    ],
)
def test_bad_model_args_raise_one_clear_value_error(cls, args, message):
    with pytest.raises(ValueError, match=message):
        cls.parse_model_args(**args)


def test_bad_model_args_fail_before_anything_is_loaded(monkeypatch):
    def no_loading(self):
        raise AssertionError("the model must not be loaded when --model_args are invalid")

    monkeypatch.setattr(PrunedChatModel, "_load", no_loading)
    with pytest.raises(ValueError, match="keep_ratio=2"):
        InternVLPrune_deepprune.create_from_arg_string("pretrained=/nowhere,keep_ratio=2", {"batch_size": 1})


def test_command_line_strings_are_parsed():
    options, config = InternVLPrune.parse_model_args(
        method="fastv", keep_ratio="0.25", prune_layer="3", max_num="4", batch_size="2", on_error="skip",
        task_kind="grounding", dtype="bf16")
    assert (config.method, config.keep_ratio, config.prune_layer, config.effective_score_layer) == ("fastv", 0.25, 3, 2)
    assert (options.family["max_patches"], options.batch_size, options.on_error, options.task_kind) == (
        4, 2, "skip", "grounding")
    assert options.pretrained == InternVLPrune.default_pretrained == "OpenGVLab/InternVL2_5-8B-MPO-hf"
    options, config = InternVLPrune_deepprune.parse_model_args(keep_tokens=32)
    # lmms-eval's internvl_hf default: 12 tiles (RefCOCO's 6 come with its tasks)
    assert (config.keep_tokens, config.keep_ratio, config.prune_layer, options.family["max_patches"]) == (32, None, 12,
                                                                                                       12)


def test_model_args_win_over_lmms_eval_defaults(monkeypatch):
    seen = {}

    def capture(self, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(InternVLPrune_deepprune, "__init__", capture)
    InternVLPrune_deepprune.create_from_arg_string("batch_size=2,max_num=3", {"batch_size": 1, "device": "cpu",
                                                                              "max_batch_size": None})
    assert seen == {"batch_size": 2, "max_num": 3, "device": "cpu"}


def test_every_family_and_preset_is_registered_as_a_chat_model():
    for family in ("internvl", "qwen2_5_vl", "llava"):
        ids = [f"{family}_prune"] + [f"{family}_{preset}" for preset in PRESETS]
        for model_id in ids:
            module, name = registry.MODELS[model_id].rsplit(".", 1)
            cls = getattr(importlib.import_module(module), name)
            assert issubclass(cls, PrunedChatModel) and cls.is_simple is False
            assert cls.model_id() == model_id
            assert cls.fixed_method == (None if model_id.endswith("_prune") else model_id[len(family) + 1:])
    assert {m.model_id for m in registry.manifests()} >= {"internvl_deepprune", "llava_none", "qwen2_5_vl_prune"}


def test_registry_module_stays_light():
    # lmms-eval imports its model package first, then calls the entry point.
    code = ("import sys, lmms_eval.models, lmms_prune.models.registry as r; r.manifests(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_output_path_is_read_from_the_command_line_or_a_config_file(tmp_path):
    argv = ["--model", "m", "--model_args", "pretrained=/a/b", "--tasks", "pope", "--output_path", "/out"]
    assert lmms_eval_cli_options(argv) == {"output_path": "/out", "model_args": "pretrained=/a/b"}
    config = tmp_path / "run.yaml"
    config.write_text("model: m\nmodel_args: pretrained=/x/y,method=fastv\noutput_path: /logs\n")
    assert lmms_eval_cli_options(["--config", str(config)]) == {"output_path": "/logs", "model_args":
                                                       "pretrained=/x/y,method=fastv"}
    assert lmms_eval_cli_options(["--config", str(config), "--output_path", "/cli"])["output_path"] == "/cli"
    assert lmms_eval_cli_options(["--tasks", "pope"]) == {"output_path": None, "model_args": None}


def test_until_cuts_at_the_earliest_stop_string():
    assert apply_until("yes.\n\nno", ["\n\n"]) == "yes."
    assert apply_until("abcXdefYg", ["Y", "X"]) == "abc"
    assert apply_until("abc", []) == "abc"


def test_summary_ratios_are_ratios_of_totals():
    rec = dict.fromkeys(("seq_len_before", "seq_len_after", "llm_prefill_seconds", "select_seconds",
                         "decode_seconds", "end_to_end_seconds", "output_tokens"), 1.0)
    records = [dict(rec, visual_before=100, visual_after=10, prefill_flops=50, prefill_flops_unpruned=100,
                    kv_cache_bytes=3, kv_cache_bytes_unpruned=4),
               dict(rec, visual_before=300, visual_after=30, prefill_flops=50, prefill_flops_unpruned=300,
                    kv_cache_bytes=1, kv_cache_bytes_unpruned=4)]
    s = summarize(records, skipped=2)
    assert (s["samples"], s["skipped"], s["mean_visual_before"]) == (2, 2, 200.0)
    assert (s["visual_kept_ratio"], s["prefill_flops_ratio"], s["kv_cache_ratio"]) == (0.1, 0.25, 0.5)


# ---------------------------------------------------------------------------------------------------------
# generate_until on the tiny models (no command line)
# ---------------------------------------------------------------------------------------------------------

IMAGE_SIZES = ((300, 200), (500, 250), (200, 300))


def _docs() -> list[dict]:
    photos = ("coffee", "astronaut", "chelsea")
    questions = ("Is there a cup?", "What is this picture about? Describe it.", "Count the cats.")
    docs = [{"question": q, "image": Image.fromarray(np.asarray(getattr(skimage.data, p)())).resize(size)}
            for p, q, size in zip(photos, questions, IMAGE_SIZES)]
    docs.append({"question": "Describe the video.", "video": "clip.mp4"})  # a video file that does not exist: fails
    return docs


def _doc_to_messages(doc: dict) -> list[dict]:
    visual = {"type": "video", "url": doc["video"]} if "video" in doc else {"type": "image", "url": doc["image"]}
    return [{"role": "user", "content": [visual, {"type": "text", "text": doc["question"]}]}]


def _requests(doc_ids, task="tiny", **gen_kwargs) -> list[Instance]:
    gen = {"max_new_tokens": 5, "temperature": 0, **gen_kwargs}
    return [Instance("generate_until", ("", _doc_to_messages, dict(gen), i, task, "test"), idx=0,
                     metadata={"task": task, "doc_id": i, "repeats": 1}) for i in doc_ids]


def _texts(model: PrunedChatModel, requests: list[Instance]) -> list[str]:
    return [r.text for r in model.generate_until(requests)]


def _set(model: PrunedChatModel, **options) -> None:
    model.options = type(model.options)(**{**model.options.__dict__, **options})


FAMILIES = {
    "internvl_llama": (InternVLPrune_deepprune, {"max_num": 2}),
    "internvl_qwen2": (InternVLPrune_deepprune, {"max_num": 2}),
    "qwen2_5_vl": (Qwen25VLPrune_deepprune, {}),
    "llava": (LlavaPrune_deepprune, {}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def wrapper(request):
    """(family, a deepprune wrapper at keep_ratio=0.1 on the tiny model, with a task of four documents)."""
    cls, extra = FAMILIES[request.param]
    model = cls(pretrained=str(tiny_model_dir(request.param)), device="cpu", **extra)
    model.task_dict = {"tiny": {"test": _docs()}, "refcoco_tiny": {"test": _docs()}}
    yield request.param, model
    model.handle.remove()


def test_results_come_back_in_request_order(wrapper):
    _, model = wrapper
    # Different gen_kwargs interleaved: the wrapper groups them, the answers must still line up.
    requests = [*_requests([2]), *_requests([0], max_new_tokens=3), *_requests([1])]
    together = _texts(model, requests)
    alone = [_texts(model, [r])[0] for r in requests]
    assert together == alone
    assert len(set(_texts(model, _requests([0, 1, 2])))) > 1  # the documents really get different answers


COST_FIELDS = ("visual_before", "visual_after", "seq_len_before", "seq_len_after", "prefill_flops", "kv_cache_bytes")


def test_batch_of_two_equals_batch_of_one(wrapper):
    _, model = wrapper
    start = len(model.records)
    one = _texts(model, _requests([0, 1, 2]))
    _set(model, batch_size=2)
    try:
        two = _texts(model, _requests([0, 1, 2]))
    finally:
        _set(model, batch_size=1)
    assert two == one
    rec_one, rec_two = model.records[start:start + 3], model.records[start + 3:]
    assert [r["batch_size"] for r in rec_two] == [2, 2, 1]
    # left padding is not counted: every sample costs the same in a batch as alone
    assert [[r[f] for f in COST_FIELDS] for r in rec_two] == [[r[f] for f in COST_FIELDS] for r in rec_one]


def test_until_is_applied_to_the_answer(wrapper):
    _, model = wrapper
    full = _texts(model, _requests([1], max_new_tokens=8))[0]
    stop = full[3:5]
    assert len(stop) == 2
    cut = _texts(model, _requests([1], max_new_tokens=8, until=["\n\n", stop]))[0]
    assert cut == full[: full.index(stop)]


def _expected_visual_tokens(family: str, model: PrunedChatModel, doc_id: int) -> int:
    w, h = IMAGE_SIZES[doc_id]
    if family.startswith("internvl"):
        return 256 * internvl_num_tiles(w, h, max_num=2)
    if family == "llava":
        return LLAVA_IMAGE_TOKENS
    image = model.family_class().prepare_images([model.task_dict["tiny"]["test"][doc_id]["image"]],
                                                model.options.family)  # Qwen's pipeline: qwen_vl_utils first
    t, gh, gw = model.processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    return t * gh * gw // 4


def test_efficiency_records_are_consistent(wrapper):
    family, model = wrapper
    start = len(model.records)
    _texts(model, _requests([0, 1, 2]))
    records = model.records[start:]
    dims = DecoderDims.from_config(model.handle.adapter.text_config)
    assert [(r["task"], r["doc_id"]) for r in records] == [("tiny", 0), ("tiny", 1), ("tiny", 2)]
    for r in records:
        n = _expected_visual_tokens(family, model, r["doc_id"])
        assert r["visual_before"] == n
        assert r["visual_after"] == max(1, round(0.1 * n)) == sum(r["visual_after_per_image"])
        assert r["seq_len_after"] == r["seq_len_before"] - r["visual_before"] + r["visual_after"]
        assert r["prefill_flops"] == pruned_prefill_flops(dims, r["seq_len_before"], r["seq_len_after"], 12)
        assert r["prefill_flops_unpruned"] == pruned_prefill_flops(dims, r["seq_len_before"], 0, dims.num_layers)
        assert r["prefill_flops"] < r["prefill_flops_unpruned"]
        layers = [r["seq_len_before"]] * 12 + [r["seq_len_after"]] * (dims.num_layers - 12)
        assert r["kv_cache_bytes"] == kv_cache_bytes(dims, layers, bytes_per_element=4)  # float32 on CPU
        assert r["kv_cache_bytes_unpruned"] == kv_cache_bytes(dims, [r["seq_len_before"]] * dims.num_layers, 4)
        assert 0 < r["llm_prefill_seconds"] < r["end_to_end_seconds"]
        assert 0 < r["select_seconds"] < r["llm_prefill_seconds"]
        assert 0 < r["decode_seconds"] < r["end_to_end_seconds"]
        assert 1 <= r["output_tokens"] <= 5
        # where the time to first token goes: phases in order, inside the request
        assert r["preprocess_seconds"] > 0 and r["vision_seconds"] > 0 and r["handover_seconds"] >= 0
        assert (r["preprocess_seconds"] + r["vision_seconds"] + r["handover_seconds"] < r["ttft_seconds"]
                < r["end_to_end_seconds"])
        assert r["batch_vision_flops"] > 0
    summary = summarize(records)
    assert summary["mean_ttft_seconds"] > summary["mean_vision_seconds"] > 0
    # the vision tower is not pruned: the whole request's FLOPs shrink less than the prefill's
    assert summary["prefill_flops_ratio"] < summary["end_to_end_flops_ratio"] < 1


def test_rank_padding_duplicates_are_answered_but_not_counted(wrapper):
    _, model = wrapper
    start = len(model.records)
    pad = _requests([1])[0]
    pad.metadata["__padding_only__"] = True  # what lmms-eval adds to even out the ranks' request counts
    texts = _texts(model, [*_requests([1]), pad])
    assert texts[0] == texts[1]
    assert [r["doc_id"] for r in model.records[start:]] == [1]


def test_task_kind_auto_means_grounding_for_refcoco(wrapper):
    _, model = wrapper
    _texts(model, _requests([0], task="refcoco_tiny"))
    assert model.handle.task_kind == "grounding"
    _texts(model, _requests([0]))
    assert model.handle.task_kind == "understanding"


def test_a_failing_sample_stops_the_run_naming_task_and_doc(wrapper):
    _, model = wrapper
    # video families: the missing file (lmms_prune.video.VideoLoadError); others: no video input at all
    with pytest.raises(RuntimeError, match=r"generation failed on task 'tiny', doc_id 3: (VideoLoadError: sample "
                                           r"'tiny/3': video 'clip.mp4' cannot be used: no such file|ValueError: "
                                           r"video inputs are not supported)"):
        model.generate_until(_requests([0, 3, 1]))


def test_on_error_skip_counts_and_reports_skipped_samples(wrapper, tmp_path, monkeypatch):
    _, model = wrapper
    monkeypatch.setenv(INVOCATION_ENV, "sweep-42")
    _set(model, on_error="skip", batch_size=2, efficiency_path=str(tmp_path / "eff.json"))
    model.records, model.skipped, model._finished = [], [], False
    try:
        texts = _texts(model, _requests([0, 3, 1]))
    finally:
        _set(model, on_error="raise", batch_size=1)
    assert texts[1] == "" and texts[0] == _texts(model, _requests([0]))[0]
    assert texts[2] == _texts(model, _requests([1]))[0]
    model.records = model.records[:2]  # the two reference answers above are not part of this "run"
    report = model.finish()
    written = json.loads((tmp_path / "eff.json").read_text())
    assert written["summary"] == report["summary"]
    assert (written["summary"]["samples"], written["summary"]["skipped"]) == (2, 1)
    assert written["skipped"][0]["doc_id"] == 3 and "video" in written["skipped"][0]["error"]
    assert [s["doc_id"] for s in written["samples"]] == [0, 1]
    assert written["method"] == "deepprune" and written["config"]["prune_layer"] == 12
    # the run's identity, for leaderboard bundles: recorded by this process, bound by a digest
    assert written["versions"] == package_versions() and written["model_type"] == model.model.config.model_type
    assert written["measured_with"] == {"invocation": "sweep-42", "host": host_id()}
    assert written["hardware"]["device"] == "cpu" and written["revision"] == "main"
    assert written["identity_digest"] == identity_digest(written)


def test_method_none_keeps_every_token():
    model = InternVLPrune.create_from_arg_string(f"pretrained={tiny_model_dir('internvl_llama')},method=none,"
                                                 "max_num=2,device=cpu")
    model.task_dict = {"tiny": {"test": _docs()}}
    _texts(model, _requests([0, 1]))
    for r in model.records:
        assert r["visual_after"] == r["visual_before"] and r["seq_len_after"] == r["seq_len_before"]
        assert r["prefill_flops"] == r["prefill_flops_unpruned"]
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_unpruned"]
    model.clean()


@pytest.mark.parametrize(("family", "method"), [("internvl_llama", "vispruner"), ("llava", "vispruner"),
                                                ("qwen2_5_vl", "divprune"), ("qwen3_vl", "vispruner")])
def test_pre_llm_methods_run_through_the_wrapper(family, method):
    cls = {"internvl_llama": InternVLPrune, "llava": LlavaPrune, "qwen2_5_vl": Qwen25VLPrune,
           "qwen3_vl": Qwen3VLPrune}[family]
    extra = ",max_num=2" if family.startswith("internvl") else ""
    model = cls.create_from_arg_string(f"pretrained={tiny_model_dir(family)},method={method},keep_ratio=0.1,"
                                       f"device=cpu{extra}")
    model.task_dict = {"tiny": {"test": _docs()}}
    single = _texts(model, _requests([0, 1]))
    _set(model, batch_size=2)
    assert _texts(model, _requests([0, 1])) == single
    for r in model.records:
        assert r["visual_after"] == max(1, round(0.1 * r["visual_before"]))
        assert r["seq_len_after"] == r["seq_len_before"] - r["visual_before"] + r["visual_after"]
        assert r["prefill_flops"] < r["prefill_flops_unpruned"] and r["llm_prefill_seconds"] > 0
    model.clean()


def test_a_missing_device_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(PrunedChatModel, "_load", lambda self: pytest.fail("must not load"))
    with pytest.raises(ValueError, match=r"device='cuda:1': CUDA is not available here; use device=cpu"):
        InternVLPrune_deepprune(pretrained=str(tiny_model_dir("internvl_llama")), device="cuda:1")
    with pytest.raises(ValueError, match=r"device='gpu0': not a torch device"):
        InternVLPrune_deepprune(pretrained=str(tiny_model_dir("internvl_llama")), device="gpu0")


def test_a_checkpoint_of_another_family_is_refused():
    with pytest.raises(ValueError, match=r"is a 'llava' checkpoint, but --model internvl_deepprune runs internvl"):
        InternVLPrune_deepprune(pretrained=str(tiny_model_dir("llava")), device="cpu")


# ---------------------------------------------------------------------------------------------------------
# The lmms-eval command line (slow: about 20-40 s per run)
# ---------------------------------------------------------------------------------------------------------


def _lmms_eval_args(model: str, family: str, tasks: str, out: Path, extra: str = "") -> list[str]:
    model_args = f"pretrained={tiny_model_dir(family)}" + (",max_num=2" if family.startswith("internvl") else "")
    return ["--model", model, "--model_args", model_args + extra, "--tasks", tasks, "--include_path", str(TASKS),
            "--limit", "4", "--gen_kwargs", "max_new_tokens=6", "--output_path", str(out), "--log_samples"]


def _check_efficiency(report: dict, tasks: tuple[str, ...]) -> None:
    assert [(s["task"], s["doc_id"]) for s in report["samples"]] == [(t, i) for t in sorted(tasks) for i in range(4)]
    summary = report["summary"]
    assert summary["samples"] == 4 * len(tasks) and summary["skipped"] == 0
    assert 0 < summary["prefill_flops_ratio"] < 1 and 0 < summary["kv_cache_ratio"] < 1
    for s in report["samples"]:
        assert s["visual_after"] == max(1, round(0.1 * s["visual_before"]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _tiny_eval_data():
    """The POPE and MME copies the task YAMLs read (committed; rebuilt here if missing)."""
    if not all((DATA / f"{name}_tiny.parquet").is_file() for name in ("pope", "mme")):
        runpy.run_path(str(DATA / "make_tiny_eval_data.py"))["main"]()


@pytest.fixture(scope="module")
def internvl_one_process(tmp_path_factory):
    """``python -m lmms_eval --model internvl_deepprune`` on the POPE and MME copies, one process."""
    tmp = tmp_path_factory.mktemp("one_process")
    args = _lmms_eval_args("internvl_deepprune", "internvl_llama", "pope_tiny,mme_tiny", tmp / "out")
    done = _run([sys.executable, "-m", "lmms_eval", *args], _env(tmp))
    return done, _outputs(tmp / "out")


@pytest.mark.cli
def test_cli_internvl_pope_and_mme_produce_their_metrics_and_efficiency(internvl_one_process):
    done, (metrics, answers, report) = internvl_one_process
    assert set(metrics["pope_tiny"]) >= {f"{m},none" for m in ("pope_accuracy", "pope_precision", "pope_recall",
                                                               "pope_f1_score", "pope_yes_ratio")}
    assert metrics["pope_tiny"]["pope_yes_ratio,none"] == 0.5  # two yes and two no answers among docs 0-3
    assert "mme_perception_score,none" in metrics["mme_tiny"]
    assert len(answers) == 8
    _check_efficiency(report, ("pope_tiny", "mme_tiny"))
    assert "internvl_deepprune efficiency over 8 samples (0 skipped)" in done.stdout + done.stderr
    # lmms-eval's own places: results["throughput"] (log_metrics) and the samples' token_counts
    output_path = Path(done.args[done.args.index("--output_path") + 1])
    out = Path(glob.glob(str(output_path / "*" / "*_results.json"))[0])
    throughput = json.loads(out.read_text())["throughput"]
    assert 0 < throughput["avg_prefill_flops_ratio"] < 1
    assert throughput["avg_visual_tokens_after"] < throughput["avg_visual_tokens_before"]
    for path in glob.glob(str(out.parent / "*_samples_*.jsonl")):
        for line in Path(path).read_text().splitlines():
            counts = json.loads(line)["token_counts"][0]
            assert counts["input_tokens"] == counts["pruning"]["seq_len_after"] < counts["pruning"]["seq_len_before"]


@pytest.mark.cli
def test_cli_two_cpu_processes_equal_one_process(internvl_one_process, tmp_path):
    _, (metrics1, answers1, report1) = internvl_one_process
    env = dict(_env(tmp_path), ACCELERATE_USE_CPU="1")
    args = _lmms_eval_args("internvl_deepprune", "internvl_llama", "pope_tiny,mme_tiny", tmp_path / "out")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(_free_port()), "-m", "lmms_eval", *args], env)
    metrics2, answers2, report2 = _outputs(tmp_path / "out")
    assert answers2 == answers1
    assert metrics2 == metrics1
    assert report2["world_size"] == 2
    _check_efficiency(report2, ("pope_tiny", "mme_tiny"))
    assert ([[s[f] for f in COST_FIELDS] for s in report2["samples"]]
            == [[s[f] for f in COST_FIELDS] for s in report1["samples"]])


@pytest.mark.cli
def test_cli_accelerate_launch_qwen2_5_vl(tmp_path):
    args = _lmms_eval_args("qwen2_5_vl_deepprune", "qwen2_5_vl", "pope_tiny", tmp_path / "out")
    _run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "-m", "lmms_eval",
          *args], _env(tmp_path))
    metrics, answers, report = _outputs(tmp_path / "out")
    assert "pope_accuracy,none" in metrics["pope_tiny"] and len(answers) == 4
    _check_efficiency(report, ("pope_tiny",))


@pytest.mark.cli
def test_cli_llava_mme(tmp_path):
    args = _lmms_eval_args("llava_prune", "llava", "mme_tiny", tmp_path / "out", ",method=fastv,keep_ratio=0.1")
    _run([sys.executable, "-m", "lmms_eval", *args], _env(tmp_path))
    metrics, answers, report = _outputs(tmp_path / "out")
    assert "mme_perception_score,none" in metrics["mme_tiny"] and len(answers) == 4
    assert report["method"] == "fastv"
    _check_efficiency(report, ("mme_tiny",))


@pytest.mark.cli
def test_cli_bad_model_args_end_with_one_clear_message(tmp_path):
    args = _lmms_eval_args("internvl_deepprune", "internvl_llama", "pope_tiny", tmp_path / "out", ",keep_ratio=2")
    done = subprocess.run([sys.executable, "-m", "lmms_eval", *args], env=_env(tmp_path), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert "ValueError: keep_ratio=2: must be in (0, 1]" in log
    assert "Loading weights" not in log  # stopped before loading anything
    assert not (tmp_path / "out").exists()
