"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025):
segment the video where consecutive frames differ (DySeg), keep each frame's most attended tokens (ATS) and merge
the rest of each segment into density-peak anchors (STPrune / DTM), before the LLM.

Authors' code: github.com/LunarShen/FastVID at ``a40a109cb8df20e8c2c17c6850f8269717369990`` (the
LLaVA-OneVision "core code" of their README, ``fastvid_llavaonevision/.../language_model/modeling_qwen2.py``,
with the signals of ``llava_arch.py`` and ``multimodal_encoder/siglip_encoder.py``; LightCompress's
``llmc/compression/token_reduction/fastvid.py`` ports the same). The maths is ``lmms_prune.selection.fastvid``.
FastVID has no stage inside the LLM: everything happens once, on the LLM's input embeddings at prefill.

Here (also docs/fidelity.md, "fastvid"):

- **Budget**: ``keep_ratio`` is their ``fastvid_retention_ratio``: every frame keeps ``int(P * keep_ratio)``
  tokens' worth (salient plus its share of anchors), so a video keeps at most that total (``keep_tokens`` k uses
  ``k / N``).
- **Signals**: their ATS attention and DySeg frame features come from SigLIP's attention-pooling head, loaded
  from the separate SigLIP checkpoint (LLaVA-OneVision's own tower has no head); here the attention is the
  engine's ``vision_attention`` (each patch's mean received attention at the feature layer, pooled like the
  tokens: bilinear on LLaVA-OneVision, as they pool theirs) and a frame's feature is the mean of its projected
  tokens (their Qwen2.5-VL port's choice).
- **Positions**: kept tokens and each merged anchor keep their original positions (their ``position_ids =
  keep_indexs``), in original order (the engine's slotted pre-LLM merge, ``Merge.slots``).
- **Qwen2.5-VL**: their Qwen2.5-VL port (``fastvid_qwen25vl``) splits each segment again where consecutive
  frames fall below ``DySeg_ignore`` and spreads the budgets per sub-segment; not reproduced: every family here
  runs the LLaVA-OneVision arithmetic on its (merged) frames.
- **Images**: untouched (FastVID prunes videos). Families that add per-token vision features inside the LLM
  (Qwen3-VL's DeepStack) are refused: a merged token has none.
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("fastvid_dyseg_c", 8, "fastvid: DySeg's minimum number of segments c (cuts after the c - 1 lowest "
          "consecutive-frame cosines)", kind="int", low=1),
    Param("fastvid_dyseg_tau", 0.9, "fastvid: DySeg's threshold tau (also cut wherever consecutive frames' cosine "
          "is below it)", low=-1.0, high=1.0),
    Param("fastvid_stprune_d", 0.4, "fastvid: STPrune's d, the share of each frame's budget given to merged "
          "anchors (the rest: salient tokens by attention)", low=0.0, high=1.0),
    Param("fastvid_dtm_p", 4, "fastvid: DTM's p, every p-th frame of a segment (from its end) holds the segment's "
          "anchors", kind="int", low=1),
    Param("fastvid_dtm_beta", 0.6, "fastvid: DTM's beta, the least weight of an anchor's own token in its merge",
          low=0.0, high=1.0),
)


class FastVID(Selector):
    """DySeg segments, ATS salient tokens, density-peak anchors merging their segment (FastVID)."""

    name = "fastvid"
    params = tuple(p.name for p in PARAMS)
    merges = True
    merges_in_place = True
    videos_only = True  # FastVID prunes video tokens only
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True, vision_attention=True)

    @classmethod
    def adaptive_count(cls, config):
        return True  # int(P * r) per frame, anchors spread by segment: at most the budget, rarely exactly n

    def __call__(self, image, scores, n):
        import torch  # method modules stay light to import (lmms-eval reads the preset names at start-up)

        span, x = image.span, image.embeddings
        if not span.video:
            return torch.arange(span.num_visual, device=x.device)
        cfg = self.config
        retention = cfg.keep_ratio if cfg.keep_ratio is not None else n / span.num_visual
        frames = len(span.grids)
        return sel.fastvid(x, image.vision_attention.to(x.device), x.float().view(frames, -1, x.shape[-1]).mean(1),
                           span.grids, retention, num_cuts=cfg.fastvid_dyseg_c - 1, tau=cfg.fastvid_dyseg_tau,
                           context_share=cfg.fastvid_stprune_d, period=cfg.fastvid_dtm_p, beta=cfg.fastvid_dtm_beta)


SELECTORS = (FastVID,)
PRESETS = (
    Preset("fastvid", "FastVID (NeurIPS 2025): per video, segments cut where consecutive frames differ (DySeg, c=8, "
           "tau=0.9), each frame's most attended tokens kept and the rest of its segment merged into density-peak "
           "anchors at their own places (STPrune d=0.4, DTM p=4, beta=0.6), pre-LLM at original positions; "
           "images untouched",
           dict(stage="pre_llm", selector="fastvid", positions="original")),
)
