"""LLaVA-OneVision (transformers-native ``llava-hf`` checkpoints): anyres_max_9, SigLIP, Qwen2 (methods.md 1).

The token layout is LLaVA-NeXT's (:mod:`lmms_prune.families.llava_next`): a 27x27 base grid (SigLIP-384/14, no
[CLS]) then the unpadded mosaic with one ``image_newline`` token ending each row, with two differences taken
from ``LlavaOnevisionModel.pack_image_features``:

* ``anyres_max_9``: when the unpadded mosaic has more than 1.1 x 9 tiles' worth of tokens it is bilinearly
  resized to ``(int(rows / r), int(cols / r))``, ``r = sqrt(rows cols / (9 x 729))``; the grid is then that
  resized mosaic (each token still covers the whole image's raster);
* in a prompt with several images (``batch_num_images > 1``) every image is the base grid alone plus one newline.

Videos (``pixel_values_videos`` ``[videos, frames, 3, H, W]``): each frame is one base image whose
``side x side`` tokens are bilinearly pooled to ``ceil(side / 2)`` a side (``apply_pooling``), frames in time
order, then ONE ``image_newline`` token after the whole video (structural): one span per video. Frames per
video: lmms-eval's ``llava_hf`` ``max_frames_num`` (default 32).

The papers using OneVision (EffiVLM-Bench, UniPruneBench) quote ratios, not counts: records carry no separate
papers' count (``visual_before_papers == visual_before``). Pre-projector features for ``vision_features`` are
repacked through the same rule (resized like the projected tokens). SigLIP has no [CLS] row: VisPruner's
importance is each patch's mean received attention at the feature layer (methods.md section 4), repacked the
same way (video frames: the model's 2x2 bilinear pooling). Grounding answers: LLaVA's
``unit_padded_square`` convention (OneVision keeps LLaVA-1.5's RefCOCO data format).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from lmms_prune.families.base import IMAGE_TOKEN, bench_text_config
from lmms_prune.families.llava_next import LlavaNext

# LLaVA-OneVision's pinpoints: every (a x 384, b x 384) for a, b in 1..6.
PINPOINTS_OV = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]


VIDEO_SIGNALS = "lmms_prune_video"  # key of video_signal_kwargs: the signals are per video frame


class LlavaOnevision(LlavaNext):
    """LLaVA-OneVision: LLaVA-NeXT's anyres layout with anyres_max_9 and a SigLIP tower without [CLS]."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    processor_class = "LlavaOnevisionProcessor"
    default_pretrained = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    also_pretrained: ClassVar[tuple[str, ...]] = ()
    has_cls = False
    papers_count = False
    image_input_keys = ("pixel_values", "image_sizes", "batch_num_images")
    # lmms-eval's llava_hf wrapper (which runs the llava-hf OneVision checkpoints): its chat_template and
    # max_frames_num (parsed by Llava.parse_model_args); here videos are supported
    model_args: ClassVar[dict[str, str]] = {
        "chat_template": "a Jinja chat template replacing the checkpoint's (default: the checkpoint's)",
        "max_frames_num": "frames sampled uniformly per video (default 32, lmms-eval's llava_hf)",
    }
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        # Qwen2-7B + SigLIP-so400m/14-384; --tokens 3645 = a 768x768 image (2x2 tiles of 729 + the base).
        "llava-onevision-7b": {"text": (28, 3584, 28, 4, 18944, "qwen2"), "pinpoints": PINPOINTS_OV},
    }

    @classmethod
    def video_sampling(cls, options):
        return {"num_frames": options["max_frames_num"], "fps": None}

    @classmethod
    def build_geometry(cls, spec, layers=None):
        import transformers as tf

        depth, hidden, heads, kv, ffn, kind = spec["text"]
        text = bench_text_config(layers or depth, hidden, heads, kv, ffn, kind)
        vision = tf.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                       num_attention_heads=16, image_size=384, patch_size=14)
        config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=tf.Qwen2Config(**text),
                                         image_token_index=IMAGE_TOKEN, video_token_index=IMAGE_TOKEN + 1,
                                         image_grid_pinpoints=spec["pinpoints"], vision_feature_layer=-1,
                                         vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
        return tf.LlavaOnevisionForConditionalGeneration, config

    # ---- adapter
    def _num_patches(self, image_sizes, batch_num_images=None):
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        vc = self.config.vision_config
        return [image_size_to_num_patches(s, self.config.image_grid_pinpoints, vc.image_size) for s in image_sizes]

    def _patched(self, kwargs):
        counts = kwargs.get("batch_num_images")
        if counts is None:
            return None
        return [int(n) == 1 for n in counts for _ in range(int(n))]

    @classmethod
    def image_structure(cls, processor, inputs):
        """Row newlines per image by the processor's own rule (``anyres_max_9`` included); an image of a group of
        several (``batch_num_images > 1``: images nested per prompt) is its base grid and one newline; no separate
        papers' count."""
        from transformers.image_processing_utils import select_best_resolution

        counts = inputs.get("batch_num_images")
        sizes = inputs["image_sizes"].tolist()
        patched = ([True] * len(sizes) if counts is None
                   else [int(n) == 1 for n in counts.tolist() for _ in range(int(n))])
        height, width = (int(x) for x in inputs["pixel_values"].shape[-2:])
        side = math.isqrt(processor.num_image_tokens)
        out = []
        for (orig_h, orig_w), tiles in zip(sizes, patched):
            if not tiles:
                out.append((1, None))
                continue
            best_h, best_w = select_best_resolution([orig_h, orig_w], processor.image_processor.image_grid_pinpoints)
            _, newlines = processor._get_unpadded_features(orig_h, orig_w, side, side, best_h // height,
                                                           best_w // width)
            out.append((int(newlines), None))
        return out

    def _pack(self, per_image, image_sizes, newline):
        packed, _ = self.model.model.pack_image_features(per_image, image_sizes, image_newline=newline,
                                                         vision_aspect_ratio=self.config.vision_aspect_ratio)
        return packed

    def encode_images(self, kwargs):
        self._encoded_kwargs = {k: kwargs.get(k) for k in ("image_sizes", "batch_num_images")}
        return self.model.model.get_image_features(pixel_values=kwargs["pixel_values"],
                                                   image_sizes=kwargs["image_sizes"],
                                                   batch_num_images=kwargs.get("batch_num_images"), return_dict=True)

    def video_frame_grid(self) -> tuple[int, int]:
        """The pooled grid of one video frame: the tower's ``side x side`` patches 2x2-pooled (bilinear, to
        ``ceil(side / 2)``, ``LlavaOnevisionModel.apply_pooling``)."""
        vc = self.config.vision_config
        side = math.ceil(vc.image_size // vc.patch_size / 2)
        return side, side

    def video_grids(self, run_length, video_index, forward_kwargs, sample=0, start=0):
        """One run of video tokens is one video: its frames' pooled grids, then one ``image_newline`` token
        (structural) after the last frame (``get_video_features``)."""
        rows, cols = self.video_frame_grid()
        frames, rest = divmod(run_length - 1, rows * cols)
        if rest or frames < 1:
            raise ValueError(f"{self.name}: a run of {run_length} video tokens is not frames of {rows}x{cols} "
                             "pooled tokens plus one newline")
        return [([(rows, cols)] * frames, (run_length - 1,))]

    def encode_videos(self, kwargs):
        cfg = self.config
        return self.model.model.get_video_features(kwargs["pixel_values_videos"],
                                                   vision_feature_layer=cfg.vision_feature_layer,
                                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                                   return_dict=True)

    def wrap_video_features(self, encoded, kept):
        """``pooler_output`` as the model reads it: ``[1, n, D]`` (flattened over its first two dims)."""
        encoded.pooler_output = kept[None]
        return encoded

    # ---- vision-side signals without [CLS] (VisPruner's importance, methods.md section 4; DivPrune-style
    # features): per tile / frame rows of the SigLIP feature layer, repacked as the projected tokens are
    def vision_importance(self, rows, kwargs):
        """Mean received attention per patch of each tile (images) or frame (videos), ``[729]`` each (the
        feature layer's attention, :meth:`vision_feature_attention`), laid out like the projected tokens: images
        through the anyres packing (:meth:`_repack`, the ``anyres_max_9`` bilinear resize included), videos
        through the 2x2 bilinear pooling plus a zero for the trailing newline (:meth:`_pool_video`)."""
        per_unit = torch.stack(list(rows))[..., None]  # [tiles or frames, P, 1]
        if kwargs.get(VIDEO_SIGNALS):
            return self._pool_video(per_unit)[:, 0]
        return self._repack(per_unit)[:, 0]

    def flatten_pre_projector(self, pre, kwargs=None):
        if kwargs is not None and kwargs.get(VIDEO_SIGNALS):
            return self._pool_video(pre)
        return self._repack(pre)

    def video_signal_kwargs(self, kwargs):
        return {VIDEO_SIGNALS: True}

    def _pool_video(self, per_frame: torch.Tensor) -> torch.Tensor:
        """``[frames, P, C]`` per-frame rows -> ``[frames * pooled + 1, C]`` in the video span's order: the model's
        own ``apply_pooling`` (bilinear to ``ceil(side / 2)`` squared), then a zero row for the newline."""
        pooled = self.model.model.apply_pooling(per_frame.float()).reshape(-1, per_frame.shape[-1])
        return torch.cat([pooled, pooled.new_zeros(1, pooled.shape[-1])]).to(per_frame.dtype)


FAMILY = LlavaOnevision
