"""Video decoding and frame sampling (``lmms_prune.video``), the motion clips and the tiny video task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmms_prune.toy.videos import DIRECTIONS, motion_clip, tinyvideo_rows, write_tinyvideo
from lmms_prune.video import (
    FAMILY_SAMPLING,
    FrameSampling,
    VideoLoadError,
    check_video,
    family_sampling,
    frame_indices,
    load_video,
    write_video,
)

REPO = Path(__file__).resolve().parents[1]
TOTALS = (1, 2, 3, 5, 8, 31, 32, 33, 64, 301)


def _task_utils(monkeypatch, data: Path = REPO / "tests" / "data" / "tinyvideo"):
    """The task's functions (``lmms_prune.tasks.tinyvideo.utils``), reading the clips in ``data``."""
    import lmms_prune.tasks.tinyvideo.utils as module

    monkeypatch.setenv(module.DATA_ENV, str(data))
    return module


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("total", [t for t in TOTALS if t >= 2])
@pytest.mark.parametrize("num_frames", [2, 7, 32])
def test_qwen_rule_equals_qwen_vl_utils_with_lmms_evals_nframes(total, num_frames):
    from qwen_vl_utils.vision_process import smart_nframes

    # lmms-eval's qwen2_5_vl chat wrapper: nframes = max(2, even floor of min(max_num_frames, total))
    nframes = max(2, (min(num_frames, total) // 2) * 2)
    n = smart_nframes({"nframes": nframes}, total_frames=total, video_fps=25.0)
    expected = torch.linspace(0, total - 1, n).round().long().tolist()
    assert frame_indices(total, 25.0, FrameSampling("qwen_vl", num_frames)) == expected


@pytest.mark.parametrize("total,video_fps,fps", [(100, 25.0, 2.0), (300, 30.0, 1.0), (8, 4.0, 0.5), (50, 10.0, 8.0)])
def test_qwen_fps_rule_equals_qwen_vl_utils(total, video_fps, fps):
    from qwen_vl_utils.vision_process import smart_nframes

    n = smart_nframes({"fps": fps}, total_frames=total, video_fps=video_fps)
    expected = torch.linspace(0, total - 1, n).round().long().tolist()
    assert frame_indices(total, video_fps, FrameSampling("qwen_vl", 32, fps=fps)) == expected
    capped = smart_nframes({"fps": fps, "max_frames": 4}, total_frames=total, video_fps=video_fps)
    assert len(frame_indices(total, video_fps, FrameSampling("qwen_vl", 4, fps=fps, max_frames=4))) == capped


@pytest.mark.parametrize("total,num_frames", [(t, n) for t in TOTALS for n in (1, 4, 7) if n <= t])
def test_shifted_rule_equals_transformers_internvl_sampler(total, num_frames):
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
    from transformers.video_utils import VideoMetadata

    meta = VideoMetadata(total_num_frames=total, fps=25.0, duration=total / 25.0)
    expected = InternVLVideoProcessor().sample_frames(meta, num_frames=num_frames).tolist()
    assert frame_indices(total, 25.0, FrameSampling("shifted", num_frames)) == expected


@pytest.mark.parametrize("total", TOTALS)
def test_linspace_rule_takes_num_frames_evenly_from_first_to_last(total):
    got = frame_indices(total, 25.0, FrameSampling("linspace", 8))
    assert len(got) == 8 and got[0] == 0 and got[-1] == total - 1
    assert got == sorted(got) and all(0 <= i < total for i in got)
    assert max(np.diff(got), default=0) - min(np.diff(got), default=0) <= 1  # evenly spaced up to rounding


@pytest.mark.parametrize("rule", ["qwen_vl", "linspace", "shifted"])
def test_fps_caps_the_frame_count_by_duration(rule):
    # a 10 s video at 1 frame per second: at most 10 frames whatever the count says (qwen: even floor, >= 4)
    got = frame_indices(250, 25.0, FrameSampling(rule, 32, fps=1.0))
    assert len(got) == 10 and got == sorted(got)


def test_sampling_refuses_what_it_cannot_sample():
    with pytest.raises(ValueError, match="no frames"):
        frame_indices(0, 25.0, FrameSampling("linspace", 8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_indices(1, 25.0, FrameSampling("qwen_vl", 8))
    with pytest.raises(ValueError, match="exceeds the video's 3 frames"):
        frame_indices(3, 25.0, FrameSampling("shifted", 8))
    with pytest.raises(ValueError, match="frame rate"):
        frame_indices(30, None, FrameSampling("linspace", 8, fps=1.0))
    with pytest.raises(ValueError, match="num_frames=0"):
        FrameSampling("linspace", 0)
    with pytest.raises(ValueError, match="rule='nearest'"):
        FrameSampling("nearest")


def test_family_sampling_uses_lmms_evals_names_and_defaults():
    assert family_sampling("qwen2_5_vl") == FrameSampling("qwen_vl", 32)
    assert family_sampling("qwen2_5_vl", {"max_num_frames": "8", "fps": "2"}) == FrameSampling("qwen_vl", 8, 2.0)
    assert family_sampling("qwen3_vl", {"max_num_frames": 8, "fps": 1}) == FrameSampling("qwen_vl", 8, 1.0, 8)
    assert family_sampling("llava_onevision", {"max_frames_num": 4}) == FrameSampling("linspace", 4)
    assert family_sampling("internvl", {"num_frames": 6}) == FrameSampling("shifted", 6)
    assert set(FAMILY_SAMPLING) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl"}
    with pytest.raises(ValueError, match="family 'llava' takes no video input"):
        family_sampling("llava")
    with pytest.raises(ValueError, match="max_frames_num='many'"):
        family_sampling("llava_onevision", {"max_frames_num": "many"})


# ------------------------------------------------------------------------------------------------ decoding
def _centre(frame: np.ndarray) -> tuple[float, float]:
    """(row, col) centre of the pixels far from the grey background."""
    rows, cols = np.nonzero(np.abs(frame.astype(int) - 200).sum(-1) > 150)
    return float(rows.mean()), float(cols.mean())


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_motion_clip_moves_the_square_in_its_direction(direction):
    frames = motion_clip(direction)
    centres = np.array([_centre(f) for f in frames])
    steps = np.diff(centres, axis=0)
    dr, dc = DIRECTIONS[direction]
    assert np.all(steps[:, 0] * dr > 0 if dr else steps[:, 0] == 0)
    assert np.all(steps[:, 1] * dc > 0 if dc else steps[:, 1] == 0)


def test_written_clip_decodes_to_the_sampled_frames(tmp_path):
    frames = motion_clip("right")
    write_video(tmp_path / "c.mp4", frames, fps=4.0)
    assert check_video(tmp_path / "c.mp4", "s") == len(frames)
    sampling = FrameSampling("linspace", 4)
    decoded = load_video(str(tmp_path / "c.mp4"), "s", sampling)
    indices = frame_indices(len(frames), 4.0, sampling)
    assert [im.mode for im in decoded] == ["RGB"] * 4 and decoded[0].size == (64, 64)
    for image, i in zip(decoded, indices):
        assert np.abs(np.asarray(image).astype(int) - frames[i]).mean() < 8  # lossy codec, same picture
        assert np.allclose(_centre(np.asarray(image)), _centre(frames[i]), atol=1.0)


def test_unusable_videos_raise_one_error_naming_the_sample(tmp_path):
    write_video(tmp_path / "ok.mp4", motion_clip("up"), fps=4.0)
    data = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 50)
    (tmp_path / "empty.mp4").write_bytes(b"")
    sampling = FrameSampling("qwen_vl", 8)
    for name, reason in (("cut.mp4", "DECORDError|Error"), ("junk.mp4", "Error"), ("empty.mp4", r"empty \(0 bytes\)"),
                         ("missing.mp4", "no such file")):
        with pytest.raises(VideoLoadError, match=rf"sample 'task/7': video '.*{name}' cannot be used: .*({reason})"):
            load_video(str(tmp_path / name), "task/7", sampling)
        with pytest.raises(VideoLoadError, match=name):
            check_video(str(tmp_path / name), "task/7")
    with pytest.raises(VideoLoadError, match="unsupported video source of type int"):
        load_video(3, "task/7", sampling)
    assert issubclass(VideoLoadError, ValueError)


# ------------------------------------------------------------------------------------------------ the task
def test_committed_task_data_is_what_the_generator_writes(tmp_path):
    written = write_tinyvideo(tmp_path)
    committed = REPO / "tests" / "data" / "tinyvideo" / "tinyvideo.jsonl"
    assert written.read_text() == committed.read_text()
    for row in tinyvideo_rows():
        assert check_video(committed.parent / f"{row['videoID']}.mp4", row["question_id"]) == 8
        assert row["options"][ord(row["answer"]) - ord("A")].endswith(row["direction"])


def test_task_scores_letters_and_counts_malformed_answers_and_video_errors(tmp_path, monkeypatch):
    utils = _task_utils(monkeypatch)
    doc = tinyvideo_rows()[1]  # right: B
    text = utils.doc_to_text(doc, {"post_prompt": "\nAnswer with the option's letter."})
    assert text.splitlines()[1:6] == [doc["question"], *doc["options"]]
    assert Path(utils.doc_to_visual(doc)[0]).is_file()
    for answer, score, malformed in (("B", 1.0, False), ("(B) right", 1.0, False), ("The answer is A.", 0.0, False),
                                     ("it moves sideways", 0.0, True), ("", 0.0, True), (None, 0.0, True)):
        record = utils.process_results(doc, [answer])["tinyvideo_perception_score"]
        assert (record["score"], record["malformed"], record["video_error"]) == (score, malformed, None), answer
    broken = tmp_path / "data"
    broken.mkdir()
    (broken / f"{doc['videoID']}.mp4").write_bytes(b"broken")
    monkeypatch.setenv(utils.DATA_ENV, str(broken))
    record = utils.process_results(doc, [""])["video_errors"]
    assert record["score"] == 0.0 and not record["malformed"] and "cannot be used" in record["video_error"]
    records = [utils.process_results(doc, [a])["malformed"] for a in ("B", "zzz")] + [record]
    assert (utils.perception_score(records), utils.malformed_count(records), utils.video_error_count(records)) == (
        pytest.approx(100 / 3), 1, 1)


def test_task_without_its_clips_names_the_folder_and_the_command_that_writes_it(tmp_path, monkeypatch):
    """The task ships in the package; its clips are written where the run says (LMMS_PRUNE_TINYVIDEO_DIR)."""
    utils = _task_utils(monkeypatch)
    doc = tinyvideo_rows()[0]
    monkeypatch.delenv(utils.DATA_ENV)
    with pytest.raises(FileNotFoundError, match=r"LMMS_PRUNE_TINYVIDEO_DIR is not set.*write_tinyvideo"):
        utils.doc_to_visual(doc)
    monkeypatch.setenv(utils.DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere: not a folder.*lmms-prune demo --video"):
        utils.doc_to_visual(doc)
    monkeypatch.setenv(utils.DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no tinyvideo.jsonl there"):
        utils.rows_file()
    write_tinyvideo(tmp_path)
    assert utils.rows_file() == (tmp_path / "tinyvideo.jsonl").resolve()
    assert utils.doc_to_visual(doc) == [str((tmp_path / f"{doc['videoID']}.mp4").resolve())]


def test_tinyvideo_is_a_task_of_the_package_not_of_the_tests():
    """lmms-eval finds ``tinyvideo`` in the package's task folder (an installed package runs it, no
    ``--include_path``), and the tests' folder holds no second copy."""
    from lmms_eval.tasks import TaskManager

    from lmms_prune.tasks.takeover import TASKS_DIR

    assert not list((REPO / "tests" / "tasks").glob("tinyvideo*"))
    index = TaskManager("ERROR", include_path=[str(TASKS_DIR)], include_defaults=False).task_index
    assert Path(index["tinyvideo"]["yaml_path"]).parent == TASKS_DIR / "tinyvideo"


# ------------------------------------------------------------------------------------------------ lmms-eval layer
def _chat_model(family: str, family_options: dict, docs: list[dict]):
    """A wrapper of ``family`` with only what ``_messages`` reads (no model is loaded)."""
    from types import SimpleNamespace

    from lmms_prune.models.wrappers import (
        InternVLPrune,
        LlavaNextPrune,
        LlavaOnevisionPrune,
        LlavaPrune,
        Qwen25VLPrune,
    )
    from lmms_prune.runner import RunOptions

    cls = {"qwen2_5_vl": Qwen25VLPrune, "internvl": InternVLPrune, "llava_onevision": LlavaOnevisionPrune,
           "llava": LlavaPrune, "llava_next": LlavaNextPrune}[family]
    model = object.__new__(cls)
    options = cls.family_class().parse_model_args(dict(family_options))  # every key, lmms-eval's defaults
    model.runner = SimpleNamespace(options=RunOptions(pretrained="unused", family=options))
    model.task_dict = {"tinyvideo": {"test": docs}}
    return model


def _item(doc_id: int):
    from lmms_prune.models.base import _Item

    def doc_to_messages(doc):  # what lmms-eval's chat task builds from a video path (ConfigurableMessagesTask)
        return [{"role": "user", "content": [{"type": "video", "url": doc["path"]}, {"type": "text", "text": "Q"}]}]

    return _Item(0, "tinyvideo", "test", doc_id, doc_to_messages, {})


@pytest.mark.parametrize("family,options,sampling", [
    ("qwen2_5_vl", {"max_num_frames": 4}, FrameSampling("qwen_vl", 4)),
    ("internvl", {"num_frames": 5}, FrameSampling("shifted", 5)),
    ("qwen2_5_vl", {}, FrameSampling("qwen_vl", 32)),  # lmms-eval's default: min(32, 8 frames) = 8
    ("llava_onevision", {"max_frames_num": 3}, FrameSampling("linspace", 3)),
])
def test_video_requests_become_neutral_video_messages_with_the_familys_sampling(tmp_path, family, options, sampling):
    frames = motion_clip("down")
    write_video(tmp_path / "c.mp4", frames, fps=4.0)
    model = _chat_model(family, options, [{"path": str(tmp_path / "c.mp4")}])
    (message,) = model._messages(_item(0))
    video, text = message["content"]
    assert message["role"] == "user" and text == {"type": "text", "text": "Q"} and video["type"] == "video"
    indices = frame_indices(8, 4.0, sampling)
    assert video["fps"] == pytest.approx(len(indices) / 8 * 4.0)  # qwen_vl_utils' sample_fps of the frames
    assert len(video["video"]) == len(indices) and all(im.mode == "RGB" for im in video["video"])
    for image, i in zip(video["video"], indices):
        assert np.allclose(_centre(np.asarray(image)), _centre(frames[i]), atol=1.0)


def test_unusable_video_requests_fail_naming_the_sample_and_other_families_refuse_videos(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"broken")
    model = _chat_model("qwen2_5_vl", {}, [{"path": str(tmp_path / "bad.mp4")}])
    with pytest.raises(VideoLoadError, match="sample 'tinyvideo/0': video .*bad.mp4' cannot be used"):
        model._messages(_item(0))
    for family in ("llava", "llava_next"):  # the engine has no video layout for them
        with pytest.raises(ValueError, match=f"video inputs are not supported by {family}_prune"):
            _chat_model(family, {}, [{"path": str(tmp_path / "bad.mp4")}])._messages(_item(0))


# ------------------------------------------------------------------------------------------------ issue 31, Poor 8
def test_a_clip_the_runs_sampling_cannot_take_is_a_video_error_not_a_malformed_answer(tmp_path, monkeypatch):
    """A 1-frame clip decodes, but Qwen-VL's rule needs 2 frames: the wrapper skips it, and the task counts it
    under video_errors (with the run's sampling, which our wrappers register) instead of malformed."""
    from lmms_prune.video import register_run_sampling, write_video

    doc = tinyvideo_rows()[1]
    data = tmp_path / "data"
    data.mkdir()
    write_video(data / f"{doc['videoID']}.mp4", motion_clip("right")[:1])
    utils = _task_utils(monkeypatch, data)
    register_run_sampling(FrameSampling("qwen_vl", 32))
    try:
        record = utils.process_results(doc, [""])["video_errors"]
    finally:
        register_run_sampling(None)
    assert not record["malformed"] and "at least 2 frames" in record["video_error"]
    assert utils.malformed_count([record]) == 0 and utils.video_error_count([record]) == 1


def test_an_impossible_fps_is_refused_up_front_and_named_when_a_clip_cannot_give_it(monkeypatch):
    import transformers

    from lmms_prune.models.wrappers import InternVLPrune_fastv
    from lmms_prune.toy.models import tiny_model_dir

    def refuse(*args, **kwargs):
        raise AssertionError("weights must not load when an input is invalid")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)
    with pytest.raises(ValueError, match=r"fps=1000000000.0: must be a number in \(0, 240\]"):
        InternVLPrune_fastv(pretrained=str(tiny_model_dir("internvl_llama")), device="cpu", fps="1e9")
    with pytest.raises(ValueError, match=r"fps=100 asks for 400 frames of a 100-frame video recorded at 25 fps.*"
                                         r"give fps <= 25"):
        frame_indices(100, 25.0, FrameSampling("shifted", 8, fps=100.0))
