"""The lmms-eval layer: chat models that answer lmms-eval requests with a pruned VLM (:mod:`lmms_prune.runner`).

A wrapper (``internvl_deepprune``, ``qwen2_5_vl_prune``, ...) is generated for every family x preset
(``lmms_prune.models.wrappers``). This module holds only what is lmms-eval's: the ``--model_args`` string,
``Instance`` to neutral chat messages, batching in request order, per-sample errors (``on_error``), gathering
the efficiency records across ranks and where they are written. Loading, prompting, generating and the cost
accounting are the runner's.

Results go where lmms-eval puts its own:

- ``results["throughput"]``: each ``generate_until`` call reports through lmms-eval's ``log_metrics`` (generated
  tokens, generation seconds) with our figures as ``additional_metrics`` (visual tokens before/after, LLM
  prefill and selection seconds, prefill-FLOPs ratio, KV-cache bytes and ratio); lmms-eval averages them into
  ``avg_<name>``.
- ``results["efficiency"]`` and ``--log_samples``: every answer carries a :class:`PrunedTokenCounts`, whose
  ``input_tokens`` are the tokens the LLM really processed (after pruning) and whose ``pruning`` entry is the
  sample's efficiency record; lmms-eval writes both into the sample's ``token_counts``.
- The efficiency JSON (all records and their summary): lmms-eval calls ``clean()`` on every rank once all
  requests have run; there the records are gathered to rank 0 and summarised in the log. The file goes to
  ``efficiency_path`` (a ``.json`` file or a directory) if given, else next to lmms-eval's
  ``<--output_path>/<model dir>/<date>_results.json`` as ``<date>_efficiency.json`` with the same ``<date>``.
  lmms-eval hands neither its output path nor the run's date to models (``simple_evaluate`` gets them, the
  model only ``--model_args``), and writes its results after ``clean()``: so the output path is read from the
  command line (``sys.argv``, or a single-run ``--config`` YAML; the sub-directory named with lmms-eval's own
  model-name sanitiser) and the file is written at process exit, dated like the results file lmms-eval wrote
  in that directory during this run (the current date if it wrote none). Without either, the summary is only
  logged.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from loguru import logger as eval_logger
from tqdm import tqdm

from lmms_prune.families import family_class
from lmms_prune.images import load_image
from lmms_prune.presets import PRESETS, PruneConfig
from lmms_prune.runner import (
    OPTIONS,
    RunOptions,
    apply_until,
    check_output_path,
    format_summary,
    generation_kwargs,
    loglikelihood_families,
    loglikelihood_unsupported,
    make_runner,
    parse_options,
    summarize,
)
from lmms_prune.video import FAMILY_SAMPLING, decode_video, family_sampling, register_run_sampling

__all__ = ["PrunedChatModel", "PrunedTokenCounts", "apply_until", "format_summary", "lmms_eval_cli_options",
           "preset_classes", "summarize"]

WRAPPER_ARGS = OPTIONS
# families whose lmms-eval 0.7.3 wrapper implements generate_until_multi_round (simple mode), with where their
# loops differ: the default max_new_tokens, and whether each round's answer is stripped before the next round
MULTI_ROUND_IN_LMMS_EVAL: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {"max_new_tokens": 32768, "strip": False},
    "qwen2_vl": {"max_new_tokens": 128, "strip": True},
}
WrapperOptions = RunOptions


@dataclass
class _Item:
    """One request: its position in the request list, where its document is, and its generation options."""

    index: int
    task: str
    split: str
    doc_id: int
    doc_to_messages: Any
    gen_kwargs: dict[str, Any]
    padding: bool = False  # lmms-eval's duplicate that evens out the ranks' request counts: not a sample
    round: int | None = None  # a multi-round request's round (0, 1, ...)


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus the sample's efficiency record (``pruning``), which lmms-eval
    writes into the ``token_counts`` of each ``--log_samples`` line."""

    pruning: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = super().to_dict()
        if self.pruning:
            out["pruning"] = dict(self.pruning)
        return out


def throughput_metrics(records: Sequence[dict[str, Any]], rank: int) -> dict[str, Any]:
    """``log_metrics`` arguments of one ``generate_until`` call from its samples' efficiency records
    (``generate_seconds`` is per batch: each batch counts once)."""
    batches: dict[tuple[float, float], float] = {}
    for r in records:
        batches[(r["batch_start"], r["generate_seconds"])] = r["generate_seconds"]
    elapsed = sum(batches.values())
    tokens = sum(int(r["output_tokens"]) for r in records)
    s = summarize(records)
    additional: dict[str, Any] = {"rank": rank, "total_requests": len(records)}
    if records:
        additional.update({
            "visual_tokens_before": s["mean_visual_before"],
            "visual_tokens_after": s["mean_visual_after"],
            "visual_kept_ratio": s["visual_kept_ratio"],
            # absent from backend=vllm's records (those phases run inside vLLM's worker): left out below
            "llm_prefill_seconds": s.get("mean_llm_prefill_seconds"),
            "select_seconds": s.get("mean_select_seconds"),
            "prefill_flops_ratio": s["prefill_flops_ratio"],
            "kv_cache_bytes": s["mean_kv_cache_bytes"],
            "kv_cache_bytes_unpruned": s["mean_kv_cache_bytes_unpruned"],
            "kv_cache_ratio": s["kv_cache_ratio"],
        })
    return {"total_gen_tokens": tokens, "total_elapsed_time": elapsed,
            "avg_speed": tokens / elapsed if elapsed > 0 else 0.0,
            "additional_metrics": {k: v for k, v in additional.items() if v is not None}}


def results_date(directory: Path, since: float) -> str | None:
    """The ``<date>`` of the newest ``<date>_results.json`` lmms-eval wrote in ``directory`` at or after
    ``since`` (a ``time.time()``), or None."""
    if not directory.is_dir():
        return None
    found = [(f.stat().st_mtime, f.name[: -len("_results.json")]) for f in directory.glob("*_results.json")
             if f.stat().st_mtime >= since]
    return max(found)[1] if found else None


def _close_process_group() -> None:
    """At interpreter exit, tear down the process group accelerate opened for a multi-process run.

    Neither lmms-eval nor accelerate does; a process that exits with the group alive may abort during
    interpreter shutdown ("terminate called without an active exception", SIGABRT) after all its results
    were written, which fails the launcher.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def lmms_eval_cli_options(argv: Sequence[str] | None = None) -> dict[str, str | None]:
    """``--output_path`` and ``--model_args`` of the lmms-eval command line this process runs, if any.

    Command-line values win; otherwise they come from a ``--config`` YAML holding one run (a mapping).
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("--output_path", "--model_args", "--config"):
        parser.add_argument(name, default=None)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    options = {"output_path": known.output_path, "model_args": known.model_args}
    if known.config and Path(known.config).is_file():
        import yaml

        config = yaml.safe_load(Path(known.config).read_text())
        if isinstance(config, dict):
            for key in options:
                if options[key] is None and config.get(key) is not None:
                    options[key] = str(config[key])
    return options


def _user_turn(doc_to_visual: Any, text: str, doc: Any) -> list[dict[str, Any]]:
    """The chat messages lmms-eval builds for a task without ``doc_to_messages`` (its own
    ``ConfigurableMessagesTask._build_user_turn``: the document's visuals, then ``text``), for requests in
    lmms-eval's simple format (``--force_simple``)."""
    from lmms_eval.api.task import ConfigurableMessagesTask

    return ConfigurableMessagesTask._build_user_turn(doc_to_visual(doc) if doc_to_visual else [], text)


def _qwen_simple_image(visual: Any, sample_id: str) -> Any:
    """A multi-round request's image as lmms-eval's simple Qwen2-VL / Qwen2.5-VL wrappers hand it to
    qwen-vl-utils: a JPEG data URL at quality 85 (their ``_encode_image_data_url``, lmms-eval's own encoder),
    decoded again; videos are refused."""
    import base64

    from lmms_eval.models.model_utils.media_encoder import encode_image_to_data_url
    from PIL import Image

    if not isinstance(visual, Image.Image):
        raise ValueError(f"sample {sample_id}: multi-round requests take images only, got {type(visual).__name__}")
    url = encode_image_to_data_url(visual, image_format="JPEG", mime_type="image/jpeg", convert_rgb=True,
                                   quality=85)
    return load_image(base64.b64decode(url.split(",", 1)[1]), sample_id)


def _hardware(device: torch.device) -> dict[str, Any]:
    """The device a run used, for efficiency reports and leaderboard bundles."""
    import platform

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "device_name": gpu or platform.processor() or platform.machine(),
            "cpu": platform.processor() or platform.machine(), "gpu": gpu}


class PrunedChatModel(lmms):
    """An lmms-eval chat model running a transformers VLM pruned by ``lmms_prune``. One subclass per family
    and preset is generated (``lmms_prune.models.wrappers``)."""

    is_simple = False

    family: ClassVar[str] = ""  # family name = model id prefix: internvl, qwen2_5_vl, llava, ...
    fixed_method: ClassVar[str | None] = None  # set on the per-preset classes (internvl_deepprune, ...)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def family_class(cls):
        return family_class(cls.family)

    @classmethod
    def model_id(cls) -> str:
        """The lmms-eval ``--model`` name of this class."""
        return f"{cls.family}_{cls.fixed_method or 'prune'}"

    @classmethod
    def parse_model_args(cls, **args: Any) -> tuple[RunOptions, PruneConfig]:
        """Validate every ``--model_args`` key and value without loading anything (see ``runner.parse_options``)."""
        return parse_options(cls.family_class(), cls.model_id(), cls.fixed_method, **args)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PrunedChatModel:
        """lmms-eval's constructor from ``--model_args``; its own options (``--batch_size``, ``--device``) fill
        in only what ``--model_args`` leaves unset, so the two never clash."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ------------------------------------------------------------------ set-up
    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        options, self.prune_config = self.parse_model_args(**model_args)
        if options.efficiency_path:  # checked now, before the weights load: not after the last sample
            check_output_path("efficiency_path", options.efficiency_path,
                              folder=Path(options.efficiency_path).suffix != ".json")
        self.runner = make_runner(self.family_class(), options, self.prune_config, self.model_id())
        if self.family in FAMILY_SAMPLING:  # video tasks tell clips this run cannot sample from bad answers
            register_run_sampling(family_sampling(self.family, options.family))
        self._setup_device()
        self._load()
        self._install()
        self.records: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self._call_records: list[dict[str, Any]] = []
        self._finished = False
        self._answered = 0  # requests this process has answered, in order
        from lmms_prune.tasks.refcoco.utils import register_run_model

        register_run_model(self.model_id())  # the RefCOCO tasks pick this family's prompt and box fallback
        self._started = time.time()  # results files older than this are another run's

    def _setup_device(self) -> None:
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        device = None
        if self.accelerator.num_processes > 1:
            device = self.accelerator.device
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            atexit.register(_close_process_group)
        self.runner.setup_device(device)

    def _load(self) -> None:
        self.runner.load()

    def _install(self) -> None:
        self.runner.install()

    # ------------------------------------------------------------------ lmms properties
    @property
    def options(self) -> RunOptions:
        """The run's options: the runner's (one copy, so a change reaches generation too)."""
        return self.runner.options

    @options.setter
    def options(self, options: RunOptions) -> None:
        self.runner.options = options

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def handle(self):
        return self.runner.handle

    @property
    def processor(self):
        return self.runner.processor

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    # ------------------------------------------------------------------ requests
    def _messages(self, item: _Item) -> list[dict[str, Any]]:
        """The request's neutral chat messages (images as PIL images, videos as lists of sampled PIL frames,
        in order)."""
        doc = self.task_dict[item.task][item.split][item.doc_id]
        chat = ChatMessages(messages=item.doc_to_messages(doc))
        messages = []
        for message in chat.messages:
            content = []
            for part in message.content:
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                elif part.type == "image":
                    image = load_image(part.url, f"{item.task}/{item.doc_id}")
                    content.append({"type": "image", "image": image})
                elif part.type == "video":
                    content.append(self._video_part(part, item))
                else:
                    raise ValueError(f"{part.type} inputs are not supported by {self.model_id()} (images, "
                                     "videos and text only)")
            messages.append({"role": message.role, "content": content})
        return messages

    def _video_part(self, part: Any, item: _Item) -> dict[str, Any]:
        """The neutral video part ``{"type": "video", "video": frames, "fps": sampled rate}`` of a video content
        part (lmms-eval gives the file path): frames sampled as lmms-eval's wrapper of this family samples them
        with this run's video ``--model_args`` (``lmms_prune.video``); ``VideoLoadError`` naming the sample if
        the file is unusable."""
        if self.family_class().video_sampling(self.options.family) is None or self.family not in FAMILY_SAMPLING:
            raise ValueError(f"video inputs are not supported by {self.model_id()} (video families: "
                             f"{', '.join(FAMILY_SAMPLING)})")
        if (isinstance(part.url, dict) and {"video_start", "video_end"} & set(part.url)) or (
                part.start_time is not None or part.end_time is not None):
            raise ValueError(f"{self.model_id()}: video start/end times are not supported; give the whole video")
        sampling = family_sampling(self.family, self.options.family)
        video = decode_video(part.url, f"{item.task}/{item.doc_id}", sampling)
        return {"type": "video", "video": video.frames, "fps": video.sample_fps}

    generation_kwargs = staticmethod(generation_kwargs)

    def _task_kind(self, task: str) -> str:
        if self.options.task_kind != "auto":
            return self.options.task_kind
        return "grounding" if "refcoco" in task.lower() else "understanding"

    def _run_batch(self, items: list[_Item]) -> list[GenerationResult]:
        """Generate the answers of one batch (same task and gen_kwargs) and record its efficiency."""
        conversations = [self._messages(item) for item in items]
        batch_start = time.perf_counter()
        answers = self.runner.generate(conversations, items[0].gen_kwargs, self._task_kind(items[0].task),
                                       items[0].task)
        results = []
        for item, answer in zip(items, answers):
            record = {"task": item.task, "doc_id": item.doc_id, "rank": self.rank, "position": self._answered,
                      **({} if item.round is None else {"round": item.round}),
                      **answer.record}  # rank and position let the report drop each process's warm-up exactly
            self._answered += 1
            self._record_box_frames(item, answer.box_frames)
            self._call_records.append({**record, "batch_start": batch_start})
            if not item.padding:
                self.records.append(record)
            results.append(GenerationResult(text=answer.text, token_counts=PrunedTokenCounts(
                input_tokens=answer.input_tokens, output_tokens=answer.output_tokens, pruning=answer.record)))
        return results

    def _record_box_frames(self, item: _Item, frames: list[dict[str, Any]]) -> None:
        """Hand a grounding sample's box frame (its first image's) to the RefCOCO task, which scores the answer
        with it in this process (``lmms_prune.tasks.refcoco.utils.record_box_frame``); other docs have no
        ``sample_id`` and are left alone."""
        doc = self.task_dict[item.task][item.split][item.doc_id]
        if frames and isinstance(doc, dict) and "sample_id" in doc:
            from lmms_prune.tasks.refcoco.utils import record_box_frame

            record_box_frame(doc, frames[0])

    def _run_or_skip(self, items: list[_Item]) -> list[GenerationResult]:
        try:
            return self._run_batch(items)
        except Exception as err:
            where = f"task {items[0].task!r}, doc_id {', '.join(str(it.doc_id) for it in items)}"
            if self.options.on_error == "raise":
                raise RuntimeError(f"{self.model_id()}: generation failed on {where}: {type(err).__name__}: "
                                   f"{err} (on_error=skip counts such samples and continues)") from err
            if len(items) > 1:  # find the failing sample(s); the others still count
                return [r for item in items for r in self._run_or_skip([item])]
            eval_logger.warning(f"{self.model_id()}: SKIPPED {where}: {type(err).__name__}: {err}")
            if not items[0].padding:
                self.skipped.append({"task": items[0].task, "doc_id": items[0].doc_id,
                                     "error": f"{type(err).__name__}: {err}"})
            return [GenerationResult(text="")]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer ``requests`` (lmms-eval chat requests) in batches of ``batch_size``; results in request order.

        Batches come from lmms-eval's ``Collator``: grouped by task, split and ``gen_kwargs``, in request order
        within a group. The call's throughput and efficiency go to lmms-eval's ``log_metrics``.
        """
        items = []
        for index, req in enumerate(requests):
            if self.is_simple:  # --force_simple: lmms-eval's simple arguments, turned into its chat user turn
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                doc_to_messages = functools.partial(_user_turn, doc_to_visual, context)
            else:
                _, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            padding = bool((req.metadata or {}).get("__padding_only__"))
            items.append(_Item(index, task, split, doc_id, doc_to_messages, dict(gen_kwargs), padding))
        collator = lmms_utils.Collator(
            items, lambda it: it.index, grouping=True,
            group_fn=lambda it: {"task": it.task, "split": it.split,
                                 "gen_kwargs": json.dumps(it.gen_kwargs, sort_keys=True, default=str)})
        self._call_records = []
        results: list[GenerationResult] = []
        with tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.model_id()} responding") as pbar:
            for batch in collator.get_batched(n=self.batch_size):
                results.extend(self._run_or_skip(batch))
                pbar.update(len(batch))
        log_metrics(**throughput_metrics(self._call_records, self.rank))
        return collator.get_original(results)

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Score lmms-eval loglikelihood requests (``multiple_choice`` tasks send one per choice) one at a time, as
        lmms-eval's own wrapper of the family does: ``(loss, is_greedy)`` per request, in request order
        (:meth:`lmms_prune.runner.Runner.loglikelihood`). Each request is pruned like a generation prefill; its
        efficiency record (``request: loglikelihood``, ``choice``: the request's index within its document) goes
        to the efficiency JSON, to the request's ``token_counts`` and, with the call's throughput, to lmms-eval's
        ``log_metrics``.

        The pair travels as the ``text`` of a ``GenerationResult``: lmms-eval 0.7.3's evaluator
        (``unwrap_generation_output``) passes a ``GenerationResult``'s text on unchanged but turns a bare
        ``(float, bool)`` tuple into its string, which its multiple-choice scoring cannot unpack."""
        if self.family not in loglikelihood_families():  # before any request, so on_error=skip cannot hide it
            raise NotImplementedError(loglikelihood_unsupported(self.family, self.model_id()))
        self._call_records = []
        results = []
        for req in tqdm(requests, disable=self.rank != 0, desc=f"{self.model_id()} scoring"):
            results.append(self._score_or_skip(req))
        log_metrics(**throughput_metrics(self._call_records, self.rank))
        return results

    def _score(self, req: Instance) -> GenerationResult:
        """One loglikelihood request: lmms-eval's arguments ``(context, target, doc_to_visual, doc_id, task,
        split)``, the target a string or a function of the document (lmms-eval's convention)."""
        context, target, doc_to_visual, doc_id, task, split = req.args
        doc = self.task_dict[task][split][doc_id]
        continuation = target if isinstance(target, str) else target(doc)
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        images = [load_image(v, f"{task}/{doc_id}") for v in (visuals or [])]
        batch_start = time.perf_counter()
        score = self.runner.loglikelihood(images, context, str(continuation), self._task_kind(task), task)
        record = {"task": task, "doc_id": doc_id, "rank": self.rank, "position": self._answered,
                  "request": "loglikelihood", "choice": req.idx, **score.record}
        self._answered += 1
        self._call_records.append({**record, "batch_start": batch_start})
        if not (req.metadata or {}).get("__padding_only__"):
            self.records.append(record)
        return GenerationResult(text=(score.loss, score.is_greedy), token_counts=PrunedTokenCounts(
            input_tokens=score.input_tokens, output_tokens=0, pruning=score.record))

    def _score_or_skip(self, req: Instance) -> GenerationResult:
        try:
            return self._score(req)
        except Exception as err:
            _, _, _, doc_id, task, _ = req.args
            where = f"task {task!r}, doc_id {doc_id}, request {req.idx}"
            if self.options.on_error == "raise":
                raise RuntimeError(f"{self.model_id()}: loglikelihood failed on {where}: {type(err).__name__}: "
                                   f"{err} (on_error=skip counts such requests and continues)") from err
            eval_logger.warning(f"{self.model_id()}: SKIPPED {where}: {type(err).__name__}: {err}")
            if not (req.metadata or {}).get("__padding_only__"):
                self.skipped.append({"task": task, "doc_id": doc_id, "error": f"{type(err).__name__}: {err}"})
            # an infinite loss: a skipped choice is never a multiple-choice argmin
            return GenerationResult(text=(float("inf"), False))

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """The multi-round protocol of lmms-eval's Qwen2-VL / Qwen2.5-VL wrappers (their simple-mode
        ``generate_until_multi_round``), one request at a time as there: round 0 asks the request's context with
        the document's visuals; round ``k > 0`` asks what the task's
        ``doc_to_text(doc, previous_output=answers, round_idx=k, previous_round_info=info)`` returns as
        ``(visuals, context, terminal, answers, info)`` (its ``answers`` replace the kept ones), until
        ``terminal``. Every round is a single-turn generation (the family's system prompt, the round's images,
        then its text without ``<image>`` tags), pruned, with its own efficiency record (``round``); the task's
        ``until`` is dropped and ``max_new_tokens`` defaults to theirs (32768 for Qwen2.5-VL, 128 for Qwen2-VL,
        whose answers are also stripped), as there.

        Returns each request's answers, one per round: lmms-eval passes a list of strings on to the task (its
        own wrappers return a tuple, which lmms-eval 0.7.3's evaluator turns into the tuple's string)."""
        if self.family not in MULTI_ROUND_IN_LMMS_EVAL:
            raise NotImplementedError(
                f"{self.model_id()}: multi-round generation (output_type generate_until_multi_round) is not "
                f"supported for the {self.family} family (lmms-eval's own wrapper of it raises as well). Run the "
                "task's single-round variant (output_type generate_until), or a model of a family that answers "
                f"multi-round tasks: {', '.join(f'{f}_<preset>' for f in MULTI_ROUND_IN_LMMS_EVAL)}")
        if not self.is_simple:
            raise ValueError(f"{self.model_id()}: multi-round tasks need lmms-eval's --force_simple (lmms-eval's own "
                             f"{self.family} wrapper reads only their simple-format requests)")
        self._call_records = []
        results = [self._rounds(req) for req in tqdm(requests, disable=self.rank != 0,
                                                       desc=f"{self.model_id()} multi-round")]
        log_metrics(**throughput_metrics(self._call_records, self.rank))
        return results

    def _rounds(self, req: Instance) -> list[str]:
        """One multi-round request's answers (see :meth:`generate_until_multi_round`)."""
        context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
        doc = self.task_dict[task][split][doc_id]
        theirs = MULTI_ROUND_IN_LMMS_EVAL[self.family]
        gen_kwargs = {"max_new_tokens": theirs["max_new_tokens"], **{k: v for k, v in gen_kwargs.items()
                                                                      if k != "until"}}
        padding = bool((req.metadata or {}).get("__padding_only__"))
        visuals, answers, info, round_idx = doc_to_visual(doc), [], None, 0
        while True:
            if round_idx:
                visuals, context, terminal, answers, info = doc_to_text(
                    doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info)
                answers = list(answers)
                if terminal:
                    return answers
            images = [_qwen_simple_image(v, f"{task}/{doc_id}") for v in visuals or []]
            turn = functools.partial(_user_turn, lambda _, v=images: v, context.replace("<image>", ""))
            item = _Item(req.idx, task, split, doc_id, turn, gen_kwargs, padding, round_idx)
            answer = self._run_or_skip([item])[0].text
            answers.append(answer.strip() if theirs["strip"] else answer)
            round_idx += 1

    # ------------------------------------------------------------------ end of run
    def efficiency_file(self, stamp: str | None = None) -> Path | None:
        """Where the efficiency JSON goes (module docstring), or None. ``stamp``: the ``<date>`` of the file
        name (default: that of lmms-eval's results file of this run in the same directory, else now)."""
        if self.options.efficiency_path:
            path = Path(self.options.efficiency_path)
            if path.suffix == ".json":
                return path
            return path / f"{stamp or lmms_utils.get_datetime_str().replace(':', '-')}_efficiency.json"
        directory = self.results_dir()
        if directory is None:
            return None
        stamp = stamp or results_date(directory, self._started) or lmms_utils.get_datetime_str().replace(":", "-")
        return directory / f"{stamp}_efficiency.json"

    def results_dir(self) -> Path | None:
        """The directory lmms-eval writes this run's ``*_results.json`` to, from its command line (lmms-eval
        hands its output path to no model), or None."""
        cli = lmms_eval_cli_options()
        if not cli["output_path"]:
            return None
        from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker

        model_dir = lmms_utils.sanitize_model_name(GeneralConfigTracker._get_model_name(cli["model_args"] or ""))
        return Path(cli["output_path"]) / model_dir

    def efficiency_report(self) -> dict[str, Any]:
        """This process's records as the JSON document ``finish`` writes (before gathering)."""
        from lmms_prune.efficiency import identity_digest, measurement_context
        from lmms_prune.fingerprint import package_versions

        report = {
            "model": self.model_id(),
            **self.runner.report(),
            "revision": self.options.revision,
            "world_size": self.world_size,
            "hardware": _hardware(self.device),
            "versions": package_versions(),  # this process's, what a leaderboard bundle's versions must equal
            "measured_with": measurement_context(),
        }
        return {**report, "identity_digest": identity_digest(report),
                "summary": summarize(self.records, len(self.skipped)), "skipped": list(self.skipped),
                "samples": list(self.records)}

    def finish(self) -> dict[str, Any] | None:
        """Gather the efficiency records of every rank; on rank 0 log the summary and write the JSON.

        Returns the gathered report on rank 0 (None elsewhere). Runs once; lmms-eval triggers it via ``clean``.
        """
        if self._finished:
            return None
        self._finished = True
        records, skipped = list(self.records), list(self.skipped)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (records, skipped))
            records = [r for part in gathered for r in part[0]]
            skipped = [s for part in gathered for s in part[1]]
        if self.rank != 0:
            return None
        records.sort(key=lambda r: (r["task"], r["doc_id"]))
        skipped.sort(key=lambda s: (s["task"], s["doc_id"]))
        report = self.efficiency_report()
        report.update(summary=summarize(records, len(skipped)), skipped=skipped, samples=records)
        s = report["summary"]
        if records:
            eval_logger.info(f"{self.model_id()} efficiency over {format_summary(s)}")
        if skipped:
            eval_logger.warning(f"{self.model_id()}: {len(skipped)} sample(s) were SKIPPED (on_error=skip): "
                                + "; ".join(f"{x['task']} doc {x['doc_id']}: {x['error']}" for x in skipped))
        if self.options.efficiency_path:
            self.write_efficiency(report)
        elif self.results_dir() is not None:
            # lmms-eval writes its results after clean(): date the file like them once they exist
            atexit.register(self.write_efficiency, report)
        return report

    def write_efficiency(self, report: dict[str, Any]) -> Path | None:
        """Write ``report`` to :meth:`efficiency_file`; returns the path (None: nowhere to write)."""
        path = self.efficiency_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
            eval_logger.info(f"{self.model_id()}: efficiency records written to {path}")
        return path

    def clean(self) -> None:
        """lmms-eval's end-of-run call on every rank: report efficiency, undo the patch, free the model."""
        self.finish()
        self.runner.close()
        super().clean()


def wrapper_classes(family: str, stem: str, module: str) -> dict[str, type[PrunedChatModel]]:
    """The lmms-eval chat models of one family: ``<stem>`` (``<family>_prune``, method chosen with ``method=``)
    and ``<stem>_<preset>`` for every preset (``<family>_<preset>``), all defined in ``module``."""
    fam = family_class(family)
    base = type(stem, (PrunedChatModel,), {
        "family": family,
        "__module__": module,
        "__qualname__": stem,
        "__doc__": f"{fam.model_class} ({family}) with visual-token pruning (method chosen with ``method=``).",
        "default_pretrained": fam.default_pretrained,
    })
    chat = {stem: base, **preset_classes(base)}
    return {**chat, **{simple_name(name): simple_class(cls) for name, cls in chat.items()}}


def simple_name(name: str) -> str:
    """The class name of the simple twin of chat model class ``name`` (``LlavaPrune_none`` -> ``..._simple``)."""
    return f"{name}_simple"


def simple_class(chat: type[PrunedChatModel]) -> type[PrunedChatModel]:
    """The twin of ``chat`` that lmms-eval runs with ``--force_simple`` (``is_simple = True``): lmms-eval builds
    its multiple-choice and loglikelihood requests for simple models only. Generation requests arrive in the
    simple format and are answered through the same chat messages (see :func:`_user_turn`)."""
    name = simple_name(chat.__name__)
    return type(name, (chat,), {"is_simple": True, "__module__": chat.__module__, "__qualname__": name,
                                "__doc__": f"{chat.__doc__.splitlines()[0]} (lmms-eval's simple interface)"})


def preset_classes(base: type[PrunedChatModel]) -> dict[str, type[PrunedChatModel]]:
    """One subclass of ``base`` per preset, with the method fixed: ``{"<Base>_<preset>": class}``.

    Their lmms-eval ids are ``<family>_<preset>`` (``internvl_deepprune``, ...); see ``registry.py``.
    """
    classes = {}
    for name, preset in PRESETS.items():
        cls_name = f"{base.__name__}_{name}"
        classes[cls_name] = type(cls_name, (base,), {
            "fixed_method": name,
            "__module__": base.__module__,
            "__qualname__": cls_name,
            "__doc__": f"{base.__doc__.splitlines()[0]} Method {name}: {preset.description}.",
        })
    return classes
