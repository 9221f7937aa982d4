"""Running the lmms-eval command line on tiny local models, for the tests of every family and harness path.

lmms-eval's CLI catches exceptions and exits 0, so a run is judged by what it wrote: :func:`run_lmms_eval`
returns the results, the logged answers and our efficiency report, and fails when any of them is missing.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "tasks"


@dataclass
class CliRun:
    """What one lmms-eval run wrote: metrics per task, ``{(task, doc_id): filtered answer}`` (with
    ``--log_samples``), the efficiency report, and the process itself (for its logs)."""

    metrics: dict
    answers: dict
    efficiency: dict
    done: subprocess.CompletedProcess


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Offline, one thread, a datasets cache of the test's own, no inherited accelerate CPU switch, and the
    committed tinyvideo clips unless the environment names others."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    env.pop("ACCELERATE_USE_CPU", None)
    env.setdefault("LMMS_PRUNE_TINYVIDEO_DIR", str(REPO / "tests" / "data" / "tinyvideo"))  # the committed clips
    return env


def run_checked(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; fail with the tail of its logs when it exits non-zero."""
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def read_outputs(out: Path) -> tuple[dict, dict, dict]:
    """(metrics per task, {(task, doc_id): answer}, efficiency report) of one run's output directory."""
    results = glob.glob(str(out / "*" / "*_results.json"))
    efficiency = glob.glob(str(out / "*" / "*_efficiency.json"))
    assert len(results) == 1, f"expected one results file under {out}, found {results}"
    assert len(efficiency) == 1, f"expected one efficiency file next to the results, found {efficiency}"
    assert Path(efficiency[0]).parent == Path(results[0]).parent
    metrics = json.loads(Path(results[0]).read_text())["results"]
    answers = {}
    for path in glob.glob(str(out / "*" / "*_samples_*.jsonl")):
        task = path.rsplit("_samples_", 1)[1][: -len(".jsonl")]
        for line in Path(path).read_text().splitlines():
            sample = json.loads(line)
            answers[(task, sample["doc_id"])] = sample["filtered_resps"]
    return metrics, answers, json.loads(Path(efficiency[0]).read_text())


def run_lmms_eval(tmp_path: Path, model: str, model_args: str, tasks: str = "pope_tiny", limit: int = 3,
                  max_new_tokens: int = 4, log_samples: bool = False, extra: list[str] | None = None) -> CliRun:
    """``python -m lmms_eval`` with this repository's test tasks, offline, into ``tmp_path / "out"``."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", tasks,
           "--include_path", str(TASKS), "--limit", str(limit), "--gen_kwargs", f"max_new_tokens={max_new_tokens}",
           "--output_path", str(out)] + (["--log_samples"] if log_samples else []) + list(extra or [])
    done = run_checked(cmd, cli_env(tmp_path))
    metrics, answers, efficiency = read_outputs(out)
    return CliRun(metrics, answers, efficiency, done)
