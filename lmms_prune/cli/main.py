"""lmms-prune: training-free visual-token pruning for VLMs, evaluated with lmms-eval.

Each sub-command lives in its own module under ``lmms_prune.cli`` and exposes ``add_arguments(parser)``
and ``run(args) -> int``. Modules are imported only when their command runs, so ``lmms-prune --help``
stays fast. Exit status: what ``run`` returns (0 on success); 1 when a command fails with a ``ValueError`` or
``OSError`` (printed as one line) or any other exception (with its traceback); 2 for a usage error; 128 + N
when stopped by signal N during a sweep.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module under lmms_prune.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the whole evaluation on CPU with the shipped tiny grounding model (a few minutes); --video: "
                     "the video methods on the tiny video task"),
    "methods": ("methods", "list the pruning presets with every parameter and default"),
    "data": ("data", "check RefCOCO data: sample counts per split against the official counts"),
    "bench": ("bench", "efficiency benchmark: prefill/TTFT/decode time, FLOPs, KV cache, memory per method"),
    "sweep": ("sweep", "run methods x keep ratios x tasks through lmms-eval, one process group per cell, resumable"),
    "report": ("report", "leaderboard tables (markdown/CSV/LaTeX) and plots from lmms-eval result files"),
    "submit": ("submit", "leaderboard bundles (one JSON per cell) from a run folder; --verify them against its logs"),
    "leaderboard": ("leaderboard", "one static offline leaderboard page (table, Pareto scatter, cross-task matrix)"),
    "calibrate": ("calibrate", "calibrate a bias prior (mean attention over many images) for d2pruner/trend"),
    "diagnose": ("diagnose", "Phase-0 attention table per layer: prompt stability, position bias, entropy"),
    "visualize": ("visualize", "overlay each method's kept tokens on an image; token-box IoU with --box"),
    "vlmeval": ("vlmeval", "VLMEvalKit's own evaluation of the pruned models (needs the vlmeval extra)"),
    "check-method": ("check_method", "prove a preset (built-in or external) on every family's tiny model: prune = "
                     "mask, cache, batch, budget, determinism"),
    "new-method": ("new_method", "write an installable external method package (score, selector, preset, test)"),
    "convert-internvl": ("convert", "original InternVL2/2.5 checkpoint (remote code) -> transformers-native directory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmms-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(f"lmms_prune.cli.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = importlib.import_module(f"lmms_prune.cli.{args._module}")
    from lmms_prune.sweep import SweepInterrupted

    try:
        return int(module.run(args) or 0)
    except SweepInterrupted as stop:  # the demo's sweep; `lmms-prune sweep` handles its own
        print(f"lmms-prune {args.command}: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except (ValueError, OSError) as err:  # bad input: one line naming the value and the fix, exit status 1
        print(f"lmms-prune {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
