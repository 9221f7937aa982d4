"""PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction"): multi-stage pruning inside the LLM (methods.md section 5b).

The forward pass is split into stages at layers ``K_1 < K_2 < ...``; at each, the visual tokens still present are
ranked by the last instruction token's attention (heads averaged) and the top ``stage_ratio`` of them are kept, so
after stage ``s`` the image keeps ``stage_ratio^s`` of its tokens. The engine does the stages
(``prune_layers``, :mod:`lmms_prune.engine.core`); this module is the preset, with the ``attention`` score and the
``topk`` selector of FastV at every stage. Trend debiasing composes: ``score="trend"`` (with ``bias_prior``)
debiases each stage's attention by the positional trend, at the tokens' ORIGINAL positions ``i / N``.

Defaults and choices (paper; authors' code read at github.com/Cooperx521/PyramidDrop, commit 6444f304aee4, file
``llava/model/modeling_llama_pdrop.py``; nothing copied):

* Layers: LLaVA-1.5-7B uses 8, 16, 24 of 32 with ``lambda = 0.5`` (README: ``layer_list [8,16,24]``,
  ``image_token_ratio_list [0.5,0.25,0.125]``). ``prune_layers="auto"`` scales them to the model's depth ``L``
  as the same fractions: ``floor(L*s/4 + 0.5)``, s = 1, 2, 3 (24 layers: 6/12/18; 28: 7/14/21).
* Counts: the authors keep ``int(N * ratio_list[s])`` of the ORIGINAL count ``N``; we keep
  ``max(1, round(N * stage_ratio^s))`` (the project's rounding rule, at least one token), also from ``N``.
* Scoring layer: the authors recompute layer ``K_s``'s own query/key projections on its input to rank; we use
  the attention row already computed inside layer ``K_s - 1`` (the project's convention, methods.md section 2,
  free from the forward pass). Query: the last prompt token (authors: the last instruction token at inference).
* Positions: the authors renumber the shorter sequence's position ids; the engine keeps each kept token's
  original RoPE position (as for every in-LLM method here), so stage ``s`` equals masking its removed set from
  layer ``K_s`` on (the equivalence the tests prove).
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
          "pyramiddrop preset) or 'K-1' = the row recorded inside layer K-1 (FastV's convention)", kind="str",
          choices=("K", "K-1")),
    Param("budget_rounding", "round", "multi-stage: tokens kept after stage s, of the ORIGINAL count N: 'int' = "
          "max(1, int(N * ratio^s)) (PyramidDrop's code, the pyramiddrop preset) or 'round' = max(1, round(...))",
          kind="str", choices=("int", "round")),
)

PRESETS = (
    Preset("pyramiddrop", "PyramidDrop: keep stage_ratio (0.5) of the visual tokens still present at each of "
           "prune_layers (LLaVA-1.5: 8,16,24 of 32; auto: scaled to the depth), ranked by the last prompt token's "
           "attention at the layer before; keep_ratio instead = average visual tokens per layer",
           dict(stage="llm", selector="topk", score="attention", prune_layers="auto", stage_ratio=0.5,
                keep_ratio=None, score_at="K", budget_rounding="int", positions="contiguous")),
)
