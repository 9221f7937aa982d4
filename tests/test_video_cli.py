"""The tiny video task (``lmms_prune/tasks/tinyvideo``, VideoMME's schema, on the clips in ``tests/data/tinyvideo``) through the lmms-eval command line, with
video pruning and efficiency records (issue 21)."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_prune.toy.models import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "tinyvideo"
CLIP_FRAMES, CLIPS = 8, 4  # tests/data/tinyvideo: four 8-frame 64x64 clips


def _qwen_tokens() -> int:
    # min_pixels = max_pixels = 112 * 112: each frame becomes 112x112, (112/28)^2 merged tokens per two frames
    return CLIP_FRAMES // 2 * (112 // 28) ** 2


def _onevision_tokens() -> int:
    # one SigLIP grid per frame, 2x2-pooled (ceil), the newline after the video is structural (not counted)
    vision = json.loads((tiny_model_dir("llava_onevision") / "config.json").read_text())["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    return CLIP_FRAMES * math.ceil(side / 2) ** 2


QWEN_PIXELS = "min_pixels=12544,max_pixels=12544"
RUNS = {  # model: (family, extra --model_args, visual tokens of one clip, whether the first clip is broken)
    "qwen2_5_vl_fastv": ("qwen2_5_vl", QWEN_PIXELS, _qwen_tokens, False),
    "qwen2_5_vl_temporal": ("qwen2_5_vl", QWEN_PIXELS + ",on_error=skip", _qwen_tokens, True),
    "llava_onevision_vispruner": ("llava_onevision", f"max_frames_num={CLIP_FRAMES}", _onevision_tokens, False),
}


def _data_with_a_broken_first_clip(folder: Path) -> tuple[Path, str]:
    folder.mkdir()
    for clip in [*DATA.glob("*.mp4"), DATA / "tinyvideo.jsonl"]:  # the task reads its rows from the folder too
        (folder / clip.name).write_bytes(clip.read_bytes())
    first = json.loads((DATA / "tinyvideo.jsonl").read_text().splitlines()[0])["videoID"]
    (folder / f"{first}.mp4").write_bytes(b"not an mp4")
    return folder, first


@pytest.mark.cli
@pytest.mark.parametrize("model", list(RUNS))
def test_video_task_runs_through_the_cli_with_pruned_video_and_efficiency_records(tmp_path, model):
    family, extra, tokens, broken = RUNS[model]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "hf"), LMMS_PRUNE_TINYVIDEO_DIR=str(DATA))
    if broken:  # on_error=skip: the sample is skipped by the wrapper and counted by the task, the run goes on
        env["LMMS_PRUNE_TINYVIDEO_DIR"] = str(_data_with_a_broken_first_clip(tmp_path / "clips")[0])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args",
           f"pretrained={tiny_model_dir(family)},keep_ratio=0.1,{extra}", "--tasks", "tinyvideo",
           "--limit", str(CLIPS), "--gen_kwargs",
           "max_new_tokens=4", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = glob.glob(str(out / "*" / "*_results.json"))
    efficiency = glob.glob(str(out / "*" / "*_efficiency.json"))
    assert len(results) == 1 and len(efficiency) == 1, done.stderr[-3000:]
    metrics = json.loads(Path(results[0]).read_text())["results"]["tinyvideo"]
    score, malformed, errors = (metrics[f"{m},none"] for m in ("tinyvideo_perception_score", "malformed",
                                                               "video_errors"))
    assert 0 <= score <= 100 * (CLIPS - broken) / CLIPS and errors == int(broken)
    assert 0 <= malformed <= CLIPS - broken
    report = json.loads(Path(efficiency[0]).read_text())
    assert report["model"] == model
    assert (report["summary"]["samples"], report["summary"]["skipped"]) == (CLIPS - broken, int(broken))
    if broken:
        assert report["skipped"][0]["doc_id"] == 0 and "VideoLoadError" in report["skipped"][0]["error"]
    for sample in report["samples"]:
        assert sample["visual_before"] == tokens()  # the whole video is one span of its frames' tokens
        assert sample["visual_after"] == max(1, round(0.1 * sample["visual_before"]))
        assert sample["visual_after_per_image"] == [sample["visual_after"]]
        assert sample["prefill_flops"] < sample["prefill_flops_unpruned"]
        assert sample["kv_cache_bytes"] < sample["kv_cache_bytes_unpruned"]
    logged = [json.loads(line) for f in glob.glob(str(out / "*" / "*_samples_tinyvideo.jsonl"))
              for line in Path(f).read_text().splitlines()]
    assert len(logged) == CLIPS


@pytest.mark.cli
def test_evs_runs_tinyvideo_through_the_cli_on_qwen_and_onevision(tmp_path):
    """``--model qwen2_5_vl_evs`` and ``llava_onevision_evs``: each clip keeps vLLM's count of its video tokens
    (``max(one frame, int(N * keep_ratio))``, here half), scored by the task."""
    from cli_runs import run_lmms_eval

    for model, family, extra, tokens in (("qwen2_5_vl_evs", "qwen2_5_vl", QWEN_PIXELS, _qwen_tokens),
                                         ("llava_onevision_evs", "llava_onevision", f"max_frames_num={CLIP_FRAMES}",
                                          _onevision_tokens)):
        run = run_lmms_eval(tmp_path / model, model, f"pretrained={tiny_model_dir(family)},keep_ratio=0.5,{extra}",
                            tasks="tinyvideo", limit=1)
        assert 0 <= run.metrics["tinyvideo"]["tinyvideo_perception_score,none"] <= 100
        assert run.efficiency["model"] == model and run.efficiency["summary"]["samples"] == 1
        for sample in run.efficiency["samples"]:
            assert sample["visual_before"] == tokens()
            assert sample["visual_after"] == tokens() // 2
            assert sample["prefill_flops"] < sample["prefill_flops_unpruned"]


@pytest.mark.cli
def test_vidcom2_and_fastvid_run_tinyvideo_through_the_cli_on_qwen(tmp_path):
    """``--model qwen2_5_vl_vidcom2`` (vLLM's exact count: ``int(N * keep_ratio)`` of each clip's tokens) and
    ``qwen2_5_vl_fastvid`` (at most ``int(P * keep_ratio)`` per merged frame); ``llava_onevision_vidcom2`` and
    ``llava_onevision_fastvid`` run in tests/test_video_demo.py through the video demo's sweep."""
    from cli_runs import run_lmms_eval

    frames, per_frame = CLIP_FRAMES // 2, _qwen_tokens() // (CLIP_FRAMES // 2)
    for model, extra, most in (("qwen2_5_vl_vidcom2", ",vidcom2_count=vllm", int(_qwen_tokens() * 0.5)),
                               ("qwen2_5_vl_fastvid", "", frames * int(per_frame * 0.5))):
        run = run_lmms_eval(tmp_path / model, model,
                            f"pretrained={tiny_model_dir('qwen2_5_vl')},keep_ratio=0.5,{QWEN_PIXELS}{extra}",
                            tasks="tinyvideo", limit=1)
        assert 0 <= run.metrics["tinyvideo"]["tinyvideo_perception_score,none"] <= 100
        assert run.efficiency["model"] == model and run.efficiency["summary"]["samples"] == 1
        [sample] = run.efficiency["samples"]
        assert sample["visual_before"] == _qwen_tokens()
        assert (sample["visual_after"] == most) if model.endswith("vidcom2") else (0 < sample["visual_after"] <= most)
        assert sample["prefill_flops"] < sample["prefill_flops_unpruned"]


@pytest.mark.cli
def test_dycoke_runs_tinyvideo_through_the_cli_on_qwen_and_onevision(tmp_path):
    """``--model qwen2_5_vl_dycoke`` and ``llava_onevision_dycoke``: each clip keeps DyCoke's TTM count (frames
    4j whole, the others ``int((1 - K) T)`` tokens; ``dycoke_k`` set on the command line), scored by the task."""
    from cli_runs import run_lmms_eval

    from lmms_prune.selection import ttm_count

    for model, family, extra, frames in (("qwen2_5_vl_dycoke", "qwen2_5_vl", QWEN_PIXELS, CLIP_FRAMES // 2),
                                         ("llava_onevision_dycoke", "llava_onevision",
                                          f"max_frames_num={CLIP_FRAMES}", CLIP_FRAMES)):
        run = run_lmms_eval(tmp_path / model, model, f"pretrained={tiny_model_dir(family)},dycoke_k=0.5,{extra}",
                            tasks="tinyvideo", limit=1)
        assert 0 <= run.metrics["tinyvideo"]["tinyvideo_perception_score,none"] <= 100
        assert run.efficiency["model"] == model and run.efficiency["summary"]["samples"] == 1
        for sample in run.efficiency["samples"]:
            assert sample["visual_before"] == tokens_of(family)
            assert sample["visual_after"] == ttm_count(tokens_of(family) // frames, frames, 0.5)
            assert sample["prefill_flops"] < sample["prefill_flops_unpruned"]


@pytest.mark.cli
def test_holitom_runs_tinyvideo_through_the_cli_on_qwen_and_onevision(tmp_path):
    """``--model qwen2_5_vl_holitom`` and ``llava_onevision_holitom``: HoliTom's merged video (OneVision's
    newline after it) reaches the LLM and is scored by the task; the count is HoliTom's own.
    ``qwen2_5_vl_holitom_full`` adds the inside-LLM merge: its records count fewer tokens and FLOPs than the
    pre-LLM stage alone on the same clip."""
    from cli_runs import run_lmms_eval

    flops = {}
    for model, family, extra in (("qwen2_5_vl_holitom", "qwen2_5_vl", QWEN_PIXELS),
                                 ("qwen2_5_vl_holitom_full", "qwen2_5_vl", QWEN_PIXELS),
                                 ("llava_onevision_holitom", "llava_onevision", f"max_frames_num={CLIP_FRAMES}")):
        run = run_lmms_eval(tmp_path / model, model, f"pretrained={tiny_model_dir(family)},keep_ratio=0.25,{extra}",
                            tasks="tinyvideo", limit=1)
        assert 0 <= run.metrics["tinyvideo"]["tinyvideo_perception_score,none"] <= 100
        assert run.efficiency["model"] == model and run.efficiency["summary"]["samples"] == 1
        for sample in run.efficiency["samples"]:
            assert sample["visual_before"] == tokens_of(family)
            assert 1 <= sample["visual_after"] < sample["visual_before"]
            assert sample["prefill_flops"] < sample["prefill_flops_unpruned"]
            flops[model] = sample["prefill_flops"]
    assert flops["qwen2_5_vl_holitom_full"] < flops["qwen2_5_vl_holitom"]


def tokens_of(family: str) -> int:
    return _qwen_tokens() if family == "qwen2_5_vl" else _onevision_tokens()
