"""``lmms-prune report``: leaderboard tables (markdown, CSV, LaTeX) and plots from lmms-eval result files."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder, or any folder with lmms-eval *_results.json files")
    parser.add_argument("--out", default=None, help="output folder (default FOLDER/report)")
    parser.add_argument("--cross-keep", type=float, default=None,
                        help="keep ratio of the cross-task view (default: the smallest in the runs)")


def run(args: argparse.Namespace) -> int:
    from lmms_prune.report import write_report

    result = write_report(args.folder, args.out, args.cross_keep)
    print(result["markdown"])
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")
    for path in result["plots"]:
        print(f"plot: {path}")
    return 0
