"""Attention debiasing by trend removal: attention divided by its fitted positional trend ``mu*exp(sigma*x)``.

methods.md section 4. A plug-in score on top of any selector (``trend_selector``, default top-k).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, S, Score
from lmms_prune.methods.d2pruner import check_prior
from lmms_prune.methods.fastv import attention_needs

PARAMS = (
    Param("trend_selector", "topk", "trend: selector applied to the trend-debiased scores (topk, pivot_mis, or "
          "sparsevlm; on the sparsevlm preset its own selector is kept unless trend_selector is given)",
          kind="str", choices=("topk", "pivot_mis", "sparsevlm")),
)


class Trend(Score):
    """``A_i / f(i / N)`` with ``f`` fitted once per token count to the calibrated prior."""

    name = "trend"
    params = ("score_layer", "query", "bias_prior", "trend_selector")
    subsets = True  # at later stages it debiases the tokens still present at their original positions

    @classmethod
    def needs(cls, config):
        return attention_needs(config) | Needs(prior=True)

    @classmethod
    def check(cls, config):
        check_prior(config)

    @classmethod
    def adjust(cls, values: dict) -> dict:
        """``trend_selector`` chooses the selector of the trend-debiased scores (default: top-k; SparseVLM's
        selector stays on the sparsevlm preset, so ``score=trend`` debiases its raters' importance)."""
        keep = "sparsevlm" if values.get("selector") == "sparsevlm" else "topk"
        return {**values, "selector": values.get("trend_selector", keep)}

    def __init__(self, config, prior=None):
        super().__init__(config, prior)
        self._fits: dict[int, tuple[float, float]] = {}

    def fit(self, n: int) -> tuple[float, float]:
        """(mu, sigma) of the positional trend of the calibrated attention for ``n`` tokens, fitted once."""
        if n not in self._fits:
            self._fits[n] = S.fit_trend(S.resize_prior(self.prior.for_tokens(n), n))
        return self._fits[n]

    def __call__(self, image):
        n = image.span.length  # the trend is a function of the ORIGINAL position i / N
        mu, sigma = self.fit(n)
        attention = image.attention[self.config.effective_score_layer]
        if image.present is None:
            return S.trend_debias(attention, mu, sigma)
        # a later multi-stage stage: the tokens still present keep their original positions i / N
        full = attention.new_zeros(n)
        index = image.present.to(attention.device)
        full[index] = attention
        return S.trend_debias(full, mu, sigma)[index]


SCORES = (Trend,)
PRESETS = (
    Preset("trend", "attention divided by its fitted positional trend mu*exp(sigma*x), then top-k (K=2)",
           dict(stage="llm", selector="topk", score="trend", prune_layer=2)),
)
