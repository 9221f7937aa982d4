"""Our wrappers as drop-ins for lmms-eval's own (internvl_hf, qwen2_5_vl, llava_hf): their --model_args keys
and defaults, task protocol settings, stop strings that stop decoding, and results where lmms-eval puts them
(log_metrics, TokenCounts, --log_samples). No command line here: see tests/test_dropin_cli.py."""

from __future__ import annotations

import importlib
import inspect
import os
import time

import lmms_eval.models  # noqa: F401  (lmms-eval's model package first, as its CLI does)
import numpy as np
import pytest
import skimage.data
import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import Instance
from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history, summarize_logged_metrics
from PIL import Image

from lmms_prune.families import family_class
from lmms_prune.models.base import PrunedTokenCounts, results_date
from lmms_prune.models.wrappers import (
    InternVLPrune_deepprune,
    InternVLPrune_none,
    LlavaPrune_none,
    Qwen25VLPrune_none,
)
from lmms_prune.runner import PROTOCOL_KEY, protocol_options
from lmms_prune.toy.models import internvl_num_tiles, tiny_model_dir

REFCOCO_TEMPLATE = "lmms_prune/tasks/refcoco/_refcoco_ground_template.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------
# --model_args: every key of lmms-eval's wrapper, with its default
# ---------------------------------------------------------------------------------------------------------

LMMS_EVAL_WRAPPERS = {
    "internvl": (InternVLPrune_none, "lmms_eval.models.chat.internvl_hf", "InternVLHf"),
    "qwen2_5_vl": (Qwen25VLPrune_none, "lmms_eval.models.simple.qwen2_5_vl", "Qwen2_5_VL"),
    "llava": (LlavaPrune_none, "lmms_eval.models.simple.llava_hf", "LlavaHf"),
}

# Keys whose default differs on purpose (README "Drop-in for lmms-eval" table says why).
DIFFERENT_DEFAULTS = {
    "pretrained",  # our default checkpoints are the papers' (InternVL2.5-8B-MPO, Qwen2.5-VL-7B)
    "device",  # cuda if available else cpu (lmms-eval: cuda)
    "device_map",  # one device unless asked (lmms-eval: auto / ""), so multi-process runs work
    "attn_implementation",  # sdpa (lmms-eval: None = transformers' choice, also sdpa on these models)
    "dtype",  # auto = bfloat16 on GPU, float32 on CPU (llava_hf: the checkpoint's)
}


def _lmms_eval_defaults(module: str, name: str) -> dict:
    params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "kwargs")}


def _our_value(options, key: str):
    if key in options.family:
        return options.family[key]
    return getattr(options, key)


@pytest.mark.parametrize("family", list(LMMS_EVAL_WRAPPERS))
def test_every_lmms_eval_key_is_accepted_with_the_same_default(family):
    cls, module, name = LMMS_EVAL_WRAPPERS[family]
    defaults = _lmms_eval_defaults(module, name)
    ours, _ = cls.parse_model_args()
    for key, default in defaults.items():
        cls.parse_model_args(**({key: default} if default is not None else {key: "none"}))  # accepted
        if key in DIFFERENT_DEFAULTS:
            continue
        value = _our_value(ours, key)
        assert value == default or (default is None and value is None), f"{family}: {key}={value!r} vs {default!r}"


def test_max_num_is_max_patches_and_max_patches_wins():
    assert InternVLPrune_none.parse_model_args(max_num=4)[0].family["max_patches"] == 4
    assert InternVLPrune_none.parse_model_args(max_num=4, max_patches=3)[0].family["max_patches"] == 3
    with pytest.raises(ValueError, match=r"max_num=0: must be an integer >= 1"):
        InternVLPrune_none.parse_model_args(max_num=0)
    with pytest.raises(ValueError, match=r"min_patches=5 > max_patches=4"):
        InternVLPrune_none.parse_model_args(min_patches=5, max_patches=4)


@pytest.mark.parametrize(("cls", "args", "message"), [
    (InternVLPrune_none, {"fps": "fast"}, r"fps='fast': must be a number > 0"),
    (InternVLPrune_none, {"crop_to_patches": "maybe"}, r"crop_to_patches='maybe': must be true, false or auto"),
    (Qwen25VLPrune_none, {"interleave_visuals": "sometimes"}, r"interleave_visuals='sometimes': must be true or "),
    (Qwen25VLPrune_none, {"max_num_frames": 0}, r"max_num_frames=0: must be an integer >= 1"),
    (LlavaPrune_none, {"max_frames_num": -1}, r"max_frames_num=-1: must be an integer >= 1"),
    (LlavaPrune_none, {"use_cache": "perhaps"}, r"use_cache='perhaps': must be true or false"),
])
def test_video_and_flag_keys_are_validated(cls, args, message):
    with pytest.raises(ValueError, match=message):
        cls.parse_model_args(**args)


# --model_args of command lines in the style of lmms-eval's docs and model docstrings, one per family, with
# our model name swapped in (the checkpoint stays theirs: parsing loads nothing).
DOC_COMMAND_LINES = {
    "internvl_fastv": "pretrained=OpenGVLab/InternVL3_5-8B-HF,revision=main,min_patches=1,max_patches=12,"
                      "num_frames=32,trust_remote_code=False,use_cache=True,device_map=auto",
    "qwen2_5_vl_fastv": "pretrained=Qwen/Qwen2.5-VL-3B-Instruct,max_pixels=12845056,min_pixels=3136,"
                        "interleave_visuals=False,system_prompt=You are a helpful assistant.,max_num_frames=32",
    "llava_fastv": "pretrained=llava-hf/llava-1.5-7b-hf,revision=main,dtype=float16,trust_remote_code=False,"
                   "use_cache=True,max_frames_num=32",
}


@pytest.mark.parametrize("model", list(DOC_COMMAND_LINES))
def test_lmms_eval_command_lines_parse_with_our_model_names(model):
    from lmms_prune.models import registry

    module, name = registry.MODELS[model].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    args = lmms_utils.simple_parse_args_string(DOC_COMMAND_LINES[model])
    options, config = cls.parse_model_args(**args)
    assert config.method == "fastv"
    assert options.pretrained == args["pretrained"]


# ---------------------------------------------------------------------------------------------------------
# Protocol settings of a task (RefCOCO: InternVL's 6 tiles)
# ---------------------------------------------------------------------------------------------------------


def _refcoco_generation_kwargs() -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    with open(REFCOCO_TEMPLATE) as f:
        return yaml.load(f, Loader=Loader)["generation_kwargs"]


def test_refcoco_tasks_carry_internvl_6_tiles_and_leave_qwen_at_the_runs_pixel_bounds():
    gen = _refcoco_generation_kwargs()
    internvl = family_class("internvl")
    run = InternVLPrune_none.parse_model_args()[0].family
    assert run["max_patches"] == 12
    assert protocol_options(internvl, run, gen)["max_patches"] == 6
    assert protocol_options(internvl, run, {"max_new_tokens": 8}) is run  # other tasks: the run's options
    for name in ("qwen2_5_vl", "qwen2_vl"):  # boxes map back through each sample's recorded resize (box frame)
        fam = family_class(name)
        opts = fam.parse_model_args({"max_pixels": 50176})
        assert protocol_options(fam, opts, gen) is opts
    llava = family_class("llava")
    opts = llava.parse_model_args({})
    assert protocol_options(llava, opts, gen) is opts


def test_a_bad_protocol_setting_names_the_task_and_key():
    internvl = family_class("internvl")
    run = InternVLPrune_none.parse_model_args()[0].family
    with pytest.raises(ValueError, match=r"task 'refcoco_x': lmms_prune_protocol.internvl has unknown key\(s\) "
                                         r"tiles"):
        protocol_options(internvl, run, {PROTOCOL_KEY: {"internvl": {"tiles": 6}}}, "refcoco_x")
    with pytest.raises(ValueError, match=r"max_patches=0: must be an integer >= 1"):
        protocol_options(internvl, run, {PROTOCOL_KEY: {"internvl": {"max_patches": 0}}}, "refcoco_x")


BIG = (1800, 900)  # 8 tiles + thumbnail within 12, 2 + thumbnail within 6


def _doc_to_messages(doc: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                         {"type": "text", "text": doc["question"]}]}]


def _docs() -> list[dict]:
    photos = ("astronaut", "coffee")
    return [{"question": "Describe the picture.", "image": Image.fromarray(np.asarray(getattr(skimage.data, p)()))
             .resize(BIG if i == 0 else (300, 200))} for i, p in enumerate(photos)]


def _request(doc_id: int, task: str, **gen) -> Instance:
    gen = {"max_new_tokens": 4, "temperature": 0, **gen}
    return Instance("generate_until", ("", _doc_to_messages, gen, doc_id, task, "test"), idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def _set(model, **options) -> None:
    model.options = type(model.options)(**{**model.options.__dict__, **options})


@pytest.fixture(scope="module")
def internvl():
    """internvl_deepprune (keep_ratio 0.1) on the tiny InternVL with lmms-eval's default 12 tiles."""
    model = InternVLPrune_deepprune(pretrained=str(tiny_model_dir("internvl_llama")), device="cpu")
    model.task_dict = {task: {"test": _docs()} for task in ("pope_x", "refcoco_x")}
    yield model
    model.runner.close()


def test_one_run_gives_refcoco_6_tiles_and_other_tasks_12(internvl):
    start = len(internvl.records)
    gen = _refcoco_generation_kwargs()
    internvl.generate_until([_request(0, "pope_x"), _request(0, "refcoco_x", **gen), _request(0, "pope_x")])
    tokens = {r["task"]: r["visual_before"] for r in internvl.records[start:]}
    assert tokens["pope_x"] == 256 * internvl_num_tiles(*BIG, max_num=12) == 256 * 9
    assert tokens["refcoco_x"] == 256 * internvl_num_tiles(*BIG, max_num=6) == 256 * 3
    _set(internvl, task_protocol=False)
    try:
        internvl.generate_until([_request(0, "refcoco_x", **gen)])
    finally:
        _set(internvl, task_protocol=True)
    assert internvl.records[-1]["visual_before"] == 256 * 9  # task_protocol=false: the run's 12 tiles


# ---------------------------------------------------------------------------------------------------------
# Stop strings stop decoding; results where lmms-eval puts them
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    """qwen2_5_vl_none on the tiny Qwen2.5-VL (a real vocabulary: its answers decode to clean text)."""
    model = Qwen25VLPrune_none(pretrained=str(tiny_model_dir("qwen2_5_vl")), device="cpu")
    model.task_dict = {"pope_x": {"test": _docs()}}
    yield model
    model.runner.close()


def test_a_stop_string_ends_decoding_early_in_fewer_tokens(qwen):
    full = qwen.generate_until([_request(1, "pope_x", max_new_tokens=12)])[0]
    text = full.text
    assert full.token_counts.output_tokens == 12
    # a stop string inside the answer, past its start: two printable characters
    k = next(i for i in range(2, len(text) - 1) if text[i:i + 2].isprintable() and text[i:i + 2].isascii())
    stop = text[k:k + 2]
    cut = qwen.generate_until([_request(1, "pope_x", max_new_tokens=12, until=[stop])])[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.token_counts.output_tokens < full.token_counts.output_tokens
    _set(qwen, use_until=False)
    try:  # lmms-eval's own wrappers' behaviour: until ignored
        ignored = qwen.generate_until([_request(1, "pope_x", max_new_tokens=12, until=[stop])])[0]
    finally:
        _set(qwen, use_until=True)
    assert (ignored.text, ignored.token_counts.output_tokens) == (text, 12)


def test_token_counts_are_after_pruning_and_carry_the_record(internvl):
    result = internvl.generate_until([_request(1, "pope_x")])[0]
    record = internvl.records[-1]
    counts = result.token_counts
    assert isinstance(counts, PrunedTokenCounts)
    assert counts.input_tokens == record["seq_len_after"] < record["seq_len_before"]
    written = counts.to_dict()
    assert written["input_tokens"] == record["seq_len_after"]
    assert written["pruning"]["visual_after"] == record["visual_after"] < record["visual_before"]


def test_log_metrics_receives_our_figures(internvl):
    before = len(get_logged_metrics_history())
    internvl.generate_until([_request(0, "pope_x"), _request(1, "pope_x")])
    logged = get_logged_metrics_history()[before:]
    records = internvl.records[-2:]
    assert len(logged) == 1
    entry = logged[0]
    assert entry["total_gen_tokens"] == sum(r["output_tokens"] for r in records)
    assert entry["visual_tokens_before"] == sum(r["visual_before"] for r in records) / 2
    assert entry["visual_tokens_after"] == sum(r["visual_after"] for r in records) / 2
    flops = sum(r["prefill_flops"] for r in records) / sum(r["prefill_flops_unpruned"] for r in records)
    assert entry["prefill_flops_ratio"] == pytest.approx(flops) and 0 < flops < 1
    assert entry["kv_cache_bytes"] == sum(r["kv_cache_bytes"] for r in records) / 2
    assert entry["total_elapsed_time"] == pytest.approx(sum(r["generate_seconds"] for r in records))
    assert "avg_visual_tokens_after" in summarize_logged_metrics()


def test_results_date_is_that_of_this_runs_results_file(tmp_path):
    old = tmp_path / "20260101_000000_results.json"
    old.write_text("{}")
    os.utime(old, (time.time() - 100, time.time() - 100))
    since = time.time() - 10
    assert results_date(tmp_path, since) is None  # another run's file
    (tmp_path / "20261201_120000_results.json").write_text("{}")
    assert results_date(tmp_path, since) == "20261201_120000"
    assert results_date(tmp_path / "missing", since) is None
