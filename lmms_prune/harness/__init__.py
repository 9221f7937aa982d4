"""Glue for evaluation harnesses other than lmms-eval, on the harness-neutral runner (:mod:`lmms_prune.runner`).

One module per harness; each is imported only when that harness runs (its package is an optional extra).
"""
