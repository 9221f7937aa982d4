"""Write the tiny local video task's data (VideoMME's schema): four motion clips and their questions.

    python tests/data/make_tiny_video_data.py       # rewrites tests/data/tinyvideo/

``tests/tasks/tinyvideo.yaml`` reads ``tinyvideo/tinyvideo.jsonl``; each row's clip is
``tinyvideo/<videoID>.mp4`` (8 frames of 64x64 at 4 fps, a square moving left/right/up/down), written by
``lmms_prune.toy.videos.write_tinyvideo``.
"""

from __future__ import annotations

from pathlib import Path

from lmms_prune.toy.videos import write_tinyvideo

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    print(write_tinyvideo(HERE / "tinyvideo"))
