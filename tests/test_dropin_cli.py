"""The baseline is lmms-eval's: ``<family>_none`` answers exactly as lmms-eval's own wrapper of the family, per
sample, on the same tiny model, tasks and command line (only the model name and our options differ)."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import pytest
from cli_runs import cli_env, run_checked

from lmms_prune.toy.models import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "tasks"

# family: (lmms-eval's model, ours, tiny model, the shared --model_args, our extra --model_args)
# Shared: InternVL at 2 tiles (lmms-eval's key), Qwen on the CPU (lmms-eval's qwen2_5_vl sends inputs to cuda
# under its default device_map=auto). Ours: bfloat16 (lmms-eval's wrappers always load it; our auto is float32
# on the CPU) and use_until=false (lmms-eval's wrappers ignore the tasks' until; ours stop there by default).
CASES = {
    "internvl": ("internvl_hf", "internvl_none", "internvl_llama", "max_patches=2", "dtype=bfloat16,use_until=false"),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen2_5_vl_none", "qwen2_5_vl", "device_map=cpu",
                   "dtype=bfloat16,use_until=false"),
    # llava_hf: its default device_map="" is refused by transformers 5; its dtype=auto is the checkpoint's
    # (float32 here, as our auto on the CPU); it centre-crops (transformers' pipeline), ours pads to a square by
    # default (the original LLaVA's, as the papers ran it)
    "llava": ("llava_hf", "llava_none", "llava", "device_map=cpu", "use_until=false,image_aspect_ratio=crop"),
}


def _run(model: str, model_args: str, out: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--device", "cpu",
           "--tasks", "pope_tiny,mme_tiny", "--include_path", str(TASKS), "--limit", "4",
           "--gen_kwargs", "max_new_tokens=6", "--output_path", str(out), "--log_samples"]
    run_checked(cmd, cli_env(tmp_path))


def _samples(out: Path) -> dict[tuple[str, int], dict]:
    samples = {}
    for path in glob.glob(str(out / "*" / "*_samples_*.jsonl")):
        task = path.rsplit("_samples_", 1)[1][: -len(".jsonl")]
        for line in Path(path).read_text().splitlines():
            sample = json.loads(line)
            samples[(task, sample["doc_id"])] = sample
    return samples


@pytest.fixture(scope="module", params=list(CASES))
def both(request, tmp_path_factory):
    """(family, lmms-eval's output dir, ours) of the same command line with the two model names."""
    theirs, ours, tiny, shared, extra = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    model_args = f"pretrained={tiny_model_dir(tiny)},{shared}"
    _run(theirs, model_args, tmp / "theirs", tmp)
    _run(ours, f"{model_args},{extra}", tmp / "ours", tmp)
    return request.param, tmp / "theirs", tmp / "ours"


@pytest.mark.cli
def test_none_answers_exactly_as_lmms_eval_per_sample(both):
    _, theirs, ours = both
    a, b = _samples(theirs), _samples(ours)
    assert len(a) == 8 and set(a) == set(b)
    assert {k: s["filtered_resps"] for k, s in b.items()} == {k: s["filtered_resps"] for k, s in a.items()}
    assert len({json.dumps(s["filtered_resps"]) for s in a.values()}) > 1  # the answers do depend on the input
    for key, s in b.items():  # same generated-token counts; input tokens are the LLM's (none pruned here)
        assert s["token_counts"][0]["output_tokens"] == a[key]["token_counts"][0]["output_tokens"]
        pruning = s["token_counts"][0]["pruning"]
        assert s["token_counts"][0]["input_tokens"] == pruning["seq_len_after"] == pruning["seq_len_before"]


@pytest.mark.cli
def test_results_carry_throughput_efficiency_and_a_json_dated_like_them(both):
    _, _, ours = both
    results_files = glob.glob(str(ours / "*" / "*_results.json"))
    assert len(results_files) == 1
    results_file = Path(results_files[0])
    results = json.loads(results_file.read_text())
    samples = _samples(ours)
    throughput = results["throughput"]
    assert throughput["total_gen_tokens"] == sum(s["token_counts"][0]["output_tokens"] for s in samples.values())
    for key in ("visual_tokens_before", "visual_tokens_after", "llm_prefill_seconds", "prefill_flops_ratio",
                "kv_cache_bytes"):
        assert f"avg_{key}" in throughput
    assert throughput["avg_prefill_flops_ratio"] == 1.0  # method none
    overall = results["efficiency"]["overall"]
    assert overall["total_input_tokens"] == sum(s["token_counts"][0]["pruning"]["seq_len_after"]
                                                for s in samples.values())
    date = results_file.name[: -len("_results.json")]
    efficiency = results_file.parent / f"{date}_efficiency.json"
    report = json.loads(efficiency.read_text())
    assert report["summary"]["samples"] == 8
