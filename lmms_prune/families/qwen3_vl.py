"""Qwen3-VL (transformers-native ``Qwen3VLForConditionalGeneration``): Qwen2.5-VL's layout plus DeepStack.

Token layout (methods.md section 1): one ``(h / (patch * merge)) x (w / (patch * merge))`` grid of merged tokens
per image (patch 16, merge 2: 32 px per token, read from the vision config), 3-D M-RoPE positions (interleaved
over the rotary frequencies; the positions themselves are Qwen2.5-VL's), image spans from ``image_grid_thw``
or the M-RoPE positions, pre-LLM hand-over through ``mm_encoder_outputs``: all inherited from
:class:`~lmms_prune.families.qwen2_5_vl.Qwen25VL`.

DeepStack: the vision tower also projects the hidden states of its layers ``deepstack_visual_indexes``
(8, 16, 24 of 27 in the 8B) with their own mergers; the language model adds the ``i``-th of them to the OUTPUT
of decoder layer ``i`` at the visual positions (``Qwen3VLTextModel._deepstack_process``, layers
``0 .. len(deepstack_visual_indexes) - 1``). Pruning at ``K`` below the last such layer: the model applies the
additions of layers ``< K`` itself (full length); the engine takes those of layers ``>= K`` out of the
language model's call (:meth:`Qwen3VL.take_injections`) and adds them to the kept visual tokens only
(``PruneHandle._install_injections``), which equals mask mode. Pre-LLM methods gather the DeepStack features
at the kept tokens along with the main features (:meth:`Qwen3VL.keep_encoder_extras`).

``--model_args``: ``min_pixels`` / ``max_pixels`` as lmms-eval's own ``qwen3_vl`` wrapper (the processor's pixel
budget). Grounding answers: ``{"bbox_2d": [x1, y1, x2, y2]}`` on a 0-1000 grid relative to the image (Qwen's
Qwen3-VL cookbooks; Qwen2.5-VL answered in pixels of the resized image): ``box_convention = "grid1000"``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lmms_prune.efficiency import EncoderDims, encoder_flops
from lmms_prune.families.base import IMAGE_TOKEN, ImageSpan, bench_text_config, join_frames
from lmms_prune.families.qwen2_5_vl import Qwen25VL


class Qwen3VL(Qwen25VL):
    """Qwen3-VL: one (h/32, w/32) grid per image; DeepStack additions to the first decoder layers."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    video_structure_inside = "its processor puts a timestamp before each merged frame of a video"
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    default_pretrained = "Qwen/Qwen3-VL-8B-Instruct"
    box_convention = "grid1000"
    config_class = "Qwen3VLConfig"
    token_pixels = 32
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        # Qwen3-VL-8B-Instruct: 36 layers, width 4096, 32 query / 8 key-value heads of 128, FFN 12288.
        "qwen3_vl-8b": {"text": (36, 4096, 32, 8, 12288, "qwen3")},
    }

    @classmethod
    def bench_vision(cls, text_hidden: int) -> dict[str, Any]:
        """Qwen3-VL-8B's vision tower (27 blocks of width 1152, patch 16, DeepStack at 8, 16, 24)."""
        return {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                "deepstack_visual_indexes": [8, 16, 24], "out_hidden_size": text_hidden}

    @classmethod
    def build_geometry(cls, spec, layers=None):
        import transformers as tf

        depth, hidden, heads, kv, ffn, _ = spec["text"]
        text = bench_text_config(layers or depth, hidden, heads, kv, ffn, "qwen3")
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}
        config = tf.Qwen3VLConfig(
            vision_config=cls.bench_vision(hidden), text_config=text, image_token_id=IMAGE_TOKEN,
            video_token_id=IMAGE_TOKEN + 1, vision_start_token_id=IMAGE_TOKEN + 2,
            vision_end_token_id=IMAGE_TOKEN + 3)
        return tf.Qwen3VLForConditionalGeneration, config

    # ---- adapter
    @classmethod
    def vision_encoder(cls, vc, patch_dim):
        """GELU-MLP blocks (no SwiGLU), merged to ``out_hidden_size``."""
        return (EncoderDims(int(vc.hidden_size), int(vc.intermediate_size), int(vc.depth), patch_dim, 2),
                int(vc.out_hidden_size))

    @classmethod
    def mergers(cls, vc):
        return 1 + len(vc.deepstack_visual_indexes)

    @classmethod
    def tower_flops(cls, vc, dims, frames):
        """Every block attends over the whole frame (no windows)."""
        return encoder_flops(dims, sum(h * w for h, w in frames), [h * w for h, w in frames])

    def video_thw(self, forward_kwargs):
        """One row per merged frame (``t = 1``), as ``Qwen3VLModel.get_rope_index`` splits the videos: the
        processor writes each merged frame as its own run of video tokens after its timestamp text
        (``<0.5 seconds><|vision_start|>...<|vision_end|>``)."""
        thw = super().video_thw(forward_kwargs)
        if thw is None:
            return None
        frames = torch.repeat_interleave(thw, thw[:, 0].long(), dim=0).clone()
        frames[:, 0] = 1
        return frames

    def spans(self, input_ids, forward_kwargs):
        """As Qwen2.5-VL, then each video's per-frame runs joined into ONE span: the timestamp text between
        them is structural (kept, never scored, not in the budget), the grids one per merged frame."""
        per_run = super().spans(input_ids, forward_kwargs)
        if not any(s.video for spans in per_run for s in spans):
            return per_run
        thw = super().video_thw(forward_kwargs)
        if thw is None:
            raise ValueError(f"{self.name}: video_grid_thw is needed to group the per-frame runs of video tokens "
                             "into videos")
        totals = iter(int(t) for t in thw[:, 0])
        out: list[list[ImageSpan]] = []
        for spans in per_run:
            joined: list[ImageSpan] = []
            pending: list[ImageSpan] = []
            for span in spans:
                if not span.video:
                    joined.append(span)
                    continue
                pending.append(span)
                if len(pending) == 1:
                    total = next(totals, None)
                    if total is None:
                        raise ValueError(f"{self.name}: more runs of video tokens than video_grid_thw's frames")
                if len(pending) == total:
                    joined.append(join_frames(pending))
                    pending = []
            if pending:
                raise ValueError(f"{self.name}: a video's {len(pending)} frame runs do not match video_grid_thw")
            out.append(joined)
        return out

    def encoder_rows(self, span):
        """Video spans: the timestamp text between frames has no encoder row."""
        rows = torch.full((span.length,), -1, dtype=torch.long)
        rows[span.visual_index] = torch.arange(span.num_visual)
        return rows if span.video else torch.arange(span.length)

    def injected_layers(self) -> int:
        return len(self.vision_config.deepstack_visual_indexes)

    def take_injections(self, lm_kwargs, first):
        embeds = lm_kwargs.get("deepstack_visual_embeds")
        positions = lm_kwargs.get("visual_pos_masks")
        if embeds is None or positions is None or first >= len(embeds):
            return {}
        lm_kwargs["deepstack_visual_embeds"] = list(embeds[:first])
        return {i: (positions, embeds[i]) for i in range(first, len(embeds))}

    def keep_encoder_extras(self, encoded, rows):
        """The DeepStack features (one tuple of per-image tensors per injected layer) at the kept tokens."""
        encoded.deepstack_features = [(torch.cat(per_image, 0)[rows.to(per_image[0].device)],)
                                      for per_image in encoded.deepstack_features]
        return encoded


FAMILY = Qwen3VL
