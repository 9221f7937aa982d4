"""VisPruner (pre-LLM): vision-encoder attention importance + similarity-based diverse tokens (methods.md 4-5).

The importance is the [CLS] row over the patches where the tower has a [CLS] token (CLIP, InternViT), else the
mean attention each patch receives over all query rows at the last full-attention vision layer (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, SigLIP); either way heads are averaged and patches summed per LLM token. The family
supplies the layer (``vision_feature_attention``) and the patch-to-token mapping (``vision_importance``).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, Score, Selector, sel

PARAMS = (
    Param("residual_order", "descending", "vispruner: order of the diverse-token candidates before duplicate "
          "removal: 'descending' importance (the authors' code) or 'original' patch order", kind="str",
          choices=("descending", "original")),
    Param("important_ratio", 0.5, "vispruner: fraction of the budget taken by vision-attention importance", low=0.0, high=1.0),
)


class VisionAttention(Score):
    """The vision encoder's attention at the feature layer per LLM token: the [CLS] row over the patches, or
    without [CLS] the mean received attention (see the module docstring)."""

    name = "vision"
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(vision_attention=True)

    def __call__(self, image):
        return image.vision_attention


class VisPruner(Selector):
    """Important tokens by vision attention, diverse tokens by duplicate removal on pre-projector features."""

    name = "vispruner"
    params = ("important_ratio", "residual_order")
    stages = ("pre_llm",)

    @classmethod
    def needs(cls, config):
        return Needs(vision_features=True)

    def __call__(self, image, scores, n):
        return sel.vispruner(scores, image.vision_features, n, important_ratio=self.config.important_ratio,
                             residual_order=self.config.residual_order)


SCORES = (VisionAttention,)
SELECTORS = (VisPruner,)
PRESETS = (
    Preset("vispruner", "VisPruner: vision-encoder attention importance + similarity-based diverse tokens, pre-LLM",
           dict(stage="pre_llm", selector="vispruner", score="vision")),
)
