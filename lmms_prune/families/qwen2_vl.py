"""Qwen2-VL (transformers-native ``Qwen2VLForConditionalGeneration``): as Qwen2.5-VL, one ``(h/28) x (w/28)``
grid of merged tokens per image with 3-D M-RoPE, but a vision tower of full attention only (no windows) and
its own vision config (``embed_dim`` wide, ``hidden_size`` = the LM width after the merger).

Everything else (spans from ``image_grid_thw`` or M-RoPE positions, pre-LLM hand-over, the ``min_pixels`` /
``max_pixels`` arguments) is Qwen2.5-VL's; the pixel defaults are those of lmms-eval's ``qwen2_vl`` wrapper
(3136..602112).

Grounding answers (``box_convention = "grid1000"``): unlike Qwen2.5-VL, Qwen2-VL answers
``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` normalised to a 0-1000 grid of the image (the Qwen2-VL report;
decoded text keeps ``(x1,y1),(x2,y2)``), prompted with ``<|object_ref_start|>{expression}<|object_ref_end|>``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_prune.efficiency import EncoderDims, encoder_flops
from lmms_prune.families.qwen2_5_vl import Qwen25VL


class Qwen2VL(Qwen25VL):
    """Qwen2-VL: one (h/28, w/28) grid per image."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    default_pretrained = "Qwen/Qwen2-VL-7B-Instruct"
    config_class = "Qwen2VLConfig"
    box_convention = "grid1000"
    lmms_eval_pixels = (3136, 602112)  # lmms-eval's qwen2_vl wrapper: min_pixels, max_pixels
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        "qwen2_vl-7b": {"text": (28, 3584, 28, 4, 18944, "qwen2")},
    }

    @classmethod
    def bench_vision(cls, text_hidden: int) -> dict[str, Any]:
        """Qwen2-VL-7B's vision tower (675M, 32 full-attention blocks) for an LM of width ``text_hidden``."""
        return {"depth": 32, "embed_dim": 1280, "hidden_size": text_hidden, "mlp_ratio": 4, "num_heads": 16,
                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}

    @classmethod
    def vision_encoder(cls, vc, patch_dim):
        """``embed_dim`` wide, a GELU MLP of ``mlp_ratio`` times that, merged to ``hidden_size`` (the LM's)."""
        width = int(vc.embed_dim)
        return EncoderDims(width, int(width * vc.mlp_ratio), int(vc.depth), patch_dim, 2), int(vc.hidden_size)

    @classmethod
    def tower_flops(cls, vc, dims, frames):
        """Every block attends over the whole frame (no windows)."""
        return encoder_flops(dims, sum(h * w for h, w in frames), [h * w for h, w in frames])


FAMILY = Qwen2VL
