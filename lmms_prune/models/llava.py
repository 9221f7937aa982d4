"""LLaVA-1.5 (transformers-native ``llava-hf`` checkpoints) for lmms-eval: ``--model llava_prune`` or
``llava_<preset>``. Each image is resized and centre-cropped to 336 px: 576 visual tokens (a 24x24 grid)."""

from __future__ import annotations

from lmms_prune.models.base import PrunedChatModel, preset_classes


class LlavaPrune(PrunedChatModel):
    """LLaVA-1.5 with visual-token pruning (method chosen with ``method=``)."""

    family = "llava"
    model_types = ("llava",)
    default_pretrained = "llava-hf/llava-1.5-7b-hf"


globals().update(preset_classes(LlavaPrune))
