"""MustDrop (Liu et al., 2024, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language
Model", arXiv 2411.10803), its vision-encoding stage as LightCompress (formerly llmc) runs it: before the LLM,
the image's non-overlapping 3 x 3 windows whose tokens are most alike (mean pairwise cosine similarity of the
vision features) are each merged into their mean, until about ``keep_ratio * N`` tokens remain.

Maths: :func:`lmms_prune.selection.mustdrop.mustdrop_merge` (LightCompress commit 9701d035b0aa,
``llmc/compression/token_reduction/mustdrop.py``; nothing copied). Budget: ``r = (N - n) // 8`` windows merged
for ``n = keep_ratio * N`` (LightCompress's ``retained_tokens``), so ``n`` to ``n + 7`` tokens remain; where
``r`` is 0, the windows of similarity ``>= mustdrop_threshold`` (0.6). Merged tokens have no original position:
the short prompt is renumbered (``positions='contiguous'``), as for VisionZip and PruMerge+.

The option ``llm_selector=mustdrop_filter`` (with ``prune_layers=auto,stage_ratio=1``; docs/methods_2025.md
gives the whole setting) adds the paper's prefill stage as the authors' code runs it (github.com/liuting20/MustDrop,
commit 909afa538bff, ``modelling_sparse_llama.py``; nothing copied), composed after the vision stage
(:mod:`lmms_prune.engine.compose`): after decoder layers 2, 6, 10, 14 of LLaVA-1.5-7B's 32 (``prune_layers``
3, 7, 11, 15, scored by the layer before; ``'auto'`` scales the fractions 3/32 ... 15/32), the "dual-attention
filter" (selector ``mustdrop_filter``, :func:`lmms_prune.selection.dual_attention_filter`) drops the visual tokens
whose summed attention from the text after the image is ``< mustdrop_global_thr`` of the image's total AND whose
largest such attention is ``< mustdrop_individual_thr`` (the authors' "192 tokens" scripts: 0.001 / 0.001), the
survivors renumbered; counts adaptive (``stage_ratio`` is not read). With ``keep_ratio=1,mustdrop_threshold=0.8``
the vision stage is the authors' adaptive count (windows of similarity ``>= 0.8``, no budget), on the tower's
output. ``decode_cache=final`` (the engine's multi-stage option) adds their decode-stage cache cut: from layer
``K_1 - 1`` on, decoded tokens see the last stage's survivors only. Not built (docs/fidelity.md): their merge
after vision layer 0 (later tower layers see merged tokens) and their key-token set (kept through the filter).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("mustdrop_threshold", 0.6, "mustdrop: a window is merged by the adaptive count when its tokens' mean "
          "pairwise cosine similarity is >= this (LightCompress's spatial_threshold; used only where the budget "
          "merges no window)", kind="float", low=-1.0, high=1.0),
    Param("mustdrop_window", 3, "mustdrop: the side of the square windows merged (LightCompress: 3 x 3)", kind="int",
          low=2),
    Param("mustdrop_global_thr", 0.001, "mustdrop_filter: a visual token may be dropped where its summed attention "
          "from the text after the image is < this fraction of the image's total (MustDrop's global_thr; the "
          "authors' TextVQA scripts: 0.001 for 192 tokens, 0.0012 for 128, 0.011 for 64)", low=0.0, high=1.0),
    Param("mustdrop_individual_thr", 0.001, "mustdrop_filter: a visual token is dropped only where also its largest "
          "attention from any one text token is < this (MustDrop's individual_thr; the scripts: 0.001 for 192 and "
          "128, 0.01 for 64)",
          low=0.0, high=1.0),
)

# MustDrop's prefill stage: after decoder layers 2, 6, 10, 14 of LLaVA-1.5-7B's 32 (prune_layers 3, 7, 11, 15)
PREFILL_FRACTIONS = (3 / 32, 7 / 32, 11 / 32, 15 / 32)


class MustDrop(Selector):
    """The most self-similar windows of the grid, each merged into its mean; the other tokens kept."""

    merges = True

    name = "mustdrop"
    params = ("mustdrop_threshold", "mustdrop_window")
    stages = ("pre_llm",)
    layer_fractions = PREFILL_FRACTIONS  # prune_layers='auto' of a composed mustdrop_filter

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


class MustDropFilter(Selector):
    """MustDrop's prefill dual-attention filter: the tokens that the text attends to, in sum or in one row."""

    name = "mustdrop_filter"
    params = ("mustdrop_global_thr", "mustdrop_individual_thr")
    stages = ("llm",)
    subsets = True
    layer_fractions = PREFILL_FRACTIONS
    description = "MustDrop's prefill filter: drops the tokens of low summed AND low largest text attention"

    @classmethod
    def adaptive_count(cls, config):
        return True  # the thresholds, not the budget, decide

    @classmethod
    def needs(cls, config):
        return Needs(text_attention=(config.effective_score_layer,))

    def __call__(self, image, scores, n):
        rows = image.text_attention[self.config.effective_score_layer]
        return sel.dual_attention_filter(rows, self.config.mustdrop_global_thr, self.config.mustdrop_individual_thr)


SELECTORS = (MustDrop, MustDropFilter)
PRESETS = (
    Preset("mustdrop", "MustDrop's vision stage (LightCompress): the most alike non-overlapping 3x3 windows of the "
           "vision features merged into their means until about keep_ratio of the tokens remain, pre-LLM",
           dict(stage="pre_llm", selector="mustdrop")),
)
