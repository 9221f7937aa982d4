"""Serving glue for vLLM: the pre-LLM presets as an out-of-tree vLLM plug-in (no fork, no patch of vLLM).

vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point (pyproject.toml) in every process
it starts. It registers one pruning-aware subclass of vLLM's own model class per architecture in
:data:`ARCHITECTURES` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; the shared part is :mod:`lmms_prune.vllm.qwen`); each
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
}
# Pre-LLM presets whose signals vLLM's Qwen-VL code exposes at its vision tower (docs/serving.md).
PRESETS = ("vispruner", "divprune", "fastervlm")
# Why the other presets are refused here (checked before any weights load).
REFUSED = {
    "cdpruner": "its relevance score reads the instruction's text embeddings, but vLLM encodes and caches each "
                "image once for every prompt it appears in (the encoder cache is keyed by the image), so the "
                "selection cannot depend on the text",
    "random": "our engine runs its selector inside the LLM only (stage='llm'), so there is no pre-LLM result "
              "to match",
    "uniform": "our engine runs its selector inside the LLM only (stage='llm'), so there is no pre-LLM result "
               "to match",
    "visionzip": "it merges tokens into new embeddings; the plug-in keeps subsets only so far",
}
POSITIONS = ("contiguous",)
# Why positions='original' (GAP's rule, our engine's other setting) is refused: the kept tokens' original M-RoPE
# positions are known only after selection, in the worker, and vLLM 0.32's one hook for changing positions after
# the encoder (SupportsMultiModalPruning.recompute_mrope_positions) is called by GPUModelRunner only when video
# pruning is configured (video_pruning_rate > 0) and never by CPUModelRunner (its load_model leaves
# is_multimodal_pruning_enabled False), so the path cannot be proven here (docs/serving.md).
REFUSED_POSITIONS = ("vLLM 0.32 rewrites positions after the encoder only through "
                     "SupportsMultiModalPruning.recompute_mrope_positions, which its CPU model runner never calls and "
                     "its GPU runner calls only with video_pruning_rate > 0 (docs/serving.md); use "
                     "positions='contiguous'")


def register() -> None:
    """``vllm.general_plugins`` entry point: register the pruning-aware model classes (idempotent: vLLM may call
    it once per process)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)


def pruning_config(hf_config: Any) -> Any:
    """The :class:`lmms_prune.presets.PruneConfig` that ``hf_config.lmms_prune`` asks for, or None without the key.

    The value is a dict: ``method`` (one of :data:`PRESETS`) and the method's parameters as for
    ``lmms_prune.apply`` (``keep_ratio`` or ``keep_tokens``, ``positions="contiguous"``, the default here).
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
    if method in REFUSED:
        raise ValueError(f"{CONFIG_KEY}.method={method!r}: not served by the vLLM plug-in: {REFUSED[method]}; "
                         f"use one of {', '.join(PRESETS)}")
    if method not in PRESETS:
        raise ValueError(f"{CONFIG_KEY}.method={method!r}: the vLLM plug-in serves the pre-LLM presets "
                         f"{', '.join(PRESETS)}; methods that prune inside the LLM need per-layer sequence lengths "
                         "in vLLM's paged KV cache (docs/serving.md)")
    positions = params.setdefault("positions", "contiguous")
    if positions in ("original", "gap"):
        raise ValueError(f"{CONFIG_KEY}.positions={positions!r}: not served yet: {REFUSED_POSITIONS}")
    if positions not in POSITIONS:
        raise ValueError(f"{CONFIG_KEY}.positions={positions!r}: must be one of {POSITIONS}")
    from lmms_prune.presets import resolve_config

    cfg = resolve_config(method, **params)
    if cfg.stage != "pre_llm":
        raise ValueError(f"{CONFIG_KEY}.stage={cfg.stage!r}: the vLLM plug-in prunes before the LLM; use stage=pre_llm")
    return cfg


def lmms_eval_model_args(model: str, prune: dict[str, Any] | None, **engine: Any) -> str:
    """The ``--model_args`` string of lmms-eval's ``vllm`` model that serves ``model`` with the pruning config
    ``prune`` (the value of ``hf_overrides["lmms_prune"]``, checked here as the plug-in will check it) and the
    other ``vllm.LLM`` arguments ``engine`` (dicts such as ``limit_mm_per_prompt`` included).

    lmms-eval splits ``--model_args`` at commas outside braces and quotes, and its ``vllm`` model turns each
    value that starts with ``{`` back into a dict with ``json.loads`` before it builds ``vllm.LLM``; so dicts go
    in as compact JSON. Raises ``ValueError`` for a bad pruning config or a value lmms-eval cannot carry.
    """
    import json
    from types import SimpleNamespace

    args: dict[str, Any] = {"model": model, **engine}
    if prune is not None:
        pruning_config(SimpleNamespace(**{CONFIG_KEY: prune}))
        args["hf_overrides"] = {CONFIG_KEY: prune}
    parts = []
    for key, value in args.items():
        text = json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else str(value)
        if not isinstance(value, dict) and any(c in text for c in ",{}[]\"'"):
            raise ValueError(f"{key}={text!r}: lmms-eval's --model_args cannot carry ',', quotes or brackets "
                             "in a plain value")
        parts.append(f"{key}={text}")
    return ",".join(parts)
