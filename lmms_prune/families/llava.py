"""LLaVA-1.5 (transformers-native ``llava-hf`` checkpoints): one 24x24 grid (576 tokens) per image.

Image pipeline (``--model_args image_aspect_ratio=pad|crop``, methods.md section 1):

* ``pad`` (default; the original LLaVA code's ``image_aspect_ratio=pad``, which the papers' LLaVA-1.5 runs use):
  the image is pasted on a centred square of side ``max(w, h)`` filled with the image processor's
  ``image_mean`` colour as ``int(x * 255)`` (LLaVA's ``expand2square``), then the processor resizes the square
  to 336 and its centre crop is a no-op. Each 14 px cell of the 336 square maps back to the original image
  through the pad offsets ``((S - w) // 2, (S - h) // 2)``; a token whose patch is at least half padding is a
  padding token (:meth:`Llava.padding_masks`, handed to the engine so trend debiasing zeroes it).
* ``crop`` (transformers' own ``llava-hf`` pipeline): ``CLIPImageProcessor`` resizes the shortest edge to 336
  (long edge ``int(336 * long / short)``), then centre-crops 336x336 (``top = int((h - 336) / 2)``); the 24x24
  grid covers only the crop.

Cells that fall in padding are clipped to the image and may have zero area. Grounding answers: see
:func:`llava_box_frame`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from PIL import Image

from lmms_prune import geometry as geo
from lmms_prune.families.base import IMAGE_TOKEN, Family, bench_text_config, int_arg

DEFAULTS = {"shortest_edge": 336, "crop": (336, 336), "do_center_crop": True}
LLAVA_IMAGE_TAG = "<image>"  # the image placeholder of lmms-eval's llava_hf prompts (llava-hf checkpoints' token)
ASPECT_RATIOS = ("pad", "crop")  # image_aspect_ratio values; the first is the default
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's image_mean (LLaVA-1.5's processors)
# lmms-eval's llava_hf keys (its dtype, revision, trust_remote_code, use_cache, ... are run options)
LLAVA_HF_ARGS: dict[str, str] = {
    "chat_template": "a Jinja chat template replacing the checkpoint's (default: the checkpoint's)",
    "max_frames_num": "frames sampled per video (default 32; videos are not supported yet)",
}


def aspect_ratio_arg(value: Any) -> str:
    """``image_aspect_ratio`` as ``pad`` or ``crop`` (``None``/empty: the default ``pad``), or a clear error."""
    text = ASPECT_RATIOS[0] if value is None else str(value).strip().lower() or ASPECT_RATIOS[0]
    if text not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio={value!r}: must be pad (the original LLaVA's pad-to-square with the "
                         "mean colour, the papers' setting) or crop (the processor's resize + centre crop)")
    return text


def pad_colour(processor: Any = None) -> tuple[int, int, int]:
    """The fill colour of ``expand2square``: the image processor's ``image_mean`` as ``int(x * 255)`` per channel
    (LLaVA's ``tuple(int(x * 255) for x in image_processor.image_mean)``); CLIP's mean without a processor."""
    ip = geo.image_processor(processor) if processor is not None else None
    mean = getattr(ip, "image_mean", None) or CLIP_MEAN
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    return tuple(int(x * 255) for x in mean)


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's ``expand2square``: ``image`` (as RGB) pasted on a ``S x S`` square (``S = max(w, h)``) of colour
    ``background``, at ``(0, (S - h) // 2)`` for a wide image or ``((S - w) // 2, 0)`` for a tall one; a square
    image is returned as it is."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), tuple(background))
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def pad_offsets(size: tuple[int, int]) -> tuple[int, int, int]:
    """``(side, left, top)`` of ``expand2square`` for a ``(width, height)`` image: the square's side and where
    the image's top-left corner sits in it."""
    width, height = size
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


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


def clip_l336_vision():
    """The vision tower of LLaVA-1.5 and LLaVA-1.6 (CLIP ViT-L/14 at 336 px) as a transformers config, for the
    benchmark geometries (random weights, real widths)."""
    import transformers as tf

    return tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=336, patch_size=14, projection_dim=768)


class Llava(Family):
    """LLaVA-1.5: 576 tokens (24x24) per image."""

    name = "llava"
    tower_refusal = None  # CLIP: the in-tower merge (tower_layout, tower_key_mask)
    input_budget_refusal = ("it resizes every image to the vision tower's fixed input (336 px: 576 tokens), so a "
                            "smaller image is enlarged back and yields as many tokens")
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    default_pretrained = "llava-hf/llava-1.5-7b-hf"
    box_convention = "unit_padded_square"  # image_aspect_ratio=crop: "unit_region" (llava_box_frame)
    model_args: ClassVar[dict[str, str]] = {
        **LLAVA_HF_ARGS,
        "image_aspect_ratio": "pad (default: the original LLaVA's pad-to-square with the image-mean colour, as the "
                              "papers ran LLaVA-1.5) or crop (transformers' resize + centre crop)",
    }
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        "llava-1.5-7b": {"text": (32, 4096, 32, 32, 11008, "llama")},
    }

    @classmethod
    def parse_model_args(cls, args):
        return {**cls.parse_llava_hf_args(args),
                "image_aspect_ratio": aspect_ratio_arg(args.pop("image_aspect_ratio", None))}

    @classmethod
    def parse_llava_hf_args(cls, args):
        """The keys lmms-eval's ``llava_hf`` takes (:data:`LLAVA_HF_ARGS`), popped from ``args``."""
        template = args.pop("chat_template", None)
        template = None if template is None or str(template).strip().lower() in ("", "none") else str(template)
        return {"chat_template": template,
                "max_frames_num": int_arg("max_frames_num", args.pop("max_frames_num", 32), 1),
                "default_max_new_tokens": 1024}  # lmms-eval's llava_hf, when a task sets none

    # ---- loglikelihood requests (multiple-choice and perplexity tasks)
    @classmethod
    def loglikelihood_texts(cls, context, continuation, num_images, processor, options):
        """lmms-eval's ``llava_hf.loglikelihood`` texts (LLaVA-1.5, LLaVA-NeXT and OneVision alike): the user
        turn is the string ``"<image> <image>\\n" + context`` (one tag per image: lmms-eval writes ``<image>``,
        the image token of every llava-hf checkpoint; here the processor's own ``image_token``), the assistant
        turn the continuation; the prompt is the user turn with the generation prompt, the full text both turns.
        The template is the ``chat_template`` option, else the tokenizer's, else lmms-eval's Vicuna template
        (as that wrapper)."""
        tokenizer = processor.tokenizer
        tag = getattr(processor, "image_token", None) or LLAVA_IMAGE_TAG
        user = f"{' '.join([tag] * num_images)}\n{context}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": continuation}]
        template = options.get("chat_template") or tokenizer.chat_template
        if template is None:
            from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE as template
        prompt = tokenizer.apply_chat_template(messages[:-1], chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=False)
        return prompt, full

    # ---- pad-to-square (image_aspect_ratio=pad)
    @classmethod
    def prepare_images(cls, images, options, processor=None):
        """``pad``: each image through :func:`expand2square` with the processor's mean colour (the processor then
        resizes the square, and its centre crop is a no-op); ``crop``: unchanged."""
        if aspect_ratio_arg(options.get("image_aspect_ratio")) != "pad":
            return images
        colour = pad_colour(processor)
        return [expand2square(image, colour) for image in images]

    @classmethod
    def standalone_images(cls, images, processor=None):
        return cls.prepare_images(images, {"image_aspect_ratio": ASPECT_RATIOS[0]}, processor)

    def padding_masks(self, images, options, processor=None):
        """``pad``: per sample, per image, bool ``[576]`` (the grid's tokens), True where the token's patch of the
        square is at least half padding (:func:`lmms_prune.scores.pad_to_square_token_mask`); ``crop``: None."""
        if aspect_ratio_arg(options.get("image_aspect_ratio")) != "pad":
            return None
        from lmms_prune.scores.padding import pad_to_square_token_mask

        side = math.isqrt(self.tokens_per_image())
        out = []
        for sample in images:
            masks = []
            for image in sample:
                width, height = geo.check_size(image.size)
                square = max(width, height)
                region = crop_region((square, square), processor)
                if any(abs(a - b) > 1e-9 for a, b in zip(region, (0, 0, square, square))):
                    raise ValueError(f"image_aspect_ratio=pad: this image processor (size="
                                     f"{getattr(geo.image_processor(processor), 'size', None)!r}, crop_size="
                                     f"{getattr(geo.image_processor(processor), 'crop_size', None)!r}) does not map "
                                     "the padded square onto the token grid (its crop cuts the square); use "
                                     "image_aspect_ratio=crop or a processor whose crop equals its resize")
                masks.append(pad_to_square_token_mask(width, height, side))
            out.append(masks)
        return out

    @classmethod
    def box_frame(cls, image_size, inputs, index, options, processor=None):
        return llava_box_frame(image_size, options, processor)

    @classmethod
    def token_boxes(cls, image_size, grids, processor=None, max_num=None, image_aspect_ratio="pad"):
        """Cells of the 336 crop (``crop``) or of the padded square (``pad``), in original-image pixels, clipped
        to the image (cells entirely in padding have zero area)."""
        width, height = geo.check_size(image_size)
        if aspect_ratio_arg(image_aspect_ratio) == "pad":
            side, left, top = pad_offsets((width, height))
            x1, y1, x2, y2 = crop_region((side, side), processor)
            region = (x1 - left, y1 - top, x2 - left, y2 - top)
        else:
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
        vision = clip_l336_vision()
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

    def tower_layout(self) -> tuple[int, tuple[int, int]]:
        """CLIP: [CLS] then the square patch grid; no positions after the embeddings, full attention."""
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        return 1, (side, side)

    def tower_key_mask(self, attention_mask, kept, dtype):
        """CLIP's layers take an additive ``[B, 1, S, S]`` mask (None where nothing is masked)."""
        hide = torch.zeros(kept.shape[0], 1, kept.shape[1], kept.shape[1], dtype=dtype, device=kept.device)
        hide = hide.masked_fill(~kept[:, None, None, :], torch.finfo(dtype).min)
        return hide if attention_mask is None else attention_mask + hide

    def tokens_per_image(self) -> int:
        seq = getattr(self.config, "image_seq_length", None)
        if seq:
            return int(seq)
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2


FAMILY = Llava
