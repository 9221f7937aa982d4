"""``lmms-prune methods``: print every preset with every parameter and default, and the external method
modules that contributed (entry points ``lmms_prune.methods``, ``LMMS_PRUNE_METHODS``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from lmms_prune.methods import EXTERNAL, ORIGINS
    from lmms_prune.presets import describe_presets

    print(describe_presets())
    if EXTERNAL:
        print("\nExternal method modules (docs/extending.md, 'Write your own method'):\n")
        for module in EXTERNAL:
            presets = [name for (kind, name), owner in ORIGINS.items() if kind == "preset" and owner == module]
            print(f"  {module}: {', '.join(presets) or 'no presets'}")
    return 0
