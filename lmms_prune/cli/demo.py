"""``lmms-prune demo``: the whole evaluation on CPU with the shipped tiny grounding model on two tasks (a few minutes);
``--video``: the video methods on the tiny video task."""

from __future__ import annotations

import argparse

# lmms_prune.demo.DEMO_METHODS (not imported here: it imports torch; tests/test_sparsevlm.py checks they agree)
METHODS = ("none,fastv,d2pruner,deepprune,vispruner,random,pyramiddrop,visionzip,fastervlm,cdpruner,sparsevlm,"
           "prumerge_plus,feather,mustdrop,vscan")
# lmms_prune.video_demo.VIDEO_METHODS (tests/test_video_demo.py checks they agree)
VIDEO_METHODS = "none,fastv,temporal,evs,vidcom2,fastvid"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", action="store_true",
                        help="the video methods on the tiny video task instead (lmms_prune.video_demo: "
                             f"{VIDEO_METHODS} on a tiny video model)")
    parser.add_argument("--out", default=None, help="output folder (re-running resumes; default runs/demo, "
                        "with --video runs/video_demo)")
    parser.add_argument("--images", type=int, default=16,
                        help="held-out synthetic images per task (RefCOCO val, POPE test; default 16)")
    parser.add_argument("--keep", type=float, default=None, help="keep ratio (default 0.1; with --video 0.25)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated presets (default {METHODS}; with --video {VIDEO_METHODS})")
    parser.add_argument("--overlays", type=int, default=3, help="images with kept-token overlays (default 3)")
    parser.add_argument("--launcher", default=None,
                        help="command prefix per run (default: accelerate launch, one process; with --video: python)")
    parser.add_argument("--pretrained", default=None, help="another InternVL checkpoint (default tiny-grounder); with "
                        "--video a checkpoint of --family, e.g. tiny-video-qa (shipped, llava_onevision, trained on the task) "
                        "or one saved by scripts/train_video_qa.py (default: tiny-video-qa for llava_onevision, the random-weight "
                        "toy for qwen2_5_vl)")
    parser.add_argument("--family", default="llava_onevision",
                        help="with --video: the tiny video model's family, llava_onevision (default) or qwen2_5_vl")
    parser.add_argument("--limit", type=int, default=None, help="with --video: clips per run (default all 8)")


def run(args: argparse.Namespace) -> int:
    import time

    t0 = time.time()
    if args.video:
        return run_video(args, t0)
    from lmms_prune.demo import run_demo

    methods = args.methods or METHODS
    keep = 0.1 if args.keep is None else args.keep
    result = run_demo(args.out or "runs/demo", n_images=args.images, keep=keep,
                      methods=tuple(m for m in methods.split(",") if m), launcher=args.launcher,
                      overlays=args.overlays, pretrained=args.pretrained)
    print()
    print(f"## lmms-prune demo: {result['model'].name}, RefCOCO-style synthetic val and POPE-style test, "
          f"keep {keep:g}")
    print()
    print(result["leaderboard"])
    print()
    rho = result["rank_correlation"]
    print("cross-task rank correlation (Spearman, RefCOCO val vs POPE, "
          f"{rho['methods']} methods): {'n/a' if rho['rho'] is None else format(rho['rho'], '.2f')}")
    print()
    print(f"full report: {result['report']['paths']['markdown']}")
    for path in result["overlays"]:
        print(f"overlay: {path}")
    print(f"leaderboard page: {result['page']}")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


def run_video(args: argparse.Namespace, t0: float) -> int:
    """``--video``: lmms_prune.video_demo, its table printed."""
    import time

    from lmms_prune.video_demo import run_video_demo

    keep = 0.25 if args.keep is None else args.keep
    methods = tuple(m for m in (args.methods or VIDEO_METHODS).split(",") if m)
    result = run_video_demo(args.out or "runs/video_demo", family=args.family, keep=keep, methods=methods,
                            launcher=args.launcher, limit=args.limit, pretrained=args.pretrained)
    print()
    print(f"## lmms-prune demo --video: {result['model'].name} ({args.family}), tinyvideo, keep {keep:g}")
    print()
    print(result["table"])
    print()
    print(f"full report: {result['report']['paths']['markdown']}")
    print(f"done in {time.time() - t0:.0f} s")
    return 0
