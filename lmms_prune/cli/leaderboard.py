"""``lmms-prune leaderboard``: one static, offline ``index.html`` from submission bundles."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE",
                        help="bundle files written by `lmms-prune submit`, or folders of them")
    parser.add_argument("--out", required=True, help="output folder; the page is OUT/index.html")


def run(args: argparse.Namespace) -> int:
    from lmms_prune.leaderboard.page import write_page

    try:
        page = write_page(args.bundles, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"leaderboard page: {page}")
    return 0
