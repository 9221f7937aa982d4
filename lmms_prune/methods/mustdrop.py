"""MustDrop (Liu et al., 2024, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language
Model", arXiv 2411.10803), its vision-encoding stage as LightCompress (formerly llmc) runs it: before the LLM,
the image's non-overlapping 3 x 3 windows whose tokens are most alike (mean pairwise cosine similarity of the
vision features) are each merged into their mean, until about ``keep_ratio * N`` tokens remain.

Maths: :func:`lmms_prune.selection.mustdrop.mustdrop_merge` (LightCompress commit 9701d035b0aa,
``llmc/compression/token_reduction/mustdrop.py``; nothing copied). Budget: ``r = (N - n) // 8`` windows merged
for ``n = keep_ratio * N`` (LightCompress's ``retained_tokens``), so ``n`` to ``n + 7`` tokens remain; where
``r`` is 0, the windows of similarity ``>= mustdrop_threshold`` (0.6). Merged tokens have no original position:
the short prompt is renumbered (``positions='contiguous'``), as for VisionZip and PruMerge+. The paper's later
stages (a dual-attention filter at prefill, output-aware KV-cache dropping at decode) are not in LightCompress
and not built here (docs/fidelity.md).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("mustdrop_threshold", 0.6, "mustdrop: a window is merged by the adaptive count when its tokens' mean "
          "pairwise cosine similarity is >= this (LightCompress's spatial_threshold; used only where the budget "
          "merges no window)", kind="float", low=-1.0, high=1.0),
    Param("mustdrop_window", 3, "mustdrop: the side of the square windows merged (LightCompress: 3 x 3)", kind="int",
          low=2),
)


class MustDrop(Selector):
    """The most self-similar windows of the grid, each merged into its mean; the other tokens kept."""

    merges = True

    name = "mustdrop"
    params = ("mustdrop_threshold", "mustdrop_window")
    stages = ("pre_llm",)

    @classmethod
    def adaptive_count(cls, config):
        return True  # the windows it merges follow the budget's (N - n) // 8 or, where that is 0, a threshold

    @classmethod
    def needs(cls, config):
        return Needs(vision_features=True)

    def __call__(self, image, scores, n):
        side = self.config.mustdrop_window
        return sel.mustdrop_merge(image.vision_features, image.span.grids, n, window=(side, side),
                                  threshold=self.config.mustdrop_threshold)


SELECTORS = (MustDrop,)
PRESETS = (
    Preset("mustdrop", "MustDrop's vision stage (LightCompress): the most alike non-overlapping 3x3 windows of the "
           "vision features merged into their means until about keep_ratio of the tokens remain, pre-LLM",
           dict(stage="pre_llm", selector="mustdrop")),
)
