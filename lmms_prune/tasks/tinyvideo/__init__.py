"""``tinyvideo``: lmms-eval's VideoMME task (schema, prompt, letter extraction, score) on eight local 8-frame clips.

The clips are synthetic (:mod:`lmms_prune.toy.videos`: four plain motion clips, four cluttered ones) and are
written, with the task's ``tinyvideo.jsonl``, by :func:`lmms_prune.toy.videos.write_tinyvideo` into a folder the
run names in ``LMMS_PRUNE_TINYVIDEO_DIR`` (``lmms-prune demo --video`` does both inside its output folder; the
test suite reads the committed copy in ``tests/data/tinyvideo``). Nothing is downloaded and nothing is written
by the task itself.
"""
