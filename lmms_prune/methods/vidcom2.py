"""VidCom2, Video Compression Commander (Liu et al., "Video Compression Commander: Plug-and-Play Inference
Acceleration for Video Large Language Models", EMNLP 2025): each frame's budget grows with its uniqueness, then
each frame keeps its tokens least like the video's and the frame's mean, before the LLM.

Authors' code: github.com/xuyang-liu16/VidCom2 (``token_compressor/vidcom2/vidcom2.py`` and its model patches
``models/llava.py``, ``models/qwen2_5_vl.py`` at commit ``944a17d14f4848ad080a65eab2b0711a760fa154``); vLLM's
reading (``--video-retention-ratio``, ``vllm/multimodal/video_prune/vidcom2.py`` at
``0f17ee061e413bf8ab7927f926f69cdff24dc63e``). The maths is ``lmms_prune.selection.vidcom2``.

Here (also docs/fidelity.md, "vidcom2"):

- **Budget**: ``keep_ratio`` is their retention ratio ``R_RATIO`` (vLLM's ``--video-retention-ratio``):
  the per-frame budgets average it; ``keep_tokens`` k uses ``k / N``. The total is the authors' sum of rounded
  per-frame counts (``vidcom2_count=authors``, the default: their code produced the published numbers), or
  vLLM's exact count (``vidcom2_count=vllm``: ``max(T, int(N * keep_ratio))``, ``keep_tokens`` exactly).
- **Positions**: kept tokens keep their original positions (``positions='original'``), as the authors' Qwen2.5-VL
  and Qwen3-VL patches slice the M-RoPE ids and vLLM recomputes them; the authors' LLaVA-OneVision patch rebuilds
  the sequence and numbers it 0..T'-1 (``positions=contiguous`` gives that).
- **Images**: untouched (both prune videos only). **Frames**: the span's (merged) frame grids, as for ``evs``.
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("vidcom2_count", "authors", "vidcom2: the total kept per video: 'authors' (the sum of the rounded "
          "per-frame budgets, their code) or 'vllm' (vLLM's exact count, reconciled by score)", kind="str",
          choices=("authors", "vllm")),
)


class VidCom2(Selector):
    """Per-frame budgets by frame uniqueness, then each frame's most distinct tokens (VidCom2)."""

    name = "vidcom2"
    params = ("vidcom2_count",)
    videos_only = True  # the authors and vLLM prune video tokens only
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True)

    @classmethod
    def adaptive_count(cls, config):
        return config.vidcom2_count == "authors"  # the sum of rounded per-frame budgets, near but not n

    def __call__(self, image, scores, n):
        import torch  # method modules stay light to import (lmms-eval reads the preset names at start-up)

        span = image.span
        if not span.video:
            return torch.arange(span.num_visual, device=image.embeddings.device)
        ratio = self.config.keep_ratio
        retention = ratio if ratio is not None else n / span.num_visual
        exact = None if ratio is not None else n  # keep_tokens: vLLM's count is the budget itself
        return sel.vidcom2_select(image.embeddings, span.grids, retention, count=self.config.vidcom2_count, n=exact)


SELECTORS = (VidCom2,)
PRESETS = (
    Preset("vidcom2", "VidCom2 (EMNLP 2025; vLLM's --video-retention-ratio): per video, frame budgets grow with "
           "each frame's uniqueness (softmax at T=0.01), then each frame keeps its tokens least like the video's "
           "and the frame's mean (multi-scale Gaussian on the lowest-variance half of the channels), pre-LLM at "
           "original positions; images untouched",
           dict(stage="pre_llm", selector="vidcom2", positions="original")),
)
