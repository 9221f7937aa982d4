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
``K_1 - 1`` on, decoded tokens see the last stage's survivors only.

The option ``mustdrop_in_tower=true`` runs the vision stage where the authors' code does (``clip_encoder.py``,
``CLIPVisionModelAcc.custom_forward``): right after vision layer 0, so the later tower layers see the merged
tokens (:mod:`lmms_prune.engine.tower`: each window's mean in one of its places, the others masked as keys; CLIP
only), the LLM getting ``[merged windows in merge order, the other patches ascending]`` as theirs; with it the
key-token set, the top ``ceil(mustdrop_key_ratio * n)`` of the ``n`` tokens leaving the tower by the last tower
layer's [CLS] attention, which every composed LLM stage keeps. The preset ``mustdrop_authors`` is the authors'
whole path (docs/fidelity.md says why ``mustdrop`` stays LightCompress's reading).
"""

from __future__ import annotations

import math

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("mustdrop_threshold", 0.6, "mustdrop: a window is merged by the adaptive count when its tokens' mean "
          "pairwise cosine similarity is >= this (LightCompress's spatial_threshold; used only where the budget "
          "merges no window)", kind="float", low=-1.0, high=1.0),
    Param("mustdrop_window", 3, "mustdrop: the side of the square windows merged (LightCompress: 3 x 3)", kind="int",
          low=2),
    Param("mustdrop_in_tower", False, "mustdrop: merge the windows inside the vision tower, after its layer 0, so "
          "its later layers see the merged tokens (the authors' code; LLaVA-1.5's CLIP tower only), instead of on "
          "the tower's output (LightCompress)", kind="bool"),
    Param("mustdrop_key_ratio", 0.08, "mustdrop with mustdrop_in_tower: the key-token set, this fraction (rounded "
          "up) of the tokens leaving the tower with the highest [CLS] attention of its last layer, which every "
          "composed LLM stage keeps (the authors' 8%; 0: none)", low=0.0, high=1.0),
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
    params = ("mustdrop_threshold", "mustdrop_window", "mustdrop_in_tower", "mustdrop_key_ratio")
    stages = ("pre_llm",)
    layer_fractions = PREFILL_FRACTIONS  # prune_layers='auto' of a composed mustdrop_filter

    @classmethod
    def adaptive_count(cls, config):
        return True  # the windows it merges follow the budget's (N - n) // 8 or, where that is 0, a threshold

    @classmethod
    def needs(cls, config):
        if config.mustdrop_in_tower:
            return Needs(embeddings=True, vision_attention_last=config.mustdrop_key_ratio > 0)
        return Needs(vision_features=True)

    @classmethod
    def used_params(cls, config):
        return cls.params if config.mustdrop_in_tower else cls.params[:3]

    def tower_layer(self):
        return 0 if self.config.mustdrop_in_tower else None  # the authors merge right after vision layer 0

    def tower_merge(self, features, grid):
        """The authors' ``conditional_pooling`` + ``merge_wavg`` on the tower's hidden patches ``[P, D]``."""
        side = self.config.mustdrop_window
        n = sel.budget(features.shape[0], keep_ratio=self.config.keep_ratio, keep_tokens=self.config.keep_tokens)
        return sel.mustdrop_merge(features, [grid], n, window=(side, side), threshold=self.config.mustdrop_threshold)

    def __call__(self, image, scores, n):
        if self.config.mustdrop_in_tower:
            # the tower merged: each window's mean sits in its slot; the authors' order (conditional_pooling):
            # the merged windows in their merge order, then the other patches ascending
            groups = image.tower_groups
            slots = (groups >= 0).nonzero().flatten()
            slots = slots[groups[slots].argsort()]
            plain = (groups == -1).nonzero().flatten()
            order = slots.new_tensor([*slots.tolist(), *plain.tolist()])  # torch.cat without importing torch here
            return sel.Merge(index=plain, weights=image.embeddings.new_zeros(0, groups.numel()),
                             prefix=image.embeddings[slots], protected=self._key_set(image, order))
        side = self.config.mustdrop_window
        return sel.mustdrop_merge(image.vision_features, image.span.grids, n, window=(side, side),
                                  threshold=self.config.mustdrop_threshold)


    def _key_set(self, image, tokens):
        """The authors' key-token set (``custom_forward`` at the tower's last layer): the top
        ``ceil(key_ratio * n)`` of the ``n`` tokens leaving the tower (``tokens``, in their output order) by the
        last layer's [CLS] attention, heads averaged; their positions in that order (None without a ratio)."""
        if self.config.mustdrop_key_ratio <= 0:
            return None
        k = math.ceil(self.config.mustdrop_key_ratio * tokens.numel())
        return image.vision_attention_last[tokens].topk(k).indices


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
    Preset("mustdrop_authors", "MustDrop as its authors' code runs it (LLaVA-1.5): the most alike 3x3 windows "
           "(similarity >= 0.8) merged inside the vision tower after its layer 0, the top 8% by the last tower "
           "layer's [CLS] attention kept as key tokens; at prefill the dual-attention filter (0.001 / 0.001) "
           "after decoder layers 2, 6, 10, 14 of 32, key tokens kept; at decode the cache cut to the final set",
           dict(stage="pre_llm", selector="mustdrop", mustdrop_in_tower=True, keep_ratio=1.0,
                mustdrop_threshold=0.8, llm_selector="mustdrop_filter", llm_score="none", prune_layers="auto",
                stage_ratio=1.0, decode_cache="final")),
)
