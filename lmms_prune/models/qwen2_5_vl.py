"""Qwen2.5-VL (transformers-native) for lmms-eval: ``--model qwen2_5_vl_prune`` or ``qwen2_5_vl_<preset>``.

Images are resized by the processor's smart resize to multiples of 28 px within its pixel budget; ``min_pixels``
and ``max_pixels`` override the budget (lmms-eval's own Qwen2.5-VL wrapper uses ``max_pixels=1605632``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_prune.models.base import PrunedChatModel, _int_arg, preset_classes


class Qwen25VLPrune(PrunedChatModel):
    """Qwen2.5-VL with visual-token pruning (method chosen with ``method=``)."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    default_pretrained = "Qwen/Qwen2.5-VL-7B-Instruct"
    family_args: ClassVar[dict[str, str]] = {
        "min_pixels": "lower bound of an image's resized area in pixels (default: the processor's)",
        "max_pixels": "upper bound of an image's resized area in pixels (default: the processor's)",
    }

    @classmethod
    def parse_family_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name in ("min_pixels", "max_pixels"):
            value = args.pop(name, None)
            if value is not None and str(value).lower() not in ("", "none"):
                out[name] = _int_arg(name, value, 28 * 28)
        if out.get("min_pixels", 0) > out.get("max_pixels", float("inf")):
            raise ValueError(f"min_pixels={out['min_pixels']} > max_pixels={out['max_pixels']}: swap them")
        return out

    def processor_kwargs(self) -> dict[str, Any]:
        return dict(self.options.family)

globals().update(preset_classes(Qwen25VLPrune))
