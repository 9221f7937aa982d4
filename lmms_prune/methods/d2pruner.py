"""D2Pruner: prior-debiased attention ``A / (A_bias + eps)`` plus pivot-MIS on the hybrid graph (K=2).

methods.md sections 4 ("D2Pruner debiased importance") and 5 ("pivot + maximal independent set").
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, S, Score, Selector, sel

CALIBRATE = "`lmms-prune calibrate --model MODEL --images DIR --layer {layer} --out PATH`"

PARAMS = (
    Param("eps", 1e-7, "epsilon of the debiasing divisions", low=0.0, open_low=True),
    Param("bias_prior", None, "path of a calibrated attention prior (lmms-prune calibrate); needed by d2pruner "
          "and trend (unless trend_weights is given)", kind="path", optional=True),
    Param("r_pivot", 0.7, "pivot_mis: fraction of the budget taken as pivots (top floor(n*r_pivot))", low=0.0, high=1.0),
    Param("theta_sim", 0.8, "pivot_mis: edge threshold on the fused similarity (in [0, 1])", low=0.0, high=1.0),
    Param("alpha", 0.5, "pivot_mis: weight of semantic vs spatial similarity; 'auto' = 0.5 for grounding tasks, "
          "1.0 otherwise (D2Pruner's settings)", kind="alpha", low=0.0, high=1.0),
    Param("temporal_adjacency", False, "pivot_mis on a video: the spatial graph also links the same cell of "
          "neighbouring frames (methods.md section 1's option); images are unaffected", kind="bool"),
)


def check_prior(config) -> None:
    if not config.bias_prior:
        raise ValueError(
            f"method {config.method!r} needs a calibrated attention prior: pass bias_prior=PATH, made with "
            + CALIBRATE.format(layer=config.effective_score_layer))


class PriorDebiased(Score):
    """``A_rel = A / (A_bias + eps)`` with the calibrated prior resized to the image's token count."""

    name = "prior"
    params = ("score_layer", "query", "bias_prior", "eps")

    @classmethod
    def needs(cls, config):
        return Needs(attention=(config.effective_score_layer,), prior=True)

    @classmethod
    def check(cls, config):
        check_prior(config)

    def __call__(self, image):
        a = image.attention[self.config.effective_score_layer]
        return S.prior_debias(a, self.prior.for_tokens(image.num_tokens).to(a.device), eps=self.config.eps)


class PivotMIS(Selector):
    """Pivots by importance, then a maximal independent set on the semantic/spatial graph (D2Pruner)."""

    name = "pivot_mis"
    params = ("r_pivot", "theta_sim", "alpha", "temporal_adjacency")

    @classmethod
    def needs(cls, config):
        return Needs(hidden=True)

    def __call__(self, image, scores, n):
        cfg = self.config
        return sel.pivot_mis(scores, image.hidden, image.span.grids, n, r_pivot=cfg.r_pivot,
                             theta_sim=cfg.theta_sim, alpha=cfg.resolved_alpha(image.task_kind),
                             temporal_adjacency=cfg.temporal_adjacency and image.span.video)


SCORES = (PriorDebiased,)
SELECTORS = (PivotMIS,)
PRESETS = (
    Preset("d2pruner", "D2Pruner: prior-debiased attention A/(A_bias+eps) + pivot-MIS on the hybrid graph (K=2)",
           dict(stage="llm", selector="pivot_mis", score="prior", prune_layer=2, alpha="auto")),
)
