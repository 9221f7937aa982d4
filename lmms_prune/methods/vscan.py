"""VScan (Zhang et al., 2025, "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language
Models", arXiv 2505.22654, Tencent): a pre-LLM stage (global and local scans of the vision tower's attention,
the other tokens merged into the kept ones) followed by pruning at a middle LLM layer, text-guided.

Read in the authors' code (github.com/Tencent/SelfEvolvingAgent, commit a82450e1b5e1, folder ``VScan``; nothing
copied; docs/fidelity.md lists the files and every difference):

* Pre-LLM stage (selector ``vscan``, :func:`lmms_prune.selection.vscan.vscan_select` and
  :func:`~lmms_prune.selection.vscan.nearest_merge`): ``n = keep_ratio * N`` tokens kept, ``n // 2`` by the local
  scan (the early vision layer's attention, ``Needs.vision_attention_early``: LLaVA's [CLS] row at layer 5 of 24,
  Qwen2.5-VL's mean received attention at its first full-attention block; at most ``ceil((n // 2) / W)`` per
  window of side ``vscan_window``), the rest by the global scan (the feature layer's, the ``vision`` score) among
  the others; every other token merged into its most similar kept token (cosine of the projected embeddings),
  each kept token becoming the mean of itself and its group, at its own place in the prompt.
* LLM stage (``llm_selector=topk``, ``llm_score=attention``, the engine's composition,
  :mod:`lmms_prune.engine.compose`): at decoder layer ``prune_layers='auto'`` = ``L/2`` (LLaVA-1.5-7B: 16 of
  32; Qwen2.5-VL-7B: 14 of 28), ranked by that layer's own query/key (``score_at='K'``: input norm, projections,
  RoPE) for the last prompt token, soft-maxed over the whole row, heads averaged; keeps ``int(M * stage_ratio)``
  of the ``M`` tokens present (``budget_base='present'``, ``budget_rounding='int'``).
* Defaults: the Qwen2.5-VL scripts' ``image_token_ratio 0.167`` then ``[0.333]`` (LLaVA-1.5: 96 then 32 of 576,
  the same 1/6 and 1/3): about 11% of the visual tokens per layer on average. ``positions='contiguous'`` and
  ``qk_rope=true`` are the LLaVA code's; the Qwen code keeps each token's M-RoPE position and ranks with the
  unrotated projections: ``positions=original,qk_rope=false``.
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("vscan_window", None, "vscan: the side (in LLM tokens) of the local scan's windows; default: 6 on a 24 x 24 "
          "grid (VScan's LLaVA code: 16 windows), else 4 (its Qwen2.5-VL code, on the merged-token grid)", kind="int",
          low=1, optional=True),
)

LLAVA_SIDE, LLAVA_WINDOW, WINDOW = 24, 6, 4


def window_side(grids: list[tuple[int, int]], given: int | None) -> int:
    """The local scan's window side: ``given``, else the authors' per model (6 on LLaVA's 24 x 24 grid, else 4)."""
    if given is not None:
        return given
    return LLAVA_WINDOW if all(g == (LLAVA_SIDE, LLAVA_SIDE) for g in grids) else WINDOW


class VScan(Selector):
    """Global + local scans of the vision tower's attention, the other tokens merged into the kept ones in place."""

    merges = True
    merges_in_place = True

    name = "vscan"
    params = ("vscan_window",)
    stages = ("pre_llm",)
    layer_fractions = (0.5,)  # its LLM stage: the middle layer (16 of 32, 14 of 28)
    description = "VScan's pre-LLM stage: global + local (windowed) scans, the rest merged into the kept tokens"

    @classmethod
    def needs(cls, config):
        return Needs(vision_attention=True, vision_attention_early=True, embeddings=True)

    def __call__(self, image, scores, n):
        grids = image.span.grids
        kept = sel.vscan_select(image.vision_attention_early, scores, grids, n,
                                window_side(grids, self.config.vscan_window))
        return sel.nearest_merge(image.embeddings, kept)


SELECTORS = (VScan,)
PRESETS = (
    Preset("vscan", "VScan: keep_ratio of the tokens by global + local scans of vision attention, the rest merged "
           "into them (pre-LLM), then stage_ratio of those by the last prompt token's attention at the middle LLM "
           "layer", dict(stage="pre_llm", selector="vscan", score="vision", keep_ratio=0.167, llm_selector="topk",
                         llm_score="attention", prune_layers="auto", stage_ratio=0.333, score_at="K",
                         budget_rounding="int", budget_base="present", positions="contiguous")),
)
