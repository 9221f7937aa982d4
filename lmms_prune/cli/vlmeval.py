"""``lmms-prune vlmeval``: VLMEvalKit's own evaluation (its datasets, prompts, scoring) of the pruned models.

    lmms-prune vlmeval --model internvl_deepprune --model-args pretrained=DIR,keep_ratio=0.1 --data RefCOCO

The models are registered into VLMEvalKit's ``supported_VLM`` in this process and VLMEvalKit's ``run.py`` main
runs them (``lmms_prune.harness.vlmeval``). Arguments after ``--`` go to VLMEvalKit's ``run.py`` unchanged.
The exit status is 1 when any model x dataset lacks its predictions, scores or efficiency records (VLMEvalKit
itself exits 0 after a failed combination). ``--compare-lmms-eval RESULTS.json`` then prints VLMEvalKit's
RefCOCO scores next to those of our lmms-eval RefCOCO tasks in that lmms-eval results file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", required=True,
                        help="pruned model name(s): <family>_<preset> or <family>_prune (with method=)")
    parser.add_argument("--model-args", default="",
                        help="lmms-eval style key=value,... options of the model(s) (pretrained=, keep_ratio=, ...)")
    parser.add_argument("--data", nargs="*", default=[],
                        help="VLMEvalKit dataset names (RefCOCO, MMBench_DEV_EN, or a custom <name>.tsv in $LMUData)")
    parser.add_argument("--work-dir", default="./outputs", help="VLMEvalKit's output directory")
    parser.add_argument("--mode", default="all", choices=("all", "infer", "eval"), help="VLMEvalKit's --mode")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each dataset")
    parser.add_argument("--judge", default=None,
                        help="VLMEvalKit's --judge (exact_matching scores MCQ/Y-N without an API judge)")
    parser.add_argument("--reuse", action="store_true", help="VLMEvalKit's --reuse (resume previous predictions)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per answer (greedy)")
    parser.add_argument("--compare-lmms-eval", default=None, metavar="RESULTS_JSON",
                        help="after the run, print VLMEvalKit's RefCOCO scores next to this lmms-eval results file")
    parser.add_argument("--refcoco-data", default="RefCOCO",
                        help="the VLMEvalKit RefCOCO dataset name whose scores --compare-lmms-eval reads")
    parser.add_argument("vlmeval_args", nargs=argparse.REMAINDER,
                        help="after --: further arguments for VLMEvalKit's run.py")


def vlmeval_argv(args: argparse.Namespace) -> list[str]:
    """The ``run.py`` command line that the parsed ``args`` stand for."""
    argv = ["vlmeval", "--model", *args.model, "--data", *args.data, "--work-dir", str(args.work_dir),
            "--mode", args.mode]
    if args.limit is not None:
        argv += ["--limit", str(args.limit)]
    if args.judge:
        argv += ["--judge", args.judge]
    if args.reuse:
        argv.append("--reuse")
    extra = list(args.vlmeval_args or [])
    return argv + (extra[1:] if extra[:1] == ["--"] else extra)


def run(args: argparse.Namespace) -> int:
    from lmms_prune.harness import vlmeval as harness

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("lmms-prune vlmeval runs one process (WORLD_SIZE > 1 is not supported); run it without torchrun",
              file=sys.stderr)
        return 2
    try:
        harness.register(args.model, args.model_args, args.work_dir, args.max_new_tokens)
    except ValueError as err:
        print(f"lmms-prune vlmeval: {err}", file=sys.stderr)
        return 2
    problems: list[str] = []
    if args.data:
        import vlmeval.run

        saved = sys.argv
        sys.argv = vlmeval_argv(args)
        try:
            vlmeval.run.main()
        finally:
            sys.argv = saved
            harness.finish_all()
        for model in args.model:
            problems += harness.check_outputs(args.work_dir, model, args.data, args.mode)
    if args.compare_lmms_eval:
        from vlmeval.smp import get_eval_file_format

        for model in args.model:
            scores = Path(args.work_dir) / model / f"{model}_{args.refcoco_data}_acc.{get_eval_file_format()}"
            try:
                rows = harness.compare_refcoco(scores, args.compare_lmms_eval)
            except (OSError, ValueError) as err:
                problems.append(f"--compare-lmms-eval for {model}: {err}")
                continue
            print(harness.format_comparison(rows, title=f"{model}: VLMEvalKit vs lmms-eval RefCOCO"))
    for problem in problems:
        print(f"lmms-prune vlmeval: {problem}", file=sys.stderr)
    return 1 if problems else 0
