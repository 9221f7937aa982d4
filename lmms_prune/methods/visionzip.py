"""VisionZip (Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary in Vision Language Models"),
pre-LLM: dominant tokens by the vision encoder's [CLS] attention + contextual tokens merged from the rest
(methods.md section 5b).

Choices (paper; authors' code read at github.com/dvlab-research/VisionZip, commit 3151f6df4fca, file
``visionzip/clip_encoder.py``; nothing copied):

* Budget: ``n`` tokens per image (``keep_ratio``/``keep_tokens``) = ``round(n * dominant_ratio)`` dominant +
  the rest contextual; ``dominant_ratio`` defaults to 54/64, LLaVA-1.5's 64-token setting, kept for every budget
  (the authors: 54+10 at 64, 108+20 at 128, 162+30 at 192, the same ratio to rounding).
* Dominance: the [CLS] row at the vision feature layer, heads averaged (authors: summed, the same order), per
  LLM token as VisPruner's (InternVL: summed over each pixel-shuffle 2x2 group). The authors count the [CLS]
  token itself among the dominant ones (``dominant - 1`` patches); here all ``d`` are patch tokens (LLaVA-1.5
  in transformers drops [CLS] before the projector).
* Contextual: among the non-dominant tokens in original order, every ``max(1, R // c)``-th is a target (the
  first ``c``); each other token joins the target of highest cosine similarity. Similarity features: the
  authors use the feature layer's keys (heads averaged); here the pre-projector features of each LLM token
  (the signal the engine records for every family; no extra hook on the encoder).
* Merge: each group is replaced by its MEAN (spec; the authors add the target to the mean of its members,
  ``target + mean(members)``). Means are taken of the projected LLM-input embeddings (the authors merge the
  encoder's output, then project; with a linear projector the two agree, with LLaVA's MLP they differ).
* Placement and positions: the image's kept dominant tokens (ascending), then the contextual tokens in target
  order, at the image's place in the prompt, numbered contiguously (``positions='contiguous'`` only).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("dominant_ratio", 54 / 64, "visionzip: fraction of each image's budget taken by dominant tokens ([CLS] "
          "attention); the rest are contextual tokens (means of groups of the other tokens). Default 54/64, "
          "LLaVA-1.5's 54+10 at 64 tokens", low=0.0, high=1.0, open_low=True),
    Param("contextual", "target_plus_mean", "visionzip: a contextual token is 'target_plus_mean' = its target "
          "token plus the mean of the tokens assigned to it (VisionZip's released code) or 'mean' = the mean of "
          "the target and those tokens", kind="str", choices=("target_plus_mean", "mean")),
)


class VisionZip(Selector):
    """Dominant tokens kept + contextual tokens merged (a :class:`lmms_prune.selection.Merge`)."""

    merges = True

    name = "visionzip"
    params = ("dominant_ratio", "contextual")
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(vision_features=True)

    @classmethod
    def check(cls, config):
        if config.positions != "contiguous":
            raise ValueError(f"positions={config.positions!r}: visionzip's merged tokens have no original "
                             "position; use positions='contiguous'")

    def __call__(self, image, scores, n):
        return sel.visionzip(scores, image.vision_features, n, dominant_ratio=self.config.dominant_ratio,
                             contextual=self.config.contextual)


SELECTORS = (VisionZip,)
PRESETS = (
    Preset("visionzip", "VisionZip: dominant tokens by vision [CLS] attention (54/64 of the budget) + contextual "
           "tokens (means of similar groups), pre-LLM", dict(stage="pre_llm", selector="visionzip", score="vision")),
)
