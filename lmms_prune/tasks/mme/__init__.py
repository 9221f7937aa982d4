"""MME (yes/no perception and cognition questions, scored acc + acc+ per category) as lmms-eval's ``mme`` task
runs it, on a local copy of the data.

Task ``mme_local``: lmms-eval's ``mme`` prompt, generation settings and scoring (``lmms_eval.tasks.mme.utils``:
``mme_perception_score`` and ``mme_cognition_score``, the sum over categories of acc + acc+, each out of 200),
reading ``LMMS_PRUNE_MME_DIR`` (lmms-lab/MME's hub layout: ``data/<split>-*.parquet`` with question_id, image,
question, answer, category) when it is set, else the hub dataset lmms-eval's ``mme`` reads. ``lmms-prune demo``
writes such a folder of synthetic position questions (``lmms_prune.toy.mme``).
"""
