"""``lmms-prune report``: leaderboard tables (markdown, CSV, LaTeX) and plots from lmms-eval result files."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a sweep folder, or any folder with lmms-eval *_results.json files")
    parser.add_argument("--out", default=None, help="output folder (default FOLDER/report)")
    parser.add_argument("--cross-keep", type=float, default=None,
                        help="keep ratio of the cross-task view (default: the smallest in the runs)")
    parser.add_argument("--match", choices=("keep", "count", "flops"), default="keep",
                        help="label rows by the budget as run (keep), by the measured final token count fraction "
                             "(count), or by the measured prefill FLOPs fraction (flops): multi-stage methods "
                             "(pyramiddrop, sparsevlm) are comparable with single-stage ones at equal count or "
                             "equal FLOPs")
    parser.add_argument("--x-axis", choices=("auto", "speedup", "flops", "tokens"), default="auto",
                        help="x-axis of the accuracy plots: measured prefill speed-up, prefill FLOPs %% of unpruned, "
                             "or kept visual tokens; each plot marks every model's Pareto front on it. auto "
                             "(default): the speed-up when every row was measured side by side with its baseline "
                             "(one sweep invocation, one host), else FLOPs")


def run(args: argparse.Namespace) -> int:
    from lmms_prune.report import write_report

    result = write_report(args.folder, args.out, args.cross_keep, args.match, args.x_axis)
    print(result["markdown"])
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")
    for path in result["plots"]:
        print(f"plot ({result['x_axis']} axis): {path}")
    for skipped in result["skipped"]:
        print(f"warning: skipped {skipped.reason}", file=sys.stderr)
    return 0
