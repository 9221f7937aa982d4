"""Serving glue for vLLM: the pre-LLM presets as an out-of-tree vLLM plug-in (no fork, no patch of vLLM).

vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point (pyproject.toml) in every process
it starts. It registers one pruning-aware subclass of vLLM's own model class per architecture in
:data:`ARCHITECTURES` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, sharing :mod:`lmms_prune.vllm.qwen`; LLaVA-1.5,
:mod:`lmms_prune.vllm.llava`; LLaVA-NeXT, :mod:`lmms_prune.vllm.llava_next`; LLaVA-OneVision,
:mod:`lmms_prune.vllm.llava_onevision`; InternVL, :mod:`lmms_prune.vllm.internvl`; what all share is
:mod:`lmms_prune.vllm.base`); each
serves the model unchanged unless its config carries the pruning key::

    LLM(model=..., hf_overrides={"lmms_prune": {"method": "divprune", "keep_ratio": 0.25}})

Why ``hf_overrides`` (docs/serving.md): it is the one vLLM setting that both halves of a pruned request see --
the front-end's prompt processor (which fixes the placeholder count, the budget) and the worker's model (which
selects) read the same ``hf_config``; it enters vLLM's config hash, so caches never mix pruned and unpruned
runs; and lmms-eval's ``vllm`` backend forwards it. ``additional_config`` reaches only ``VllmConfig``, which the
prompt processor does not see.

Importing this package does not import vLLM (``lmms_prune`` must import without it); only :func:`register`
and the submodules do.
"""

from __future__ import annotations

from typing import Any

CONFIG_KEY = "lmms_prune"
# vLLM architecture name -> our subclass of vLLM's class (module:class, imported by vLLM when it builds the model).
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "lmms_prune.vllm.qwen2_vl:PrunedQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "lmms_prune.vllm.qwen2_5_vl:PrunedQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "lmms_prune.vllm.qwen3_vl:PrunedQwen3VL",
    "LlavaForConditionalGeneration": "lmms_prune.vllm.llava:PrunedLlava",
    "LlavaNextForConditionalGeneration": "lmms_prune.vllm.llava_next:PrunedLlavaNext",
    "LlavaOnevisionForConditionalGeneration": "lmms_prune.vllm.llava_onevision:PrunedLlavaOnevision",
    "InternVLForConditionalGeneration": "lmms_prune.vllm.internvl:PrunedInternVL",
}
# our family name -> the vLLM architecture the plug-in registers for it (ARCHITECTURES)
FAMILY_ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                        "qwen3_vl": "Qwen3VLForConditionalGeneration", "llava": "LlavaForConditionalGeneration",
                        "llava_next": "LlavaNextForConditionalGeneration",
                        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                        "internvl": "InternVLForConditionalGeneration"}
# Pre-LLM presets whose signals vLLM's Qwen-VL, LLaVA and InternVL code exposes at its vision tower, each proven
# to keep our engine's tokens by scripts/vllm_check.py (docs/serving.md). random and uniform run inside the LLM by
# default (their presets' stage='llm'); the plug-in serves them with stage='pre_llm', which the user names.
PRESETS = ("vispruner", "divprune", "fastervlm", "visionzip", "prumerge_plus", "random", "uniform")
# Why other presets are refused here (checked before any weights load); methods that prune inside the LLM, or
# whose token count follows the image, are refused by what their config says (pruning_config).
VIDEO_ONLY = "it prunes videos only, and the plug-in prunes images (vLLM's own EVS serves videos: video_pruning_rate)"
REFUSED = {
    "none": "it prunes nothing: serve the model without hf_overrides['lmms_prune']",
    "cdpruner": "its relevance score reads the instruction's text embeddings, but vLLM encodes and caches each "
                "image once for every prompt it appears in (the encoder cache is keyed by the image), so the "
                "selection cannot depend on the text",
    "fixed": "its keep_indices name each sample's tokens, but vLLM's encoder sees images, not samples",
    "downsample": "it shrinks the image instead of pruning tokens; pass the smaller size to vLLM's processor "
                  "(mm_processor_kwargs, e.g. max_pixels) and serve the model without a pruning config",
    **{name: VIDEO_ONLY for name in ("evs", "vidcom2", "dycoke", "holitom", "holitom_full", "fastvid")},
}
# why the token count must be fixed before the encoder runs
ADAPTIVE = ("vLLM fixes each image's placeholder count when it processes the prompt, before the encoder runs, "
            "but this setting's count follows the image's content")
INSIDE_LLM = ("methods that prune inside the LLM need per-layer sequence lengths in vLLM's paged KV cache "
              "(docs/serving.md)")


def family_refusal(family: str, cfg: Any) -> str | None:
    """Why the plug-in (and our engine) refuses ``cfg`` on ``family``, or None: merges on Qwen3-VL, whose LLM
    adds per-token vision features (DeepStack) at every visual position of its first layers, and on LLaVA-NeXT,
    and LLaVA-OneVision, whose row newlines sit inside each image's run."""
    from lmms_prune.methods import SELECTORS

    if not getattr(SELECTORS.get(cfg.selector), "merges", False):
        return None
    if family == "qwen3_vl":
        return ("it merges tokens, but Qwen3-VL also adds per-token vision features inside the LLM (DeepStack) that "
                "a merged token has none of")
    if family in ("llava_next", "llava_onevision"):
        return ("it merges tokens, but LLaVA-NeXT's and LLaVA-OneVision's images end each mosaic row in a newline "
                "that a merged sequence cannot place")
    return None


# vllm.LLM arguments backend=vllm sets itself from the run's options (vllm_engine_args may not)
ENGINE_ARGS_SET = {"model": "pretrained", "hf_overrides": "the pruning parameters", "dtype": "dtype",
                   "revision": "revision", "trust_remote_code": "trust_remote_code",
                   "mm_processor_kwargs": "the family's processor options", "max_num_seqs": "batch_size"}
POSITIONS = ("contiguous", "original", "gap")  # "gap" is our engine's other name of "original"
# The M-RoPE families: vLLM asks their model for the prompt's positions (get_mrope_input_positions) in the worker,
# with each image's pixels, before the encoder runs, which is where positions='original' is served. The 1-D RoPE
# families are asked the same once their config declares M-RoPE with the same rotation (mrope_override).
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def mrope_override(hf_config: Any) -> dict[str, Any]:
    """The ``hf_overrides`` entry that makes vLLM ask a 1-D RoPE model (LLaVA, LLaVA-NeXT, LLaVA-OneVision,
    InternVL) for its positions, which ``positions='original'`` needs: the text config's ``rope_parameters`` plus
    an ``mrope_section`` that puts every rotary frequency in the first of M-RoPE's three rows. The plug-in fills
    all three rows with each token's 1-D position, so the rotation is the model's own (docs/serving.md)."""
    text = hf_config.get_text_config()
    params = dict(getattr(text, "rope_parameters", None) or {"rope_type": "default",
                                                             "rope_theta": getattr(text, "rope_theta", 10000.0)})
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    half = int(head_dim * params.get("partial_rotary_factor", 1.0)) // 2
    return {"text_config": {"rope_parameters": params | {"mrope_section": [half, 0, 0]}}}


def served_overrides(family: str, prune: dict[str, Any] | None, hf_config: Any) -> dict[str, Any]:
    """The whole ``hf_overrides`` that serves ``family`` with the pruning config ``prune`` (the value of
    ``hf_overrides["lmms_prune"]``; None: unpruned): the key, plus :func:`mrope_override` where a 1-D RoPE family
    asks for ``positions='original'``."""
    if prune is None:
        return {}
    out: dict[str, Any] = {CONFIG_KEY: prune}
    if prune.get("positions", "contiguous") != "contiguous" and family not in MROPE_FAMILIES:
        out |= mrope_override(hf_config)
    return out


def register() -> None:
    """``vllm.general_plugins`` entry point: register the pruning-aware model classes (idempotent: vLLM may call
    it once per process)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)


def pruning_config(hf_config: Any) -> Any:
    """The :class:`lmms_prune.presets.PruneConfig` that ``hf_config.lmms_prune`` asks for, or None without the key.

    The value is a dict: ``method`` (one of :data:`PRESETS`) and the method's parameters as for
    ``lmms_prune.apply`` (``keep_ratio`` or ``keep_tokens``, ``positions="contiguous"``, the default here, or
    ``"original"``: on a 1-D RoPE family with :func:`mrope_override` beside it).
    Raises ``ValueError`` naming the bad value and the fix; it runs in the prompt processor and in the model's
    constructor, so before any weights load.
    """
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"hf_overrides[{CONFIG_KEY!r}]={raw!r}: must be a dict such as "
                         "{'method': 'divprune', 'keep_ratio': 0.25}")
    params = dict(raw)
    method = params.pop("method", None)
    served = ", ".join(PRESETS)
    if method in REFUSED:
        raise ValueError(f"{CONFIG_KEY}.method={method!r}: not served by the vLLM plug-in: {REFUSED[method]}; "
                         f"use one of {served}")
    from lmms_prune.presets import PRESETS as ALL
    from lmms_prune.presets import resolve_config

    if method not in ALL:
        raise ValueError(f"{CONFIG_KEY}.method={method!r}: unknown; the vLLM plug-in serves {served}")
    stage = params.get("stage", ALL[method].settings.get("stage"))
    if stage != "pre_llm":
        if method in PRESETS:  # random, uniform: inside the LLM unless told
            raise ValueError(f"{CONFIG_KEY}.stage={stage!r}: {method} runs inside the LLM by default; the vLLM "
                             "plug-in prunes before the LLM: pass stage='pre_llm' (the same tokens, dropped before "
                             "the first layer)")
        raise ValueError(f"{CONFIG_KEY}.method={method!r} (stage={stage!r}): not served by the vLLM plug-in: "
                         f"{INSIDE_LLM}; use one of {served}")
    positions = params.setdefault("positions", "contiguous")
    if positions not in POSITIONS:
        raise ValueError(f"{CONFIG_KEY}.positions={positions!r}: must be one of {POSITIONS}")
    cfg = resolve_config(method, **params)
    if cfg.composed:
        raise ValueError(f"{CONFIG_KEY}.method={method!r}: its second stage ({cfg.llm_selector}) prunes inside the "
                         f"LLM: {INSIDE_LLM}; use one of {served}")
    from lmms_prune.methods import SELECTORS

    if SELECTORS[cfg.selector].adaptive_count(cfg):
        fix = "; pass prumerge_budget='fixed'" if method == "prumerge_plus" else f"; use one of {served}"
        raise ValueError(f"{CONFIG_KEY}.method={method!r}: not served by the vLLM plug-in: {ADAPTIVE}{fix}")
    if method not in PRESETS:
        raise ValueError(f"{CONFIG_KEY}.method={method!r}: not served by the vLLM plug-in yet (no cross-engine "
                         f"proof); use one of {served}")
    return cfg


def backend_options(family: str, method: str, prune: dict[str, Any], config: Any, options: Any,
                    engine_args: Any = None) -> dict[str, Any]:
    """The :class:`lmms_prune.runner.RunOptions` fields of ``backend=vllm`` (``vllm_prune``: the value of
    ``hf_overrides["lmms_prune"]``, None for ``method=none``; ``vllm_engine_args``), after checking, before
    anything loads, that the vLLM plug-in serves this run exactly as ``config`` (what the transformers backend
    would run) says. Raises ``ValueError`` naming the value and the fix."""
    if family not in FAMILY_ARCHITECTURES:
        raise ValueError(f"backend=vllm: the vLLM plug-in serves the families {', '.join(FAMILY_ARCHITECTURES)}, "
                         f"not {family} (docs/serving.md); use backend=transformers")
    if options.device_map is not None:
        raise ValueError(f"device_map={options.device_map!r} with backend=vllm: vLLM places the model itself "
                         "(tensor_parallel_size in vllm_engine_args); drop device_map")
    if not options.use_cache:
        raise ValueError("use_cache=false with backend=vllm: vLLM always decodes from its paged KV cache; drop "
                         "use_cache or use backend=transformers")
    value = None
    if method != "none":
        value = {"method": method, **{k: getattr(config, k) for k in prune}}
        from types import SimpleNamespace

        served = pruning_config(SimpleNamespace(**{CONFIG_KEY: value}))
        if served != config:
            raise ValueError(f"backend=vllm would run {method} with positions={served.positions!r}, the transformers "
                             f"backend with positions={config.positions!r}; pass positions=contiguous")
        reason = family_refusal(family, config)
        if reason:
            raise ValueError(f"backend=vllm: {family} is not served with {method}: {reason}; use another preset")
    if engine_args is None or engine_args == "":
        engine: dict[str, Any] = {}
    elif isinstance(engine_args, dict):
        engine = dict(engine_args)
    else:
        import json

        try:
            engine = json.loads(str(engine_args))
        except json.JSONDecodeError as err:
            raise ValueError(f"vllm_engine_args={engine_args!r}: not JSON ({err.msg}); give an object such as "
                             '{"max_model_len":4096}') from None
        if not isinstance(engine, dict):
            raise ValueError(f"vllm_engine_args={engine_args!r}: must be a JSON object of vllm.LLM arguments")
    clash = sorted(set(engine) & set(ENGINE_ARGS_SET))
    if clash:
        raise ValueError(f"vllm_engine_args sets {', '.join(clash)}, which backend=vllm sets from "
                         f"{', '.join(ENGINE_ARGS_SET[k] for k in clash)}; set those instead")
    return {"vllm_prune": value, "vllm_engine_args": engine}


def lmms_eval_model_args(model: str, prune: dict[str, Any] | None, **engine: Any) -> str:
    """The ``--model_args`` string of lmms-eval's ``vllm`` model that serves ``model`` with the pruning config
    ``prune`` (the value of ``hf_overrides["lmms_prune"]``, checked here as the plug-in will check it; with
    ``positions='original'`` the checkpoint's config is read, and a 1-D RoPE model gets :func:`mrope_override`)
    and the other ``vllm.LLM`` arguments ``engine`` (dicts such as ``limit_mm_per_prompt`` included).

    lmms-eval splits ``--model_args`` at commas outside braces and quotes, and its ``vllm`` model turns each
    value that starts with ``{`` back into a dict with ``json.loads`` before it builds ``vllm.LLM``; so dicts go
    in as compact JSON. Raises ``ValueError`` for a bad pruning config or a value lmms-eval cannot carry.
    """
    import json
    from types import SimpleNamespace

    args: dict[str, Any] = {"model": model, **engine}
    if prune is not None:
        pruning_config(SimpleNamespace(**{CONFIG_KEY: prune}))
        config = None
        if prune.get("positions", "contiguous") != "contiguous":  # a 1-D RoPE model needs its M-RoPE declaration
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model)
        args["hf_overrides"] = served_overrides(getattr(config, "model_type", ""), prune, config)
    parts = []
    for key, value in args.items():
        text = json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else str(value)
        if not isinstance(value, dict) and any(c in text for c in ",{}[]\"'"):
            raise ValueError(f"{key}={text!r}: lmms-eval's --model_args cannot carry ',', quotes or brackets "
                             "in a plain value")
        parts.append(f"{key}={text}")
    return ",".join(parts)
