"""PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction"): multi-stage pruning inside the LLM (methods.md section 5b).

The forward pass is split into stages at layers ``K_1 < K_2 < ...``; at each, the visual tokens still present are
ranked by the last prompt token's attention (heads averaged) and the top ``stage_ratio`` of them are kept, so
after stage ``s`` the image keeps ``stage_ratio^s`` of its tokens. The engine does the stages
(``prune_layers``, :mod:`lmms_prune.engine.core`); this module is the preset, with the ``attention`` score and the
``topk`` selector of FastV at every stage, and the multi-stage options below. Trend debiasing composes:
``score="trend"`` (with ``bias_prior``) debiases each stage's attention by the positional trend, at the tokens'
ORIGINAL positions ``i / N``.

The defaults are the authors' released arithmetic (github.com/Cooperx521/PyramidDrop, commit 6444f304aee4, file
``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward``, ``pdrop_rank_drop``; nothing copied), each with an
option giving our earlier reading (``docs/fidelity.md``):

* Layers: LLaVA-1.5-7B uses 8, 16, 24 of 32 with ``lambda = 0.5`` (README: ``layer_list [8,16,24]``,
  ``image_token_ratio_list [0.5,0.25,0.125]``). ``prune_layers="auto"`` scales them to the model's depth ``L``
  as the same fractions: ``floor(L*s/4 + 0.5)``, s = 1, 2, 3 (24 layers: 6/12/18; 28: 7/14/21).
* Scoring (``score_at``): ``'K'`` (default, the authors) = layer ``K_s``'s own input norm, query/key projections
  and RoPE applied to its input (the sequence as it stands, renumbered), the last prompt token's row soft-maxed
  over the whole row in float32, heads averaged, image columns (``Needs.query_key_attention``); ``'K-1'`` = the
  row recorded inside layer ``K_s - 1`` (FastV's convention, free from the forward pass).
* Counts (``budget_rounding``): ``'int'`` (default, the authors) keeps ``int(N * stage_ratio^s)`` of the
  ORIGINAL count ``N``, at least 1 (where ``int`` gives 0 we keep one token: the authors' ``topk(0)`` would
  keep none); ``'round'`` keeps ``max(1, round(N * stage_ratio^s))``.
* Positions (``positions``): ``'contiguous'`` (default, the authors' ``arange(0, cur_len)``) renumbers the
  survivors after each stage, and decoding continues from the renumbered length at each stage's layers (their
  decode step subtracts the tokens each stage dropped); ``'original'`` keeps every token's original position.
  Both are proven equal to mask mode at prefill and every cached decode step (tests/test_multistage.py).
* Budget (``keep_ratio``): multi-stage methods keep a different number of tokens per layer. With
  ``stage_ratio`` (the default, 0.5) the budget is the paper's. With ``keep_ratio`` (or ``keep_tokens``) instead,
  it is the AVERAGE number of visual tokens per decoder layer over all ``L`` layers -- the first-order prefill
  FLOPs equivalent of keeping that many tokens at every layer -- and the stage ratio is solved from it
  (:func:`lmms_prune.selection.budget.stage_ratio_for_average`); a budget below ``K_1 / L`` is unreachable and an
  error. The per-layer counts are in ``PruneRecord.kv_lengths`` and the efficiency records (FLOPs, KV bytes).
"""

from __future__ import annotations

from lmms_prune.methods.base import Param, Preset

PARAMS = (
    Param("score_at", "K-1", "multi-stage (prune_layers): the attention that ranks stage K's tokens: 'K' = layer K's "
          "own query/key projections and RoPE applied to its input, before it runs (PyramidDrop's code, the "
          "pyramiddrop preset), 'K-1' = the row recorded inside layer K-1 (FastV's convention) or 'own-K-1' = "
          "layer K-1's own query/key projections applied to its input, before it runs (FEATHER's code; with "
          "qk_rope and qk_softmax)", kind="str", choices=("K", "K-1", "own-K-1")),
    Param("budget_rounding", "round", "multi-stage: tokens kept after stage s, of the ORIGINAL count N: 'int' = "
          "max(1, int(N * ratio^s)) (PyramidDrop's code, the pyramiddrop preset) or 'round' = max(1, round(...))",
          kind="str", choices=("int", "round")),
    Param("budget_base", "original", "multi-stage with stage_ratio r: stage s (1-based) keeps r^s of 'original' = the "
          "image's original token count N (PyramidDrop's code) or 'present' = the tokens present when the stage "
          "starts (FEATHER's code: its second stage keeps int(M * r^2) of the M tokens the first kept)", kind="str",
          choices=("original", "present")),
)

PRESETS = (
    Preset("pyramiddrop", "PyramidDrop as released: keep int(N * stage_ratio^s) (stage_ratio 0.5) of the visual "
           "tokens at each of prune_layers (LLaVA-1.5: 8,16,24 of 32; auto: scaled to the depth), ranked by the "
           "last prompt token's attention from layer K's own query/key (score_at=K), survivors renumbered "
           "(positions=contiguous); keep_ratio instead = average visual tokens per layer",
           dict(stage="llm", selector="topk", score="attention", prune_layers="auto", stage_ratio=0.5,
                keep_ratio=None, score_at="K", budget_rounding="int", positions="contiguous")),
)
