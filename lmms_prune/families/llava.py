"""LLaVA-1.5 (transformers-native ``llava-hf`` checkpoints): one 24x24 grid (576 tokens) per image.

Token-to-pixel geometry follows ``CLIPImageProcessor``: shortest edge resized to 336 (long edge
``int(336 * long / short)``), then a centre crop of 336x336 (``top = int((h - 336) / 2)``); the 24x24 grid
covers only the crop. Cells that fall in padding (crop larger than the resized image) are clipped to the image
and may have zero area. Grounding answers: see :func:`llava_box_frame`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lmms_prune import geometry as geo
from lmms_prune.families.base import IMAGE_TOKEN, Family, bench_text_config, int_arg

DEFAULTS = {"shortest_edge": 336, "crop": (336, 336), "do_center_crop": True}


def crop_region(size: tuple[int, int], processor: Any) -> tuple[float, float, float, float]:
    """The part of the original image the 336 px crop shows: (x1, y1, x2, y2), possibly beyond the image."""
    width, height = size
    ip = geo.image_processor(processor) if processor is not None else None
    if ip is None:
        shortest, fixed = DEFAULTS["shortest_edge"], None
        crop, do_crop = DEFAULTS["crop"], DEFAULTS["do_center_crop"]
    else:
        s = getattr(ip, "size", None)
        shortest = geo.size_value(s, "shortest_edge")
        fixed = (geo.size_value(s, "height"), geo.size_value(s, "width")) if shortest is None else None
        cs = getattr(ip, "crop_size", None)
        crop = (geo.size_value(cs, "height"), geo.size_value(cs, "width"))
        do_crop = bool(getattr(ip, "do_center_crop", False))
        if getattr(ip, "do_resize", True) is False:
            shortest, fixed = None, (height, width)
    if shortest is not None:  # transformers' get_resize_output_image_size(default_to_square=False)
        if width <= height:
            new_w, new_h = int(shortest), int(int(shortest) * height / width)
        else:
            new_h, new_w = int(shortest), int(int(shortest) * width / height)
    elif fixed is not None and None not in fixed:
        new_h, new_w = int(fixed[0]), int(fixed[1])
    else:
        raise ValueError(f"LLaVA image processor size={getattr(ip, 'size', None)!r}: expected shortest_edge "
                         "or height/width")
    left, top, out_w, out_h = 0.0, 0.0, float(new_w), float(new_h)
    if do_crop:
        ch, cw = int(crop[0]), int(crop[1])
        # transformers' center_crop: pad symmetrically when the crop is larger, then int((size - crop) / 2).
        left = -((cw - new_w) // 2) if cw > new_w else int((new_w - cw) / 2)
        top = -((ch - new_h) // 2) if ch > new_h else int((new_h - ch) / 2)
        out_w, out_h = float(cw), float(ch)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy


def llava_box_frame(image_size: tuple[int, int], options: dict[str, Any], processor: Any = None) -> dict[str, Any]:
    """The box frame of one LLaVA-1.5 image (``lmms_prune.tasks.refcoco.parsing``).

    LLaVA-1.5 is trained on RefCOCO boxes as ``[x1, y1, x2, y2]`` floats in [0, 1] of the image it sees:
    ``image_aspect_ratio=pad`` (the family option, default ``pad`` when absent) pads the image to a centred
    square (``expand2square``) -> ``unit_padded_square`` of the original size; ``crop`` shows the processor's
    centre crop -> ``unit_region`` with the crop's region in original pixels (:func:`crop_region`, possibly
    beyond the image).
    """
    width, height = geo.check_size(image_size)
    mode = str(options.get("image_aspect_ratio", "pad") or "pad").lower()
    if mode == "pad":
        return {"convention": "unit_padded_square", "width": width, "height": height}
    if mode == "crop":
        region = crop_region((width, height), processor)
        return {"convention": "unit_region", "width": width, "height": height,
                "region": [float(v) for v in region]}
    raise ValueError(f"image_aspect_ratio={mode!r}: must be pad or crop")


class Llava(Family):
    """LLaVA-1.5: 576 tokens (24x24) per image."""

    name = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    default_pretrained = "llava-hf/llava-1.5-7b-hf"
    box_convention = "unit_padded_square"  # image_aspect_ratio=crop: "unit_region" (llava_box_frame)
    # lmms-eval's llava_hf keys (its dtype, revision, trust_remote_code, use_cache, ... are run options)
    model_args: ClassVar[dict[str, str]] = {
        "chat_template": "a Jinja chat template replacing the checkpoint's (default: the checkpoint's)",
        "max_frames_num": "frames sampled per video (default 32; videos are not supported yet)",
    }
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        "llava-1.5-7b": {"text": (32, 4096, 32, 32, 11008, "llama")},
    }

    @classmethod
    def parse_model_args(cls, args):
        template = args.pop("chat_template", None)
        template = None if template is None or str(template).strip().lower() in ("", "none") else str(template)
        return {"chat_template": template,
                "max_frames_num": int_arg("max_frames_num", args.pop("max_frames_num", 32), 1),
                "default_max_new_tokens": 1024}  # lmms-eval's llava_hf, when a task sets none

    @classmethod
    def box_frame(cls, image_size, inputs, index, options, processor=None):
        return llava_box_frame(image_size, options, processor)

    @classmethod
    def token_boxes(cls, image_size, grids, processor=None, max_num=None):
        width, height = geo.check_size(image_size)
        region = crop_region((width, height), processor)
        boxes = torch.cat([geo.raster(region, g) for g in geo.grid_list(grids)])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return boxes.float()

    @classmethod
    def build_geometry(cls, spec, layers=None):
        import transformers as tf

        depth, hidden, heads, kv, ffn, kind = spec["text"]
        text = bench_text_config(layers or depth, hidden, heads, kv, ffn, kind)
        vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        config = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**text),
                                image_token_index=IMAGE_TOKEN, image_seq_length=576, vision_feature_layer=-2,
                                vision_feature_select_strategy="default")
        return tf.LlavaForConditionalGeneration, config

    @classmethod
    def synthetic_inputs(cls, model, visual_tokens, text, gen):
        adapter = cls(model)
        if visual_tokens != adapter.tokens_per_image():
            raise ValueError(f"--tokens {visual_tokens}: LLaVA-1.5 always has {adapter.tokens_per_image()} tokens")
        size = model.config.vision_config.image_size
        return torch.randn(1, 3, size, size, generator=gen), {}

    def vision_layers(self):
        return self.vision_tower.encoder.layers

    def tokens_per_image(self) -> int:
        seq = getattr(self.config, "image_seq_length", None)
        if seq:
            return int(seq)
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2


FAMILY = Llava
