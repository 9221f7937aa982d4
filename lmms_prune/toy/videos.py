"""Synthetic motion clips in the schema of lmms-eval's VideoMME (``lmms-eval/Video-MME``, task ``videomme``).

A clip is a flat-coloured square sliding one step per frame, over a plain background (:func:`motion_clip`) or
over a static textured background with two static squares of other colours (:func:`cluttered_clip`: most of
every frame repeats the previous one, the redundancy video pruning methods exploit, and only one object
answers the question); the question asks which way the named square moves, so the answer depends on the
motion (any single frame is ambiguous). Rows carry
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


def square_path(direction: str, frames: int, size: int, side: int, step: int) -> list[tuple[int, int]]:
    """Top-left ``(row, col)`` of a ``side``-pixel square in each of ``frames`` frames of ``size`` pixels, moving
    ``step`` pixels per frame in ``direction`` (one of :data:`DIRECTIONS`), centred on the perpendicular axis,
    its path centred in the frame."""
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
        out.append((pos[0], pos[1]))
    return out


def _paint(canvas: np.ndarray, path: list[tuple[int, int]], side: int, colour: str) -> list[np.ndarray]:
    out = []
    for row, col in path:
        frame = canvas.copy()
        frame[row:row + side, col:col + side] = PALETTE[colour]
        out.append(frame)
    return out


def motion_clip(direction: str, colour: str = "red", frames: int = 8, size: int = 64, side: int = 16,
                step: int = 5, background: int = 200) -> list[np.ndarray]:
    """``frames`` RGB frames ``[size, size, 3]`` (uint8) of a ``side``-pixel square moving ``step`` pixels per
    frame in ``direction`` (:func:`square_path`) over a plain grey ``background``."""
    canvas = np.full((size, size, 3), background, dtype=np.uint8)
    return _paint(canvas, square_path(direction, frames, size, side, step), side, colour)


def textured_background(size: int = 64, cell: int = 8, seed: int = 0) -> np.ndarray:
    """``[size, size, 3]`` uint8: a checkerboard of ``cell``-pixel light-grey squares (150 / 200), each shade
    jittered by up to +-12 per square (seeded), far from every :data:`PALETTE` colour."""
    rng = np.random.default_rng(seed)
    cells = size // cell
    shade = np.where((np.arange(cells)[:, None] + np.arange(cells)[None, :]) % 2, 150, 200)
    shade = shade + rng.integers(-12, 13, size=(cells, cells))
    return np.repeat(np.repeat(shade, cell, 0), cell, 1)[..., None].repeat(3, 2).astype(np.uint8)


def cluttered_clip(direction: str, colour: str, distractors: tuple[str, str], frames: int = 8, size: int = 64,
                   side: int = 12, step: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Like :func:`motion_clip` on a static :func:`textured_background`, with two static ``side - 2``-pixel
    squares of the ``distractors`` colours in the top-left and bottom-right corners (off the moving path)."""
    canvas = textured_background(size, seed=seed)
    small = side - 2
    for (row, col), other in zip(((4, 4), (size - 4 - small, size - 4 - small)), distractors):
        canvas[row:row + small, col:col + small] = PALETTE[other]
    return _paint(canvas, square_path(direction, frames, size, side, step), side, colour)


PLAIN = tuple(zip(DIRECTIONS, ("red", "blue", "green", "purple")))
"""The plain clips: (direction, colour), in row order."""
CLUTTERED = (("right", "orange", ("blue", "green")), ("left", "yellow", ("red", "purple")),
             ("down", "blue", ("orange", "red")), ("up", "red", ("yellow", "green")))
"""The cluttered clips after them: (direction, moving colour, static distractor colours)."""


def tinyvideo_rows() -> list[dict]:
    """Eight VideoMME-style rows: the four plain clips (one per direction, in different colours), then four
    cluttered ones (:data:`CLUTTERED`)."""
    scenes = [(d, c, None) for d, c in PLAIN] + list(CLUTTERED)
    rows = []
    for i, (direction, colour, distractors) in enumerate(scenes):
        video_id = f"{i + 1:03d}"
        rows.append({
            "video_id": video_id,
            "duration": "short",
            "domain": "Life Record",
            "sub_category": "Daily Life",
            "url": "",
            "videoID": f"{'motion' if distractors is None else 'cluttered'}_{direction}_{colour}",
            "question_id": f"{video_id}-1",
            "task_type": "Temporal Perception",
            "question": QUESTION.format(colour=colour),
            "options": list(OPTIONS),
            "answer": "ABCD"[list(DIRECTIONS).index(direction)],
            "direction": direction,
            "colour": colour,
            "distractors": list(distractors or ()),
        })
    return rows


def tinyvideo_clip(row: dict) -> list[np.ndarray]:
    """The frames of one :func:`tinyvideo_rows` row (its position seeds a cluttered clip's texture)."""
    if not row["distractors"]:
        return motion_clip(row["direction"], row["colour"])
    return cluttered_clip(row["direction"], row["colour"], tuple(row["distractors"]), seed=int(row["video_id"]))


def write_tinyvideo(folder: str | Path, fps: float = 4.0) -> Path:
    """Write the clips (``<videoID>.mp4``) and ``tinyvideo.jsonl`` (one row per line) into ``folder``;
    returns the jsonl path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = tinyvideo_rows()
    for row in rows:
        write_video(folder / f"{row['videoID']}.mp4", tinyvideo_clip(row), fps=fps)
    path = folder / "tinyvideo.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


KINDS = ("plain", "cluttered")
"""The two clip kinds of ``tinyvideo`` (:func:`motion_clip`, :func:`cluttered_clip`)."""


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> dict:
    """A random scene of ``kind`` (random when None): ``{"kind", "direction", "colour", "distractors",
    "background", "seed"}``, with a random direction and :data:`PALETTE` colour; a plain scene gets a random
    grey level in [180, 230], a cluttered one two other random colours and a texture seed >= 1000 (the task's
    rows use seeds 1-8, so these clips are never theirs). Draw the clip with :func:`scene_clip`."""
    kind = KINDS[int(rng.integers(2))] if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
    colours = list(PALETTE)
    picked = rng.permutation(len(colours))[:3]
    return {"kind": kind, "direction": list(DIRECTIONS)[int(rng.integers(4))], "colour": colours[picked[0]],
            "distractors": [colours[i] for i in picked[1:]] if kind == "cluttered" else [],
            "background": int(rng.integers(180, 231)), "seed": int(rng.integers(1000, 2**31))}


def scene_clip(scene: dict) -> list[np.ndarray]:
    """The 8 frames of a :func:`sample_scene` scene, at the task's sizes."""
    if scene["kind"] == "plain":
        return motion_clip(scene["direction"], scene["colour"], background=scene["background"])
    return cluttered_clip(scene["direction"], scene["colour"], tuple(scene["distractors"]), seed=scene["seed"])
