"""Pruning configurations: the one place where every pruning parameter is parsed and validated.

``resolve_config(method, **overrides)`` builds the :class:`PruneConfig` of a preset with user overrides, for
the Python API, the lmms-eval ``--model_args`` and the CLI alike; :func:`check_model` adds the checks that
need the model's shape and reads only its config (``AutoConfig``), so both run before any weights load. A
parameter that the chosen method does not read is refused, not ignored. It imports nothing heavy.

``PruneConfig``'s fields are the common ones below plus every method module's ``PARAMS``
(:mod:`lmms_prune.methods`); ``lmms-prune methods`` prints them with their help.

Layer convention (methods.md section 2): ``prune_layer = K`` means decoder layers ``0..K-1`` see every token
and the unselected visual tokens are removed from the input of layer ``K``; ``score_layer`` defaults to
``K - 1`` (the attention computed inside layer K-1 decides what layer K receives).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from lmms_prune.methods import PARAMS as METHOD_PARAMS
from lmms_prune.methods import PRESETS, SCORES, SELECTORS
from lmms_prune.methods.base import STAGES, Param, Preset

__all__ = ["PRESETS", "Preset", "PruneConfig", "check_model", "describe_presets", "resolve_config", "validate"]

# 'gap' and 'original' are one rule (kept tokens keep their original position IDs: GAP, arXiv 2506.21873,
# lmms_prune.selection.positions.gap_positions); 'gap' names it after the paper that showed grounding needs it.
POSITION_RULES = ("contiguous", "original", "gap")
# Parameters every method has; the stage-specific ones are read only by methods of that stage.
COMMON_PARAMS: tuple[Param, ...] = (
    Param("method", "none", "preset name this config was built from", kind="str"),
    Param("stage", "none", "where tokens are dropped: 'llm' (inside the decoder at prune_layer), 'pre_llm' "
          "(before the decoder: dropped tokens never enter it), 'none'", kind="str", choices=STAGES),
    Param("selector", "none", f"selection algorithm: one of {', '.join(SELECTORS)}", kind="str",
          choices=("none", *SELECTORS)),
    Param("score", "none", f"importance score: one of {', '.join(SCORES)}", kind="str", choices=tuple(SCORES)),
    Param("keep_ratio", 0.1, "fraction of each image's visual tokens kept: round(keep_ratio*N), >= 1 (give "
          "keep_ratio or keep_tokens, not both)", low=0.0, high=1.0, open_low=True, optional=True),
    Param("keep_tokens", None, "absolute number of visual tokens kept per image (instead of keep_ratio)",
          kind="int", low=1, optional=True),
    Param("prune_layer", None, "K: decoder layers 0..K-1 see all tokens; pruning applies from layer K",
          kind="int", low=0, optional=True),
    Param("score_layer", None, "layer whose attention scores tokens (default K-1)", kind="int", low=0,
          optional=True),
    Param("prune_layers", None, "multi-stage pruning (PyramidDrop): decoder layers K1<K2<... where a stage keeps "
          "a subset of the visual tokens still present, each scored at K_s-1 or by layer K_s itself (score_at); '8,16,24' ('8/16/24' "
          "inside lmms-eval --model_args), or 'auto' "
          "(the method's LLaVA-1.5-7B layers scaled to the depth, rounded half up: pyramiddrop 8,16,24 of 32, "
          "sparsevlm 3,7,16 of 32). With it, "
          "keep_ratio/keep_tokens is the AVERAGE number of visual tokens per decoder layer (all L layers; the "
          "per-stage ratio is solved from it), or give stage_ratio instead. Replaces prune_layer",
          kind="layers", optional=True),
    Param("stage_ratio", None, "multi-stage: fraction of the ORIGINAL visual tokens kept after stage s is "
          "stage_ratio^s (each stage keeps stage_ratio of those still present); give it instead of "
          "keep_ratio/keep_tokens", low=0.0, high=1.0, open_low=True, optional=True),
    Param("positions", "contiguous", "RoPE position IDs of the kept tokens. pre_llm: 'contiguous' renumbering of "
          "the shorter prompt (default, as VisPruner/DivPrune), or 'gap' = 'original': each kept token keeps its "
          "position in the unpruned prompt (GAP's rule, arXiv 2506.21873). Multi-stage (prune_layers): "
          "'contiguous' = each stage's survivors take positions 0..n-1 and decoding continues from n (PyramidDrop's "
          "and SparseVLM's code), or 'gap' = 'original'. Single-stage llm: 'gap' (default there) = 'original', "
          "as FastV's code. A pre-LLM stage followed by an LLM stage (llm_selector): the pre-LLM stage's rule, and the "
          "LLM stage's unless llm_positions is set", kind="str", choices=POSITION_RULES),
    Param("decode_cache", "stage", "multi-stage (prune_layers): the visual KV entries a decoded token attends to. "
          "'stage' (default, PyramidDrop's and SparseVLM's code): each layer those present at its stage (all before "
          "the first stage); 'final': every layer from K_1 - 1 on (the layer whose output the first stage prunes) "
          "the LAST stage's survivors only, at the last stage's renumbered positions (MustDrop's decode-stage "
          "cache cut)", kind="str", choices=("stage", "final")),
)
COMMON_PARAMS += (
    Param("llm_selector", "none", "pre_llm methods: an LLM stage after the pre-LLM stage (VScan's middle-layer "
          "pruning): the selector that keeps a subset of the tokens the pre-LLM stage passed, at the decoder layer of "
          "prune_layers ('auto': the pre-LLM selector's layer fractions), stage_ratio of them; scored by llm_score "
          "with score_at, qk_rope, qk_softmax; 'none' = no LLM stage", kind="str", choices=("none", *SELECTORS)),
    Param("llm_score", "attention", "pre_llm methods with llm_selector: the importance score of the LLM stage "
          f"(one of {', '.join(SCORES)})", kind="str", choices=tuple(SCORES)),
    Param("llm_positions", None, "pre_llm methods with llm_selector: RoPE position IDs at the LLM stage's layers "
          "and of the decoded tokens, on the shortened prompt that stage sees. 'original' (= 'gap'): each survivor "
          "keeps its position in the shortened prompt and decoding continues from that prompt's length (HoliTom's "
          "code); 'contiguous': the survivors are renumbered 0..n-1 and decoding continues from n (VScan's LLaVA "
          "code); unset: as positions", kind="str", choices=POSITION_RULES, optional=True),
    Param("llm_structural", "keep", "pre_llm methods with llm_selector: a video's structural tokens in the "
          "shortened prompt (LLaVA-OneVision's newline after a video). 'keep': they stay at every layer, outside "
          "the LLM stage's candidates (the engine's rule for structure); 'candidates': the LLM stage counts them "
          "among the video's tokens it keeps or merges, budget included (HoliTom's code: its inner stage takes the "
          "video's features with their newline)", kind="str", choices=("keep", "candidates")),
)
# the fields of a pre-LLM method's LLM stage (llm_selector != 'none'): the multi-stage machinery's own
COMPOSED_PARAMS = ("llm_score", "llm_positions", "llm_structural", "prune_layers", "stage_ratio", "score_at", "budget_rounding",
                   "budget_base", "decode_cache")
STAGE_PARAMS = {"none": (), "llm": ("prune_layer", "prune_layers", "positions"),
                "pre_llm": ("positions", "llm_selector")}
ALWAYS = ("method", "stage", "selector", "score", "keep_ratio", "keep_tokens")
_COMMON_CLASH = sorted({p.name for p in COMMON_PARAMS} & set(METHOD_PARAMS))
if _COMMON_CLASH:
    from lmms_prune.methods import ORIGINS

    raise ValueError(f"parameter name {_COMMON_CLASH[0]!r} is declared by both {__name__} (the parameters every "
                     f"method has) and {ORIGINS['parameter', _COMMON_CLASH[0]]}; rename the one in the method module")
PARAMS: dict[str, Param] = {p.name: p for p in COMMON_PARAMS} | METHOD_PARAMS


def _effective_score_layer(self) -> int | None:
    if self.score_layer is not None:
        return self.score_layer
    if self.prune_layer is None and isinstance(self.prune_layers, tuple):  # multi-stage: the first stage's
        return self.prune_layers[0] - (0 if self.score_at == "K" else 1)
    return None if self.prune_layer is None else self.prune_layer - 1


def _multi_stage(self) -> bool:
    return self.stage == "llm" and self.prune_layers is not None


def _stage_layers(self, depth: int) -> tuple[int, ...]:
    """The pruning layers of this config on a decoder of ``depth`` layers (one for single-stage methods)."""
    if not self.multi_stage:
        return (self.prune_layer,)
    if self.prune_layers == "auto":
        from lmms_prune.selection.budget import depth_scaled_layers

        selector = SELECTORS.get(self.selector)
        return depth_scaled_layers(depth, selector.layer_fractions if selector else (0.25, 0.5, 0.75))
    return tuple(self.prune_layers)


def _stage_configs(self, depth: int) -> list[Any]:
    """One single-stage config per pruning stage (``prune_layer=K_s``, scored at ``K_s-1``): the score and
    selector plug-ins of stage ``s`` are built from it, so any single-stage score composes per stage."""
    if not self.multi_stage:
        return [self]
    return [dataclasses.replace(self, prune_layer=k, prune_layers=None, stage_ratio=None,
                                score_layer=k if self.score_at == "K" else None)
            for k in self.stage_layers(depth)]


def _composed(self) -> bool:
    """A pre-LLM stage followed by an LLM stage (``llm_selector``): see :func:`_split_stages`."""
    return self.stage == "pre_llm" and self.llm_selector != "none"


def _split_stages(self, depth: int | None = None) -> tuple[Any, Any]:
    """A composed config (``llm_selector`` set) as its two single-purpose configs: the pre-LLM stage (``selector``,
    ``score``, ``keep_ratio``/``keep_tokens``) and the LLM stage that runs on the shortened prompt (``llm_selector``,
    ``llm_score`` at ``prune_layers`` keeping ``stage_ratio`` of the tokens present, multi-stage machinery, its
    ``positions`` being ``llm_positions``, or the pre-LLM stage's ``positions`` where unset: a merging pre-LLM stage
    must renumber the shortened prompt, while the LLM stage may keep the positions of that prompt, as HoliTom's
    code does). ``prune_layers='auto'`` is resolved with ``depth`` (decoder layers) from the pre-LLM selector's
    ``layer_fractions`` (VScan: the middle layer); without ``depth`` it stays 'auto'."""
    if not self.composed:
        raise ValueError(f"method {self.method!r}: not a composed config (llm_selector='none')")
    layers = self.prune_layers
    if layers == "auto" and depth is not None:
        from lmms_prune.selection.budget import depth_scaled_layers

        layers = depth_scaled_layers(depth, SELECTORS[self.selector].layer_fractions)
    pre = dataclasses.replace(self, llm_selector="none", llm_positions=None, prune_layers=None, stage_ratio=None)
    positions = self.positions if self.llm_positions is None else self.llm_positions
    llm = dataclasses.replace(self, stage="llm", selector=self.llm_selector, score=self.llm_score,
                              llm_selector="none", llm_positions=None, keep_ratio=None, keep_tokens=None,
                              prune_layers=layers, prune_layer=None, positions=positions)
    return pre, llm


def _needs(self):
    """The signals this config's score and selector read (:class:`lmms_prune.methods.base.Needs`)."""
    score = SCORES[self.score].needs(self)
    return score | SELECTORS[self.selector].needs(self) if self.selector in SELECTORS else score


def _score_layers(self) -> tuple[int, ...]:
    """Decoder layers whose last-row attention (or key norms) this config needs."""
    if self.stage != "llm":
        return ()
    if self.multi_stage:  # per stage, known once the depth is (see stage_configs)
        return ()
    needs = self.needs()
    return tuple(sorted(set(needs.attention) | set(needs.text_attention) | set(needs.key_norms)
                        | set(needs.query_key_attention)))


def _resolved_alpha(self, task_kind: str | None = None) -> float:
    """``alpha='auto'``: 0.5 for grounding, 1.0 for understanding tasks (D2Pruner paper's settings)."""
    if self.alpha == "auto":
        return 0.5 if task_kind in (None, "grounding") else 1.0
    return float(self.alpha)


def _to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


PruneConfig = dataclasses.make_dataclass(
    "PruneConfig",
    [(p.name, Any, field(default=p.default, metadata={"help": p.help})) for p in PARAMS.values()],
    frozen=True,
    namespace={
        "__doc__": "Everything that defines one pruning run. Field help texts are printed by ``lmms-prune "
                   "methods``; fields come from lmms_prune.presets.COMMON_PARAMS and each method module.",
        "effective_score_layer": property(_effective_score_layer),
        "composed": property(_composed),
        "split_stages": _split_stages,
        "multi_stage": property(_multi_stage),
        "stage_layers": _stage_layers,
        "stage_configs": _stage_configs,
        "needs": _needs,
        "score_layers": _score_layers,
        "resolved_alpha": _resolved_alpha,
        "to_dict": _to_dict,
    },
)
PruneConfig.__module__ = __name__


def used_params(cfg: Any) -> set[str]:
    """The config fields that ``cfg``'s stage, score and selector read."""
    used = set(ALWAYS) | set(STAGE_PARAMS[cfg.stage])
    if cfg.multi_stage:
        used |= {"stage_ratio", "positions", "score_at", "budget_rounding", "budget_base", "decode_cache"}
        if cfg.score_at != "K-1":
            used |= {"qk_rope", "qk_softmax"}
    if cfg.stage != "none":
        used |= set(SCORES[cfg.score].used_params(cfg))
        if cfg.selector in SELECTORS:
            used |= set(SELECTORS[cfg.selector].used_params(cfg))
    if cfg.composed:
        used |= set(COMPOSED_PARAMS) | (used_params(cfg.split_stages()[1]) - {"selector", "score"})
    return used


def reads(method: str, name: str) -> bool:
    """Whether preset ``method`` (with its own settings) reads parameter ``name``: shared options such as a
    sweep's ``*:KEY=VALUE`` apply only where they are read."""
    if method not in PRESETS:
        raise ValueError(f"method={method!r}: unknown; choose one of {', '.join(PRESETS)}")
    return name in used_params(PruneConfig(**{"method": method, **PRESETS[method].settings}))


def _users(name: str) -> list[str]:
    """Presets whose methods read parameter ``name``."""
    out = []
    for preset in PRESETS.values():
        try:
            cfg = PruneConfig(**{"method": preset.name, **preset.settings})
        except TypeError:
            continue
        if name in used_params(cfg):
            out.append(preset.name)
    return out


def validate(cfg: Any) -> Any:
    """Check the config's values and their combinations (no model needed); returns ``cfg``."""
    for name, param in PARAMS.items():
        value = getattr(cfg, name)
        if not (value is None and param.optional):
            param.parse(value)
    if cfg.multi_stage:
        given = [v is not None for v in (cfg.keep_ratio, cfg.keep_tokens, cfg.stage_ratio)]
        if sum(given) != 1:
            raise ValueError(
                f"keep_ratio={cfg.keep_ratio!r}, keep_tokens={cfg.keep_tokens!r}, stage_ratio={cfg.stage_ratio!r}: "
                "multi-stage pruning (prune_layers) takes exactly one of them (keep_ratio/keep_tokens: the average "
                "visual tokens per decoder layer; stage_ratio: the fraction each stage keeps)")
        if cfg.prune_layer is not None:
            raise ValueError(f"prune_layer={cfg.prune_layer!r} with prune_layers={cfg.prune_layers!r}: give one "
                             "of them (prune_layers for several stages)")
        if cfg.score_layer is not None:
            raise ValueError(f"score_layer={cfg.score_layer!r}: multi-stage pruning scores each stage K_s at layer "
                             "K_s (score_at='K') or K_s-1 (score_at='K-1' or 'own-K-1'); drop score_layer")
        if cfg.score_at != "K-1" and (cfg.query != "last" or cfg.query_rows != 1):
            raise ValueError(f"query={cfg.query!r}, query_rows={cfg.query_rows!r} with score_at={cfg.score_at!r}: a "
                             "layer's own projections score the last prompt token only; use query='last', "
                             "query_rows=1 or score_at='K-1'")
    elif (cfg.keep_ratio is None) == (cfg.keep_tokens is None):
        raise ValueError(f"keep_ratio={cfg.keep_ratio!r}, keep_tokens={cfg.keep_tokens!r}: give exactly one of "
                         "them (e.g. keep_ratio=0.1, or keep_tokens=64)")
    if cfg.query_rows != 1 and cfg.query != "last":
        raise ValueError(f"query_rows={cfg.query_rows!r} with query={cfg.query!r}: query_rows counts the last prompt "
                         "tokens of query='last'; drop query_rows")
    if cfg.stage == "none":
        return cfg
    if cfg.composed:
        _validate_composed(cfg)
    score, selector = SCORES[cfg.score], SELECTORS.get(cfg.selector)
    if selector is None:
        raise ValueError(f"method {cfg.method!r}: stage={cfg.stage!r} needs a selector, one of {', '.join(SELECTORS)}")
    for plugin in (score, selector):
        if cfg.stage not in plugin.stages:
            where = {"llm": "inside the LLM", "pre_llm": "before the LLM"}[cfg.stage]
            raise ValueError(f"{'score' if plugin is score else 'selector'}={plugin.name!r} cannot run {where} "
                             f"(stage={cfg.stage!r}); it runs at stage {', '.join(plugin.stages)}")
    if cfg.multi_stage:
        for plugin in (score, selector):
            if not plugin.subsets:
                raise ValueError(
                    f"{'score' if plugin is score else 'selector'}={plugin.name!r} cannot run in multi-stage pruning "
                    f"(prune_layers={cfg.prune_layers!r}): its later stages see a subset of each image's tokens; "
                    "use one of the scores/selectors that work on subsets (" + ", ".join(
                        n for n, p in {**SCORES, **SELECTORS}.items() if p.subsets) + ") or drop prune_layers")
    if (cfg.stage == "pre_llm" and selector.merges and not selector.merges_in_place
            and cfg.positions != "contiguous"):
        raise ValueError(f"positions={cfg.positions!r}: {cfg.method}'s merged tokens have no original position; "
                         "use positions='contiguous'" + ("; the LLM stage's: llm_positions" if cfg.composed else ""))
    if cfg.stage == "llm" and not cfg.multi_stage and cfg.positions == "contiguous":
        raise ValueError(f"positions={cfg.positions!r} with single-stage pruning inside the LLM: the kept tokens "
                         "keep their original position IDs there (FastV's code, GAP's rule); use positions='gap' "
                         "(or 'original'), or renumber per stage with prune_layers")
    if cfg.stage == "llm" and not cfg.multi_stage:
        if cfg.prune_layer is None:
            raise ValueError(f"prune_layer=None: must be an integer >= 0 for method {cfg.method!r}")
        for layer in cfg.score_layers():
            if layer is None or layer < 0 or layer >= cfg.prune_layer:
                raise ValueError(
                    f"score_layer={layer} with prune_layer={cfg.prune_layer}: the scoring layer must run "
                    f"before pruning, so it must be in [0, {cfg.prune_layer - 1}]; lower score_layer "
                    "(or shallow_layer) or raise prune_layer"
                )
    score.check(cfg)
    selector.check(cfg)
    return cfg


def _validate_composed(cfg: Any) -> None:
    """A pre-LLM stage followed by an LLM stage: the LLM stage is a multi-stage config of its own (one or more
    layers, ``stage_ratio`` of the tokens present), validated as such; its plug-ins see a subset of each image."""
    if cfg.prune_layers is None or cfg.stage_ratio is None:
        raise ValueError(f"llm_selector={cfg.llm_selector!r}, prune_layers={cfg.prune_layers!r}, stage_ratio="
                         f"{cfg.stage_ratio!r}: an LLM stage after the pre-LLM stage needs its layers (prune_layers, "
                         "e.g. 'auto' or 16) and the fraction it keeps of the tokens present (stage_ratio, e.g. 0.333)")
    if cfg.prune_layer is not None:
        raise ValueError(f"prune_layer={cfg.prune_layer!r}: the LLM stage after a pre-LLM stage takes prune_layers")
    try:
        validate(cfg.split_stages()[1])
    except ValueError as err:
        raise ValueError(f"llm_selector={cfg.llm_selector!r}, llm_score={cfg.llm_score!r}: the LLM stage after the "
                         f"pre-LLM stage is refused: {err}") from None


_EMPTY_FIX = {
    "layers": "strictly increasing decoder layers, e.g. 8,16,24 (8/16/24 inside lmms-eval --model_args), or 'auto'",
    "path": "a file path",
    "bool": "true or false",
}
"""What an empty parameter should have been, by `Param` kind (the others say it through ``Param._expect``)."""


def resolve_config(method: str = "fastv", **overrides: Any) -> Any:
    """Build and validate the config of a preset with user overrides (strings are parsed).

    >>> resolve_config("deepprune", keep_ratio="0.25").prune_layer
    12
    """
    if method not in PRESETS:
        raise ValueError(f"method={method!r}: unknown; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown pruning parameter(s) {', '.join(unknown)}; valid ones: {', '.join(sorted(PARAMS))}")
    overrides = {k: v for k, v in overrides.items() if k != "method"}
    values: dict[str, Any] = {"method": method, **PRESETS[method].settings}
    for name, value in overrides.items():
        if isinstance(value, str) and not value.strip() and PARAMS[name].kind != "str":
            # `prune_layers=` would otherwise mean "unset" and surface as a confusing error about another parameter
            expect = _EMPTY_FIX.get(PARAMS[name].kind) or PARAMS[name]._expect()
            raise ValueError(f"{name}={value!r}: empty; give {expect}, or leave {name} out")
        values[name] = PARAMS[name].parse(value)
    if values.get("keep_tokens") is not None and "keep_ratio" not in overrides:
        values["keep_ratio"] = None
    if "prune_layers" in overrides and "prune_layer" not in overrides:
        values["prune_layer"] = None  # several stages replace the preset's single layer
    if values.get("prune_layers") is not None and values.get("stage") == "llm":
        # multi-stage: the budget is keep_* or stage_ratio, the last given (a composed pre-LLM method has both)
        budget_given = "keep_ratio" in overrides or "keep_tokens" in overrides
        if "stage_ratio" in overrides and not budget_given:
            values["keep_ratio"] = values["keep_tokens"] = None
        elif budget_given and "stage_ratio" not in overrides:
            values["stage_ratio"] = None
    if (values.get("stage") == "llm" and values.get("prune_layers") is None and "positions" not in overrides
            and "positions" not in PRESETS[method].settings):
        values["positions"] = "gap"  # single-stage pruning inside the LLM keeps the original positions
    score = SCORES.get(values.get("score", "none"))
    if score is not None and hasattr(score, "adjust"):
        values = score.adjust(values)
    cfg = validate(PruneConfig(**values))
    unused = sorted(set(overrides) - used_params(cfg))
    if unused:
        name = unused[0]
        users = _users(name)
        raise ValueError(
            f"{name}={overrides[name]!r}: method {method!r} (score={cfg.score}, selector={cfg.selector}, "
            f"stage={cfg.stage}) does not use {name}; drop it"
            + (f" (it is read by: {', '.join(users)})" if users else ""))
    return cfg


def check_model(cfg: Any, config: Any) -> None:
    """Checks that need the model's shape, from its transformers config only (no weights)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = int(text.num_hidden_layers)
    if cfg.composed:  # each stage against the model: the pre-LLM one (e.g. DeepStack), then the LLM one
        for stage in cfg.split_stages(depth):
            check_model(stage, config)
        return
    if cfg.multi_stage:
        layers = cfg.stage_layers(depth)
        if layers[-1] >= depth:
            raise ValueError(f"prune_layers={cfg.prune_layers!r}: this model has {depth} decoder layers, so every "
                             f"layer must be in [1, {depth - 1}]")
        if cfg.keep_ratio is not None:
            from lmms_prune.selection.budget import stage_ratio_for_average

            stage_ratio_for_average(cfg.keep_ratio, layers, depth)  # raises when the average is unreachable
        for stage in cfg.stage_configs(depth):
            check_model(stage, config)
        return
    family = _family_name(config)
    for plugin in (SCORES.get(cfg.score), SELECTORS.get(cfg.selector)):
        if plugin is not None and family is not None:
            plugin.for_family(cfg, family)  # its refusals for the model's family (Plugin.for_family)
    vision = getattr(config, "vision_config", None)
    if (cfg.stage == "pre_llm" and getattr(SELECTORS.get(cfg.selector), "merges", False)
            and getattr(vision, "deepstack_visual_indexes", None)):
        raise ValueError(f"method {cfg.method!r} merges tokens before the LLM, but this {config.model_type} model also "
                         "adds per-token vision features inside the LLM (DeepStack) that a merged token has none of; "
                         "use a method that keeps a subset (vispruner, divprune, evs, vidcom2)")
    if cfg.stage == "llm" and not 0 <= cfg.prune_layer < depth:
        raise ValueError(
            f"prune_layer={cfg.prune_layer}: this model has {depth} decoder layers, so it must be in [0, {depth - 1}]")
    for layer in cfg.score_layers():
        if not 0 <= layer < depth:
            raise ValueError(f"score_layer={layer}: must be in [0, {depth - 1}] for this model")
    selector = SELECTORS.get(cfg.selector)
    decode = selector.decode_layer(cfg) if selector is not None and cfg.stage == "pre_llm" else None
    if decode is not None and not 1 <= decode < depth:
        raise ValueError(f"decode layer {decode} of method {cfg.method!r}: this model has {depth} decoder layers, so "
                         f"it must be in [1, {depth - 1}] (the attention row comes from the layer before it)")


def _family_name(config: Any) -> str | None:
    """The lmms-prune family of a transformers config, or None for a config of no family (a text config)."""
    from lmms_prune.families import family_for_config

    try:
        return family_for_config(config).name
    except TypeError:
        return None


def describe_presets() -> str:
    """Human-readable table of every preset with every parameter and its default (``lmms-prune methods``)."""
    lines = ["Presets (select with method=NAME; override any parameter the method reads):", ""]
    for preset in PRESETS.values():
        settings = ", ".join(f"{k}={v}" for k, v in preset.settings.items())
        lines.append(f"  {preset.name:<12} {preset.description}")
        lines.append(f"  {'':<12} [{settings}]")
    lines += ["", "Parameters (default):", ""]
    for f in dataclasses.fields(PruneConfig):
        lines.append(f"  {f.name:<16} ({f.default!r}) {f.metadata.get('help', '')}")
    return "\n".join(lines)
