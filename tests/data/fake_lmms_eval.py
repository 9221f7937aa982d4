"""A stand-in for ``python -m lmms_eval`` in sweep tests: ``--launcher "python tests/data/fake_lmms_eval.py"``.

It writes what a run of this package's wrappers leaves behind (one ``*_results.json`` under ``--output_path``
and the efficiency JSON at ``efficiency_path``), so the sweep's bookkeeping can be tested in milliseconds.
``FAKE_LMMS_EVAL_MODE`` picks the outcome, each one a way lmms-eval really ends:

- ``ok``: two samples answered;
- ``skip_all``: results written, every sample skipped (``on_error=skip`` with a broken setting);
- ``crash``: a traceback in the log, no results, exit status 0 (lmms-eval's CLI catches the exception);
- ``hang``: starts a grandchild in its process group, writes both pids to ``FAKE_LMMS_EVAL_PIDS`` and sleeps.

Every call appends its arguments as one JSON line to ``FAKE_LMMS_EVAL_CALLS`` when that is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m")
    for name in ("--model", "--model_args", "--tasks", "--output_path", "--limit", "--include_path",
                 "--batch_size", "--gen_kwargs"):
        parser.add_argument(name)
    args, _ = parser.parse_known_args()
    mode = os.environ.get("FAKE_LMMS_EVAL_MODE", "ok")
    if os.environ.get("FAKE_LMMS_EVAL_CALLS"):
        with open(os.environ["FAKE_LMMS_EVAL_CALLS"], "a") as calls:
            calls.write(json.dumps({"model": args.model, "model_args": args.model_args, "limit": args.limit,
                                    "mode": mode}) + "\n")
    if mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(os.environ["FAKE_LMMS_EVAL_PIDS"]).write_text(f"{os.getpid()} {child.pid}\n")
        time.sleep(600)
        return 0
    if mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: generation failed on sample 0", file=sys.stderr)
        print("Error during evaluation: generation failed on sample 0", file=sys.stderr)
        return 0
    model_args = dict(part.split("=", 1) for part in args.model_args.split(","))
    stamp = time.strftime("%Y%m%d_%H%M%S")
    out = Path(args.output_path) / "model"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}_results.json").write_text(json.dumps({
        "config": {"model": args.model, "model_args": args.model_args, "limit": args.limit},
        "results": {"pope_tiny": {"alias": "pope_tiny", "pope_accuracy,none": 50.0}},
        "group_subtasks": {"pope_tiny": []},
        "date": stamp,
    }))
    answered = 0 if mode == "skip_all" else 2
    samples = [{"task": "pope_tiny", "doc_id": i, "batch_size": 1, "visual_after": 10, "visual_before": 20,
                "llm_prefill_seconds": 0.1, "kv_cache_bytes": 100, "kv_cache_bytes_unpruned": 200}
               for i in range(answered)]
    Path(model_args["efficiency_path"]).write_text(json.dumps({
        "summary": {"samples": answered, "skipped": 2 - answered}, "samples": samples, "world_size": 1,
        "skipped": [{"task": "pope_tiny", "doc_id": i, "error": "ValueError: bad"} for i in range(2 - answered)],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
