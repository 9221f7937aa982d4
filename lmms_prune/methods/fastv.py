"""FastV: top-k of the last prompt token's attention at layer K-1 (methods.md sections 4-5; K=2)."""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Score, Selector, sel

PARAMS = (
    Param("query", "last", "attention query: 'last' prompt token, 'text_mean' over the text rows after the "
          "image, or 'raters' (SparseVLM: the mean row of the text tokens whose attention mass on the image is "
          ">= the mean mass, chosen per image and stage)", kind="str", choices=("last", "text_mean", "raters")),
    Param("query_rows", 1, "query='last': the mean attention of the last query_rows prompt tokens (rows), heads "
          "averaged (FrameFusion's num: 1 in its Qwen2 and InternLM2 models, 4 in its Qwen2-VL model)", kind="int",
          low=1),
    Param("qk_rope", True, "own-layer query/key attention (multi-stage score_at='K' or 'own-K-1'): true = the "
          "layer's RoPE applied to queries and keys (PyramidDrop's code); false = the unrotated projections "
          "(FEATHER's code, its fix of FastV's bias towards late positions)", kind="bool"),
    Param("qk_softmax", "row", "own-layer query/key attention: the last prompt token's softmax over 'row' = every key "
          "(PyramidDrop's code) or 'visual' = the sample's visual keys only (FEATHER's code)", kind="str",
          choices=("row", "visual")),
)


class Attention(Score):
    """Text-to-vision attention ``A^(l)`` of the last prompt token (or the text rows' mean), heads averaged."""

    name = "attention"
    params = ("score_layer", "query", "query_rows")
    subsets = True

    @classmethod
    def needs(cls, config):
        return attention_needs(config)

    def __call__(self, image):
        return image.attention[self.config.effective_score_layer]


def attention_needs(config) -> Needs:
    """The score layer's attention row; with ``query='raters'`` also the text rows it is made of. A score layer
    equal to the pruning layer ``K`` (PyramidDrop's stages, ``score_at='K'``) is layer K's own query/key
    projections on its input, computed before it runs (``Needs.query_key_attention``); ``score_at='own-K-1'``
    (FEATHER's stages) the same of layer K-1, with the options ``qk_rope`` and ``qk_softmax``."""
    layer = (config.effective_score_layer,)
    if config.prune_layer is not None and (layer[0] == config.prune_layer or config.score_at == "own-K-1"):
        # query='last' (presets.validate)
        return Needs(query_key_attention=layer, query_key_unrotated=not config.qk_rope,
                     query_key_visual_softmax=config.qk_softmax == "visual")
    return Needs(attention=layer, text_attention=layer if config.query == "raters" else ())


class TopK(Selector):
    """The ``n`` highest scores."""

    name = "topk"
    subsets = True

    def __call__(self, image, scores, n):
        return sel.topk(scores, n)


SCORES = (Attention,)
SELECTORS = (TopK,)
PRESETS = (
    Preset("fastv", "FastV: top-k of the last prompt token's attention at layer K-1 (K=2)",
           dict(stage="llm", selector="topk", score="attention", prune_layer=2)),
)
