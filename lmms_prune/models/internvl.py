"""InternVL2.5 / InternVL3 (transformers-native ``-hf`` checkpoints, Llama or Qwen2 text model) for lmms-eval.

``--model internvl_prune --model_args method=...`` or ``--model internvl_<preset>``. Images are cut into at most
``max_num`` 448 px tiles plus a thumbnail (InternVL's dynamic preprocessing; 6 is its grounding protocol,
methods.md section 6), passed to the processor as ``max_patches``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_prune.models.base import PrunedChatModel, _int_arg, preset_classes


class InternVLPrune(PrunedChatModel):
    """InternVL with visual-token pruning (method chosen with ``method=``)."""

    family = "internvl"
    model_types = ("internvl",)
    default_pretrained = "OpenGVLab/InternVL2_5-8B-MPO-hf"
    family_args: ClassVar[dict[str, str]] = {"max_num": "maximum number of 448 px tiles per image (default 6)"}

    @classmethod
    def parse_family_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        return {"max_num": _int_arg("max_num", args.pop("max_num", 6), 1)}

    def processor_kwargs(self) -> dict[str, Any]:
        # Explicit, so a checkpoint whose saved image-processor config turns tiling off still follows InternVL's
        # dynamic preprocessing (1..max_num tiles + thumbnail).
        return {"crop_to_patches": True, "min_patches": 1, "max_patches": self.options.family["max_num"]}


globals().update(preset_classes(InternVLPrune))
