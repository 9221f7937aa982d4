"""LLaVA-PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", the "+" variant), pre-LLM: IQR outliers of the vision encoder's [CLS] attention plus
spatially uniform samples, each merged with its 32 most similar tokens (attention-weighted), plus one token
summarising the rest.

Maths: :func:`lmms_prune.selection.prumerge.prumerge_plus` (authors' code read at
github.com/42Shawn/LLaVA-PruMerge, commit 097c04116a58, ``llava/model/multimodal_encoder/clip_encoder.py``;
nothing copied). Budget (``prumerge_budget``):

* ``fixed`` (default, for comparisons at a matched budget): ``n = round(keep_ratio * N)`` (or ``keep_tokens``)
  output tokens: ``n - 1`` centres (the IQR outliers first, at most ``n - 1``, the rest evenly spaced samples)
  and the summary token;
* ``adaptive`` (the authors'): the count follows the image: ``int(N * r)`` outliers (``r``: the share of IQR
  outliers), every ``int(int(1/r)/3)``-th token as a spatial sample, and the summary token (about ``4 r N + 1``
  tokens); ``keep_ratio``/``keep_tokens`` are then not read.

Importance: the ``vision`` score (the [CLS] row at the feature layer, heads averaged; without a [CLS] token,
Qwen's, the mean received attention). Similarity: the pre-projector features. Merged tokens have no original
position, so the short prompt is renumbered (``positions='contiguous'`` only), as for VisionZip.
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("prumerge_budget", "fixed", "prumerge_plus: 'fixed' = keep_ratio/keep_tokens output tokens per image "
          "(n-1 merged centres + 1 summary token); 'adaptive' = the authors' count from the IQR outliers of the "
          "[CLS] attention (about 4*r*N+1 tokens; keep_ratio is not read)", kind="str",
          choices=("fixed", "adaptive")),
    Param("prumerge_neighbours", 32, "prumerge_plus: k, the most similar tokens merged into each centre "
          "(authors: 32)", kind="int", low=1),
)


class PruMergePlus(Selector):
    """IQR outliers + spatial samples, each merged with its k most similar tokens, + a summary token."""

    merges = True

    name = "prumerge_plus"
    params = ("prumerge_budget", "prumerge_neighbours")
    stages = ("pre_llm",)

    @classmethod
    def adaptive_count(cls, config):
        return config.prumerge_budget == "adaptive"  # the authors' IQR-outlier count

    @classmethod
    def needs(cls, config):
        return Needs(vision_features=True)

    def __call__(self, image, scores, n):
        fixed = self.config.prumerge_budget == "fixed"
        return sel.prumerge_plus(scores, image.vision_features, n if fixed else None,
                                 neighbours=self.config.prumerge_neighbours)


SELECTORS = (PruMergePlus,)
PRESETS = (
    Preset("prumerge_plus", "LLaVA-PruMerge+: IQR outliers of vision [CLS] attention + spatial samples, each "
           "merged with its 32 most similar tokens (attention-weighted) + 1 summary token, pre-LLM",
           dict(stage="pre_llm", selector="prumerge_plus", score="vision")),
)
