"""Loglikelihood (multiple-choice) requests through the lmms-eval command line: ``llava_none`` scores every
request as lmms-eval's own ``llava_hf.loglikelihood`` does, and a pruning method prunes those requests too.

The tiny tasks are lmms-eval's ``seedbench_ppl`` on a few SEED-Bench-schema rows (tests/tasks/seedbench*_tiny.yaml):
four choices per question, one loglikelihood request per choice, scored by lmms-eval's own multiple-choice code.
lmms-eval builds such requests for simple models only, so both runs use ``--force_simple``.

The reference is lmms-eval's ``llava_hf.loglikelihood``, which cannot run unchanged with transformers 5: its
processor calls fail on an empty image list (text-only prompts) and on a prompt holding ``<image>`` without its
images (it tokenises the prompt alone to count the context tokens). So:

* text-only task: lmms-eval's own ``LlavaHf.loglikelihood``, in this process on the same tiny model, with the
  processor handed ``None`` for an empty image list (what transformers 4 did with it);
* image task: that method re-created line by line below (:func:`llava_hf_loglikelihood`), the prompt tokenised
  with its images so that the context covers the expanded image tokens.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import datasets
import pytest
from cli_runs import run_lmms_eval
from lmms_eval.api.instance import Instance
from lmms_eval.tasks.seedbench import utils as seed

from lmms_prune.toy.models import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
TASKS = ("seedbench_text_tiny", "seedbench_tiny")
LIMIT = 2  # documents per task, 4 choices each


def _requests(out: Path) -> dict[tuple[str, int, int], tuple[tuple[float, bool], dict]]:
    """``{(task, doc_id, choice): ((loss, is_greedy), token_counts)}`` from a ``--log_samples`` run."""
    found = {}
    for path in glob.glob(str(out / "*" / "*_samples_*.jsonl")):
        task = path.rsplit("_samples_", 1)[1][: -len(".jsonl")]
        for line in Path(path).read_text().splitlines():
            sample = json.loads(line)
            for choice, ((loss, greedy), counts) in enumerate(zip(sample["filtered_resps"],
                                                                  sample["token_counts"])):
                found[(task, sample["doc_id"], choice)] = ((float(loss), greedy in (True, "True")), counts)
    return found


def _docs(task: str) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files={"test": str(DATA / f"{task}.parquet")})["test"]


def _instances(task: str) -> list[Instance]:
    """lmms-eval's multiple-choice requests of a task (``ConfigurableTask.construct_requests``: the zero-shot
    context ``doc_to_text``, each choice after the default target delimiter " ")."""
    out = []
    for doc_id, doc in enumerate(_docs(task).select(range(LIMIT))):
        for i, choice in enumerate(seed.seed_doc_to_choice(doc)):
            args = (seed.seed_doc_to_text_mc(doc), f" {choice}", seed.seed_doc_to_visual, doc_id, task, "test")
            out.append(Instance("loglikelihood", args, idx=i,
                                metadata={"task": task, "doc_id": doc_id, "repeats": 1}))
    return out


class _EmptyImagesAsNone:
    """The processor with ``images=[]`` passed as ``None`` (transformers 4 took an empty list as no images)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, *args, images=None, **kwargs):
        return self.processor(*args, images=images or None, **kwargs)


def llava_hf_loglikelihood(lm, context: str, continuation: str, images: list) -> tuple[float, bool]:
    """lmms-eval 0.7.3's ``LlavaHf.loglikelihood`` for one request (``lm``: its ``LlavaHf``), re-created: one
    ``<image>`` tag per image before the context; user/assistant string turns through the tokenizer's chat
    template; the labels are the full text's ids with the context positions set to -100; the loss is the
    model's own (``labels=``); greedy when the logits' argmax at each continuation position equals that
    position's token. Only change: the context is tokenised with its images (and the tag is the processor's image
    token: ``<image>`` on llava-hf checkpoints, ``<|image_pad|>`` on the toy OneVision)."""
    processor, tokenizer = lm._image_processor, lm.tokenizer
    tag = getattr(processor, "image_token", None) or "<image>"
    user = f"{' '.join([tag] * len(images))}\n{context}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": continuation}]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    inputs = processor(text=[full], images=images, return_tensors="pt")
    context_len = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :context_len] = -100
    import torch

    with torch.inference_mode():
        out = lm.model(**inputs, labels=labels)
    greedy = out.logits.argmax(dim=-1)[:, context_len:]
    return float(out.loss), bool((greedy == inputs["input_ids"][:, context_len:]).all())


@pytest.fixture(scope="module")
def llava():
    return str(tiny_model_dir("llava"))


@pytest.fixture(scope="module")
def ours(llava, tmp_path_factory):
    """``llava_none`` on both tasks (lmms-eval's crop pipeline, as llava_hf's raw images)."""
    tmp = tmp_path_factory.mktemp("ll_none")
    run_lmms_eval(tmp, "llava_none", f"pretrained={llava},device_map=cpu,image_aspect_ratio=crop",
                  tasks=",".join(TASKS), limit=LIMIT, log_samples=True, extra=["--force_simple"])
    return _requests(tmp / "out")


@pytest.fixture(scope="module")
def lmms_eval_llava_hf(llava):
    """lmms-eval's own ``llava_hf`` (simple) on the tiny checkpoint, its task data attached as lmms-eval does."""
    from lmms_eval.models.simple.llava_hf import LlavaHf

    lm = LlavaHf(pretrained=llava, device="cpu", device_map="cpu")
    lm.task_dict = {task: {"test": _docs(task)} for task in TASKS}
    return lm


@pytest.mark.cli
def test_none_scores_text_requests_exactly_as_lmms_eval_llava_hf(ours, lmms_eval_llava_hf):
    lm = lmms_eval_llava_hf
    requests = _instances("seedbench_text_tiny")
    processor = lm._image_processor
    lm._image_processor = _EmptyImagesAsNone(processor)
    try:
        theirs = lm.loglikelihood(requests)
    finally:
        lm._image_processor = processor
    assert len(theirs) == LIMIT * 4
    for req, (loss, greedy) in zip(requests, theirs):
        (our_loss, our_greedy), counts = ours[("seedbench_text_tiny", req.args[3], req.idx)]
        assert math.isclose(our_loss, loss, rel_tol=1e-5), (req.args, our_loss, loss)
        assert our_greedy == greedy
        assert counts["pruning"]["visual_before"] == 0
    assert len({round(loss, 4) for loss, _ in theirs}) > 1  # the scores depend on the choice


@pytest.mark.cli
def test_none_scores_image_requests_as_llava_hf_arithmetic(ours, lmms_eval_llava_hf):
    requests = _instances("seedbench_tiny")
    docs = _docs("seedbench_tiny")
    for req in requests:
        context, continuation, doc_to_visual, doc_id, _, _ = req.args
        loss, greedy = llava_hf_loglikelihood(lmms_eval_llava_hf, context, continuation,
                                              doc_to_visual(docs[doc_id]))
        (our_loss, our_greedy), counts = ours[("seedbench_tiny", doc_id, req.idx)]
        assert math.isclose(our_loss, loss, rel_tol=1e-5), (req.args[:2], our_loss, loss)
        assert our_greedy == greedy
        pruning = counts["pruning"]
        assert pruning["visual_before"] == pruning["visual_after"] > 0  # method none keeps every token
        assert counts["input_tokens"] == pruning["seq_len_before"] == pruning["seq_len_after"]


@pytest.mark.cli
def test_pruning_applies_to_loglikelihood_requests_and_the_records_say_so(llava, ours, tmp_path):
    run = run_lmms_eval(tmp_path, "llava_fastv", f"pretrained={llava},device_map=cpu,image_aspect_ratio=crop",
                        tasks="seedbench_tiny", limit=LIMIT, log_samples=True, extra=["--force_simple"])
    pruned = _requests(tmp_path / "out")
    assert len(pruned) == LIMIT * 4
    for key, ((loss, _), counts) in pruned.items():
        pruning = counts["pruning"]
        assert pruning["visual_after"] < pruning["visual_before"] == ours[key][1]["pruning"]["visual_before"]
        assert counts["input_tokens"] == pruning["seq_len_after"] < pruning["seq_len_before"]
        assert pruning["prefill_flops"] < pruning["prefill_flops_unpruned"]
        assert math.isfinite(loss)
    assert any(not math.isclose(loss, ours[key][0][0], rel_tol=1e-6) for key, ((loss, _), _) in pruned.items())
    samples = run.efficiency["samples"]
    assert len(samples) == LIMIT * 4 and {s["request"] for s in samples} == {"loglikelihood"}
    assert sorted((s["doc_id"], s["choice"]) for s in samples) == sorted((d, c) for _, d, c in pruned)
    assert run.efficiency["summary"]["visual_kept_ratio"] < 1
    assert run.metrics["seedbench_tiny"]["acc,none"] in (0.0, 0.5, 1.0)


def test_families_without_loglikelihood_say_so_and_name_the_alternative():
    from lmms_prune.runner import loglikelihood_families, loglikelihood_unsupported

    assert loglikelihood_families() == ["llava", "llava_next", "llava_onevision"]  # lmms-eval's llava_hf runs them
    message = loglikelihood_unsupported("qwen2_5_vl", "qwen2_5_vl_fastv")
    assert "qwen2_5_vl family" in message and "generate_until" in message and "llava_<preset>" in message


def test_every_wrapper_has_a_simple_twin_for_force_simple():
    """lmms-eval resolves ``--force_simple`` to the manifest's simple class and checks its ``is_simple``."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from lmms_prune.models.registry import MODELS, SIMPLE_MODELS, manifests

    registry = ModelRegistryV2()
    for manifest in manifests():
        registry.register_manifest(manifest)
    assert set(SIMPLE_MODELS) == set(MODELS) - {"grounding_oracle"}
    for name in ("llava_none", "qwen2_5_vl_fastv", "internvl_prune"):
        simple, chat = registry.get_model_class(name, force_simple=True), registry.get_model_class(name)
        assert simple.is_simple and not chat.is_simple and issubclass(simple, chat)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_llava_next_and_onevision_score_as_llava_hf_arithmetic(family):
    """The other families of lmms-eval's ``llava_hf`` (in process: the runner against the re-creation above on
    the same tiny checkpoint, unpruned, one image request per choice)."""
    from types import SimpleNamespace

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmms_prune.families import family_class
    from lmms_prune.runner import Runner, parse_options

    path = str(tiny_model_dir(family))
    fam = family_class(family)
    options, config = parse_options(fam, f"{family}_none", "none", pretrained=path, device="cpu")
    runner = Runner(fam, options, config, f"{family}_none")
    runner.setup_device()
    runner.load()
    runner.install()
    processor = AutoProcessor.from_pretrained(path)
    lm = SimpleNamespace(_image_processor=processor, tokenizer=processor.tokenizer,
                         model=AutoModelForImageTextToText.from_pretrained(path).eval())
    docs = _docs("seedbench_tiny")
    for req in _instances("seedbench_tiny")[:4]:
        context, continuation, doc_to_visual, doc_id, _, _ = req.args
        images = doc_to_visual(docs[doc_id])
        score = runner.loglikelihood(images, context, continuation, "understanding")
        loss, greedy = llava_hf_loglikelihood(lm, context, continuation, images)
        assert math.isclose(score.loss, loss, rel_tol=1e-5) and score.is_greedy == greedy
        assert score.record["visual_before"] == score.record["visual_after"] > 0
    runner.close()
