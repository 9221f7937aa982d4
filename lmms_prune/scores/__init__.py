"""Importance scores: pure tensor functions of attention maps and priors (methods.md section 4).

Nothing here knows about models, hooks or lmms-eval.
"""

from lmms_prune.scores.padding import pad_to_square_token_mask
from lmms_prune.scores.prior import prior_debias, resize_prior
from lmms_prune.scores.raters import rater_importance, select_raters
from lmms_prune.scores.ratio import minmax, ratio, ratio_combo
from lmms_prune.scores.trend import fit_trend, load_trend_weights, trend, trend_debias, weight_debias
from lmms_prune.scores.vision import cls_attention, merge_consecutive, merge_pixel_shuffle

__all__ = [
    "cls_attention",
    "fit_trend",
    "load_trend_weights",
    "merge_consecutive",
    "merge_pixel_shuffle",
    "minmax",
    "pad_to_square_token_mask",
    "prior_debias",
    "rater_importance",
    "ratio",
    "ratio_combo",
    "resize_prior",
    "select_raters",
    "trend",
    "trend_debias",
    "weight_debias",
]
