"""FasterVLM (Zhang et al., 2024, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning"),
pre-LLM: the top ``n`` visual tokens by the vision encoder's [CLS] attention alone (methods.md section 5b;
VisPruner with ``important_ratio=1``).

Choices (authors' code read at github.com/Theia-4869/FasterVLM, commit f5d5f12037e1, ``llava/model/
llava_arch.py`` and ``multimodal_encoder/clip_encoder.py``; nothing copied): the [CLS] row of the vision feature
layer (the layer LLaVA feeds to the projector), heads averaged, over the patch tokens; top ``n``, kept in
their original order. Ties here: lower index first. Positions: as every pre-LLM method here
(``positions``, default contiguous renumbering; the authors keep LLaVA's contiguous numbering of the shorter
prompt).
"""

from __future__ import annotations

from lmms_prune.methods.base import Preset, Selector, sel


class ClsTopK(Selector):
    """The ``n`` highest vision-[CLS]-attention tokens, before the LLM."""

    name = "cls_topk"
    stages = ("pre_llm",)

    def __call__(self, image, scores, n):
        return sel.topk(scores, n)


SELECTORS = (ClsTopK,)
PRESETS = (
    Preset("fastervlm", "FasterVLM: top-n by the vision encoder's [CLS] attention alone, pre-LLM",
           dict(stage="pre_llm", selector="cls_topk", score="vision")),
)
