"""``lmms-prune demo --video`` (``lmms_prune.video_demo``) and the cluttered clips of ``tinyvideo``.

* the cluttered clips: between consecutive frames only the moving square's old and new places change, the two
  distractor squares and the texture stay, and the named colour is the one that moves;
* the demo refuses bad settings before any model loads, with the value and the fix;
* one small demo run (``vidcom2`` and ``fastvid`` beside the unpruned run, one clip) on a checkpoint saved by
  ``scripts/train_video_qa.py`` (its own tokenizer with OneVision's ``<video>`` placeholder, 3 LM layers, given
  with ``--pretrained``): ``--model llava_onevision_vidcom2`` and ``llava_onevision_fastvid`` through the lmms-eval
  command line, the
  table has a row per method with fewer visual tokens and FLOPs than the unpruned row, and every file the
  sweep wrote is inside the output folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lmms_prune.cli import demo as cli_demo
from lmms_prune.cli.main import main
from lmms_prune.toy.data import PALETTE
from lmms_prune.toy.videos import square_path, tinyvideo_clip, tinyvideo_rows
from lmms_prune.video_demo import VIDEO_METHODS

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_video_qa.py"


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(-1)


@pytest.mark.parametrize("row", [r for r in tinyvideo_rows() if r["distractors"]], ids=lambda r: r["videoID"])
def test_a_cluttered_clip_changes_only_where_the_named_square_moves(row):
    frames = tinyvideo_clip(row)
    path = square_path(row["direction"], len(frames), 64, 12, 5)
    for t in range(1, len(frames)):
        expected = np.zeros((64, 64), dtype=bool)
        for r, c in path[t - 1:t + 1]:
            expected[r:r + 12, c:c + 12] = True
        assert not (_changed(frames[t - 1], frames[t]) & ~expected).any()  # the rest of the frame repeats
        r, c = path[t]
        assert (frames[t][r:r + 12, c:c + 12] == PALETTE[row["colour"]]).all()
    for other in row["distractors"]:  # each distractor colour is present, and static
        present = [(f == PALETTE[other]).all(-1) for f in frames]
        assert present[0].sum() == 100 and all((p == present[0]).all() for p in present)
    assert row["colour"] not in row["distractors"]


def test_the_cli_default_methods_are_the_demos_and_bad_settings_are_refused_before_loading(capsys):
    assert tuple(cli_demo.VIDEO_METHODS.split(",")) == VIDEO_METHODS
    for argv, message in ((["--family", "internvl"], "--family 'internvl'"), (["--keep", "0"], "--keep 0.0"),
                          (["--methods", "vidcom3"], "--methods vidcom3: unknown")):
        assert main(["demo", "--video", *argv]) == 1
        assert message in capsys.readouterr().err


def test_the_demo_runs_the_shipped_trained_model_where_there_is_one(monkeypatch):
    """Without --pretrained: LLaVA-OneVision runs the shipped tiny-video-qa (trained on the task, so the scores
    separate the methods), which resolves to its folder; Qwen2.5-VL its random-weight toy; --pretrained wins."""
    from lmms_prune import video_demo
    from lmms_prune.loading import SHIPPED, resolve_pretrained
    from lmms_prune.toy import models

    assert video_demo.demo_pretrained("llava_onevision") == "tiny-video-qa" and "tiny-video-qa" in SHIPPED
    assert (Path(resolve_pretrained("tiny-video-qa")) / "config.json").is_file()
    monkeypatch.setattr(models, "tiny_model_dir", lambda family: Path("/toys") / family)
    assert video_demo.demo_pretrained("qwen2_5_vl") == str(Path("/toys/qwen2_5_vl"))
    assert video_demo.demo_pretrained("llava_onevision", "runs/mine") == "runs/mine"


@pytest.mark.cli
def test_video_demo_runs_the_methods_through_lmms_eval_and_prints_their_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_video_qa", TRAIN_SCRIPT)
    tv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tv)
    checkpoint = tmp_path / "video_qa"
    tv.build_model(0).save_pretrained(checkpoint)  # the script's saved layout (training only changes the weights)
    tv.video_qa_processor().save_pretrained(checkpoint)
    out = tmp_path / "demo"
    assert main(["demo", "--video", "--family", "llava_onevision", "--methods", "vidcom2,fastvid", "--keep", "0.5",
                 "--limit", "1", "--pretrained", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## lmms-prune demo --video: video_qa (llava_onevision)" in printed
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert set(rows) == {"none", "vidcom2", "fastvid"}
    unpruned_tokens = float(rows["none"][3])
    assert unpruned_tokens == 8 * 16  # 8 frames of 4x4 pooled tokens (the newline is structural)
    for method in ("vidcom2", "fastvid"):
        keep, score, _, kept, flops = rows[method]
        assert keep == "0.5" and 0 <= float(score) <= 100
        assert 0 < float(kept) < unpruned_tokens and float(flops) < 100
    assert float(rows["fastvid"][3]) <= 8 * int(16 * 0.5)  # int(P r) per frame at most
    assert {p.name for p in out.iterdir()} <= {"data", "runs", "report", "hf_datasets"}
