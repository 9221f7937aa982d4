"""Downsampling (VTC-Bench's baseline: Liao et al., 2025, "Are We Using the Right Benchmark: An Evaluation
Framework for Visual Token Compression Methods", arXiv 2510.07143): shrink each image so the vision tower
yields about ``keep_ratio`` of its visual tokens; nothing is pruned.

A processor-level method: the runner asks the model's family how a smaller input maps to fewer tokens
(:meth:`lmms_prune.families.base.Family.budget_images`), and the family refuses with the reason, before any
weights load, where it cannot (:meth:`~lmms_prune.families.base.Family.check_input_budget`):

* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the image, at the size the processor would give it, is resized (bicubic)
  by ``sqrt(keep_ratio)`` per side to multiples of the merged-token side, and ``min_pixels`` lowered so the
  processor keeps it (VTC-Bench: integer side factors 1-10 on the raw image, Qwen2-VL only);
* InternVL: the number of 448 px tiles (``max_patches`` per image, the closest tile count to the budget);
  refused with ``crop_to_patches`` not true (one tile whatever the size) and below the fewest tiles' share;
* LLaVA-1.5: refused (a fixed 336 px input: a smaller image is enlarged back to 576 tokens);
* LLaVA-NeXT / LLaVA-OneVision: refused (the anyres grid moves in whole tiles, never below base + 1 tile).

The budget is ``keep_ratio`` only (a fraction of each image's own tokens); ``keep_tokens`` is refused. Outside
the runner (``lmms_prune.apply`` on a model) it prunes nothing: the image is shrunk before the processor.
Efficiency records count the tokens the shrunken images gave (``visual_before == visual_after``).
"""

from __future__ import annotations

from lmms_prune.methods.base import Param, Preset

PARAMS = (
    Param("input_budget", False, "processor-level budget (the downsample preset): shrink each image so the vision "
          "tower yields about keep_ratio of its visual tokens; nothing is pruned", kind="bool"),
)

PRESETS = (
    Preset("downsample", "Downsampling (VTC-Bench's baseline): each image shrunk so the vision tower yields about "
           "keep_ratio of its tokens (Qwen: pixels; InternVL: tiles); no pruning",
           dict(stage="none", input_budget=True)),
)
