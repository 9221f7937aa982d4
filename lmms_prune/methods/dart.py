"""DART: key-norm pivots plus the tokens least similar to each pivot, at layer K (methods.md section 5).

The authors' defaults (docs/fidelity.md): 4 visual and 4 text pivots by the L1 norm of their post-RoPE keys
at layer K-1; similarity on the final RMSNorm of layer K's input hidden states; text pivots are the tokens
after the image (up to the next image or the prompt's end), claim a share of the budget and are never kept.
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Score, Selector, sel

PARAMS = (
    Param("num_pivots", 4, "dart: number of visual key-norm pivots (authors: 4)", kind="int", low=1),
    Param("num_text_pivots", 4, "dart: number of text key-norm pivots (authors: 4; 0 = visual pivots only)",
          kind="int", low=0),
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
    params = ("num_pivots", "num_text_pivots")

    @classmethod
    def needs(cls, config):
        return Needs(key_norms=(config.effective_score_layer,), final_norm=True, text=config.num_text_pivots > 0)

    def __call__(self, image, scores, n):
        cfg = self.config
        text = cfg.num_text_pivots > 0 and image.text_final_norm is not None and image.text_final_norm.shape[0] > 0
        return sel.dart(scores, image.final_norm, n, num_pivots=cfg.num_pivots,
                        text_key_norms=image.text_key_norms[cfg.effective_score_layer] if text else None,
                        text_features=image.text_final_norm if text else None,
                        num_text_pivots=cfg.num_text_pivots if text else 0)


SCORES = (KeyNorm,)
SELECTORS = (Dart,)
PRESETS = (
    Preset("dart", "DART: key-norm pivots + least-similar tokens at layer K (K=2)",
           dict(stage="llm", selector="dart", score="key_norm", prune_layer=2)),
)
