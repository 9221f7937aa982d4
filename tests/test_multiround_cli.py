"""Multi-round requests (``output_type: generate_until_multi_round``) through the lmms-eval command line:
``qwen2_5_vl_none`` answers every round exactly as lmms-eval's own ``qwen2_5_vl`` wrapper (its simple mode, which
is where lmms-eval implements them: both runs use ``--force_simple``), and a pruning method prunes every round.

The task (tests/tasks/multiround_tiny.yaml) asks three rounds per POPE image: its question, a follow-up quoting
the previous answer with the image again, then a text-only question quoting the second answer; so a round that
differed would change the next one's prompt too."""

from __future__ import annotations

import ast
import glob
import json
import sys
from pathlib import Path

import pytest
from cli_runs import TASKS, cli_env, run_checked, run_lmms_eval

from lmms_prune.toy.models import tiny_model_dir

LIMIT = 2


def _answers(out: Path) -> dict[int, list[str]]:
    """``{doc_id: [answer per round]}``, each answer stripped (lmms-eval strips a list's answers when it logs them
    and logs a tuple, what its own wrappers return, as the tuple's string)."""
    answers = {}
    for path in glob.glob(str(out / "*" / "*_samples_multiround_tiny.jsonl")):
        for line in Path(path).read_text().splitlines():
            sample = json.loads(line)
            resp = sample["filtered_resps"]
            rounds = ast.literal_eval(resp) if isinstance(resp, str) else resp
            answers[sample["doc_id"]] = [a.strip() for a in rounds]
    return answers


@pytest.fixture(scope="module")
def qwen():
    return str(tiny_model_dir("qwen2_5_vl"))


@pytest.mark.cli
def test_none_answers_every_round_exactly_as_lmms_eval_qwen2_5_vl(qwen, tmp_path):
    # ours: bfloat16 (lmms-eval's wrapper always loads it) and use_until=false (it ignores until), as in
    # tests/test_dropin_cli.py
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "qwen2_5_vl", "--model_args",
           f"pretrained={qwen},device_map=cpu", "--device", "cpu", "--tasks", "multiround_tiny",
           "--include_path", str(TASKS), "--limit", str(LIMIT), "--output_path", str(tmp_path / "theirs"),
           "--log_samples", "--force_simple"]
    run_checked(cmd, cli_env(tmp_path))
    ours = run_lmms_eval(tmp_path, "qwen2_5_vl_none", f"pretrained={qwen},device_map=cpu,dtype=bfloat16,"
                         "use_until=false", tasks="multiround_tiny", limit=LIMIT, max_new_tokens=5,
                         log_samples=True, extra=["--force_simple"])
    theirs = _answers(tmp_path / "theirs")
    assert len(theirs) == LIMIT and all(len(rounds) == 3 for rounds in theirs.values())
    assert _answers(tmp_path / "out") == theirs
    samples = ours.efficiency["samples"]
    assert sorted((s["doc_id"], s["round"]) for s in samples) == [(d, r) for d in range(LIMIT) for r in range(3)]
    for s in samples:  # rounds 0 and 1 show the image, round 2 is text only
        assert (s["visual_before"] > 0) == (s["round"] < 2)
    assert ours.metrics["multiround_tiny"]["rounds,none"] == 3


@pytest.mark.cli
def test_pruning_applies_to_every_round_with_an_image(qwen, tmp_path):
    run = run_lmms_eval(tmp_path, "qwen2_5_vl_fastv", f"pretrained={qwen},device_map=cpu", tasks="multiround_tiny",
                        limit=1, max_new_tokens=5, log_samples=True, extra=["--force_simple"])
    samples = sorted(run.efficiency["samples"], key=lambda s: s["round"])
    assert [s["round"] for s in samples] == [0, 1, 2]
    for s in samples[:2]:
        assert s["visual_after"] < s["visual_before"] and s["prefill_flops"] < s["prefill_flops_unpruned"]
    assert samples[2]["visual_before"] == samples[2]["visual_after"] == 0


def test_multi_round_requests_need_force_simple_or_name_the_alternative():
    from lmms_prune.models import wrappers
    from lmms_prune.models.registry import MODELS

    def model(name: str):
        cls = getattr(wrappers, MODELS[name].rsplit(".", 1)[1])
        return cls.__new__(cls)  # the checks need no weights

    with pytest.raises(NotImplementedError, match=r"internvl family .*generate_until\).*qwen2_5_vl_<preset>"):
        model("internvl_fastv").generate_until_multi_round([])
    with pytest.raises(ValueError, match="--force_simple"):
        model("qwen2_5_vl_fastv").generate_until_multi_round([])
