"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025):
segment the video where consecutive frames differ (DySeg), keep each frame's most attended tokens (ATS) and merge
the rest of each segment into density-peak anchors (STPrune / DTM), before the LLM.

Authors' code: github.com/LunarShen/FastVID at ``a40a109cb8df20e8c2c17c6850f8269717369990``, two versions
(``fastvid_variant``; the maths of both is ``lmms_prune.selection.fastvid``):

- ``llava_onevision``: the LLaVA-OneVision "core code" of their README
  (``fastvid_llavaonevision/.../language_model/modeling_qwen2.py``, with the signals of ``llava_arch.py`` and
  ``multimodal_encoder/siglip_encoder.py``; LightCompress's ``llmc/compression/token_reduction/fastvid.py`` ports
  the same): the same salient/anchor split on every frame;
- ``qwen2_5_vl``: their Qwen2.5-VL port (``fastvid_qwen25vl/.../qwenvlutils/modeling_qwen2_5_vl.py``, lines
  1889-2099, settings of ``fastvid_qwen25vl/scripts/eval.sh``): budgets per segment (at least one anchor),
  each segment split again where consecutive frames' cosine falls below ``fastvid_dyseg_ignore`` and only the
  last frame of each sub-segment keeping tokens; each anchor merges the segment's other non-salient tokens.
- ``auto`` (default): the authors' code for the model's family: ``qwen2_5_vl`` on Qwen2.5-VL, and on Qwen2-VL
  (the same video layout: merged frames of two input frames, 2 x 2 merged patches; the authors ship no Qwen2-VL
  code), ``llava_onevision`` on every other family (LLaVA-OneVision, InternVL's frame tiles). The engine resolves
  it when the method is applied (``Selector.for_family``), and ``fastvid_dyseg_tau`` left unset with it: their
  0.9 (``llava_onevision``) or 0.84 (``qwen2_5_vl``).

FastVID has no stage inside the LLM: everything happens once, on the LLM's input embeddings at prefill.

Here (also docs/fidelity.md, "fastvid"):

- **Budget**: ``keep_ratio`` is their ``fastvid_retention_ratio`` (their Qwen2.5-VL script: 0.27, reported to
  keep 24.1%): ``llava_onevision`` keeps ``int(P * keep_ratio)`` tokens' worth per frame, ``qwen2_5_vl``
  ``L * int(P * keep_ratio)`` per segment of ``L`` frames at most; so a video keeps at most that total
  (``keep_tokens`` k uses ``k / N``). Where their code fails, this keeps working: one frame or no cut (one
  segment), ``int(P * keep_ratio) = 0`` (nothing of the video kept), fewer frames than ``c``.
- **Signals**: their ATS attention and DySeg frame features: on LLaVA-OneVision from SigLIP's attention-pooling
  head, loaded from the separate SigLIP checkpoint (LLaVA-OneVision's own tower has no head); on Qwen2.5-VL the
  softmax of each frame's mean query over its 2 x 2-averaged keys at the last vision block, and the mean of the
  frame's projected tokens. ``fastvid_attention`` (``auto``: ``frame_query`` with ``qwen2_5_vl``, else
  ``received``): ``frame_query`` is their Qwen2.5-VL signal (the engine's ``vision_frame_attention``,
  :func:`lmms_prune.selection.frame_query_attention`; Qwen2.5-VL and Qwen2-VL); ``received`` the engine's
  ``vision_attention`` (each patch's mean received attention at the feature layer, pooled like the tokens:
  bilinear on LLaVA-OneVision, as they pool theirs; on Qwen the last full-attention block), the stand-in for
  the SigLIP head on other families. A frame's feature is the mean of its projected tokens (their Qwen2.5-VL
  port's).
- **Frames**: Qwen's merged frames (two input frames per temporal patch) are FastVID's frames, as in their port
  (``video_grid_thw``'s ``t``).
- **Positions**: kept tokens and each merged anchor keep their original positions (their ``position_ids =
  keep_indexs``; Qwen: the 3-D M-RoPE ids), in original order (the engine's slotted pre-LLM merge,
  ``Merge.slots``).
- **Images**: untouched (FastVID prunes videos). Families that add per-token vision features inside the LLM
  (Qwen3-VL's DeepStack) are refused: a merged token has none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

VARIANTS = ("llava_onevision", "qwen2_5_vl")  # lmms_prune.selection.fastvid.VARIANTS (not imported: torch)
ATTENTIONS = ("frame_query", "received")

PARAMS = (
    Param("fastvid_dyseg_c", 8, "fastvid: DySeg's minimum number of segments c (cuts after the c - 1 lowest "
          "consecutive-frame cosines)", kind="int", low=1),
    Param("fastvid_dyseg_tau", None, "fastvid: DySeg's threshold tau (also cut wherever consecutive frames' cosine "
          "is below it); unset: the authors' for the variant, 0.9 (llava_onevision) or 0.84 (qwen2_5_vl)",
          low=-1.0, high=1.0, optional=True),
    Param("fastvid_dyseg_ignore", 0.95, "fastvid: variant qwen2_5_vl's DySeg_ignore: a segment is split again "
          "wherever consecutive frames' cosine is below it, and only each part's last frame keeps tokens",
          low=-1.0, high=1.0),
    Param("fastvid_stprune_d", 0.4, "fastvid: STPrune's d, the share of each frame's (qwen2_5_vl: each segment's) "
          "budget given to merged anchors (the rest: salient tokens by attention)", low=0.0, high=1.0),
    Param("fastvid_dtm_p", 4, "fastvid: DTM's p, every p-th frame (qwen2_5_vl: sub-segment) of a segment, from its "
          "end, holds the segment's anchors", kind="int", low=1),
    Param("fastvid_dtm_beta", 0.6, "fastvid: DTM's beta, the least weight of an anchor's own token in its merge",
          low=0.0, high=1.0),
    Param("fastvid_variant", "auto", "fastvid: which of the authors' codes runs: llava_onevision (their core code: "
          "the same split on every frame) or qwen2_5_vl (their Qwen2.5-VL port: budgets per segment and "
          "sub-segment); auto: qwen2_5_vl on Qwen2.5-VL and Qwen2-VL, llava_onevision on other families",
          kind="str", choices=("auto", *VARIANTS)),
    Param("fastvid_attention", "auto", "fastvid: ATS's attention: frame_query (their Qwen2.5-VL port's: per merged "
          "frame, the softmax of its mean query over its 2 x 2-averaged keys at the tower's last block, heads "
          "averaged; Qwen2.5-VL and Qwen2-VL only) or received (each token's mean received attention at the "
          "tower's feature layer, the engine's vision_attention); auto: frame_query with fastvid_variant="
          "qwen2_5_vl, received otherwise", kind="str", choices=("auto", *ATTENTIONS)),
)
# The authors' code per family (``auto``), its DySeg tau (their scripts) and its ATS attention (``auto``: their
# Qwen2.5-VL port's where it runs; their LLaVA-OneVision code's SigLIP-head attention is not ported, the received
# attention stands in): Qwen2-VL shares Qwen2.5-VL's video layout and tower, and the authors ship no code for it
FAMILY_VARIANTS = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_5_vl"}
VARIANT_TAU = {"llava_onevision": 0.9, "qwen2_5_vl": 0.84}
VARIANT_ATTENTION = {"llava_onevision": "received", "qwen2_5_vl": "frame_query"}


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
        frame_query = config.fastvid_attention == "frame_query"  # 'auto': resolved per family (for_family)
        return Needs(embeddings=True, vision_attention=not frame_query, vision_frame_attention=frame_query)

    @classmethod
    def used_params(cls, config):
        if config.fastvid_variant == "llava_onevision":
            return tuple(p for p in cls.params if p != "fastvid_dyseg_ignore")
        return cls.params

    @classmethod
    def for_family(cls, config: Any, family: str) -> Any:
        """``fastvid_variant='auto'`` -> the authors' code for ``family`` (``FAMILY_VARIANTS``, else
        ``llava_onevision``); an unset ``fastvid_dyseg_tau`` -> that variant's (``VARIANT_TAU``);
        ``fastvid_attention='auto'`` -> that variant's (``VARIANT_ATTENTION``). ``frame_query`` on a family
        without it is refused here (``lmms_prune.presets.check_model`` calls this before any weights load)."""
        variant = config.fastvid_variant
        if variant == "auto":
            variant = FAMILY_VARIANTS.get(family, "llava_onevision")
        tau = VARIANT_TAU[variant] if config.fastvid_dyseg_tau is None else config.fastvid_dyseg_tau
        attention = VARIANT_ATTENTION[variant] if config.fastvid_attention == "auto" else config.fastvid_attention
        if attention == "frame_query" and family not in FAMILY_VARIANTS:
            raise ValueError(f"fastvid_attention='frame_query' on a {family} model: that signal is their Qwen2.5-VL "
                             f"port's, read in a Qwen tower ({', '.join(FAMILY_VARIANTS)}); use "
                             "fastvid_attention='received'")
        return dataclasses.replace(config, fastvid_variant=variant, fastvid_dyseg_tau=tau,
                                   fastvid_attention=attention)

    @classmethod
    def adaptive_count(cls, config):
        return True  # int(P * r) per frame or segment, clamped per frame: at most the budget, rarely exactly n

    def __call__(self, image, scores, n):
        import torch  # method modules stay light to import (lmms-eval reads the preset names at start-up)

        span, x = image.span, image.embeddings
        if not span.video:
            return torch.arange(span.num_visual, device=x.device)
        cfg = self.config
        retention = cfg.keep_ratio if cfg.keep_ratio is not None else n / span.num_visual
        if cfg.fastvid_variant not in VARIANTS or cfg.fastvid_dyseg_tau is None or cfg.fastvid_attention == "auto":
            raise ValueError(f"fastvid_variant={cfg.fastvid_variant!r}, fastvid_dyseg_tau={cfg.fastvid_dyseg_tau!r}, "
                             f"fastvid_attention={cfg.fastvid_attention!r}: resolve them for the model's family "
                             "first (FastVID.for_family; lmms_prune.apply does)")
        split = {"ignore": cfg.fastvid_dyseg_ignore} if cfg.fastvid_variant == "qwen2_5_vl" else {}
        frames = len(span.grids)
        attention = (image.vision_frame_attention if cfg.fastvid_attention == "frame_query"
                     else image.vision_attention)
        return sel.fastvid(x, attention.to(x.device), x.float().view(frames, -1, x.shape[-1]).mean(1),
                           span.grids, retention, num_cuts=cfg.fastvid_dyseg_c - 1, tau=cfg.fastvid_dyseg_tau,
                           context_share=cfg.fastvid_stprune_d, period=cfg.fastvid_dtm_p, beta=cfg.fastvid_dtm_beta,
                           variant=cfg.fastvid_variant, **split)


SELECTORS = (FastVID,)
PRESETS = (
    Preset("fastvid", "FastVID (NeurIPS 2025): per video, segments cut where consecutive frames differ (DySeg, c=8, "
           "tau=0.9; Qwen: 0.84), each frame's most attended tokens kept and the rest of its segment merged into "
           "density-peak anchors at their own places (STPrune d=0.4, DTM p=4, beta=0.6), pre-LLM at original "
           "positions; the authors' Qwen2.5-VL code on Qwen2.5-VL/Qwen2-VL (fastvid_variant=auto: budgets per "
           "segment, split again below DySeg_ignore=0.95), their LLaVA-OneVision code elsewhere; images untouched",
           dict(stage="pre_llm", selector="fastvid", positions="original")),
)
