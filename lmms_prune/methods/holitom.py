"""HoliTom (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", NeurIPS 2025),
its pre-LLM stage ("HoliTom (w/o M)" in the authors' code): per video, a global segmentation of the frames into
windows (a dynamic programme maximising the tokens that stay alike through a window), each window's static tokens
averaged over its frames and clustered, each frame's other tokens reduced to the most attended ones, to about
``keep_ratio`` of the video's tokens. Images are untouched (HoliTom is a video method).

Maths: :func:`lmms_prune.selection.holitom_merge` (authors' code github.com/cokeshao/HoliTom at commit
``e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0``, ``holitom/llava_arch.py``; nothing copied).

Here (also docs/fidelity.md, "holitom"):

- **Budget**: ``keep_ratio`` is the authors' ``RETAIN_RATIO`` (0.1 by default, as theirs); the count follows
  their roundings (``ceil`` per frame, ``round`` per window), so it is the method's own (``check-method`` reports
  it).
- **Signals**: the projected video embeddings (the authors': LLaVA-OneVision's projected, pooled frame features)
  and the vision tower's mean received attention at the feature layer, pooled like the features.
- **Layout**: merged tokens have no original position, so the short prompt is renumbered
  (``positions='contiguous'``); the kept tokens come first in their original order, then the merged ones.
- **Inside-LLM merge** (``holitom_full``, the authors' full method with ``HOLITOM_k``/``HOLITOM_r``): at layer
  ``k`` (18/28 of the depth) the ``stage_ratio`` (``1 - r = 0.5``) of the video tokens most attended by the last
  prompt token at layer ``k - 1`` are kept and every other one is folded into its most similar kept token
  (:func:`lmms_prune.selection.holitom_inner_merge`), through the engine's pre-LLM -> LLM composition. From
  layer ``k`` on the survivors keep their positions in the shortened prompt and decoding continues from its
  length, as the authors' ``position_ids = keep_indexs`` (``llm_positions='original'``; ``'contiguous'``
  renumbers them). Its candidates are the video's tokens with their newline (LLaVA-OneVision's one newline after
  a video), as the authors' ``image_tokens`` counts the video's features after the newline is appended
  (``llm_structural='candidates'``; ``'keep'``: the newline stays outside, the engine's rule for structure).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("holitom_tau", 0.8, "holitom: cosine similarity with the same cell of the next frame above which a token "
          "is static (the authors' T: 0.8 by default, 0.65 in their 10%-budget runs)", low=-1.0, high=1.0),
    Param("holitom_beta", 0.6, "holitom: weight of a cluster's centre in its merged token (the rest: the mean of "
          "its members)", low=0.0, high=1.0),
    Param("holitom_d", 0.0, "holitom: share of each frame's kept dynamic tokens formed by clustering instead of "
          "attention (the authors' D, 0 by default)", low=0.0, high=1.0),
    Param("holitom_k", 7, "holitom: neighbours of the kNN density of the clustering (the authors' K)", kind="int",
          low=1),
    Param("holitom_max_window", 1024, "holitom: the most frames one temporal window may span", kind="int", low=1),
)


class HoliTom(Selector):
    """HoliTom's pre-LLM merging: temporal windows of static tokens merged, then attention top-k per frame."""

    name = "holitom"
    params = ("holitom_tau", "holitom_beta", "holitom_d", "holitom_k", "holitom_max_window")
    stages = ("pre_llm",)
    merges = True
    videos_only = True  # HoliTom compresses videos; an image keeps every token
    # holitom_full's inner stage (prune_layers='auto'): k = 18 of Qwen2-7B's 28 layers (the authors' HOLITOM_k in
    # every script), scaled to the model's depth
    layer_fractions = (18 / 28,)

    @classmethod
    def adaptive_count(cls, config):
        return True  # the windows' static tokens and the authors' ceil/round set the count

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True, vision_attention=True)

    @classmethod
    def check(cls, config):
        if config.keep_ratio is None:
            raise ValueError(f"keep_tokens={config.keep_tokens!r}: holitom's budget is a ratio of each video's "
                             "tokens (the authors' RETAIN_RATIO); give keep_ratio instead")

    def __call__(self, image, scores, n):
        import torch  # method modules stay light to import (lmms-eval reads the preset names at start-up)

        span, cfg = image.span, self.config
        if not span.video:
            return torch.arange(span.num_visual, device=image.embeddings.device)
        return sel.holitom_merge(image.embeddings, image.vision_attention.to(image.embeddings.device), span.grids,
                                 cfg.keep_ratio, tau=cfg.holitom_tau, beta=cfg.holitom_beta,
                                 dominant_share=cfg.holitom_d, neighbours=cfg.holitom_k,
                                 max_window_size=cfg.holitom_max_window)


class HoliTomInner(Selector):
    """HoliTom's inside-LLM merge: the most attended video tokens kept, each other one folded into its most
    similar kept token (hidden states at the stage's layer), the LLM stage of ``holitom_full``."""

    name = "holitom_inner"
    stages = ("llm",)
    subsets = True  # it sees the tokens the pre-LLM stage left (a subset, no grid)
    merges = True

    @classmethod
    def needs(cls, config):
        return Needs(hidden=True)

    def __call__(self, image, scores, n):
        import torch  # method modules stay light to import (lmms-eval reads the preset names at start-up)

        if not image.span.video:  # HoliTom merges the video's tokens only
            return torch.arange(image.num_tokens, device=scores.device)
        return sel.holitom_inner_merge(scores.to(image.hidden.device), image.hidden, n)


SELECTORS = (HoliTom, HoliTomInner)
PRESETS = (
    Preset("holitom", "HoliTom's pre-LLM stage: per video, frames segmented into windows where tokens stay alike, "
           "static tokens averaged over their window and clustered, each frame's other tokens cut to the most "
           "attended (vision tower), to about keep_ratio; images untouched (the inside-LLM merge: holitom_full)",
           dict(stage="pre_llm", selector="holitom")),
    Preset("holitom_full", "HoliTom as the authors' scripts run it: the pre-LLM stage (holitom), then at layer k "
           "(18 of 28, scaled: prune_layers=auto) the stage_ratio (1 - HOLITOM_r = 0.5) of the video tokens most "
           "attended by the last prompt token at layer k-1 kept, every other one folded into its most similar kept "
           "token (running pairwise average of the hidden states)",
           dict(stage="pre_llm", selector="holitom", llm_selector="holitom_inner", llm_score="attention",
                prune_layers="auto", stage_ratio=0.5, budget_rounding="round", budget_base="present",
                positions="contiguous", llm_positions="original", llm_structural="candidates")),
)
