"""Synthetic motion clips in the schema of lmms-eval's VideoMME (``lmms-eval/Video-MME``, task ``videomme``).

A clip is a flat-coloured square sliding across a plain background, one step per frame; the question asks
which way it moves, so the answer depends on the motion (any single frame is ambiguous). Rows carry
VideoMME's columns: ``video_id``, ``duration``, ``domain``, ``sub_category``, ``url``, ``videoID``,
``question_id``, ``task_type``, ``question``, ``options`` (``["A. left", ...]``) and ``answer`` (the letter).
The clip file of a row is ``<videoID>.mp4`` in the data folder (VideoMME: ``<cache>/data/<videoID>.mp4``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmms_prune.toy.data import PALETTE
from lmms_prune.video import write_video

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
"""Motion direction -> (row, col) step sign."""

OPTIONS = ("A. left", "B. right", "C. up", "D. down")
QUESTION = "Which way does the {colour} square move?"


def motion_clip(direction: str, colour: str = "red", frames: int = 8, size: int = 64, side: int = 16,
                step: int = 5, background: int = 200) -> list[np.ndarray]:
    """``frames`` RGB frames ``[size, size, 3]`` (uint8) of a ``side``-pixel square moving ``step`` pixels per
    frame in ``direction`` (one of :data:`DIRECTIONS`), centred on the perpendicular axis, starting so
    that its path is centred in the frame."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: must be one of {tuple(DIRECTIONS)}")
    travel = step * (frames - 1)
    if travel + side > size:
        raise ValueError(f"a {side}px square moving {step}px x {frames - 1} frames does not fit in {size}px")
    dr, dc = DIRECTIONS[direction]
    centre = (size - side) // 2
    first = (size - side - travel) // 2
    out = []
    for t in range(frames):
        along = first + step * t
        pos = [centre, centre]
        for axis, sign in enumerate((dr, dc)):
            if sign:
                pos[axis] = along if sign > 0 else size - side - along
        frame = np.full((size, size, 3), background, dtype=np.uint8)
        frame[pos[0]:pos[0] + side, pos[1]:pos[1] + side] = PALETTE[colour]
        out.append(frame)
    return out


def tinyvideo_rows() -> list[dict]:
    """Four VideoMME-style rows, one per direction, in different colours."""
    rows = []
    for i, (direction, colour) in enumerate(zip(DIRECTIONS, ("red", "blue", "green", "purple"))):
        video_id = f"{i + 1:03d}"
        rows.append({
            "video_id": video_id,
            "duration": "short",
            "domain": "Life Record",
            "sub_category": "Daily Life",
            "url": "",
            "videoID": f"motion_{direction}_{colour}",
            "question_id": f"{video_id}-1",
            "task_type": "Temporal Perception",
            "question": QUESTION.format(colour=colour),
            "options": list(OPTIONS),
            "answer": "ABCD"[list(DIRECTIONS).index(direction)],
            "direction": direction,
            "colour": colour,
        })
    return rows


def write_tinyvideo(folder: str | Path, fps: float = 4.0) -> Path:
    """Write the clips (``<videoID>.mp4``) and ``tinyvideo.jsonl`` (one row per line) into ``folder``;
    returns the jsonl path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = tinyvideo_rows()
    for row in rows:
        write_video(folder / f"{row['videoID']}.mp4", motion_clip(row["direction"], row["colour"]), fps=fps)
    path = folder / "tinyvideo.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
