"""DART: key-norm pivots plus the tokens least similar to each pivot, at layer K (methods.md section 5)."""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Score, Selector, sel

PARAMS = (
    Param("num_pivots", 8, "dart: number of key-norm pivots", kind="int", low=1),
)


class KeyNorm(Score):
    """L1 norm of each visual token's key at the scoring layer (heads averaged)."""

    name = "key_norm"
    params = ("score_layer",)

    @classmethod
    def needs(cls, config):
        return Needs(key_norms=(config.effective_score_layer,))

    def __call__(self, image):
        return image.key_norms[self.config.effective_score_layer]


class Dart(Selector):
    """Pivots by key norm, then each pivot's least cosine-similar tokens until ``n`` are kept."""

    name = "dart"
    params = ("num_pivots",)

    @classmethod
    def needs(cls, config):
        return Needs(hidden=True)

    def __call__(self, image, scores, n):
        return sel.dart(scores, image.hidden, n, num_pivots=self.config.num_pivots)


SCORES = (KeyNorm,)
SELECTORS = (Dart,)
PRESETS = (
    Preset("dart", "DART: key-norm pivots + least-similar tokens at layer K (K=2)",
           dict(stage="llm", selector="dart", score="key_norm", prune_layer=2)),
)
