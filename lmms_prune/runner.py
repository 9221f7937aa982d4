"""The harness-neutral runner: load a pruned VLM, build inputs from chat messages, generate, account for cost.

A harness (the lmms-eval layer in :mod:`lmms_prune.models`, or another evaluation harness) parses its own
request format into neutral chat messages::

    [{"role": "user", "content": [{"type": "image", "image": PIL.Image}, {"type": "text", "text": "..."}]}]

A video part is ``{"type": "video", "video": [PIL.Image, ...]}``: its frames, already sampled as the family's
``video_sampling`` says (optionally ``"fps"``: the sampled frames' rate, for Qwen's M-RoPE time step); the
family's ``prepare_videos`` hands them to the processor as ``videos=`` (one span per video in the engine).

and hands batches of them to :meth:`Runner.generate`, which returns one :class:`Answer` per conversation: the
text, the token counts and the sample's efficiency record (the engine's ``PruneRecord``, the runner's timing
and the theoretical cost of :mod:`lmms_prune.efficiency`).

Options: :func:`parse_options` validates every option and pruning parameter (through
:func:`lmms_prune.presets.resolve_config`) before anything is loaded; a bad value raises one ``ValueError``
that names it and says the fix. The options are those of lmms-eval's own wrapper of each family (same names,
meanings and defaults; the family module lists its own) plus the pruning parameters.

Protocol settings of a task: a task whose protocol fixes a processor setting (RefCOCO: InternVL's 6 tiles)
states it in its ``generation_kwargs`` under :data:`PROTOCOL_KEY`, keyed by family name::

    generation_kwargs:
      lmms_prune_protocol: {internvl: {max_patches: 6}}

``generation_kwargs`` are the only per-request settings lmms-eval hands to a model (``lmms_eval_specific_kwargs``
reach only the prompt functions, task ``metadata`` none of the model's), so the setting travels with the
task's requests and applies to them only; other tasks of the same run keep the run's options, and other
harnesses' models ignore the key. ``task_protocol=false`` turns it off.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lmms_prune.efficiency import DecoderDims, kv_cache_bytes, prefill_flops, warm_samples
from lmms_prune.families.base import Family, bool_arg, int_arg
from lmms_prune.methods import SELECTORS
from lmms_prune.presets import PRESETS, PruneConfig, resolve_config
from lmms_prune.timing import PhaseClock, ttft_parts

# dtype names: torch's own (lmms_eval.utils.get_dtype resolves them) and their short aliases.
DTYPE_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                 "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
TASK_KINDS = ("auto", "grounding", "understanding")
ON_ERROR = ("raise", "skip")
BACKENDS = ("transformers", "vllm")  # backend=: our engine inside transformers' generate, or the vLLM plug-in
PROTOCOL_KEY = "lmms_prune_protocol"  # a task's per-family protocol settings in its generation_kwargs

OPTIONS: dict[str, str] = {
    "pretrained": "checkpoint name or local directory (from_pretrained); an original InternVL2/2.5 checkpoint "
                  "(e.g. OpenGVLab/InternVL2_5-8B) is converted once into the cache; tiny-grounder = the shipped "
                  "demo model",
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
    "revision": "checkpoint revision (from_pretrained), default main",
    "trust_remote_code": "from_pretrained's trust_remote_code, default false",
    "low_cpu_mem_usage": "from_pretrained's low_cpu_mem_usage, default false",
    "use_cache": "generate with the KV cache, default true (false recomputes the prefix every step)",
    "use_until": "stop generating at the task's until strings, default true (lmms-eval's own wrappers ignore "
                 "them: false reproduces their answers)",
    "task_protocol": "apply a task's protocol settings (generation_kwargs lmms_prune_protocol, e.g. RefCOCO's 6 "
                     "InternVL tiles) to its requests, default true",
    "backend": "transformers (default: our engine inside transformers' generate) or vllm (the vLLM plug-in, "
               "lmms_prune.vllm: pre-LLM presets on every family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, "
               "LLaVA-NeXT, LLaVA-OneVision, InternVL; run it in the vLLM venv, scripts/vllm_env.sh)",
    "vllm_engine_args": "backend=vllm: further vllm.LLM arguments as a JSON object, e.g. "
                        "{\"max_model_len\":4096,\"enforce_eager\":true}",
}

# Sampling options passed on to generate when temperature > 0. Besides these, only max_new_tokens, temperature,
# num_beams and until are read from a task's gen_kwargs; other keys there (image_sizes, ...) are not for generate.
_SAMPLING_KEYS = ("top_p", "top_k")


def _choice_arg(name: str, value: Any, choices: Sequence[str]) -> str:
    text = str(value).strip()
    if text not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return text


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name or alias (``bf16`` -> ``torch.bfloat16``), via lmms-eval's ``get_dtype``."""
    from lmms_eval.utils import get_dtype

    return get_dtype(DTYPE_ALIASES[name])


def _optional_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in ("", "none", "null") else text


@dataclass(frozen=True)
class RunOptions:
    """The parsed, validated options that are not pruning parameters (``family``: the family's own)."""

    pretrained: str
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    device: str | None = None
    device_map: str | None = None
    batch_size: int = 1
    task_kind: str = "auto"
    on_error: str = "raise"
    efficiency_path: str | None = None
    revision: str = "main"
    trust_remote_code: bool = False
    low_cpu_mem_usage: bool = False
    use_cache: bool = True
    use_until: bool = True
    task_protocol: bool = True
    family: dict[str, Any] = field(default_factory=dict)
    backend: str = "transformers"
    # backend=vllm: hf_overrides["lmms_prune"] (None: unpruned) and the other vllm.LLM arguments
    vllm_prune: dict[str, Any] | None = None
    vllm_engine_args: dict[str, Any] = field(default_factory=dict)


def looks_like_path(name: str) -> bool:
    """Whether a ``pretrained`` value can only mean a local folder: absolute, ``~``- or ``.``-relative, or with
    more than the one ``/`` of a hub id (``org/name``)."""
    return os.path.isabs(name) or name.startswith(("~", "./", "../")) or name.count("/") > 1 or "\\" in name


def check_local_checkpoint(name: str) -> None:
    """Refuse a path-looking ``pretrained`` (`looks_like_path`) that is not a folder, before transformers reads
    it as a malformed hub id; hub ids (``org/name``) and existing folders pass."""
    if not looks_like_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise ValueError(f"pretrained={name!r}: no such directory; give a local checkpoint folder (written by "
                         "save_pretrained) or a hub id such as OpenGVLab/InternVL2_5-8B")
    if not path.is_dir():
        raise ValueError(f"pretrained={name!r}: a file, not a checkpoint directory; give the folder that holds "
                         "config.json")


def check_output_path(key: str, value: str, folder: bool) -> None:
    """Create the folder a run will write ``value`` into (``value`` itself when ``folder``, else its parent) and
    check that a file can be written there, so a run is never lost at its end for a path checked only then."""
    path = Path(value).expanduser()
    target = path if folder else path.parent
    if not folder and path.is_dir():
        raise ValueError(f"{key}={value!r}: is a folder; name a .json file, or give the folder without .json")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".lmms_prune_write_check"):
            pass
    except OSError as err:
        raise ValueError(f"{key}={value!r}: cannot write there ({err.strerror or err}: {err.filename or target}); "
                         "name a file or folder this user can write") from None


def parse_options(family: type[Family], model_id: str, fixed_method: str | None,
                  **args: Any) -> tuple[RunOptions, PruneConfig]:
    """Validate every option and pruning parameter of a run of ``family`` without loading anything.

    ``model_id`` names the run in messages (``internvl_deepprune``); ``fixed_method`` is the preset the model
    name fixes (None: ``method=`` is required). Raises ``ValueError`` naming the bad key or value and the fix.
    """
    args = dict(args)
    prune_fields = set(PruneConfig.__dataclass_fields__) - {"method"}
    valid = set(OPTIONS) | set(family.model_args) | prune_fields
    unknown = sorted(set(args) - valid)
    if unknown:
        raise ValueError(
            f"--model {model_id}: unknown --model_args key(s) {', '.join(unknown)}. Model options: "
            f"{', '.join(sorted(set(OPTIONS) | set(family.model_args)))}; pruning parameters: "
            f"{', '.join(sorted(prune_fields))}"
        )
    method = args.pop("method", None)  # "none" is a preset name here, not a missing value
    method = None if method is None or not str(method).strip() else str(method).strip()
    if fixed_method is not None:
        if method is not None and method != fixed_method:
            raise ValueError(
                f"--model {model_id} runs method={fixed_method}; got method={method!r}. Use "
                f"--model {family.name}_prune --model_args method={method},... (or --model "
                f"{family.name}_{method})"
            )
        method = fixed_method
    if method is None:
        raise ValueError(f"--model {model_id} needs method=NAME in --model_args; one of {', '.join(PRESETS)}")
    prune = {k: args.pop(k) for k in list(args) if k in prune_fields}
    config = resolve_config(method, **prune)
    backend = _choice_arg("backend", args.pop("backend", "transformers"), BACKENDS)
    engine_args = args.pop("vllm_engine_args", None)

    pretrained = _optional_str(args.pop("pretrained", None)) or family.default_pretrained
    if pretrained is not None:
        from lmms_prune.loading import resolve_pretrained

        check_local_checkpoint(pretrained)
        pretrained = resolve_pretrained(pretrained)
    if pretrained is None:
        raise ValueError(f"--model {model_id} needs pretrained=CHECKPOINT_OR_DIR in --model_args")
    dtype = _choice_arg("dtype", args.pop("dtype", "auto"), ("auto", *DTYPE_ALIASES))
    attn = _optional_str(args.pop("attn_implementation", None)) or "sdpa"  # lmms-eval's None: the default
    attn = _choice_arg("attn_implementation", attn, ATTN_IMPLEMENTATIONS)
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation=flash_attention_2 needs the flash-attn package: install it "
                         "or use attn_implementation=sdpa")
    args.pop("max_batch_size", None)
    batch_size = args.pop("batch_size", 1)
    if str(batch_size).startswith("auto"):
        raise ValueError(f"batch_size={batch_size!r}: automatic batch sizes are not supported; give an "
                         "integer >= 1")
    options = RunOptions(
        pretrained=str(pretrained),
        dtype=dtype,
        attn_implementation=attn,
        device=_optional_str(args.pop("device", None)),
        device_map=_optional_str(args.pop("device_map", None)),
        batch_size=int_arg("batch_size", batch_size, 1),
        task_kind=_choice_arg("task_kind", args.pop("task_kind", "auto"), TASK_KINDS),
        on_error=_choice_arg("on_error", args.pop("on_error", "raise"), ON_ERROR),
        efficiency_path=_optional_str(args.pop("efficiency_path", None)),
        revision=_optional_str(args.pop("revision", None)) or "main",
        trust_remote_code=bool_arg("trust_remote_code", args.pop("trust_remote_code", False)),
        low_cpu_mem_usage=bool_arg("low_cpu_mem_usage", args.pop("low_cpu_mem_usage", False)),
        use_cache=bool_arg("use_cache", args.pop("use_cache", True)),
        use_until=bool_arg("use_until", args.pop("use_until", True)),
        task_protocol=bool_arg("task_protocol", args.pop("task_protocol", True)),
        family=family.parse_model_args(args),
        backend=backend,
    )
    if backend == "vllm":
        from lmms_prune.vllm import backend_options

        options = dataclasses.replace(options, **backend_options(family.name, method, prune, config, options,
                                                                 engine_args))
    elif engine_args is not None:
        raise ValueError("vllm_engine_args is for backend=vllm; drop it or add backend=vllm")
    if getattr(config, "input_budget", False):  # a processor-level budget: the family says how, or why not
        family.check_input_budget(config.keep_ratio, config.keep_tokens, options.family)
    selector = SELECTORS.get(config.selector)
    if selector is not None and selector(config).tower_layer() is not None:
        family.check_tower_merge(config.method)
    return options, config


def protocol_options(family: type[Family], options: dict[str, Any], gen_kwargs: dict[str, Any],
                     task: str = "") -> dict[str, Any]:
    """The family options of a request: the run's ``options`` (parsed) updated with the task's protocol
    settings for ``family`` (``gen_kwargs[PROTOCOL_KEY][family.name]``, see the module docstring), validated
    by the family like ``--model_args``. Where both give a setting, the task's protocol wins."""
    protocol = gen_kwargs.get(PROTOCOL_KEY) or {}
    if not isinstance(protocol, dict):
        raise ValueError(f"task {task!r}: generation_kwargs {PROTOCOL_KEY}={protocol!r} must map family names to "
                         "settings, e.g. {internvl: {max_patches: 6}}")
    settings = protocol.get(family.name)
    if not settings:
        return options
    if not isinstance(settings, dict):
        raise ValueError(f"task {task!r}: {PROTOCOL_KEY}.{family.name}={settings!r} must be a mapping of "
                         f"{family.name} options ({', '.join(family.model_args)})")
    unknown = sorted(set(settings) - set(family.model_args))
    if unknown:
        raise ValueError(f"task {task!r}: {PROTOCOL_KEY}.{family.name} has unknown key(s) {', '.join(unknown)}; "
                         f"{family.name} options: {', '.join(family.model_args)}")
    return family.parse_model_args({**options, **settings})


def generation_kwargs(gen_kwargs: dict[str, Any], max_new_tokens: int = 128) -> tuple[dict[str, Any], list[str]]:
    """``generate`` keyword arguments and the stop strings from a task's ``gen_kwargs``.

    Greedy unless ``temperature > 0`` (lmms-eval's convention); ``max_new_tokens`` defaults to
    ``max_new_tokens`` (that of lmms-eval's wrapper of the family: 1024 for InternVL and LLaVA, 128 for Qwen).
    """
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    out: dict[str, Any] = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", max_new_tokens)),
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


def apply_until(text: str, until: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (lmms-eval's ``until``)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def summarize(records: Sequence[dict[str, Any]], skipped: int = 0) -> dict[str, Any]:
    """Means of the per-sample efficiency fields and the pruned / unpruned ratios of their totals (timing means
    without the warm-up batch of each process, :func:`lmms_prune.efficiency.warm_samples`)."""
    out: dict[str, Any] = {"samples": len(records), "skipped": skipped}
    if not records:
        return out
    # Timing means leave out each process's warm-up batch when the records say which it was (rank, position);
    # token and cost figures use every sample.
    timed = list(records)
    if all("rank" in r and "position" in r for r in records):
        timed = warm_samples(records) or timed
    out["timed_samples"] = len(timed)
    for key in ("visual_before", "visual_before_papers", "visual_after", "seq_len_before", "seq_len_after",
                "prefill_flops", "prefill_flops_unpruned", "kv_cache_bytes", "kv_cache_bytes_unpruned",
                "output_tokens"):
        if all(key in r for r in records):  # visual_before_papers: records written before it existed lack it
            out[f"mean_{key}"] = sum(float(r[key]) for r in records) / len(records)
    for key in ("llm_prefill_seconds", "select_seconds", "decode_seconds", "end_to_end_seconds",
                "preprocess_seconds", "vision_seconds", "handover_seconds", "ttft_seconds"):
        if all(key in r for r in timed):  # the TTFT parts: records written before they existed lack them
            out[f"mean_{key}"] = sum(float(r[key]) for r in timed) / len(timed)

    def ratio(num: str, den: str) -> float | None:
        total = sum(float(r[den]) for r in records)
        return sum(float(r[num]) for r in records) / total if total else None

    out["visual_kept_ratio"] = ratio("visual_after", "visual_before")
    out["prefill_flops_ratio"] = ratio("prefill_flops", "prefill_flops_unpruned")
    out["kv_cache_ratio"] = ratio("kv_cache_bytes", "kv_cache_bytes_unpruned")
    if all("batch_vision_flops" in r for r in records):
        # the whole request's FLOPs: each sample's share of its batch's vision encoding + its prefill
        vision = [float(r["batch_vision_flops"]) / int(r.get("batch_size", 1) or 1) for r in records]
        pruned = sum(v + float(r["prefill_flops"]) for v, r in zip(vision, records))
        unpruned = sum(v + float(r["prefill_flops_unpruned"]) for v, r in zip(vision, records))
        out["end_to_end_flops_ratio"] = pruned / unpruned if unpruned else None
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
            f"selection {num('mean_select_seconds', '.4f')}s, vision {num('mean_vision_seconds', '.4f')}s, "
            f"TTFT {num('mean_ttft_seconds', '.4f')}s, end-to-end FLOPs x{num('end_to_end_flops_ratio', '.3f')}, "
            f"end-to-end {num('mean_end_to_end_seconds', '.4f')}s "
            f"(times over {summary.get('timed_samples', summary['samples'])} samples after warm-up)")


@dataclass
class Answer:
    """One conversation's answer: the text, token counts and its efficiency record."""

    text: str
    input_tokens: int
    output_tokens: int
    record: dict[str, Any]
    # one box frame per image of the conversation (``Family.box_frame``: how its grounding answers map back)
    box_frames: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Score:
    """One loglikelihood request's result: lmms-eval's ``(loss, is_greedy)`` pair (:meth:`Runner.loglikelihood`),
    the tokens the LLM processed (after pruning) and the efficiency record."""

    loss: float
    is_greedy: bool
    input_tokens: int
    record: dict[str, Any]


def loglikelihood_families() -> list[str]:
    """The families whose lmms-eval wrapper scores loglikelihoods (``Family.loglikelihood_texts`` overridden)."""
    from lmms_prune.families import FAMILIES, family_class
    from lmms_prune.families.base import Family

    return [name for name in FAMILIES
            if family_class(name).loglikelihood_texts.__func__ is not Family.loglikelihood_texts.__func__]


def loglikelihood_unsupported(family: str, model_id: str) -> str:
    """The error message of a loglikelihood request to a family whose lmms-eval wrapper has none."""
    return (f"{model_id}: loglikelihood requests (output_type loglikelihood / multiple_choice) are not supported "
            f"for the {family} family: lmms-eval's own wrapper of it raises NotImplementedError as well. Run the "
            f"task's generation variant (output_type generate_until), or a model of a family that scores them: "
            f"{', '.join(f'{name}_<preset>' for name in loglikelihood_families())}")


class Runner:
    """A pruned VLM of one family, loaded and patched, answering batches of neutral chat conversations.

    The steps are separate so a harness can validate and place the run before any weights load:
    ``setup_device()`` (``accelerator``: an ``accelerate.Accelerator`` of a multi-process run, or None),
    ``load()``, ``install()``.
    """

    def __init__(self, family: type[Family], options: RunOptions, config: PruneConfig, model_id: str):
        self.family = family
        self.options = options
        self.config = config
        self.model_id = model_id

    # ------------------------------------------------------------------ set-up
    def setup_device(self, device: torch.device | None = None) -> None:
        """Choose the device (``device``: the rank's own one in a multi-process run), dtype and attention."""
        opts = self.options
        if device is not None:
            if opts.device_map is not None:
                raise ValueError(f"device_map={opts.device_map!r} cannot be combined with a multi-process run: "
                                 "each process holds a whole model on its own device; drop device_map")
            self.device = device
        else:
            try:
                self.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            except RuntimeError:
                raise ValueError(f"device={opts.device!r}: not a torch device; use cpu, cuda or cuda:N") from None
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device={opts.device!r}: CUDA is not available here; use device=cpu")
        if opts.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = torch_dtype(opts.dtype)
        attn = opts.attn_implementation
        if attn == "auto":
            flash = importlib.util.find_spec("flash_attn") is not None and self.device.type == "cuda"
            attn = "flash_attention_2" if flash else "sdpa"
        self.attn = attn

    def load(self) -> None:
        """Load the checkpoint with ``from_pretrained`` after checking its config against family and method."""
        from transformers import AutoModelForImageTextToText

        opts = self.options
        self.check_checkpoint()
        model = AutoModelForImageTextToText.from_pretrained(
            opts.pretrained, revision=opts.revision, trust_remote_code=opts.trust_remote_code,
            low_cpu_mem_usage=opts.low_cpu_mem_usage, dtype=self.dtype, attn_implementation=self.attn,
            device_map=opts.device_map,
        )
        if opts.device_map is None:
            model = model.to(self.device)
        else:
            self.device = model.device
        self.model = model.eval()
        self.load_processor()

    def load_processor(self) -> None:
        """The run's processor, loaded with the run's processor options (as lmms-eval's wrappers load it), so
        the processor's own calls (outside generate) resize like the run; generate passes them again with any
        task protocol."""
        from transformers import AutoProcessor

        opts = self.options
        self.processor = AutoProcessor.from_pretrained(
            opts.pretrained, revision=opts.revision, trust_remote_code=opts.trust_remote_code,
            **self.family.processor_kwargs(opts.family))
        self.processor.tokenizer.padding_side = "left"

    def check_checkpoint(self) -> Any:
        """The checkpoint's config, checked against the family and the method before any weights load."""
        from transformers import AutoConfig

        from lmms_prune.presets import check_model

        opts = self.options
        config = AutoConfig.from_pretrained(opts.pretrained)
        if config.model_type not in self.family.model_types:
            raise ValueError(
                f"pretrained={opts.pretrained!r} is a {config.model_type!r} checkpoint, but --model "
                f"{self.model_id} runs {', '.join(self.family.model_types)} models; pick the wrapper of its family "
                f"({', '.join(_family_prefixes())})"
            )
        check_model(self.config, config)
        selector = SELECTORS.get(self.config.selector)
        if selector is not None and selector.videos_only and self.family.video_sampling(opts.family) is None:
            raise ValueError(f"{self.model_id}: method {self.config.method!r} prunes videos only, and the "
                             f"{self.family.name} family takes no videos, so it would prune nothing; use a video "
                             "family (qwen2_5_vl, qwen3_vl, llava_onevision, internvl) or an image method")
        if (selector is not None and selector.videos_only and selector.merges and not selector.merges_in_place
                and self.family.video_structure_inside):
            raise ValueError(f"{self.model_id}: method {self.config.method!r} merges each video into a shorter "
                             f"sequence, but {self.family.name} videos have structural tokens inside them that the "
                             f"merged sequence cannot place ({self.family.video_structure_inside}); use a method "
                             "that keeps a subset of the video's tokens (temporal, evs, vidcom2, dycoke) or merges "
                             "in place (fastvid), or a family whose videos end with them (qwen2_5_vl, "
                             "llava_onevision)")
        if self.config.stage != "none" and self.config.needs().prior and self.config.bias_prior:
            from lmms_prune.engine.prior import load_prior

            load_prior(self.config.bias_prior).check(config, self.config.effective_score_layer)
        return config

    def install(self) -> None:
        """Patch the model with the pruning engine; clock each ``generate``'s phases (lmms_prune.timing) for
        the time to first token, its parts and the decode time."""
        import lmms_prune

        self.handle = lmms_prune.apply(self.model, method=self.config.method, config=self.config)
        self.dims = DecoderDims.from_config(self.handle.adapter.text_config)
        self.bytes_per_element = torch.empty((), dtype=self.dtype).element_size()
        self._clock = PhaseClock(self.model, self.handle.adapter, self.device)
        self._hooks = [self._clock]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Undo the patch and the runner's own hooks."""
        self.handle.remove()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ------------------------------------------------------------------ generation
    def build_prompt(self, messages: list[dict[str, Any]], family_options: dict[str, Any] | None = None) -> str:
        """The prompt text of one conversation: the checkpoint's chat template (or the ``chat_template`` option)
        after the family's ``system_prompt`` and ``reasoning_prompt`` options (lmms-eval's meanings: a system
        message where the conversation has none; text appended to the last user turn)."""
        fam = self.options.family if family_options is None else family_options
        messages = [dict(m) for m in messages]
        system = fam.get("system_prompt")
        if system and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        reasoning = fam.get("reasoning_prompt")
        if reasoning:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            content = list(messages[last]["content"])
            texts = [i for i, part in enumerate(content) if part["type"] == "text"]
            if texts:
                k = texts[-1]
                content[k] = {**content[k], "text": content[k]["text"].strip() + reasoning}
            else:
                content.append({"type": "text", "text": reasoning})
            messages[last] = {**messages[last], "content": content}
        kwargs = {"chat_template": fam["chat_template"]} if fam.get("chat_template") else {}
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    @staticmethod
    def split_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """The processor's messages (image and video parts as placeholders) and the images in order."""
        out, images, _ = Runner.split_visuals(messages)
        return out, images

    @staticmethod
    def split_visuals(messages: list[dict[str, Any]]
                      ) -> tuple[list[dict[str, Any]], list[Image.Image], list[dict[str, Any]]]:
        """The processor's messages (image and video parts as placeholders), the images and the video parts
        (``{"type": "video", "video": [PIL frames], "fps": ...}``), each in order."""
        out, images, videos = [], [], []
        for message in messages:
            content = []
            for part in message["content"]:
                if part["type"] == "image":
                    images.append(part["image"])
                    content.append({"type": "image"})
                elif part["type"] == "video":
                    videos.append(part)
                    content.append({"type": "video"})
                else:
                    content.append(part)
            out.append({"role": message["role"], "content": content})
        return out, images, videos

    @staticmethod
    def video_frames(messages: list[dict[str, Any]]) -> list[int | None]:
        """The conversation's visual parts in prompt order: None for an image, a video's frame count (the
        engine's ``PruneHandle.video_frames``: which image runs form one video, where the processor does not
        say)."""
        return [None if part["type"] == "image" else len(part["video"])
                for message in messages for part in message["content"] if part["type"] in ("image", "video")]

    def stop_ids(self) -> tuple[int | None, int | None]:
        """``(eos_token_id, pad_token_id)`` of ``generate``: the tokenizer's, as lmms-eval's wrappers pass them
        (the pad falls back to the generation config's, then to the eos)."""
        tokenizer = self.processor.tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = self.model.generation_config.eos_token_id
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
        if pad is None:
            pad = eos[0] if isinstance(eos, (list, tuple)) else eos
        return eos, pad

    def generate(self, conversations: list[list[dict[str, Any]]], gen_kwargs: dict[str, Any],
                 task_kind: str | None, task: str = "") -> list[Answer]:
        """Answer a batch of conversations with one ``generate`` call (left padding).

        The task's ``until`` strings stop decoding (``generate(stop_strings=...)``: a sample ends at the step
        whose text contains one) and are cut from the answers; ``use_until=false`` ignores them, as lmms-eval's
        own wrappers do. ``task`` names the task in messages about its protocol settings. Each answer carries
        the box frames of its images (``Family.box_frame`` from the original sizes and the processor's output:
        how a grounding answer maps back to the image).
        """
        t_start = time.perf_counter()
        family_options = self.options.family
        if self.options.task_protocol:
            family_options = protocol_options(self.family, family_options, gen_kwargs, task)
        texts, images, videos, per_sample = [], [], [], []
        for messages in conversations:
            plain, item_images, item_videos = self.split_visuals(messages)
            texts.append(self.build_prompt(plain, family_options))
            images.extend(item_images)
            videos.extend(item_videos)
            per_sample.append(item_images)
        # padding tokens of the family's own image pipeline (LLaVA-1.5 pad-to-square), for the scores that zero them
        self.handle.image_padding = self.handle.adapter.padding_masks(per_sample, family_options, self.processor)
        counts = [len(item) for item in per_sample]
        sizes = [image.size for image in images]  # original sizes, before the family's own pipeline
        images = self.family.prepare_images(images, family_options, processor=self.processor)
        if getattr(self.config, "input_budget", False) and images:
            images, family_options = self.family.budget_images(images, self.config.keep_ratio, family_options,
                                                               self.processor)
        # videos: frames already sampled (the family's video_sampling); the family's pipeline prepares them
        video_kwargs = self.family.prepare_videos(videos, family_options) if videos else {}
        self.handle.video_frames = [self.video_frames(messages) for messages in conversations]
        inputs = self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                                return_tensors="pt", **self.family.processor_kwargs(family_options), **video_kwargs)
        frames = [self.family.box_frame(size, inputs, i, family_options, self.processor)
                  for i, size in enumerate(sizes)]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        inputs = inputs.to(self.device)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                inputs[key] = value.to(self.dtype)
        gen, until = generation_kwargs(gen_kwargs, int(family_options.get("default_max_new_tokens", 128)))
        if not self.options.use_until:
            until = []
        tokenizer = self.processor.tokenizer
        eos_id, pad_id = self.stop_ids()
        stops = [u for u in until if u]
        if stops:
            gen.update(stop_strings=stops, tokenizer=tokenizer)
        self.handle.task_kind = task_kind
        self.handle.records = []  # never read a previous batch's records
        t_gen = self._clock.start()
        with torch.inference_mode():
            output = self.model.generate(**inputs, **gen, eos_token_id=eos_id, pad_token_id=pad_id,
                                         use_cache=self.options.use_cache)
        self.sync()
        t_gen_end = time.perf_counter()
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers = tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        t_end = time.perf_counter()

        beams = gen["num_beams"]
        records = self.handle.records
        if len(records) != len(conversations) * beams:
            raise RuntimeError(f"the pruning engine recorded {len(records)} samples for a batch of "
                               f"{len(conversations)} (num_beams={beams})")
        out = []
        for i in range(len(conversations)):
            rec = records[i * beams]
            n_out = int((new_tokens[i] != pad_id).sum()) if pad_id is not None else int(new_tokens.shape[1])
            record = self.efficiency_record(rec, len(conversations), n_out, t_start, t_gen, t_gen_end, t_end)
            record["batch_vision_flops"] = self.family.vision_flops(self.model.config, inputs)
            # input tokens: what the LLM really processed, i.e. after pruning
            out.append(Answer(apply_until(answers[i], until), rec.seq_len_after, n_out, record,
                              frames[starts[i]:starts[i] + counts[i]]))
        return out

    def loglikelihood(self, images: list[Image.Image], context: str, continuation: str, task_kind: str | None,
                      task: str = "") -> Score:
        """Score ``continuation`` after ``context`` and ``images`` with one forward pass of the pruned model.

        The arithmetic is that of lmms-eval's own wrapper of the family (``Family.loglikelihood_texts`` builds its
        texts; LLaVA: ``llava_hf.loglikelihood``): the continuation tokens are those of the full text after the
        prompt's ``C`` tokens; ``loss`` is their mean negative log-likelihood,
        ``-1/T sum_{t=C}^{L-1} log p(x_t | x_<t)`` over the ``T = L - C`` continuation tokens (what lmms-eval's
        multiple-choice scoring takes the argmin of); ``is_greedy`` is lmms-eval's check, the argmax of the logits
        *at* each continuation position ``t`` equal to ``x_t`` (not ``t - 1``'s, unlike lm-evaluation-harness).
        The prompt is tokenised with its images, so ``C`` counts the expanded image tokens (lmms-eval tokenises
        it without them, which transformers 5 refuses whenever the prompt has an image tag).

        Pruning applies as in generation (the engine prunes the prefill); the continuation is text after every
        image, so its rows are the last ``T + 1`` of the logits however many visual tokens were dropped.
        """
        t_start = time.perf_counter()
        family_options = self.options.family
        texts = self.family.loglikelihood_texts(context, continuation, len(images), self.processor, family_options)
        if texts is None:
            raise NotImplementedError(loglikelihood_unsupported(self.family.name, self.model_id))
        prompt, full = texts
        self.handle.image_padding = self.handle.adapter.padding_masks([images], family_options, self.processor)
        prepared = self.family.prepare_images(images, family_options, processor=self.processor)
        kwargs = self.family.processor_kwargs(family_options)
        inputs = self.processor(text=[full], images=prepared or None, return_tensors="pt", **kwargs)
        context_len = self.processor(text=[prompt], images=prepared or None, return_tensors="pt",
                                     **kwargs)["input_ids"].shape[1]
        inputs = inputs.to(self.device)
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                inputs[key] = value.to(self.dtype)
        ids = inputs["input_ids"][0]
        targets = ids[context_len:]  # [T]
        self.handle.task_kind = task_kind
        self.handle.records = []
        self._prefill_end = None
        self.sync()
        t_gen = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=self.options.use_cache).logits[0]  # [L' <= L, V]
        self.sync()
        t_gen_end = time.perf_counter()
        tail = logits[logits.shape[0] - targets.numel() - 1:].float()  # rows C-1 .. L-1 of the unpruned sequence
        loss = torch.nn.functional.cross_entropy(tail[:-1], targets)
        is_greedy = bool((tail[1:].argmax(-1) == targets).all())
        records = self.handle.records
        if len(records) != 1:
            raise RuntimeError(f"the pruning engine recorded {len(records)} samples for one loglikelihood request")
        rec = records[0]
        record = self.efficiency_record(rec, 1, 0, t_start, t_gen, t_gen_end, time.perf_counter())
        return Score(float(loss), is_greedy, rec.seq_len_after, record)

    def efficiency_record(self, rec: Any, batch: int, n_out: int, t_start: float, t_gen: float,
                          t_gen_end: float, t_end: float) -> dict[str, Any]:
        """One sample's efficiency: engine record + runner timing + theoretical cost (methods.md 8).
        Times measured per batch (preprocessing, vision, hand-over, prefill, selection, TTFT, decode,
        end-to-end) are the batch's; the TTFT runs from the request (``t_start``, before the processor) to the
        first token's logits, so it is preprocessing plus :data:`lmms_prune.timing.PHASES` (docs/efficiency.md)."""
        layers = list(rec.kv_lengths) or [rec.seq_len_after] * self.dims.num_layers
        full = [rec.seq_len_before] * self.dims.num_layers
        marks = self._clock.marks
        prefill_end = marks.get("llm_end", t_gen)
        first = marks.get("head_end", prefill_end)
        phases = ttft_parts(marks, first, rec.select_seconds, self.config.stage == "pre_llm") \
            if "llm_start" in marks else {}
        return {
            "batch_size": batch,
            "task_kind": self.handle.task_kind,
            "visual_before": rec.visual_before,
            "visual_before_papers": rec.visual_before_papers,
            "visual_after": rec.visual_after,
            "visual_after_per_image": [int(k.numel()) + (rec.merged[i] if rec.merged else 0)
                                       for i, k in enumerate(rec.kept)],
            "tokens_per_layer": layers,  # per decoder layer, tokens in its KV cache after prefill (multi-stage)
            "seq_len_before": rec.seq_len_before,
            "seq_len_after": rec.seq_len_after,
            "llm_prefill_seconds": rec.llm_prefill_seconds,
            "select_seconds": rec.select_seconds,
            "preprocess_seconds": t_gen - t_start,
            "vision_seconds": phases.get("vision", 0.0),
            "handover_seconds": phases.get("handover", 0.0),
            "ttft_seconds": first - t_start,
            "decode_seconds": t_gen_end - prefill_end,
            "generate_seconds": t_gen_end - t_gen,
            "end_to_end_seconds": t_end - t_start,
            **self.cost_fields(layers, full),
            "output_tokens": n_out,
        }

    def cost_fields(self, layers: list[int], full: list[int]) -> dict[str, int]:
        """The theoretical prefill FLOPs and KV cache of one sample (:mod:`lmms_prune.efficiency`), with
        ``layers`` tokens per decoder layer after pruning and ``full`` without."""
        return {"prefill_flops": prefill_flops(self.dims, layers),
                "prefill_flops_unpruned": prefill_flops(self.dims, full),
                "kv_cache_bytes": kv_cache_bytes(self.dims, layers, self.bytes_per_element),
                "kv_cache_bytes_unpruned": kv_cache_bytes(self.dims, full, self.bytes_per_element)}

    def report(self) -> dict[str, Any]:
        """What identifies the run in an efficiency report."""
        return {
            "pretrained": self.options.pretrained,
            "method": self.config.method,
            "config": self.config.to_dict(),
            "dtype": str(self.dtype).replace("torch.", ""),
            "decoder": self.dims.__dict__,
            "model_type": getattr(getattr(self.model, "config", None), "model_type", None),
            "backend": self.options.backend,
        }


def make_runner(family: type[Family], options: RunOptions, config: PruneConfig, model_id: str) -> Runner:
    """The runner of ``options.backend``: :class:`Runner` (transformers' ``generate`` with our engine) or
    :class:`lmms_prune.vllm.runner.VllmRunner` (the vLLM plug-in; imports vLLM)."""
    if options.backend == "vllm":
        from lmms_prune.vllm.runner import VllmRunner

        return VllmRunner(family, options, config, model_id)
    return Runner(family, options, config, model_id)


def _family_prefixes() -> list[str]:
    from lmms_prune.families import FAMILIES

    return [f"{name}_*" for name in FAMILIES]
