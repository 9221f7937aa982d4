"""``lmms-prune methods``: print every preset with every parameter and default."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from lmms_prune.presets import describe_presets

    print(describe_presets())
    return 0
