"""``lmms-prune sweep``: every model x method x keep-ratio cell through lmms-eval, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="internvl",
                        help="comma-separated families, optionally =PATH: internvl,qwen2_5_vl=/ckpt (default internvl)")
    parser.add_argument("--methods", default="fastv,d2pruner,deepprune", help="comma-separated presets")
    parser.add_argument("--keep", default="0.5,0.25,0.1", help="comma-separated keep ratios")
    parser.add_argument("--tasks", default="refcoco,refcoco+,refcocog", help="lmms-eval task or group names")
    parser.add_argument("--launcher", default=None,
                        help='command prefix for each cell, e.g. "accelerate launch --num_processes 8" '
                             "(default: this Python)")
    parser.add_argument("--method-args", action="append", default=[],
                        help="METHOD:KEY=VALUE model arg for one method ('*' for all), repeatable, "
                             "e.g. d2pruner:bias_prior=prior.pt")
    parser.add_argument("--limit", type=int, default=None, help="lmms-eval --limit (samples per task)")
    parser.add_argument("--include-path", default=None, help="lmms-eval --include_path")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a failed cell within this run")
    parser.add_argument("--out", required=True, help="sweep folder (re-run with the same folder to resume)")
    parser.add_argument("--report", action="store_true", help="write the report when the sweep finishes")


def run(args: argparse.Namespace) -> int:
    import sys

    from lmms_prune.sweep import Sweep, build_cells, parse_method_args, parse_models

    cells = build_cells(parse_models(args.models), [m for m in args.methods.split(",") if m],
                        [float(k) for k in args.keep.split(",") if k], parse_method_args(args.method_args))
    launcher = args.launcher or sys.executable
    sweep = Sweep(Path(args.out), [t for t in args.tasks.split(",") if t], launcher=launcher, limit=args.limit,
                  include_path=args.include_path, retries=args.retries)
    statuses = sweep.run(cells)
    for name, status in statuses.items():
        print(f"{name}: {status}")
    failed = [n for n, s in statuses.items() if s.startswith("FAILED")]
    if args.report:
        from lmms_prune.report import write_report

        print(write_report(args.out)["markdown"])
    return 1 if failed else 0
