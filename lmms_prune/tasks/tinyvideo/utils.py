"""lmms-eval glue of ``tinyvideo`` (``tinyvideo.yaml``): lmms-eval's ``videomme`` task on local clips.

The schema, prompt, answer extraction and score are VideoMME's (lmms-eval 0.7.3 ``tasks/videomme/utils.py``,
whose module cannot be imported here: it needs OpenCV at import). Its ``doc_to_visual`` gives the clip's file
path (``<data>/<videoID>.mp4``), which lmms-eval's chat task turns into ``{"type": "video", "url": path}``;
the model decodes and samples the frames. Per sample ``process_results`` returns one record for three
metrics: ``tinyvideo_perception_score`` (percent correct over all samples, VideoMME's overall score),
``malformed`` (answers with no option letter: counted, and scored wrong) and ``video_errors`` (samples whose
clip cannot be decoded, or cannot be sampled by the run's frame sampling (``lmms_prune.video.run_sampling``,
recorded by our wrappers: a 1-frame clip under Qwen-VL): the wrapper skipped them under ``on_error=skip`` and
answered nothing; scored wrong, counted here instead of as malformed).

The data folder is ``LMMS_PRUNE_TINYVIDEO_DIR`` (:func:`data_dir`), read when the task loads its rows and when a
clip's path is asked for; :class:`TinyVideoTask` refuses a missing folder with the command that writes one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer

from lmms_prune.tasks.local import LocalDataTask
from lmms_prune.video import VideoLoadError, check_video, run_sampling

DATA_ENV = "LMMS_PRUNE_TINYVIDEO_DIR"
OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and the "
                 "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
CHOICES = ["A", "B", "C", "D"]


def data_dir() -> Path:
    """The folder of the clips (``$LMMS_PRUNE_TINYVIDEO_DIR``), absolute; raises naming the fix when it is not
    set or not a folder."""
    root = os.environ.get(DATA_ENV)
    fix = ("write the clips with `python -c \"from lmms_prune.toy.videos import write_tinyvideo; "
           "write_tinyvideo('DIR')\"` and set LMMS_PRUNE_TINYVIDEO_DIR=DIR (`lmms-prune demo --video` does both "
           "inside its --out folder)")
    if not root:
        raise FileNotFoundError(f"{DATA_ENV} is not set: the tinyvideo task reads its clips from that folder; {fix}")
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{DATA_ENV}={root}: not a folder; {fix}")
    return Path(root).resolve()


def rows_file() -> Path:
    """``tinyvideo.jsonl`` in :func:`data_dir`; raises naming the fix when it is missing."""
    path = data_dir() / "tinyvideo.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{DATA_ENV}={os.environ[DATA_ENV]}: no tinyvideo.jsonl there; write the task's "
                                "rows and clips with lmms_prune.toy.videos.write_tinyvideo(folder)")
    return path


class TinyVideoTask(LocalDataTask):
    """lmms-eval's chat task reading its rows from :func:`data_dir` (``tinyvideo.jsonl`` through the ``json``
    builder, absolute path: two folders never share a ``datasets`` cache entry)."""

    def local_dataset_kwargs(self, dataset_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**dataset_kwargs, "data_files": {"test": str(rows_file())}}


def doc_to_visual(doc: dict) -> list[str]:
    """The clip's path (VideoMME: ``<cache>/data/<videoID>.mp4``)."""
    return [str(data_dir() / f"{doc['videoID']}.mp4")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """VideoMME's prompt: instruction, question, options one per line, then the post prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    question = doc["question"] + "\n" + "\n".join(doc["options"])
    return OPTION_PROMPT + "\n" + question + "\n" + kwargs.get("post_prompt", "The best answer is:")


def score_answer(answer: Any, target: str) -> dict[str, Any]:
    """``{"pred_answer", "score", "malformed"}`` of one answer: VideoMME's letter extraction; an answer with
    no letter (or not a string) is malformed and scores 0."""
    letter = extract_mcq_answer(answer, choices=CHOICES) if isinstance(answer, str) else ""
    return {"pred_answer": letter, "score": float(letter != "" and letter.lower() == target.lower()),
            "malformed": letter == ""}


def process_results(doc: dict, results: list[Any]) -> dict[str, dict[str, Any]]:
    """The same per-sample record for the three metrics (module docstring). An empty answer whose clip does
    not decode is a video error, not a malformed answer."""
    answer = results[0] if results else ""
    record = {"question_id": doc["question_id"], "videoID": doc["videoID"], "answer": doc["answer"],
              **score_answer(answer, doc["answer"]), "video_error": None}
    if not (isinstance(answer, str) and answer.strip()):
        try:
            check_video(doc_to_visual(doc)[0], doc["question_id"], run_sampling())
        except VideoLoadError as err:
            record.update(video_error=str(err), malformed=False)
    return {"tinyvideo_perception_score": record, "malformed": record, "video_errors": record}


def perception_score(records: list[dict[str, Any]]) -> float:
    """Percent of samples answered correctly, every sample in the denominator (0.0 for none)."""
    return 100.0 * sum(r["score"] for r in records) / len(records) if records else 0.0


def malformed_count(records: list[dict[str, Any]]) -> int:
    """Number of answers with no option letter."""
    return sum(bool(r["malformed"]) for r in records)


def video_error_count(records: list[dict[str, Any]]) -> int:
    """Number of samples whose clip could not be decoded."""
    return sum(r["video_error"] is not None for r in records)
