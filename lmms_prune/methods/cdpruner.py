"""CDPruner (Zhang et al., 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs"), pre-LLM: greedy MAP of a conditional DPP over each image's visual tokens (methods.md 5b).

Kernel ``L = diag(q) S diag(q)``; greedy MAP with the fast incremental-Cholesky greedy (Chen et al. 2018), in
:func:`lmms_prune.selection.cdpruner`.

Choices (paper; authors' code read at github.com/Theia-4869/CDPruner, commit 9541616c40fc, file
``llava/model/llava_arch.py``; nothing copied):

* ``S``: cosine similarity of the projected visual embeddings (the LLM-input tokens), as the authors.
* ``q``, the instruction relevance: the authors embed the instruction with CLIP's TEXT tower and compare it with
  CLIP's projected image embeddings. The families here have no text tower (InternViT, Qwen's ViT; LLaVA's
  CLIP text tower is not shipped in the checkpoint), so both sides are taken in the LLM's input space: the
  projected visual embeddings against the LLM's input embeddings of the text tokens after the image (the
  instruction and the template's closing tokens): ``q_i`` = mean cosine over those tokens, min-max normalised to
  ``(0, 1]``. The authors' LLaVA code negates the CLIP similarity before normalising (``-sim``), a CLIP-space
  finding that does not carry over to the LLM's embedding space; we use the similarity itself. Their optional
  ``theta`` reweighting (``exp(alpha q)``) is off in their code and not offered.
* Budget: ``n`` per image (``keep_ratio``/``keep_tokens``), selected per image (the authors: per sample, one
  image). Positions: as every pre-LLM method (``positions``; default contiguous renumbering, as the authors).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Preset, Score, Selector, sel


class InstructionRelevance(Score):
    """``q``: each visual embedding's mean cosine similarity to the instruction's input embeddings, in (0, 1]."""

    name = "instruction"
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True, instruction=True)

    def __call__(self, image):
        return sel.instruction_relevance(image.embeddings, image.instruction.to(image.embeddings.device))


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
    Preset("cdpruner", "CDPruner: conditional DPP (instruction relevance x cosine similarity), greedy MAP, "
           "pre-LLM", dict(stage="pre_llm", selector="cdpruner", score="instruction")),
)
