"""DivPrune (pre-LLM): max-min diversity of the projected visual embeddings (methods.md section 5)."""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Preset, Selector, sel


class DivPrune(Selector):
    """Greedy max-min diversity on ``1 - cosine`` of the projected embeddings."""

    name = "divprune"
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(embeddings=True)

    def __call__(self, image, scores, n):
        return sel.divprune(image.embeddings, n)


SELECTORS = (DivPrune,)
PRESETS = (
    Preset("divprune", "DivPrune: max-min diversity of the projected visual embeddings, pre-LLM",
           dict(stage="pre_llm", selector="divprune")),
)
