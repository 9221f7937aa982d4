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
    parser.add_argument("--log-samples", action="store_true",
                        help="lmms-eval --log_samples: per-sample logs, needed by `lmms-prune submit --verify`")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 when every cell is done, 1 when one failed (or another sweep holds it), 2 for bad
    arguments, 128 + the signal number when stopped by SIGTERM / SIGINT (its running cell's processes ended)."""
    import sys

    from lmms_prune.sweep import (
        Sweep,
        SweepInterrupted,
        build_cells,
        check_cells,
        check_tasks,
        parse_method_args,
        parse_models,
    )

    try:
        keeps = [float(k) for k in args.keep.split(",") if k]
    except ValueError:
        print(f"lmms-prune sweep: --keep {args.keep!r}: write comma-separated numbers in (0, 1]", file=sys.stderr)
        return 2
    tasks = [t for t in args.tasks.split(",") if t]
    try:  # everything checked before the first cell launches
        cells = build_cells(parse_models(args.models), [m for m in args.methods.split(",") if m], keeps,
                            parse_method_args(args.method_args))
        check_cells(cells)
        check_tasks(tasks, args.include_path)
    except ValueError as err:
        print(f"lmms-prune sweep: {err}", file=sys.stderr)
        return 2
    launcher = args.launcher or sys.executable
    sweep = Sweep(Path(args.out), tasks, launcher=launcher, limit=args.limit,
                  include_path=args.include_path, retries=args.retries,
                  extra_args=("--log_samples",) if args.log_samples else ())
    try:
        statuses = sweep.run(cells, progress=lambda line: print(line, flush=True))
    except SweepInterrupted as stop:
        print(f"lmms-prune sweep: {stop}; the running cell was stopped and will rerun next time", file=sys.stderr)
        return 128 + stop.signum
    failed = [n for n, s in statuses.items() if not (s.startswith("done") or s.startswith("skipped"))]
    print(f"{len(statuses) - len(failed)}/{len(statuses)} cells done" + (f"; not done: {', '.join(failed)}" if failed else ""))
    if args.report:
        from lmms_prune.report import write_report

        print(write_report(args.out)["markdown"])
    return 1 if failed else 0
