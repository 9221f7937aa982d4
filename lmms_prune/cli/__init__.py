"""Command-line interface: ``lmms-prune <command>``."""
