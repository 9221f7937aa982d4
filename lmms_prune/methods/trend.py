"""Attention debiasing by trend removal: attention divided by its fitted positional trend ``mu*exp(sigma*x)``.

methods.md section 4. A plug-in score on top of any selector (``trend_selector``, default top-k). Attention on
padding tokens (LLaVA-1.5 pad-to-square: a token whose patch is at least half padding, ``Needs.padding``) is set
to 0. ``trend_weights=PATH``: instead of the exponential fitted to a calibrated prior, a released weight vector
(the attention-debiasing authors' ``.npy`` files), scored ``A * w`` with ``w`` resized linearly to the token
count (the priors' rule, ``scores.prior.resize_prior``).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, S, Score
from lmms_prune.methods.d2pruner import check_prior
from lmms_prune.methods.fastv import attention_needs

PARAMS = (
    Param("trend_selector", "topk", "trend: selector applied to the trend-debiased scores (topk, pivot_mis, or "
          "sparsevlm; on the sparsevlm preset its own selector is kept unless trend_selector is given)",
          kind="str", choices=("topk", "pivot_mis", "sparsevlm")),
    Param("trend_weights", None, "trend: path of a released weight vector (.npy, 1-D, finite, >= 0; e.g. the "
          "attention-debiasing authors' playground/data/weight/<method>/<benchmark>.npy) used instead of the "
          "exponential fitted to bias_prior: score A*w, w resized linearly to the token count (the priors' rule); "
          "padding tokens still score 0", kind="path", optional=True),
)


def check_weights(config) -> None:
    """``trend_weights`` readable and valid (:func:`lmms_prune.scores.load_trend_weights`), and not combined with a
    prior; the error names the value and the fix."""
    path = config.trend_weights
    if config.bias_prior:
        raise ValueError(f"trend_weights={path!r} and bias_prior={config.bias_prior!r}: the trend is either the "
                         "released weight vector or the exponential fitted to the prior; give one of them")
    try:
        S.load_trend_weights(path)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"trend_weights={error}") from None


class Trend(Score):
    """``A_i / f(i / N)`` with ``f`` fitted once per token count to the calibrated prior, or ``A_i * w_i`` with a
    released weight vector; padding tokens score 0."""

    name = "trend"
    params = ("score_layer", "query", "bias_prior", "trend_selector", "trend_weights")
    subsets = True  # at later stages it debiases the tokens still present at their original positions

    @classmethod
    def needs(cls, config):
        return attention_needs(config) | Needs(prior=not config.trend_weights, padding=True)

    @classmethod
    def check(cls, config):
        if config.trend_weights:
            check_weights(config)
        else:
            try:
                check_prior(config)
            except ValueError as error:
                raise ValueError(f"{error}; or pass trend_weights=PATH.npy (a released weight vector)") from None

    @classmethod
    def adjust(cls, values: dict) -> dict:
        """``trend_selector`` chooses the selector of the trend-debiased scores (default: top-k; SparseVLM's
        selector stays on the sparsevlm preset, so ``score=trend`` debiases its raters' importance)."""
        keep = "sparsevlm" if values.get("selector") == "sparsevlm" else "topk"
        return {**values, "selector": values.get("trend_selector", keep)}

    def __init__(self, config, prior=None):
        super().__init__(config, prior)
        self._fits: dict[int, tuple[float, float]] = {}
        self.weights = S.load_trend_weights(config.trend_weights) if config.trend_weights else None

    def fit(self, n: int) -> tuple[float, float]:
        """(mu, sigma) of the positional trend of the calibrated attention for ``n`` tokens, fitted once."""
        if n not in self._fits:
            self._fits[n] = S.fit_trend(S.resize_prior(self.prior.for_tokens(n), n))
        return self._fits[n]

    def debias(self, attention, n: int, pad_mask=None):
        """``attention`` ``[n]`` (at the original positions ``i / n``) debiased, padding tokens set to 0."""
        if self.weights is not None:
            return S.weight_debias(attention, self.weights, pad_mask)
        mu, sigma = self.fit(n)
        return S.trend_debias(attention, mu, sigma, pad_mask)

    def __call__(self, image):
        n = image.span.length  # the trend is a function of the ORIGINAL position i / N
        attention = image.attention[self.config.effective_score_layer]
        if image.present is None:
            return self.debias(attention, n, image.padding)
        # a later multi-stage stage: the tokens still present keep their original positions i / N
        index = image.present.to(attention.device)
        full = attention.new_zeros(n)
        full[index] = attention
        pad = None
        if image.padding is not None:
            pad = full.new_zeros(n, dtype=bool)
            pad[index] = image.padding.to(attention.device)
        return self.debias(full, n, pad)[index]


SCORES = (Trend,)
PRESETS = (
    Preset("trend", "attention divided by its fitted positional trend mu*exp(sigma*x) (or times a released weight "
           "vector, trend_weights), padding tokens 0, then top-k (K=2)",
           dict(stage="llm", selector="topk", score="trend", prune_layer=2)),
)
