"""EVS, Efficient Video Sampling (vLLM's video pruning): drop the video tokens that change least from the same
cell of the previous frame, before the LLM.

vLLM (github.com/vllm-project/vllm, ``vllm/multimodal/evs.py`` at commit
``094f117823287790739d3022162a3f30f13d758b``; called on each video's projected embeddings by its Qwen2.5-VL,
Qwen3-VL and other video models when served with ``--video-pruning-rate q``): dissimilarity ``1 - cos`` with the
previous frame's same cell, the first frame kept whole, the most dissimilar tokens kept. The maths is
``lmms_prune.selection.evs``.

Here (also docs/fidelity.md, "evs"):

- **Budget**: ``keep_ratio`` plays vLLM's ``1 - q``: a video keeps ``max(cells, int(N * keep_ratio))`` tokens
  (vLLM's floor, where the other methods here round; never less than one frame, as vLLM); ``keep_tokens`` k
  keeps ``max(cells, k)``.
- **Positions**: kept tokens keep their original positions (``positions='original'``; Qwen's M-RoPE
  ``(t, h, w)`` of the unpruned video), as vLLM recomputes them for the kept tokens; vLLM then numbers the text
  after the video from the video's start plus its grid width, the unpruned model (and we) from its largest
  position plus one (the same when the width is the largest of ``t, h, w``).
- **Images**: vLLM prunes videos only; an image span keeps every token (no previous frame to differ from).
- **Frames** are the span's (merged) frame grids: Qwen2.5-VL's two input frames per grid (vLLM's ``T`` of
  ``video_grid_thw``), one pooled grid per frame on LLaVA-OneVision, one 448 px tile per frame on InternVL.
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Preset, Selector, sel


class EVS(Selector):
    """The first frame whole, then the tokens most unlike the same cell of their previous frame (vLLM's EVS)."""

    name = "evs"
    videos_only = True  # vLLM prunes video embeddings only
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True)

    def __call__(self, image, scores, n):
        import torch  # method modules stay light to import (lmms-eval reads the preset names at start-up)

        span = image.span
        if not span.video:
            return torch.arange(span.num_visual, device=image.embeddings.device)
        if self.config.keep_ratio is not None:  # vLLM's int(N * (1 - q)), not the engine's rounded budget
            n = max(1, int(span.num_visual * self.config.keep_ratio))
        return sel.evs_select(image.embeddings, span.grids, n)


SELECTORS = (EVS,)
PRESETS = (
    Preset("evs", "EVS (vLLM's Efficient Video Sampling): per video, the first frame whole, then the tokens most "
           "unlike the same cell of the previous frame (1 - cosine of the projected embeddings), pre-LLM at "
           "original positions; images untouched",
           dict(stage="pre_llm", selector="evs", positions="original")),
)
