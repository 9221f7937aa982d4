"""lmms-eval tasks shipped with lmms-prune (task YAMLs are package data).

- ``refcoco/``: RefCOCO / RefCOCO+ / RefCOCOg grounding with InternVL's protocol. Groups ``refcoco_ground``,
  ``refcoco+_ground``, ``refcocog_ground`` and ``refcoco_ground_all`` (all 8 splits); split tasks such as
  ``refcoco_ground_val``, ``refcoco+_ground_testA``, ``refcocog_ground_test``. Data sources and their
  environment variables: ``refcoco/data.py``.
- ``pope/``: ``pope_local``, lmms-eval's ``pope`` task (prompt, generation, scoring) on a local copy of
  lmms-lab/POPE's layout (``LMMS_PRUNE_POPE_DIR``; the hub dataset otherwise).
- ``mme/``: ``mme_local``, lmms-eval's ``mme`` task on a local copy of lmms-lab/MME's layout
  (``LMMS_PRUNE_MME_DIR``; the hub dataset otherwise).
- ``takeover.py``: makes ``--tasks refcoco`` / ``refcoco+`` / ``refcocog`` mean the grounding groups when
  lmms-prune is installed (``LMMS_PRUNE_TAKEOVER=0`` turns it off; lmms-eval's captioning groups stay
  reachable as ``refcoco_caption``, ``refcoco+_caption``, ``refcocog_caption``).

Without the takeover, pass this folder to lmms-eval with ``--include_path`` and use the names above.
"""
