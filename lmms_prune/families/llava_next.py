"""LLaVA-NeXT / LLaVA-1.6 (transformers-native ``llava-hf`` checkpoints): anyres (methods.md section 1).

Layout of one image's run of placeholder tokens (``LlavaNextModel.pack_image_features``):

* the base image, resized to 336x336 without keeping the aspect ratio: a 24x24 grid (576 tokens) over the whole
  image;
* the high-resolution tiles (the best ``image_grid_pinpoints`` resolution, ``nph x npw`` tiles of 336 px, the
  image resized into it and padded to centre), arranged as one ``(24 nph) x (24 npw)`` mosaic and **unpadded** to
  the image's aspect ratio (``unpad_image``): ``rows x cols`` tokens over the whole image, row-major;
* one ``image_newline`` token after each mosaic row (an image with no tiles gets one newline after the base).

The newline tokens are structure: the span lists them in ``ImageSpan.structural``; they are never pruned, never
scored and never counted in a budget. Grids: ``[(24, 24), (rows, cols)]``. The papers (FastV, SparseVLM,
VisPruner, D2Pruner) quote budgets "of 2880" = 576 x 5, their code's count without unpadding; here budgets are
ratios of the visual tokens present and ``ImageSpan.papers_length`` (``PruneRecord.visual_before_papers``,
the efficiency record's ``visual_before_papers``) gives the papers' ``576 x (1 + nph npw)``.

The layout is read with the model's own packing rule from ``image_sizes`` when the forward call has them; in
``generate`` (transformers 5 encodes the images before the first forward and passes only
``mm_encoder_outputs``) from the ``image_sizes`` the encoder was called with (kept by :meth:`install_hooks`).
Encoder outputs made elsewhere (a caller's own ``mm_encoder_outputs``) are read from their newline rows (the
``image_newline`` parameter, bit for bit); their papers' count is then the lower bound
``576 x (1 + ceil(rows / 24) ceil(cols / 24))`` (a small image can leave a whole tile of padding).

``--model_args``: lmms-eval's own ``llava_hf`` wrapper takes no image-processing options (``pretrained``,
``dtype``, ``device``, ``device_map``, ``batch_size``, ``attn_implementation``, ``chat_template``, ``use_cache``),
so this family adds none; the processor's saved ``image_grid_pinpoints`` rule applies.

Grounding answers (``box_convention = "unit_padded_square"``): LLaVA-1.5/1.6 are trained on RefCOCO boxes as
``[x1, y1, x2, y2]`` floats in [0, 1] with 2-3 decimals, relative to the image padded to a centred square
(LLaVA's ``expand2square``), prompted with "Please provide the bounding box coordinate of the region this
sentence describes: {expression}" (no ``<ref>`` tags). :func:`padded_square_box_to_original` maps them back.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from lmms_prune import geometry as geo
from lmms_prune.families.base import IMAGE_TOKEN, Family, ImageSpan, bench_text_config, runs
from lmms_prune.families.llava import LLAVA_HF_ARGS, Llava, clip_l336_vision

# LLaVA-1.6's grid pinpoints (height, width): at most 4 tiles of 336 px, so the papers' count is 576 x 5 = 2880.
PINPOINTS_1_6 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def padded_square_box_to_original(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """``[x1, y1, x2, y2]`` in [0, 1] of the image padded to a centred ``S x S`` square (``S = max(w, h)``,
    LLaVA's ``expand2square``, which pastes the image at the integer offsets ``((S - w) // 2, (S - h) // 2)``)
    -> pixels of the original ``width x height`` image (not clamped)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width={width}, height={height}: image size must be positive")
    side = max(width, height)
    dx, dy = (side - width) // 2, (side - height) // 2
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1 * side - dx, y1 * side - dy, x2 * side - dx, y2 * side - dy


ENCODER_INPUTS = "lmms_prune_encoder_inputs"  # attribute of an encoder output: the image sizes it was made for


class _RestoreMethod:
    """Removes an instance attribute that shadows a method (the class method is back)."""

    def __init__(self, owner: Any, name: str):
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


@dataclass(frozen=True)
class ImageLayout:
    """One image's placeholder run: ``length`` tokens, the grids of its visual tokens, the positions of its
    newline tokens within the run, and the papers' visual-token count (None when the family has none)."""

    length: int
    grids: list[tuple[int, int]]
    structural: tuple[int, ...]
    papers_length: int | None


def layout_from_newlines(is_newline: torch.Tensor, side: int, papers: bool) -> ImageLayout:
    """An image's layout from the bool ``[L]`` marks of its newline tokens: ``side x side`` base tokens first,
    then ``rows`` mosaic rows of ``cols`` tokens, each followed by one newline (or a single newline right after
    the base when the image has no tiles)."""
    length = int(is_newline.numel())
    structural = tuple(int(i) for i in torch.nonzero(is_newline).flatten())
    base = side * side
    if structural == (base,) and length == base + 1:
        return ImageLayout(length, [(side, side)], structural, base if papers else None)
    rows = len(structural)
    cols = (length - base) // rows - 1 if rows else 0
    expected = tuple(base + r * (cols + 1) + cols for r in range(rows))
    if rows == 0 or cols < 1 or base + rows * (cols + 1) != length or structural != expected:
        raise ValueError(f"a run of {length} image tokens with newlines at {structural[:4]}... is not a {side}x{side} "
                         "base grid followed by mosaic rows each ending in a newline")
    tiles = math.ceil(rows / side) * math.ceil(cols / side)
    return ImageLayout(length, [(side, side), (rows, cols)], structural, base * (1 + tiles) if papers else None)


class LlavaNext(Llava):
    """LLaVA-NeXT: a 24x24 base grid plus the unpadded mosaic, a newline token ending each mosaic row."""

    name = "llava_next"
    input_budget_refusal = ("its anyres grid (image_grid_pinpoints) changes in whole tiles and never "
                            "drops below the base image plus one tile, so most budgets cannot be met; not supported")
    model_types = ("llava_next",)
    tower_refusal = ("its AnyRes tiles are pooled and unpadded after the tower and end in row newlines, so a "
                     "window merged in the tower has no one LLM token; the in-tower merge runs on llava")
    tower_layout = Family.tower_layout  # LLaVA-1.5's CLIP tower, but not its one-to-one patches (the refusal)
    tower_key_mask = Family.tower_key_mask
    model_class = "LlavaNextForConditionalGeneration"
    processor_class = "LlavaNextProcessor"
    default_pretrained = "llava-hf/llava-v1.6-vicuna-7b-hf"
    also_pretrained: ClassVar[tuple[str, ...]] = ("llava-hf/llava-v1.6-mistral-7b-hf",)
    box_convention = "unit_padded_square"
    image_input_keys = ("pixel_values", "image_sizes")
    papers_count: ClassVar[bool] = True  # records carry the papers' "of 2880" count
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        # Vicuna-7B + CLIP ViT-L/14-336; --tokens 2880 = a 672x672 image (2x2 tiles, nothing unpadded) whose 48
        # newline tokens come on top (2928 placeholders).
        "llava-next-7b": {"text": (32, 4096, 32, 32, 11008, "llama"), "pinpoints": PINPOINTS_1_6},
    }

    # ---- image options: anyres pads and tiles in the processor, so LLaVA-1.5's image_aspect_ratio is not one
    model_args: ClassVar[dict[str, str]] = dict(LLAVA_HF_ARGS)

    @classmethod
    def parse_model_args(cls, args):
        return cls.parse_llava_hf_args(args)

    @classmethod
    def prepare_images(cls, images, options, processor=None):
        return images

    @classmethod
    def standalone_images(cls, images, processor=None):
        return images

    def padding_masks(self, images, options, processor=None):
        return None

    @classmethod
    def image_structure(cls, processor, inputs):
        """Row newlines and the papers' ``side^2 (1 + tiles)`` per image, by the processor's own rule
        (``LlavaNextProcessor._get_number_of_features``: the best pinpoint resolution, the unpadded mosaic)."""
        from transformers.image_processing_utils import select_best_resolution

        height, width = (int(x) for x in inputs["pixel_values"].shape[-2:])
        side_h, side_w = height // processor.patch_size, width // processor.patch_size
        out = []
        for orig_h, orig_w in inputs["image_sizes"].tolist():
            best_h, best_w = select_best_resolution([orig_h, orig_w], processor.image_processor.image_grid_pinpoints)
            _, newlines = processor._get_unpadded_features(orig_h, orig_w, side_h, side_w, best_h // height,
                                                           best_w // width)
            out.append((int(newlines), side_h * side_w * (1 + (best_h // height) * (best_w // width))))
        return out


    @classmethod
    def box_frame(cls, image_size, inputs, index, options, processor=None):
        """``unit_padded_square`` of the original image (module docstring; LLaVA-1.5's pad/crop option does not
        apply to anyres)."""
        return Family.box_frame.__func__(cls, image_size, inputs, index, options, processor)

    # ---- token-to-pixel geometry: the base grid and the unpadded mosaic each cover the whole image
    @classmethod
    def token_boxes(cls, image_size, grids, processor=None, max_num=None):
        return Family.token_boxes(image_size, grids, processor, max_num)

    @classmethod
    def token_views(cls, grids):
        grid_list = geo.grid_list(grids)
        sizes = [r * c for r, c in grid_list]
        views = {}
        for name, i in (("base", 0), ("mosaic", 1)):
            if i < len(sizes):
                mask = torch.zeros(sum(sizes), dtype=torch.bool)
                mask[sum(sizes[:i]): sum(sizes[: i + 1])] = True
                views[name] = mask
        return views

    @classmethod
    def grid_labels(cls, image_size, grids, processor=None, max_num=None):
        return ["base", "mosaic"][: len(geo.grid_list(grids))]

    @classmethod
    def layout_key(cls, image_size, grids, processor=None, max_num=None):
        return "anyres" + "+".join(f"{r}x{c}" for r, c in geo.grid_list(grids))

    # ---- benchmark geometry
    @classmethod
    def build_geometry(cls, spec, layers=None):
        import transformers as tf

        depth, hidden, heads, kv, ffn, kind = spec["text"]
        text = bench_text_config(layers or depth, hidden, heads, kv, ffn, kind)
        vision = clip_l336_vision()
        config = tf.LlavaNextConfig(vision_config=vision, text_config=tf.LlamaConfig(**text),
                                    image_token_index=IMAGE_TOKEN, image_grid_pinpoints=spec["pinpoints"],
                                    vision_feature_layer=-2, vision_feature_select_strategy="default")
        return tf.LlavaNextForConditionalGeneration, config

    @classmethod
    def _synthetic_layout(cls, model, visual_tokens: int) -> tuple[int, ImageLayout]:
        """(side in pixels, layout) of a square pinpoint image with ``visual_tokens`` visual tokens (the
        model's own packing rule; nothing is unpadded from a square image on a square pinpoint)."""
        adapter = cls(model)
        found = []
        for h, w in model.config.image_grid_pinpoints:
            if h != w:
                continue
            lay = adapter._layouts_from_sizes({"image_sizes": torch.tensor([[h, w]])})[0]
            if lay.length - len(lay.structural) == visual_tokens:
                return h, lay
            found.append(lay.length - len(lay.structural))
        raise ValueError(f"--tokens {visual_tokens}: {cls.name} synthetic images are square pinpoints with "
                         f"{sorted(found)} visual tokens; choose one of those")

    @classmethod
    def synthetic_inputs(cls, model, visual_tokens, text, gen):
        side, _ = cls._synthetic_layout(model, visual_tokens)
        sizes = torch.tensor([[side, side]])
        tiles = cls(model)._num_patches(sizes)[0]
        size = model.config.vision_config.image_size
        return torch.randn(1, tiles, 3, size, size, generator=gen), {"image_sizes": sizes}

    @classmethod
    def placeholder_count(cls, model, visual_tokens):
        return cls._synthetic_layout(model, visual_tokens)[1].length

    # ---- adapter
    def tokens_per_image(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def image_newline(self) -> torch.Tensor:
        return self.model.model.image_newline

    def _num_patches(self, image_sizes: torch.Tensor, batch_num_images: Any = None) -> list[int]:
        """Tiles per image, the base included (as ``get_image_features`` splits the tower's output)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vc = self.config.vision_config
        return [image_size_to_num_patches(s, self.config.image_grid_pinpoints, vc.image_size) for s in image_sizes]

    def _pack(self, per_image: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> list[torch.Tensor]:
        """The model's own packing of per-tile token rows ``[tiles, P, C]`` (one tensor per image) into each
        image's run ``[L, C]`` with ``newline`` ``[C]`` as the newline rows."""
        packed, _ = self.model.model.pack_image_features(per_image, image_sizes, "default", image_newline=newline)
        return packed

    def _patched(self, kwargs: dict[str, Any]) -> list[bool] | None:
        return None

    @classmethod
    def vision_tiles(cls, config, pixels, inputs, video):
        """Images: the tiles ``get_image_features`` encodes (base + grid; the padded rows of ``pixel_values``
        are not; LLaVA-OneVision: only the base of an image among several, ``batch_num_images``); videos: every
        frame."""
        if video:
            return super().vision_tiles(config, pixels, inputs, video)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [image_size_to_num_patches(s, config.image_grid_pinpoints, config.vision_config.image_size)
                  for s in inputs["image_sizes"]]
        per_sample = inputs.get("batch_num_images")
        if per_sample is None:
            return sum(counts)
        alone = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return sum(c if a else 1 for c, a in zip(counts, alone))

    def _layouts_from_sizes(self, kwargs: dict[str, Any]) -> list[ImageLayout]:
        sizes = kwargs["image_sizes"]
        counts = self._num_patches(sizes)
        patched = self._patched(kwargs)
        if patched is not None:
            counts = [c if p else 1 for c, p in zip(counts, patched)]
        side = math.isqrt(self.tokens_per_image())
        markers = [torch.ones(c, side * side, 1) for c in counts]
        packed = self._pack(markers, sizes.cpu(), torch.zeros(1))
        layouts = [layout_from_newlines(p[:, 0] == 0, side, self.papers_count) for p in packed]
        if not self.papers_count:
            return layouts
        # the papers' count from the tiles themselves (exact, whatever the unpadding removed)
        return [replace(lay, papers_length=side * side * c) for lay, c in zip(layouts, counts)]

    def _layouts_from_features(self, encoded: Any) -> list[ImageLayout]:
        newline = self.image_newline()
        side = math.isqrt(self.tokens_per_image())
        out = []
        for feats in encoded.pooler_output:
            marks = (feats == newline.to(feats.device, feats.dtype)).all(-1).cpu()
            out.append(layout_from_newlines(marks, side, self.papers_count))
        return out

    def image_layouts(self, forward_kwargs: dict[str, Any]) -> list[ImageLayout]:
        """Every image of the call, in order: from ``image_sizes`` (the model's rule: the forward's own, or those
        ``generate`` gave the encoder, kept by :meth:`install_hooks`), else from the encoder output's newlines."""
        if forward_kwargs.get("image_sizes") is not None:
            return self._layouts_from_sizes(forward_kwargs)
        encoded = (forward_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is None:
            return []
        seen = getattr(encoded, ENCODER_INPUTS, None)
        if seen is not None and seen.get("image_sizes") is not None:
            return self._layouts_from_sizes(seen)
        return self._layouts_from_features(encoded)

    def install_hooks(self) -> list[Any]:
        """Wrap ``get_image_features`` (an instance attribute, signature kept: ``generate`` reads it) so that its
        output remembers the ``image_sizes`` / ``batch_num_images`` it was called with; ``generate`` drops
        them from the forward's inputs once the images are encoded."""
        inner = self.model.model
        original = inner.get_image_features

        @functools.wraps(original)
        def get_image_features(*args: Any, **kwargs: Any):
            out = original(*args, **kwargs)
            bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
            if not isinstance(out, tuple):
                setattr(out, ENCODER_INPUTS, {k: bound.get(k) for k in ("image_sizes", "batch_num_images")})
            return out

        inner.get_image_features = get_image_features
        return [_RestoreMethod(inner, "get_image_features")]

    def spans(self, input_ids, forward_kwargs):
        layouts = self.image_layouts(forward_kwargs)
        out: list[list[ImageSpan]] = []
        i = 0
        for row in input_ids:
            spans: list[ImageSpan] = []
            for start, length in runs(row == self.image_token_id):
                offset = start
                while offset < start + length:
                    if i >= len(layouts):
                        raise ValueError(f"{self.name}: image tokens at {offset} but no image_sizes or encoded "
                                         "images describe them (pass the processor's image_sizes)")
                    lay = layouts[i]
                    spans.append(ImageSpan(offset, lay.length, lay.grids, lay.structural, lay.papers_length))
                    offset += lay.length
                    i += 1
                if offset != start + length:
                    raise ValueError(f"{self.name}: a run of {length} image tokens does not match the images' "
                                     f"layouts (it ends inside image {i - 1})")
            if self.video_token_id is not None and self.video_token_id != self.image_token_id:
                for start, length in runs(row == self.video_token_id):
                    for grids, structural in self.video_grids(length, 0, forward_kwargs):
                        spans.append(ImageSpan(start, length, grids, structural, video=True))
                spans.sort(key=lambda s: s.start)
            out.append(spans)
        return out

    # ---- pre-LLM hand-over: per-tile vision signals repacked into the span's token order
    def encode_images(self, kwargs):
        self._encoded_kwargs = {k: kwargs.get(k) for k in ("image_sizes", "batch_num_images")}
        return self.model.model.get_image_features(pixel_values=kwargs["pixel_values"],
                                                   image_sizes=kwargs["image_sizes"], return_dict=True)

    def _repack(self, per_tile: torch.Tensor) -> torch.Tensor:
        """``[tiles of all images, P, C]`` per-tile token rows -> ``[placeholders, C]`` in span order, newline
        rows zero (the engine never reads them)."""
        kwargs = self._encoded_kwargs
        sizes = kwargs["image_sizes"]
        counts = self._num_patches(sizes)
        patched = self._patched(kwargs)
        if patched is not None:
            counts = [c if p else 1 for c, p in zip(counts, patched)]
        per_image = list(torch.split(per_tile, counts, dim=0))
        newline = per_tile.new_zeros(per_tile.shape[-1])
        return torch.cat(self._pack(per_image, sizes, newline), 0)

    def flatten_pre_projector(self, pre, kwargs=None):
        return self._repack(pre)

    def cls_importance(self, rows):
        from lmms_prune.scores import cls_attention

        per_tile = torch.stack([cls_attention(r, has_cls=True) for r in rows])  # [tiles, P]
        return self._repack(per_tile[..., None])[:, 0]


FAMILY = LlavaNext
