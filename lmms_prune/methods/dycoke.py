"""DyCoke (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models", CVPR 2025):
stage 1, token temporal merging (TTM), before the LLM: of each video, frames ``4j`` stay whole, every odd frame
keeps the ``int((1 - K) T)`` tokens least like the same cell of the frame before it, and every frame ``4j + 2``
(but the last such) those least like frame ``4j``; stage 2 at decode (below). Images are untouched (DyCoke is a
video method).

Maths: :func:`lmms_prune.selection.ttm_select` and :func:`lmms_prune.selection.dycoke_decode_keep` (authors'
code github.com/KD-TAO/DyCoke at commit ``dd7463498203479d0ff6f2d29c4e72928c0af244``,
``llava/model/llava_arch.py``: ``dycole_ttm``; ``llava/model/language_model/modeling_qwen2.py``:
``dycoke_pruning``, ``update_cache``; nothing copied).

Here (also docs/fidelity.md, "dycoke"):

- **Budget**: DyCoke's own: ``dycoke_k`` (its merging ratio ``K``, 0.7 in the authors' lmms-eval wrapper) sets
  how many tokens a pruned frame keeps; ``keep_ratio`` is not read (the count is the method's, reported as
  such by ``check-method``). On ``F = 32`` frames 9 stay whole and 23 are pruned: about ``(9 + 23 (1 - K)) / 32``
  of the tokens stay (0.49 at ``K = 0.7``).
- **Features**: the projected video embeddings of each (merged) frame grid (the authors': LLaVA-OneVision's
  projected, 2x2-pooled frame features). Frames are the span's grids: Qwen2.5-VL's two input frames per grid,
  one pooled grid per frame on LLaVA-OneVision, one 448 px tile per frame on InternVL.
- **Positions**: the short prompt is renumbered (``positions='contiguous'``) as the authors' LLaVA-OneVision
  sees its shortened sequence; ``positions='original'`` keeps Qwen's M-RoPE positions of the kept tokens.
- **Stage 2**, DyCoke's dynamic KV-cache pruning at decode (``dycoke_l`` L = 3, ``dycoke_p`` P = 0.8, the
  authors'): at each decode step, layer ``L - 1``'s attention row of the current token over the video's ``N``
  tokens (heads averaged) is compared with the previous step's; where the cosine is below 0.9 (and at the first
  step) layers ``>= L`` attend to the ``int(N (1 - P))`` most attended video entries only (and every other
  entry), else to the whole cache. The cache is never shrunk: entries dropped at one step can come back. The
  engine's decode-time selection (:mod:`lmms_prune.engine.decode`) runs it; ``dycoke_l=none`` turns it off.
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Selector, sel

PARAMS = (
    Param("dycoke_k", 0.7, "dycoke: DyCoke's merging ratio K: each pruned frame keeps int((1 - K) * T) of its T "
          "tokens, those least like the same cell of its reference frame (the authors' lmms-eval default 0.7)",
          low=0.0, high=1.0),
    Param("dycoke_l", 3, "dycoke: stage 2 (decode-time KV pruning): at each decode step, layer L-1's attention of "
          "the current token picks the video KV entries layers >= L attend to (the authors' 3); none: stage 1 only",
          kind="int", low=1, optional=True),
    Param("dycoke_p", 0.8, "dycoke: stage 2 keeps int(N * (1 - P)) of the video's N KV entries at a step whose "
          "attention moved (cosine < 0.9 with the previous step's); the authors' 0.8", low=0.0, high=1.0),
)


class DyCokeTTM(Selector):
    """DyCoke's token temporal merging: pruned frames keep their tokens least like their reference frame's."""

    name = "dycoke_ttm"
    params = ("dycoke_k", "dycoke_l", "dycoke_p")
    stages = ("pre_llm",)
    videos_only = True  # DyCoke compresses videos; an image keeps every token
    reads_budget = False  # DyCoke's K and the frame count set the count; keep_ratio is never read

    @classmethod
    def adaptive_count(cls, config):
        return True  # DyCoke's K and the frame count, not keep_ratio, set the count

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True)

    @classmethod
    def decode_layer(cls, config):
        return config.dycoke_l

    def decode_keep(self, span, row, previous):
        if not span.video:  # DyCoke's stage 2 prunes the video's entries only
            return None
        return sel.dycoke_decode_keep(row, previous, self.config.dycoke_p)

    def __call__(self, image, scores, n):
        import torch  # method modules stay light to import (lmms-eval reads the preset names at start-up)

        span = image.span
        if not span.video:
            return torch.arange(span.num_visual, device=image.embeddings.device)
        return sel.ttm_select(image.embeddings, span.grids, self.config.dycoke_k)


SELECTORS = (DyCokeTTM,)
PRESETS = (
    Preset("dycoke", "DyCoke's stage 1 (token temporal merging), pre-LLM: per video, frames 4j whole, the others "
           "keep the int((1 - dycoke_k) T) tokens least like the same cell of their reference frame; images "
           "untouched; then stage 2 at decode: layers >= dycoke_l attend to the int(N (1 - dycoke_p)) video entries "
           "most attended by the current token at layer dycoke_l - 1 when its attention moved",
           dict(stage="pre_llm", selector="dycoke_ttm")),
)
