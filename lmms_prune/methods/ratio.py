"""Ratio debiasing (deep-layer paper, section 3.2): ``A_mid / (A_shallow + eps)`` and the weighted combo."""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, S, Score

PARAMS = (
    Param("shallow_layer", 2, "ratio/ratio_combo: layer of the shallow attention A_shallow (2 = the deep-layer "
          "paper's K_s=3)", kind="int", low=0),
    Param("combo_weight", 0.5, "ratio_combo: w in w*minmax(A_mid) + (1-w)*minmax(ratio)", low=0.0, high=1.0),
)


class Ratio(Score):
    """``A(score_layer) / (A(shallow_layer) + eps)``, both rows of one forward pass."""

    name = "ratio"
    params = ("score_layer", "query", "shallow_layer", "eps")

    @classmethod
    def needs(cls, config):
        return Needs(attention=tuple(sorted({config.effective_score_layer, config.shallow_layer})))

    def __call__(self, image):
        cfg = self.config
        return S.ratio(image.attention[cfg.effective_score_layer], image.attention[cfg.shallow_layer], eps=cfg.eps)


class RatioCombo(Ratio):
    """``w * minmax(A_mid) + (1 - w) * minmax(A_mid / (A_shallow + eps))``."""

    name = "ratio_combo"
    params = (*Ratio.params, "combo_weight")

    def __call__(self, image):
        cfg = self.config
        return S.ratio_combo(image.attention[cfg.effective_score_layer], image.attention[cfg.shallow_layer],
                             weight=cfg.combo_weight, eps=cfg.eps)


SCORES = (Ratio, RatioCombo)
PRESETS = (
    Preset("ratio", "ratio debiasing A(11)/(A(2)+eps) + pivot-MIS (K=12, K_s=3)",
           dict(stage="llm", selector="pivot_mis", score="ratio", prune_layer=12, shallow_layer=2)),
    Preset("ratio_combo", "w*minmax(A(11)) + (1-w)*minmax(A(11)/A(2)) + pivot-MIS (K=12)",
           dict(stage="llm", selector="pivot_mis", score="ratio_combo", prune_layer=12, shallow_layer=2)),
)
