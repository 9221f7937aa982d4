"""Named pruning presets: one small table that maps a method name to a full ``PruneConfig``.

``resolve_config(method, **overrides)`` is the single place where user parameters are parsed and validated,
for the Python API, the lmms-eval ``--model_args`` and the CLI alike. It imports nothing heavy.

Layer convention (methods.md section 2): ``prune_layer = K`` means decoder layers ``0..K-1`` see every token
and the unselected visual tokens are removed from the input of layer ``K``; ``score_layer`` defaults to
``K - 1`` (the attention computed inside layer K-1 decides what layer K receives).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SELECTORS = ("none", "fixed", "random", "uniform", "topk", "pivot_mis", "vispruner", "divprune", "dart")
SCORES = ("none", "attention", "prior", "ratio", "ratio_combo", "trend", "vision", "key_norm")
STAGES = ("none", "llm", "pre_llm")
QUERIES = ("last", "text_mean")
POSITIONS = ("contiguous", "original")


def _f(default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class PruneConfig:
    """Everything that defines one pruning run. Field help texts are printed by ``lmms-prune methods``."""

    method: str = _f("none", "preset name this config was built from")
    stage: str = _f("none", "where tokens are dropped: 'llm' (inside the decoder at prune_layer), "
                    "'pre_llm' (before the decoder: dropped tokens never enter it), 'none'")
    selector: str = _f("none", f"selection algorithm: one of {', '.join(SELECTORS)}")
    score: str = _f("none", f"importance score: one of {', '.join(SCORES)}")
    keep_ratio: float | None = _f(0.1, "fraction of each image's visual tokens kept: round(keep_ratio*N), >= 1")
    keep_tokens: int | None = _f(None, "absolute number of visual tokens kept per image (overrides keep_ratio)")
    prune_layer: int | None = _f(None, "K: decoder layers 0..K-1 see all tokens; pruning applies from layer K")
    score_layer: int | None = _f(None, "layer whose attention scores tokens (default K-1)")
    shallow_layer: int = _f(2, "ratio/ratio_combo: layer of the shallow attention A_shallow "
                            "(2 = the deep-layer paper's K_s=3)")
    combo_weight: float = _f(0.5, "ratio_combo: w in w*minmax(A_mid) + (1-w)*minmax(ratio)")
    eps: float = _f(1e-7, "epsilon of the debiasing divisions")
    query: str = _f("last", "attention query: 'last' prompt token, or 'text_mean' over text rows after the image")
    r_pivot: float = _f(0.7, "pivot_mis: fraction of the budget taken as pivots (top floor(n*r_pivot))")
    theta_sim: float = _f(0.8, "pivot_mis: edge threshold on the fused similarity")
    alpha: float | str = _f(0.5, "pivot_mis: weight of semantic vs spatial similarity; 'auto' = 0.5 for "
                            "grounding tasks, 1.0 otherwise (D2Pruner's settings)")
    important_ratio: float = _f(0.5, "vispruner: fraction of the budget taken by [CLS] importance")
    num_pivots: int = _f(8, "dart: number of key-norm pivots")
    trend_selector: str = _f("topk", "trend: selector applied to the trend-debiased scores (topk or pivot_mis)")
    bias_prior: str | None = _f(None, "path of a calibrated attention prior (lmms-prune calibrate); "
                                "needed by d2pruner and trend")
    keep_indices: Any = _f(None, "fixed: visual-token indices to keep, per sample (list of lists, or one "
                           "list for every sample), counted within the visual tokens in sequence order")
    positions: str = _f("contiguous", "pre_llm: RoPE positions of the kept tokens: 'contiguous' renumbering "
                        "(as VisPruner/DivPrune) or 'original'")
    seed: int = _f(0, "random: seed of the random selection")

    @property
    def effective_score_layer(self) -> int | None:
        if self.score_layer is not None:
            return self.score_layer
        return None if self.prune_layer is None else self.prune_layer - 1

    def score_layers(self) -> tuple[int, ...]:
        """Decoder layers whose last-row attention (or key norms) this config needs."""
        if self.stage != "llm" or self.score in ("none", "vision"):
            return ()
        layer = self.effective_score_layer
        if self.score in ("ratio", "ratio_combo"):
            return tuple(sorted({layer, self.shallow_layer}))
        return (layer,)

    def resolved_alpha(self, task_kind: str | None = None) -> float:
        """``alpha='auto'``: 0.5 for grounding, 1.0 for understanding tasks (D2Pruner paper's settings)."""
        if self.alpha == "auto":
            return 0.5 if task_kind in (None, "grounding") else 1.0
        return float(self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Preset:
    """A named method: its description and the config fields it sets."""

    name: str
    description: str
    settings: dict[str, Any]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("none", "no pruning: the unpruned baseline through the same code path",
               dict(stage="none", keep_ratio=1.0)),
        Preset("fixed", "keep exactly the visual tokens given in keep_indices (oracle experiments)",
               dict(stage="llm", selector="fixed", prune_layer=2)),
        Preset("random", "seeded random subset", dict(stage="llm", selector="random", prune_layer=2)),
        Preset("uniform", "evenly spaced tokens within each grid (tile)",
               dict(stage="llm", selector="uniform", prune_layer=2)),
        Preset("fastv", "FastV: top-k of the last prompt token's attention at layer K-1 (K=2)",
               dict(stage="llm", selector="topk", score="attention", prune_layer=2)),
        Preset("d2pruner", "D2Pruner: prior-debiased attention A/(A_bias+eps) + pivot-MIS on the hybrid graph (K=2)",
               dict(stage="llm", selector="pivot_mis", score="prior", prune_layer=2, alpha="auto")),
        Preset("deepprune", "deep-layer attention pruning: raw attention of layer 11 + pivot-MIS, no prior (K=12)",
               dict(stage="llm", selector="pivot_mis", score="attention", prune_layer=12, alpha=0.5)),
        Preset("ratio", "ratio debiasing A(11)/(A(2)+eps) + pivot-MIS (K=12, K_s=3)",
               dict(stage="llm", selector="pivot_mis", score="ratio", prune_layer=12, shallow_layer=2)),
        Preset("ratio_combo", "w*minmax(A(11)) + (1-w)*minmax(A(11)/A(2)) + pivot-MIS (K=12)",
               dict(stage="llm", selector="pivot_mis", score="ratio_combo", prune_layer=12, shallow_layer=2)),
        Preset("trend", "attention divided by its fitted positional trend mu*exp(sigma*x), then top-k (K=2)",
               dict(stage="llm", selector="topk", score="trend", prune_layer=2)),
        Preset("vispruner", "VisPruner: vision-encoder [CLS] importance + similarity-based diverse tokens, pre-LLM",
               dict(stage="pre_llm", selector="vispruner", score="vision")),
        Preset("divprune", "DivPrune: max-min diversity of the projected visual embeddings, pre-LLM",
               dict(stage="pre_llm", selector="divprune")),
        Preset("dart", "DART: key-norm pivots + least-similar tokens at layer K (K=2)",
               dict(stage="llm", selector="dart", score="key_norm", prune_layer=2)),
    )
}

_FIELDS = {f.name: f for f in dataclasses.fields(PruneConfig)}
_INT_FIELDS = {"keep_tokens", "prune_layer", "score_layer", "shallow_layer", "num_pivots", "seed"}
_FLOAT_FIELDS = {"keep_ratio", "combo_weight", "eps", "r_pivot", "theta_sim", "important_ratio"}
_NONE_STRINGS = {"", "none", "null"}


def _parse_value(name: str, value: Any) -> Any:
    """Parse a command-line string into the field's type; non-strings pass through."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if name in _INT_FIELDS | _FLOAT_FIELDS and text.lower() in _NONE_STRINGS:
        return None
    try:
        if name in _INT_FIELDS:
            return int(text)
        if name in _FLOAT_FIELDS:
            return float(text)
        if name == "alpha":
            return text if text == "auto" else float(text)
    except ValueError:
        kind = "an integer" if name in _INT_FIELDS else "a number"
        raise ValueError(f"{name}={value!r}: must be {kind}") from None
    if name == "keep_indices":
        return _parse_indices(text)
    if name == "bias_prior" and text.lower() in _NONE_STRINGS:
        return None
    return text


def _parse_indices(text: str) -> list[int] | list[list[int]]:
    """``"3,5,9"`` or ``"3,5;1,2"`` (one list per sample, ';'-separated) into lists of ints."""
    try:
        groups = [[int(x) for x in g.replace(" ", "").split(",") if x] for g in text.split(";")]
    except ValueError:
        raise ValueError(f"keep_indices={text!r}: must be comma-separated integers, ';' between samples") from None
    return groups[0] if len(groups) == 1 else groups


def validate(cfg: PruneConfig) -> PruneConfig:
    """Check value ranges that do not depend on the model. Model-dependent checks live in the engine."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r}: must be one of {STAGES}")
    if cfg.selector not in SELECTORS:
        raise ValueError(f"selector={cfg.selector!r}: must be one of {SELECTORS}")
    if cfg.score not in SCORES:
        raise ValueError(f"score={cfg.score!r}: must be one of {SCORES}")
    if cfg.keep_tokens is not None and cfg.keep_tokens < 1:
        raise ValueError(f"keep_tokens={cfg.keep_tokens}: must be >= 1")
    if cfg.keep_tokens is None:
        if cfg.keep_ratio is None:
            raise ValueError("keep_ratio=None and keep_tokens=None: give one of them (e.g. keep_ratio=0.1)")
        if not 0.0 < cfg.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio={cfg.keep_ratio}: must be in (0, 1]")
    if cfg.stage == "llm":
        if cfg.prune_layer is None or cfg.prune_layer < 0:
            raise ValueError(f"prune_layer={cfg.prune_layer}: must be an integer >= 0 for method {cfg.method!r}")
        needs_attention = cfg.score not in ("none", "vision")
        if needs_attention:
            for layer in cfg.score_layers():
                if layer is None or layer < 0 or layer >= cfg.prune_layer:
                    raise ValueError(
                        f"score_layer={layer} with prune_layer={cfg.prune_layer}: the scoring layer must run "
                        f"before pruning, so it must be in [0, {cfg.prune_layer - 1}]; lower score_layer "
                        "(or shallow_layer) or raise prune_layer"
                    )
    if cfg.query not in QUERIES:
        raise ValueError(f"query={cfg.query!r}: must be one of {QUERIES}")
    if cfg.positions not in POSITIONS:
        raise ValueError(f"positions={cfg.positions!r}: must be one of {POSITIONS}")
    if not 0.0 <= cfg.r_pivot <= 1.0:
        raise ValueError(f"r_pivot={cfg.r_pivot}: must be in [0, 1]")
    if cfg.alpha != "auto" and not (isinstance(cfg.alpha, (int, float)) and 0.0 <= cfg.alpha <= 1.0):
        raise ValueError(f"alpha={cfg.alpha!r}: must be in [0, 1] or 'auto'")
    if not 0.0 <= cfg.important_ratio <= 1.0:
        raise ValueError(f"important_ratio={cfg.important_ratio}: must be in [0, 1]")
    if not 0.0 <= cfg.combo_weight <= 1.0:
        raise ValueError(f"combo_weight={cfg.combo_weight}: must be in [0, 1]")
    if cfg.num_pivots < 1:
        raise ValueError(f"num_pivots={cfg.num_pivots}: must be >= 1")
    if cfg.trend_selector not in ("topk", "pivot_mis"):
        raise ValueError(f"trend_selector={cfg.trend_selector!r}: must be 'topk' or 'pivot_mis'")
    if cfg.selector == "fixed" and cfg.keep_indices is None:
        raise ValueError("method 'fixed' needs keep_indices=[...] (visual-token indices to keep)")
    if cfg.score in ("prior", "trend") and not cfg.bias_prior:
        raise ValueError(
            f"method {cfg.method!r} needs a calibrated attention prior: pass bias_prior=PATH, made with "
            "`lmms-prune calibrate --model MODEL --images DIR --layer "
            f"{cfg.effective_score_layer} --out PATH`"
        )
    return cfg


def resolve_config(method: str = "fastv", **overrides: Any) -> PruneConfig:
    """Build and validate the config of a preset with user overrides (strings are parsed).

    >>> resolve_config("deepprune", keep_ratio="0.25").prune_layer
    12
    """
    if method not in PRESETS:
        raise ValueError(f"method={method!r}: unknown; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(_FIELDS) - {"method"})
    if unknown:
        raise ValueError(
            f"unknown pruning parameter(s) {', '.join(unknown)}; valid ones: {', '.join(sorted(_FIELDS))}"
        )
    values: dict[str, Any] = {"method": method, **PRESETS[method].settings}
    for name, value in overrides.items():
        if name != "method":
            values[name] = _parse_value(name, value)
    if values.get("keep_tokens") is not None and "keep_ratio" not in overrides:
        values["keep_ratio"] = None
    return validate(PruneConfig(**values))


def describe_presets() -> str:
    """Human-readable table of every preset with every parameter and its default (``lmms-prune methods``)."""
    lines = ["Presets (select with method=NAME; override any parameter below):", ""]
    for preset in PRESETS.values():
        settings = ", ".join(f"{k}={v}" for k, v in preset.settings.items())
        lines.append(f"  {preset.name:<12} {preset.description}")
        lines.append(f"  {'':<12} [{settings}]")
    lines += ["", "Parameters (default):", ""]
    for f in dataclasses.fields(PruneConfig):
        lines.append(f"  {f.name:<16} ({f.default!r}) {f.metadata.get('help', '')}")
    return "\n".join(lines)
