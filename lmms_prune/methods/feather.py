"""FEATHER (Endo et al., 2024, "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
Acceleration", arXiv 2412.13180): FastV's attention criterion without its bias towards the image's last rows,
plus uniform sampling, in two stages inside the LLM.

Read in the authors' code (github.com/markendo/FEATHER, commit c2a09b2765967601054c7b1fd513ac3e94ee4fc9,
``prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py``: ``FastVLlamaModel.forward`` and
``calculate_attention_weight``; the run ``vlm-evaluation/scripts/eval_feather.sh``: ``--fastv_k "[8, 16]"
--fastv_ratio 0.7 --fastv_predefined_mask "no_rope_s=3"``; nothing copied):

* Stages at layers 8 and 16 of LLaVA-1.5-7B's 32 (``prune_layers="auto"``: the fractions 1/4 and 1/2 of the
  depth, ``floor(L*f + 0.5)``). Survivors keep their ORIGINAL positions (their ``position_ids[:, keep]``),
  ``positions="gap"``.
* Criterion: before layer ``K-1`` runs, that layer's own ``input_layernorm``, ``q_proj`` and ``k_proj`` on its
  input, WITHOUT RoPE; the last token's scores over the image keys only, soft-maxed over them, heads averaged
  (``score_at="own-K-1"``, ``qk_rope=false``, ``qk_softmax="visual"``: ``Needs.query_key_attention``).
* Stage 1 keeps ``topk(int(0.3 N))`` UNION the uniform grid ``grid[::3, ::3]`` (``fastv_ratio`` 0.7 is the
  reduction: keep ``1 - 0.7``); stage 2 keeps ``topk(int(0.09 M))`` of the ``M`` tokens stage 1 kept (their
  ``len(image_indices)`` is reset to the survivors; ``budget_base="present"``), uniform tokens not protected.

Budget: with ``stage_ratio`` (the default, 0.3) the authors' schedule. With ``keep_ratio``/``keep_tokens``
instead, as PyramidDrop: the stage ratio is solved so that ``N r`` and ``N r^2`` tokens after the two stages
average ``keep_ratio * N`` visual tokens per decoder layer; the grid added at stage 1 (``ceil(h/3) ceil(w/3)``
per grid block, 64 of LLaVA-1.5's 576) and stage 2's count from the survivors make the run keep somewhat more
than that (``PruneRecord.kv_lengths`` has the real per-layer counts).
"""

from __future__ import annotations

from lmms_prune.methods.base import Param, Preset, Selector, sel

PARAMS = (
    Param("uniform_stride", 3, "topk_uniform (feather): the first stage also keeps every uniform_stride-th row and "
          "column of each grid block, grid[::s, ::s] (FEATHER's code: 3)", kind="int", low=1),
)


class TopKUniform(Selector):
    """Top-k UNION the strided grid at the first stage, plain top-k at later ones (FEATHER)."""

    name = "topk_uniform"
    params = ("uniform_stride",)
    subsets = True
    layer_fractions = (0.25, 0.5)  # FEATHER's layers 8 and 16 of 32

    def __call__(self, image, scores, n):
        if image.present is not None:  # a later stage: the uniform tokens are not protected (authors' code)
            return sel.topk(scores, n)
        grid = sel.strided_grid(image.span.grids, self.config.uniform_stride, device=scores.device)
        return sel.topk_union(scores, n, grid)


SELECTORS = (TopKUniform,)
PRESETS = (
    Preset("feather", "FEATHER as released: at layers 8 and 16 of 32 (auto: scaled to the depth) rank the visual "
           "tokens by layer K-1's own unrotated query/key (no RoPE), the last token soft-maxed over the image "
           "keys; keep top int(0.3 N) UNION grid[::3, ::3], then top int(0.09 M) of the M kept; original "
           "positions; keep_ratio instead = average visual tokens per layer",
           dict(stage="llm", selector="topk_uniform", score="attention", prune_layers="auto", stage_ratio=0.3,
                keep_ratio=None, score_at="own-K-1", qk_rope=False, qk_softmax="visual", budget_rounding="int",
                budget_base="present", positions="gap", uniform_stride=3)),
)
