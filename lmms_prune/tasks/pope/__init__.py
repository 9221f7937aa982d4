"""POPE (object-hallucination yes/no questions) as lmms-eval's ``pope`` task runs it, on a local copy of the data.

Task ``pope_local``: lmms-eval's ``pope`` prompt, generation settings and scoring (``lmms_eval.tasks.pope.utils``:
accuracy, precision, recall, F1, yes ratio), reading ``LMMS_PRUNE_POPE_DIR`` (lmms-lab/POPE's hub layout:
``data/<split>-*.parquet`` with question_id, question, answer, image_source, image, category) when it is set,
else the hub dataset lmms-eval's ``pope`` reads. ``lmms-prune demo`` writes such a folder of synthetic scenes
(``lmms_prune.toy.pope``).
"""
