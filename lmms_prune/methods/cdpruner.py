"""CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs"), pre-LLM: greedy MAP of a conditional DPP over each image's visual tokens (methods.md 5b).

Kernel ``L = diag(q) S diag(q)``; greedy MAP with the fast incremental-Cholesky greedy (Chen et al. 2018), in
:func:`lmms_prune.selection.cdpruner`.

Choices (paper; authors' code read at github.com/Theia-4869/CDPruner, commit 9541616c40fc, file
``llava/model/llava_arch.py``; nothing copied):

* ``S``: cosine similarity of the projected visual embeddings (the LLM-input tokens), as the authors.
* ``q``, the instruction relevance: the authors embed the instruction with CLIP's TEXT tower
  (``CLIPTextModelWithProjection``: the pooled, projected embedding of each 77-token segment of the tokenized
  instruction, zero-padded to a multiple of 77, one embedding per segment) and compare it with CLIP's projected
  image embeddings (``visual_projection(post_layernorm(features))``). The families here have no text tower
  (InternViT, Qwen's ViT; LLaVA's CLIP text tower is not shipped in the checkpoint), so both sides are taken in
  the LLM's input space: the projected visual embeddings against the LLM's input embeddings of the text tokens
  after the image (the instruction and the template's closing tokens), one per token. The authors' code
  NEGATES the cosine before averaging over the text embeddings and min-max normalising
  (``relevance = (-relevance).mean(dim=-1)``); ``relevance_sign='negated'`` (the default) does the same,
  ``relevance_sign='plain'`` (our earlier reading of the paper) does not. Their optional ``theta`` reweighting
  (``exp(alpha q)``) is commented out in their code and not offered.
* Budget: ``n`` per image (``keep_ratio``/``keep_tokens``), selected per image (the authors: per sample, one
  image). Positions: as every pre-LLM method (``positions``; default contiguous renumbering, as the authors).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Score, Selector, sel

PARAMS = (
    Param("relevance_sign", "negated", "cdpruner: 'negated' = the relevance is the NEGATED mean cosine between each "
          "visual token and the instruction embeddings, then min-max normalised (CDPruner's released code), "
          "'plain' = the mean cosine itself", kind="str", choices=("negated", "plain")),
)


class InstructionRelevance(Score):
    """``q``: each visual embedding's (negated, by default) mean cosine similarity to the instruction's input
    embeddings, min-max normalised."""

    name = "instruction"
    params = ("relevance_sign",)
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True, instruction=True)

    def __call__(self, image):
        return sel.instruction_relevance(image.embeddings, image.instruction.to(image.embeddings.device),
                                         negate=self.config.relevance_sign == "negated")


class CDPruner(Selector):
    """Greedy MAP of the conditional DPP ``diag(q) S diag(q)`` on the projected embeddings."""

    name = "cdpruner"
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True)

    def __call__(self, image, scores, n):
        return sel.cdpruner(image.embeddings, scores, n)


SCORES = (InstructionRelevance,)
SELECTORS = (CDPruner,)
PRESETS = (
    Preset("cdpruner", "CDPruner: conditional DPP (instruction relevance, negated as the authors' code, x cosine "
           "similarity of the projected tokens), greedy MAP, pre-LLM",
           dict(stage="pre_llm", selector="cdpruner", score="instruction")),
)
