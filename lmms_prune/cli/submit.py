"""``lmms-prune submit``: leaderboard bundles (one JSON per cell) from a run folder, or ``--verify`` bundles
against the run folder they came from (every metric recomputed from the per-sample logs)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a sweep folder, one cell of it, or any lmms-eval output folder (runs with --log_samples)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out", default=None, help="write the bundle of RUN_DIR's single run to this file")
    out.add_argument("--out-dir", default=None,
                     help="write one bundle per run into this folder (<family>__<method>__keep<r>__<fingerprint>.json, "
                          "names made safe: nothing is written outside it)")
    out.add_argument("--verify", action="append", default=None, metavar="BUNDLE",
                     help="check this bundle (a file, or a folder of bundles; repeatable) against RUN_DIR and "
                          "exit 1 on any mismatch")
    parser.add_argument("--include-path", action="append", default=[],
                        help="task folder to find task YAMLs in when verifying (besides the run's own "
                             "--include_path and lmms-eval's tasks); repeatable")


def _submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmms_prune.leaderboard.bundle import build_bundles, bundle_filename, write_bundle, write_bundle_into

    bundles = build_bundles(args.run_dir)
    if args.out:
        if len(bundles) != 1:
            names = ", ".join(bundle_filename(b) for b in bundles)
            print(f"error: RUN_DIR {args.run_dir} holds {len(bundles)} runs ({names}); use --out-dir DIR for one "
                  "bundle per run, or give one cell's folder", file=sys.stderr)
            return 2
        paths = [write_bundle(bundles[0], Path(args.out))]
    else:
        out_dir = Path(args.out_dir) if args.out_dir else Path(args.run_dir) / "bundles"
        paths = [write_bundle_into(b, out_dir) for b in bundles]  # names from data: never outside out_dir
    for bundle, path in zip(bundles, paths):
        m = bundle["method"]
        print(f"{path}: {bundle['checkpoint']['family']} {m['name']} keep {m['keep_ratio']:g}, "
              f"fingerprint {bundle['fingerprint']}, {len(bundle['tasks'])} task(s), logs {bundle['logs']['digest'][:12]}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from lmms_prune.leaderboard.bundle import bundle_paths, load_bundle
    from lmms_prune.leaderboard.verify import TaskConfigs, verify_bundle

    failed = 0
    configs = TaskConfigs(args.include_path)
    for path in bundle_paths(args.verify):
        try:
            bundle = load_bundle(path)
            result = verify_bundle(bundle, args.run_dir, args.include_path, name=str(path), configs=configs)
        except (ValueError, FileNotFoundError) as err:
            print(f"FAIL {path}: {err}")
            failed += 1
            continue
        if result.ok:
            print(f"OK   {path}: {result.checked} checks, its identity equals the run's records and every "
                  "figure its recomputation from the logs")
        else:
            failed += 1
            print(f"FAIL {path}: {len(result.mismatches)} of {result.checked} checks do not match")
            for line in result.mismatches:
                print(f"     - {line}")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    try:
        return _verify(args) if args.verify else _submit(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
