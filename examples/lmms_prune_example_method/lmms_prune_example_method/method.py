"""``gridtopk``: FastV's attention score, kept per grid (tile or video frame) in proportion to its size.

FastV keeps the ``n`` highest attention scores of a whole image, so a tile or a video frame that draws little
attention can lose every token. ``gridtopk`` first splits the budget ``n`` over the image's grids in proportion
to their token counts (largest remainder: ``lmms_prune.api.sel.block_quotas``), then keeps each grid's
highest-scoring tokens. A video is one span with one grid per (merged) frame, so every frame keeps its share.

This module is the worked example of docs/extending.md ("Write your own method"): it uses only
:mod:`lmms_prune.api`, imports nothing heavy at module level, and is registered by this folder's
``pyproject.toml`` (entry point ``lmms_prune.methods``) or by ``LMMS_PRUNE_METHODS=<path of this file>``.
"""

from __future__ import annotations

from lmms_prune.api import Needs, Param, Preset, Score, Selector, sel

PARAMS = (
    Param("grid_floor", 0, "gridtopk: tokens every grid keeps at least (taken from the budget before the "
          "proportional split; capped so that the floors fit in it)", kind="int", low=0),
)


class LastTokenAttention(Score):
    """The last prompt token's attention row at ``score_layer`` (default ``prune_layer - 1``): ``[N]``."""

    name = "gridtopk_attention"
    params = ("score_layer",)
    subsets = True

    @classmethod
    def needs(cls, config):
        return Needs(attention=(config.effective_score_layer,))

    def __call__(self, image):
        return image.attention[self.config.effective_score_layer]


class GridTopK(Selector):
    """Per-grid top-k: grid ``g`` of ``r_g x c_g`` tokens keeps ``floor + q_g`` of its highest scores, the
    quotas ``q_g`` splitting the rest of the budget in proportion to the grids' sizes. Returns ``[n]`` ascending
    indices within the image (its grids are consecutive blocks of its visual tokens, in order)."""

    name = "gridtopk"
    params = ("grid_floor",)

    def __call__(self, image, scores, n):
        import torch

        grids = image.span.grids
        sizes = [r * c for r, c in grids]
        floor = min(self.config.grid_floor, n // len(grids), *sizes)
        rest = [s - floor for s in sizes]
        spare = n - floor * len(grids)
        quotas = [floor] * len(grids)
        if spare > 0:  # the proportional split of what the floors leave, over what each grid has left
            fill = sel.block_quotas([(1, r) for r in rest if r > 0], spare)
            it = iter(fill)
            quotas = [q + (next(it) if r > 0 else 0) for q, r in zip(quotas, rest)]
        kept, start = [], 0
        for size, quota in zip(sizes, quotas):
            if quota:
                kept.append(start + sel.topk(scores[start:start + size], quota))
            start += size
        return torch.cat(kept)


SCORES = (LastTokenAttention,)
SELECTORS = (GridTopK,)
PRESETS = (
    Preset("gridtopk", "gridtopk: FastV's attention at layer K-1, top-k per grid (tile, video frame) in "
           "proportion to its size (K=2)", dict(stage="llm", score="gridtopk_attention", selector="gridtopk",
                                                prune_layer=2)),
)
