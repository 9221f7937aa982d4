"""VisionZip (Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary in Vision Language Models"),
pre-LLM: dominant tokens by the vision encoder's [CLS] attention + contextual tokens merged from the rest
(methods.md section 5b).

Choices (paper; authors' code read at github.com/dvlab-research/VisionZip, commit 3151f6df4fca, file
``visionzip/clip_encoder.py``; nothing copied):

* Budget: ``n`` tokens per image (``keep_ratio``/``keep_tokens``) = ``round(n * dominant_ratio)`` dominant +
  the rest contextual; ``dominant_ratio`` defaults to 54/64, LLaVA-1.5's 64-token setting, kept for every budget
  (the authors: 54+10 at 64, 108+20 at 128, 162+30 at 192, the same ratio to rounding).
* Dominance: the [CLS] row at the vision feature layer, heads averaged (authors: summed, the same order), per
  LLM token as VisPruner's (InternVL: summed over each pixel-shuffle 2x2 group). ``cls_dominant`` (default, the
  authors): the [CLS] token itself is one of the ``d`` dominant tokens (``d - 1`` patches, then the [CLS]'s
  feature-layer state through the family's projector, placed first as in their code), where the tower has a
  [CLS] and each patch is one LLM token (LLaVA-1.5: transformers drops the [CLS] before the projector, the engine
  projects it itself, ``Needs.vision_cls``). InternVL's projector takes 2x2 pixel-shuffled groups, which a lone
  [CLS] is not, and Qwen's towers have none: there all ``d`` are LLM tokens. ``cls_dominant=false``: all ``d`` are
  patches everywhere (our earlier reading).
* Contextual: among the non-dominant tokens in original order, every ``max(1, R // c)``-th is a target (the
  first ``c``); each other token joins the target of highest cosine similarity. Similarity features
  (``features``): ``'keys'`` (default, the authors) = the feature layer's keys, heads averaged, where the tower's
  patches map one-to-one onto the LLM's tokens (LLaVA-1.5); where an LLM token groups several patches (InternVL's
  pixel shuffle, Qwen's 2x2 merger) a token has no single key and the pre-projector features are used;
  ``'hidden'`` = the pre-projector features everywhere (our earlier reading).
* Merge (``contextual``): ``'target_plus_mean'`` (default, the authors: ``target + mean(members)``, just the target
  when no token joined it) or ``'mean'`` (the mean of the target and its members, our earlier reading). Merged
  in the projected LLM-input space (the authors merge the encoder's output, then project; with a linear
  projector the two agree, with LLaVA's MLP they differ).
* Budget 1 (no contextual token) keeps the top dominant token (the authors' code divides by zero there).
* Placement and positions: the image's kept dominant tokens (ascending), then the contextual tokens in target
  order, at the image's place in the prompt, numbered contiguously (``positions='contiguous'`` only).
"""

from __future__ import annotations

import dataclasses

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("dominant_ratio", 54 / 64, "visionzip: fraction of each image's budget taken by dominant tokens ([CLS] "
          "attention; the [CLS] itself among them where cls_dominant applies); the rest are contextual tokens "
          "(merged from the other tokens). Default 54/64, LLaVA-1.5's 54+10 at 64 tokens", low=0.0, high=1.0,
          open_low=True),
    Param("cls_dominant", True, "visionzip: the vision tower's [CLS] token (projected) is one of the dominant tokens, "
          "with dominant - 1 patches (VisionZip's released code), where the tower has a [CLS] and each of its "
          "patches is one LLM token (LLaVA-1.5); false: every dominant token is a patch", kind="bool"),
    Param("features", "keys", "visionzip: similarity features that assign tokens to contextual targets: 'keys' = the "
          "vision encoder's keys at the feature layer, heads averaged (VisionZip's released code), where the tower's "
          "patches map one-to-one onto LLM tokens (LLaVA-1.5), else the pre-projector features; 'hidden' = the "
          "pre-projector features always", kind="str", choices=("keys", "hidden")),
    Param("contextual", "target_plus_mean", "visionzip: a contextual token is 'target_plus_mean' = its target "
          "token plus the mean of the tokens assigned to it (VisionZip's released code) or 'mean' = the mean of "
          "the target and those tokens", kind="str", choices=("target_plus_mean", "mean")),
)


class VisionZip(Selector):
    """Dominant tokens kept + contextual tokens merged (a :class:`lmms_prune.selection.Merge`)."""

    merges = True

    name = "visionzip"
    params = ("dominant_ratio", "cls_dominant", "features", "contextual")
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(vision_features=True, vision_keys=config.features == "keys", vision_cls=config.cls_dominant)

    def __call__(self, image, scores, n):
        keys = self.config.features == "keys" and image.vision_keys is not None
        features = image.vision_keys if keys else image.vision_features
        cls = image.vision_cls if self.config.cls_dominant and n < image.num_tokens else None
        merge = sel.visionzip(scores, features, n, dominant_ratio=self.config.dominant_ratio,
                              contextual=self.config.contextual, cls_slot=cls is not None)
        return merge if cls is None else dataclasses.replace(merge, prefix=cls[None])


SELECTORS = (VisionZip,)
PRESETS = (
    Preset("visionzip", "VisionZip: dominant tokens by vision [CLS] attention (54/64 of the budget) + contextual "
           "tokens (target + mean of the tokens most similar to it by the vision keys), pre-LLM",
           dict(stage="pre_llm", selector="visionzip", score="vision")),
)
