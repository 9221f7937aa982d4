"""Write the test suite's copy of the tiny video task's data (VideoMME's schema): eight clips and their questions.

    python tests/data/make_tiny_video_data.py       # rewrites tests/data/tinyvideo/

The package's task ``tinyvideo`` (``lmms_prune/tasks/tinyvideo``) reads ``tinyvideo.jsonl`` and
``<videoID>.mp4`` (8 frames of 64x64 at 4 fps: four plain and four cluttered clips, a square moving
left/right/up/down) from the folder in ``LMMS_PRUNE_TINYVIDEO_DIR``; the tests point it here
(``tests/cli_runs.py``). Written by ``lmms_prune.toy.videos.write_tinyvideo``.
"""

from __future__ import annotations

from pathlib import Path

from lmms_prune.toy.videos import write_tinyvideo

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    print(write_tinyvideo(HERE / "tinyvideo"))
