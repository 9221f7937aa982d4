"""Temporal: drop video tokens that repeat the same cell of the previous frame, then top-k by importance.

Follows FrameFusion (Fu et al., "FrameFusion: Combining Similarity and Importance for Video Token Reduction
on Large Vision Language Models", ICCV 2025; authors' code github.com/thu-nics/FrameFusion, read for its
choices): a token whose cosine similarity with the token of the same cell (patch) in the previous frame is at
least ``S_th`` (``temporal_threshold``, their default ``similarity_lower_bound=0.6``) is redundant; redundant
tokens go first, then importance (FastV's attention of the last prompt token) prunes the rest to the budget.
When more tokens pass the threshold than the budget removes, only the most similar go (their cap on merging,
``topk(similarity, sparsity * N)``). The maths is ``lmms_prune.selection.temporal``.

Where it differs from FrameFusion (also in docs/fidelity.md):

- **Pruned, not merged**: FrameFusion averages each run of similar tokens into the run's first token; here
  the redundant tokens are dropped and the kept ones are unchanged, so the result equals mask mode (the
  engine's equivalence) and structural tokens (LLaVA-OneVision's newline) need no special case.
- **One layer**: FrameFusion merges at the input of several early layers, until fewer than
  ``ratio_lower_bound`` tokens merge, and then prunes once with the attention of the layer after. Here
  similarity (hidden states at layer K's input) and importance (attention of layer K-1) come from the same
  pass and tokens are removed once, at ``prune_layer`` K (default 2, FastV's layer).
- **Importance rows**: FrameFusion averages the last ``num`` query rows (1 in its Qwen2 and InternLM2 models, 4
  in its Qwen2-VL model); the preset uses the last row on every family, ``query_rows=4`` gives their Qwen2-VL
  choice.
- **Budget**: a keep ratio of the video's visual tokens (``keep_ratio``/``keep_tokens``), as every method here,
  instead of their FLOPs ``cost`` over all layers.
- Frames are the (merged) frame grids of the span (Qwen2.5-VL: two input frames per grid, FrameFusion's own
  unit there too).

On an image (a span with ``video=False``) no token has a previous frame: nothing is redundant and the
selection is FastV's top-k of the same score (documented fallback, so a prompt with images and a video runs
one method over both).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("temporal_threshold", 0.6, "temporal: cosine similarity with the same cell of the previous frame at or "
          "above which a video token is redundant (FrameFusion's S_th)", low=-1.0, high=1.0),
)


class Temporal(Selector):
    """Temporally redundant tokens first (same cell, previous frame, cosine >= threshold), then top-k."""

    name = "temporal"
    params = ("temporal_threshold",)

    @classmethod
    def needs(cls, config):
        return Needs(hidden=True)

    def __call__(self, image, scores, n):
        if not image.span.video:
            return sel.topk(scores, n)
        return sel.temporal_select(scores, image.hidden.to(scores.device), image.span.grids, n,
                                   threshold=self.config.temporal_threshold)


SELECTORS = (Temporal,)
PRESETS = (
    Preset("temporal", "FrameFusion-style temporal pruning: video tokens repeating the previous frame's cell "
           "(cosine >= temporal_threshold) go first, then top-k of the last prompt token's attention (K=2)",
           dict(stage="llm", selector="temporal", score="attention", prune_layer=2)),
)
