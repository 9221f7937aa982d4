"""lmms-eval tasks shipped with lmms-prune (task YAMLs are package data)."""
