"""lmms-eval model wrappers."""
