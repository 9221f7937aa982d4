"""``lmms-prune demo``: the whole evaluation on CPU with the shipped tiny grounding model on two tasks (a few minutes)."""

from __future__ import annotations

import argparse

# lmms_prune.demo.DEMO_METHODS (not imported here: it imports torch; tests/test_sparsevlm.py checks they agree)
METHODS = "none,fastv,d2pruner,deepprune,vispruner,random,pyramiddrop,visionzip,fastervlm,cdpruner,sparsevlm,prumerge_plus"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (re-running resumes)")
    parser.add_argument("--images", type=int, default=16,
                        help="held-out synthetic images of the val task (default 16; the crowded testA task: a quarter)")
    parser.add_argument("--keep", type=float, default=0.1, help="keep ratio (default 0.1)")
    parser.add_argument("--methods", default=METHODS, help=f"comma-separated presets (default {METHODS})")
    parser.add_argument("--overlays", type=int, default=3, help="images with kept-token overlays (default 3)")
    parser.add_argument("--launcher", default=None,
                        help="command prefix per run (default: accelerate launch, one process)")
    parser.add_argument("--pretrained", default=None, help="another InternVL checkpoint (default tiny-grounder)")


def run(args: argparse.Namespace) -> int:
    import time

    from lmms_prune.demo import run_demo

    t0 = time.time()
    result = run_demo(args.out, n_images=args.images, keep=args.keep,
                      methods=tuple(m for m in args.methods.split(",") if m), launcher=args.launcher,
                      overlays=args.overlays, pretrained=args.pretrained)
    print()
    print(f"## lmms-prune demo: {result['model'].name}, RefCOCO-style synthetic val and crowded testA, "
          f"keep {args.keep:g}")
    print()
    print(result["leaderboard"])
    print()
    rho = result["rank_correlation"]
    print("cross-task rank correlation (Spearman, val vs crowded testA, "
          f"{rho['methods']} methods): {'n/a' if rho['rho'] is None else format(rho['rho'], '.2f')}")
    print()
    print(f"full report: {result['report']['paths']['markdown']}")
    for path in result["overlays"]:
        print(f"overlay: {path}")
    print(f"leaderboard page: {result['page']}")
    print(f"done in {time.time() - t0:.0f} s")
    return 0
