"""Shared logic of the lmms-eval chat models that run a pruned VLM.

A wrapper (``internvl_deepprune``, ``qwen2_5_vl_prune``, ...) loads a transformers-native VLM with
``from_pretrained``, patches it once with ``lmms_prune.apply`` and answers lmms-eval's ``generate_until``
requests in batches (left padding), in request order. Each family subclass only says how to check the
checkpoint, build the processor inputs and pass its image options (InternVL's ``max_num`` tiles, Qwen's pixel
budget).

``--model_args`` values arrive as strings (or numbers) from the command line. ``parse_model_args`` parses and
validates all of them before anything is loaded; every pruning parameter goes through
``lmms_prune.presets.resolve_config``. A bad value raises one ``ValueError`` that names it and says the fix.

Efficiency: after every batch the engine's ``PruneRecord`` of each sample, the wrapper's own timing and the
theoretical cost (``lmms_prune.efficiency``) form one record per sample. lmms-eval calls ``clean()`` on every
rank once all requests have run; there the records are gathered to rank 0, summarised in the log and written
as JSON next to lmms-eval's results. Where: ``efficiency_path`` (a ``.json`` file or a directory) if given,
else ``<--output_path>/<model dir>/<date>_efficiency.json``, the directory lmms-eval writes its
``*_results.json`` to (lmms-eval does not hand its output path to models, so it is read from the command line,
``sys.argv``, or from a single-run ``--config`` YAML, and the sub-directory is named with lmms-eval's own
model-name sanitiser). Without either, the summary is only logged.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
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
from lmms_eval.protocol import ChatMessages
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

from lmms_prune.efficiency import DecoderDims, kv_cache_bytes, prefill_flops
from lmms_prune.presets import PRESETS, PruneConfig, resolve_config

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
TASK_KINDS = ("auto", "grounding", "understanding")
ON_ERROR = ("raise", "skip")

WRAPPER_ARGS: dict[str, str] = {
    "pretrained": "checkpoint name or local directory (from_pretrained); tiny-grounder = the shipped demo model",
    "method": "pruning preset (lmms-prune methods lists them)",
    "dtype": "auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32",
    "attn_implementation": "sdpa (default), eager, flash_attention_2 (needs flash-attn), auto",
    "device": "cuda, cuda:1, cpu, ... (default: cuda if available; each rank's own device when multi-process)",
    "device_map": "passed to from_pretrained, e.g. auto (single process only)",
    "batch_size": "requests per generate call (left padding)",
    "task_kind": "grounding, understanding, or auto (grounding for refcoco tasks): selects alpha='auto'",
    "on_error": "raise (stop at the first failing sample) or skip (count, report and continue)",
    "efficiency_path": "where the efficiency JSON goes (.json file or directory; default: next to the results)",
    "max_batch_size": "accepted for lmms-eval's --max_batch_size; unused (no automatic batch size)",
}

# Sampling options passed on to generate when temperature > 0. Besides these, only max_new_tokens, temperature,
# num_beams and until are read from a task's gen_kwargs; other keys there (image_sizes, ...) are not for generate.
_SAMPLING_KEYS = ("top_p", "top_k")


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return number


def _choice_arg(name: str, value: Any, choices: Sequence[str]) -> str:
    text = str(value).strip()
    if text not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return text


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in ("", "none", "null") else text


@dataclass(frozen=True)
class WrapperOptions:
    """The parsed, validated ``--model_args`` that are not pruning parameters."""

    pretrained: str
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    device: str | None = None
    device_map: str | None = None
    batch_size: int = 1
    task_kind: str = "auto"
    on_error: str = "raise"
    efficiency_path: str | None = None
    family: dict[str, Any] = field(default_factory=dict)


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


def _close_process_group() -> None:
    """At interpreter exit, tear down the process group accelerate opened for a multi-process run.

    Neither lmms-eval nor accelerate does; a process that exits with the group alive may abort during
    interpreter shutdown ("terminate called without an active exception", SIGABRT) after all its results
    were written, which fails the launcher.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def summarize(records: Sequence[dict[str, Any]], skipped: int = 0) -> dict[str, Any]:
    """Means of the per-sample efficiency fields and the pruned / unpruned ratios of their totals."""
    out: dict[str, Any] = {"samples": len(records), "skipped": skipped}
    if not records:
        return out
    for key in ("visual_before", "visual_after", "seq_len_before", "seq_len_after", "llm_prefill_seconds",
                "select_seconds", "decode_seconds", "end_to_end_seconds", "prefill_flops",
                "prefill_flops_unpruned", "kv_cache_bytes", "kv_cache_bytes_unpruned", "output_tokens"):
        out[f"mean_{key}"] = sum(float(r[key]) for r in records) / len(records)

    def ratio(num: str, den: str) -> float | None:
        total = sum(float(r[den]) for r in records)
        return sum(float(r[num]) for r in records) / total if total else None

    out["visual_kept_ratio"] = ratio("visual_after", "visual_before")
    out["prefill_flops_ratio"] = ratio("prefill_flops", "prefill_flops_unpruned")
    out["kv_cache_ratio"] = ratio("kv_cache_bytes", "kv_cache_bytes_unpruned")
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """One log line of :func:`summarize`'s means and ratios; a ratio without a denominator reads ``n/a``."""

    def num(key: str, spec: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else format(value, spec)

    return (f"{summary['samples']} samples ({summary['skipped']} skipped): visual tokens "
            f"{num('mean_visual_before', '.1f')} -> {num('mean_visual_after', '.1f')} "
            f"(x{num('visual_kept_ratio', '.3f')}), prefill FLOPs x{num('prefill_flops_ratio', '.3f')}, "
            f"KV cache x{num('kv_cache_ratio', '.3f')}, mean LLM prefill {num('mean_llm_prefill_seconds', '.4f')}s, "
            f"selection {num('mean_select_seconds', '.4f')}s, end-to-end {num('mean_end_to_end_seconds', '.4f')}s")


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


def apply_until(text: str, until: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class PrunedChatModel(lmms):
    """An lmms-eval chat model running a transformers VLM pruned by ``lmms_prune``. Subclass per family."""

    is_simple = False

    family: ClassVar[str] = ""  # model id prefix: internvl, qwen2_5_vl, llava
    model_types: ClassVar[tuple[str, ...]] = ()  # accepted config.model_type of the checkpoint
    default_pretrained: ClassVar[str | None] = None
    fixed_method: ClassVar[str | None] = None  # set on the per-preset classes (internvl_deepprune, ...)
    family_args: ClassVar[dict[str, str]] = {}  # extra --model_args of the family, name -> help

    # ------------------------------------------------------------------ parsing
    @classmethod
    def model_id(cls) -> str:
        """The lmms-eval ``--model`` name of this class."""
        return f"{cls.family}_{cls.fixed_method or 'prune'}"

    @classmethod
    def parse_family_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Parse and validate the family's own ``--model_args`` (``family_args``); returns their values."""
        return {}

    @classmethod
    def parse_model_args(cls, **args: Any) -> tuple[WrapperOptions, PruneConfig]:
        """Validate every ``--model_args`` key and value without loading anything.

        Raises ``ValueError`` naming the bad key or value and the fix.
        """
        args = dict(args)
        prune_fields = set(PruneConfig.__dataclass_fields__) - {"method"}
        valid = set(WRAPPER_ARGS) | set(cls.family_args) | prune_fields
        unknown = sorted(set(args) - valid)
        if unknown:
            raise ValueError(
                f"--model {cls.model_id()}: unknown --model_args key(s) {', '.join(unknown)}. Model options: "
                f"{', '.join(sorted(set(WRAPPER_ARGS) | set(cls.family_args)))}; pruning parameters: "
                f"{', '.join(sorted(prune_fields))}"
            )
        method = args.pop("method", None)  # "none" is a preset name here, not a missing value
        method = None if method is None or not str(method).strip() else str(method).strip()
        if cls.fixed_method is not None:
            if method is not None and method != cls.fixed_method:
                raise ValueError(
                    f"--model {cls.model_id()} runs method={cls.fixed_method}; got method={method!r}. Use "
                    f"--model {cls.family}_prune --model_args method={method},... (or --model "
                    f"{cls.family}_{method})"
                )
            method = cls.fixed_method
        if method is None:
            raise ValueError(f"--model {cls.model_id()} needs method=NAME in --model_args; one of "
                             f"{', '.join(PRESETS)}")
        prune = {k: args.pop(k) for k in list(args) if k in prune_fields}
        config = resolve_config(method, **prune)

        pretrained = _optional_str(args.pop("pretrained", None)) or cls.default_pretrained
        if pretrained is not None:
            from lmms_prune.loading import resolve_pretrained

            pretrained = resolve_pretrained(pretrained)
        if pretrained is None:
            raise ValueError(f"--model {cls.model_id()} needs pretrained=CHECKPOINT_OR_DIR in --model_args")
        dtype = _choice_arg("dtype", args.pop("dtype", "auto"), ("auto", *DTYPES))
        attn = _choice_arg("attn_implementation", args.pop("attn_implementation", "sdpa"), ATTN_IMPLEMENTATIONS)
        flash_installed = importlib.util.find_spec("flash_attn") is not None
        if attn == "flash_attention_2" and not flash_installed:
            raise ValueError("attn_implementation=flash_attention_2 needs the flash-attn package: install it "
                             "or use attn_implementation=sdpa")
        args.pop("max_batch_size", None)
        batch_size = args.pop("batch_size", 1)
        if str(batch_size).startswith("auto"):
            raise ValueError(f"batch_size={batch_size!r}: automatic batch sizes are not supported; give an "
                             "integer >= 1")
        options = WrapperOptions(
            pretrained=str(pretrained),
            dtype=dtype,
            attn_implementation=attn,
            device=_optional_str(args.pop("device", None)),
            device_map=_optional_str(args.pop("device_map", None)),
            batch_size=_int_arg("batch_size", batch_size, 1),
            task_kind=_choice_arg("task_kind", args.pop("task_kind", "auto"), TASK_KINDS),
            on_error=_choice_arg("on_error", args.pop("on_error", "raise"), ON_ERROR),
            efficiency_path=_optional_str(args.pop("efficiency_path", None)),
            family=cls.parse_family_args(args),
        )
        return options, config

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
        self.options, self.prune_config = self.parse_model_args(**model_args)
        self._hooks: list[Any] = []  # the wrapper's own hooks (the engine's are in self.handle)
        self._setup_device()
        self._load()
        self._install()
        self.records: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self._finished = False

    def _setup_device(self) -> None:
        from accelerate import Accelerator

        opts = self.options
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            if opts.device_map is not None:
                raise ValueError(f"device_map={opts.device_map!r} cannot be combined with a multi-process run: "
                                 "each process holds a whole model on its own device; drop device_map")
            self._device = self.accelerator.device
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            atexit.register(_close_process_group)
        else:
            try:
                self._device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            except RuntimeError:
                raise ValueError(f"device={opts.device!r}: not a torch device; use cpu, cuda or cuda:N") from None
            if self._device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device={opts.device!r}: CUDA is not available here; use device=cpu")
        if opts.dtype == "auto":
            self._dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        else:
            self._dtype = DTYPES[opts.dtype]
        attn = opts.attn_implementation
        if attn == "auto":
            flash = importlib.util.find_spec("flash_attn") is not None and self._device.type == "cuda"
            attn = "flash_attention_2" if flash else "sdpa"
        self._attn = attn

    def _load(self) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        opts = self.options
        config = AutoConfig.from_pretrained(opts.pretrained)
        if config.model_type not in self.model_types:
            raise ValueError(
                f"pretrained={opts.pretrained!r} is a {config.model_type!r} checkpoint, but --model "
                f"{self.model_id()} runs {', '.join(self.model_types)} models; pick the wrapper of its family "
                "(internvl_*, qwen2_5_vl_*, llava_*)"
            )
        model = AutoModelForImageTextToText.from_pretrained(
            opts.pretrained, dtype=self._dtype, attn_implementation=self._attn, device_map=opts.device_map
        )
        if opts.device_map is None:
            model = model.to(self._device)
        else:
            self._device = model.device
        self._model = model.eval()
        self.processor = AutoProcessor.from_pretrained(opts.pretrained)
        self.processor.tokenizer.padding_side = "left"

    def _install(self) -> None:
        import lmms_prune

        self.handle = lmms_prune.apply(self._model, method=self.prune_config.method, config=self.prune_config)
        self.dims = DecoderDims.from_config(self.handle.adapter.text_config)
        self.bytes_per_element = torch.empty((), dtype=self._dtype).element_size()
        self._prefill_end: float | None = None
        self._hooks.append(self.handle.adapter.language_model.register_forward_hook(self._stamp_prefill_end))

    def _stamp_prefill_end(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._prefill_end is None:
            self._sync()
            self._prefill_end = time.perf_counter()

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # ------------------------------------------------------------------ lmms properties
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    # ------------------------------------------------------------------ family hooks
    def processor_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of the processor call (image options of the family)."""
        return {}

    def build_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text of one request from its chat messages (the checkpoint's own chat template)."""
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def before_generate(self, inputs: Any) -> None:
        """Called with the processor's output just before ``generate``."""

    # ------------------------------------------------------------------ requests
    def _messages(self, item: _Item) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """The request's chat messages in the processor's format, and its images in order."""
        doc = self.task_dict[item.task][item.split][item.doc_id]
        chat = ChatMessages(messages=item.doc_to_messages(doc))
        messages, images = [], []
        for message in chat.messages:
            content = []
            for part in message.content:
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                elif part.type == "image":
                    image = part.url if isinstance(part.url, Image.Image) else Image.open(part.url)
                    images.append(image.convert("RGB"))
                    content.append({"type": "image"})
                else:
                    raise ValueError(f"{part.type} inputs are not supported by {self.model_id()} (images and "
                                     "text only)")
            messages.append({"role": message.role, "content": content})
        return messages, images

    @staticmethod
    def generation_kwargs(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``generate`` keyword arguments and the stop strings from a task's ``gen_kwargs``.

        Greedy unless ``temperature > 0`` (lmms-eval's convention); ``max_new_tokens`` defaults to 128.
        """
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        out: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", 128)),
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            out["temperature"] = temperature
            for key in _SAMPLING_KEYS:
                if gen_kwargs.get(key) is not None:
                    out[key] = gen_kwargs[key]
        else:  # silence the checkpoint's own sampling defaults
            out.update(temperature=None, top_p=None, top_k=None)
        return out, until

    def _task_kind(self, task: str) -> str:
        if self.options.task_kind != "auto":
            return self.options.task_kind
        return "grounding" if "refcoco" in task.lower() else "understanding"

    def _run_batch(self, items: list[_Item]) -> list[GenerationResult]:
        """Generate the answers of one batch (same task and gen_kwargs) and record its efficiency."""
        t_start = time.perf_counter()
        texts, images = [], []
        for item in items:
            messages, item_images = self._messages(item)
            texts.append(self.build_prompt(messages))
            images.extend(item_images)
        inputs = self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                                return_tensors="pt", **self.processor_kwargs())
        inputs = inputs.to(self._device)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                inputs[key] = value.to(self._dtype)
        gen, until = self.generation_kwargs(items[0].gen_kwargs)
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self._model.generation_config.pad_token_id
        self.handle.task_kind = self._task_kind(items[0].task)
        self.before_generate(inputs)
        self.handle.records = []  # never read a previous batch's records
        self._prefill_end = None
        self._sync()
        t_gen = time.perf_counter()
        with torch.inference_mode():
            output = self._model.generate(**inputs, **gen, pad_token_id=pad_id)
        self._sync()
        t_gen_end = time.perf_counter()
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        t_end = time.perf_counter()

        beams = gen["num_beams"]
        records = self.handle.records
        if len(records) != len(items) * beams:
            raise RuntimeError(f"the pruning engine recorded {len(records)} samples for a batch of {len(items)} "
                               f"(num_beams={beams})")
        results = []
        for i, item in enumerate(items):
            rec = records[i * beams]
            n_out = int((new_tokens[i] != pad_id).sum()) if pad_id is not None else int(new_tokens.shape[1])
            if not item.padding:
                self.records.append(self._efficiency_record(item, rec, len(items), n_out, t_start, t_gen,
                                                            t_gen_end, t_end))
            results.append(GenerationResult(text=apply_until(answers[i], until),
                                            token_counts=TokenCounts(input_tokens=rec.seq_len_before,
                                                                     output_tokens=n_out)))
        return results

    def _efficiency_record(self, item: _Item, rec: Any, batch: int, n_out: int, t_start: float, t_gen: float,
                           t_gen_end: float, t_end: float) -> dict[str, Any]:
        """One sample's efficiency: engine record + wrapper timing + theoretical cost (methods.md 8).
        Times measured per batch (prefill, selection, decode, end-to-end) are the batch's."""
        layers = list(rec.kv_lengths) or [rec.seq_len_after] * self.dims.num_layers
        full = [rec.seq_len_before] * self.dims.num_layers
        prefill_end = self._prefill_end if self._prefill_end is not None else t_gen
        return {
            "task": item.task,
            "doc_id": item.doc_id,
            "batch_size": batch,
            "task_kind": self.handle.task_kind,
            "visual_before": rec.visual_before,
            "visual_after": rec.visual_after,
            "visual_after_per_image": [int(k.numel()) for k in rec.kept],
            "seq_len_before": rec.seq_len_before,
            "seq_len_after": rec.seq_len_after,
            "llm_prefill_seconds": rec.llm_prefill_seconds,
            "select_seconds": rec.select_seconds,
            "decode_seconds": t_gen_end - prefill_end,
            "generate_seconds": t_gen_end - t_gen,
            "end_to_end_seconds": t_end - t_start,
            "prefill_flops": prefill_flops(self.dims, layers),
            "prefill_flops_unpruned": prefill_flops(self.dims, full),
            "kv_cache_bytes": kv_cache_bytes(self.dims, layers, self.bytes_per_element),
            "kv_cache_bytes_unpruned": kv_cache_bytes(self.dims, full, self.bytes_per_element),
            "output_tokens": n_out,
        }

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

        A batch holds requests of one task, split and ``gen_kwargs``, in their original order.
        """
        groups: dict[tuple[str, str, str], list[_Item]] = {}
        for index, req in enumerate(requests):
            _, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            key = (task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))
            padding = bool((req.metadata or {}).get("__padding_only__"))
            groups.setdefault(key, []).append(
                _Item(index, task, split, doc_id, doc_to_messages, dict(gen_kwargs), padding))
        results: list[GenerationResult | None] = [None] * len(requests)
        size = self.batch_size
        with tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.model_id()} responding") as pbar:
            for items in groups.values():
                for start in range(0, len(items), size):
                    batch = items[start:start + size]
                    for item, result in zip(batch, self._run_or_skip(batch)):
                        results[item.index] = result
                    pbar.update(len(batch))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(f"{self.model_id()} answers generation tasks only (generate_until)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{self.model_id()} answers single-round generation tasks only")

    # ------------------------------------------------------------------ end of run
    def efficiency_file(self) -> Path | None:
        """Where ``finish`` writes the efficiency JSON (module docstring), or None."""
        stamp = lmms_utils.get_datetime_str()  # the format and clock of lmms-eval's own result files
        if self.options.efficiency_path:
            path = Path(self.options.efficiency_path)
            return path if path.suffix == ".json" else path / f"{stamp}_efficiency.json"
        cli = lmms_eval_cli_options()
        if not cli["output_path"]:
            return None
        from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker

        model_dir = lmms_utils.sanitize_model_name(GeneralConfigTracker._get_model_name(cli["model_args"] or ""))
        return Path(cli["output_path"]) / model_dir / f"{stamp}_efficiency.json"

    def efficiency_report(self) -> dict[str, Any]:
        """This process's records as the JSON document ``finish`` writes (before gathering)."""
        return {
            "model": self.model_id(),
            "pretrained": self.options.pretrained,
            "method": self.prune_config.method,
            "config": self.prune_config.to_dict(),
            "dtype": str(self._dtype).replace("torch.", ""),
            "decoder": self.dims.__dict__,
            "world_size": self.world_size,
            "summary": summarize(self.records, len(self.skipped)),
            "skipped": list(self.skipped),
            "samples": list(self.records),
        }

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
        path = self.efficiency_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
            eval_logger.info(f"{self.model_id()}: efficiency records written to {path}")
        return report

    def clean(self) -> None:
        """lmms-eval's end-of-run call on every rank: report efficiency, undo the patch, free the model."""
        self.finish()
        self.handle.remove()
        for hook in self._hooks:
            hook.remove()
        super().clean()


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
