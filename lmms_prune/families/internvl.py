"""InternVL2.5 / InternVL3 / InternVL3.5 (transformers-native ``-hf`` checkpoints, one class).

The releases differ only in the text model: InternVL2.5 Llama (InternLM2.5 converted) or Qwen2, InternVL3
Qwen2.5 (a Qwen2 config, ``OpenGVLab/InternVL3-8B-hf``), InternVL3.5 Qwen3 (q/k RMSNorm,
``OpenGVLab/InternVL3_5-8B-HF``); the vision side (InternViT-300M, 448 px tiles, pixel shuffle) is the same.

Token layout (methods.md section 1): an image is cut into ``t <= max_num`` 448 px tiles chosen by aspect
ratio, row-major, plus a 448 px thumbnail last when ``t > 1``; each tile gives 256 tokens = a 16x16 raster
after pixel shuffle. InternVL wraps every image in ``<img>...</img>``, so one run of image tokens is one image.

Token-to-pixel geometry: the image is resized to ``cols*448 x rows*448`` (the grid of transformers'
``get_optimal_tiled_canvas``, the rule of InternVL's ``dynamic_preprocess``) and cut into tiles row-major; the
tile tokens together form one ``(rows*16) x (cols*16)`` raster over the whole image; the thumbnail's 16x16
raster covers the whole image again.

``--model_args``: lmms-eval's ``internvl_hf`` keys (``min_patches``, ``max_patches`` = at most this many tiles,
default 12, ``num_frames``, ``fps``), ``max_num`` (older name of ``max_patches``) and ``crop_to_patches``.
RefCOCO's tasks ask for 6 tiles (InternVL's grounding protocol, section 6) through their generation kwargs
(:data:`lmms_prune.runner.PROTOCOL_KEY`). Grounding answers: ``<box>[[x1, y1, x2, y2]]</box>`` on a 0-1000
grid of the original image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from lmms_prune import geometry as geo
from lmms_prune.efficiency import mlp_flops
from lmms_prune.families.base import (
    IMAGE_TOKEN,
    Family,
    ImageSpan,
    bench_text_config,
    int_arg,
    join_frames,
    optional_float_arg,
)

TILE = 448
DEFAULT_MAX_NUM = 6  # InternVL's grounding protocol (methods.md section 6): calibration, overlays, RefCOCO
LMMS_EVAL_MAX_PATCHES = 12  # lmms-eval's internvl_hf default (and the checkpoints' saved one)
_INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def tile_grid(width: int, height: int, max_num: int = DEFAULT_MAX_NUM, min_num: int = 1,
              image_size: int = TILE) -> tuple[int, int]:
    """``(columns, rows)`` of the tiles InternVL cuts a ``width x height`` image into: transformers'
    ``get_optimal_tiled_canvas`` (the aspect ratio closest to the image's among ``min_num..max_num`` tiles;
    ties go to more tiles while the image covers more than half of their area)."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: width and height must be >= 1 pixel")
    if not 1 <= min_num <= max_num:
        raise ValueError(f"min_num={min_num}, max_num={max_num}: need 1 <= min_num <= max_num")
    cols, rows = get_optimal_tiled_canvas((height, width), (image_size, image_size), min_num, max_num)
    return int(cols), int(rows)


def num_tiles(width: int, height: int, max_num: int = DEFAULT_MAX_NUM, min_num: int = 1,
              image_size: int = TILE) -> int:
    """Tiles fed to the vision tower for one image: the grid's ``cols * rows`` plus a thumbnail when > 1."""
    cols, rows = tile_grid(width, height, max_num=max_num, min_num=min_num, image_size=image_size)
    return cols * rows + (1 if cols * rows > 1 else 0)


def tiles_of(image_size: Sequence[int], grids: Any, processor: Any = None,
             max_num: int | None = None) -> tuple[int, int]:
    """``(cols, rows)`` of the tiles of one image with token ``grids`` (one per tile, thumbnail last).

    The budget is ``max_num`` (default: the processor's ``max_patches``, else 6); it must give as many tiles as
    ``grids`` holds, otherwise the image was processed with another budget.
    """
    width, height = geo.check_size(image_size)
    grids = geo.grid_list(grids)
    if len(grids) == 1:
        return (1, 1)
    ip = geo.image_processor(processor) if processor is not None else None
    if max_num is None:
        max_num = int(getattr(ip, "max_patches", None) or DEFAULT_MAX_NUM)
    min_num = int(getattr(ip, "min_patches", None) or 1)
    tile = int(geo.size_value(getattr(ip, "size", None), "height") or TILE)
    cols, rows = tile_grid(width, height, max_num=max_num, min_num=min_num, image_size=tile)
    if cols * rows + 1 != len(grids):
        raise ValueError(
            f"max_num={max_num}: InternVL's tiling of a {width}x{height} image gives {cols}x{rows} tiles + a "
            f"thumbnail = {cols * rows + 1} grids, but the image has {len(grids)}; pass the max_num "
            "(--max-num) the image was processed with"
        )
    return cols, rows


class InternVL(Family):
    """InternVL2.5/3 (-hf): each image is a run of ``tiles * 256`` tokens; one 16x16 grid per tile."""

    name = "internvl"
    model_types = ("internvl",)
    tower_refusal = ("its pixel shuffle after InternViT turns each 2 x 2 patches into one LLM token, so a "
                     "patch slot merged in the tower is no LLM token of its own; the in-tower merge runs on llava")
    video_structure_inside = ("its processor writes a video as one-tile image runs with the text 'FrameN: ' "
                              "between the frames")
    model_class = "InternVLForConditionalGeneration"
    processor_class = "InternVLProcessor"
    default_pretrained = "OpenGVLab/InternVL2_5-8B-MPO-hf"
    # lmms-eval's internvl_hf keys (same defaults), plus our max_num and crop_to_patches.
    model_args: ClassVar[dict[str, str]] = {
        "min_patches": "minimum number of 448 px tiles per image (default 1)",
        "max_patches": f"maximum number of 448 px tiles per image (default {LMMS_EVAL_MAX_PATCHES}, lmms-eval's; "
                       "RefCOCO tasks use 6, InternVL's grounding protocol)",
        "max_num": "older name of max_patches; max_patches wins when both are given",
        "crop_to_patches": "true (default): InternVL's dynamic tiling; false: one tile per image; auto: the "
                           "checkpoint's saved setting (what lmms-eval's internvl_hf uses)",
        "num_frames": "frames sampled uniformly per video (default 32, lmms-eval's internvl_hf); with fps, the most",
        "fps": "video frames per second to sample (default unset: num_frames uniform frames)",
    }
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        "internvl2_5-1b": {"text": (24, 896, 14, 2, 4864, "qwen2")},
        "internvl2_5-2b": {"text": (24, 2048, 16, 8, 8192, "llama")},
        "internvl2_5-8b": {"text": (32, 4096, 32, 8, 14336, "llama")},
        "internvl3-8b": {"text": (28, 3584, 28, 4, 18944, "qwen2")},  # Qwen2.5-7B
        "internvl3_5-8b": {"text": (36, 4096, 32, 8, 12288, "qwen3")},  # Qwen3-8B
    }

    @classmethod
    def parse_model_args(cls, args):
        max_num = args.pop("max_num", None)
        max_patches = args.pop("max_patches", None)
        if max_patches is None:
            max_patches = LMMS_EVAL_MAX_PATCHES if max_num is None else max_num
        name = "max_num" if max_num is not None and max_patches is max_num else "max_patches"
        out = {"min_patches": int_arg("min_patches", args.pop("min_patches", 1), 1),
               "max_patches": int_arg(name, max_patches, 1)}
        if out["min_patches"] > out["max_patches"]:
            raise ValueError(f"min_patches={out['min_patches']} > max_patches={out['max_patches']}: need "
                             "min_patches <= max_patches")
        crop = str(args.pop("crop_to_patches", "true")).strip().lower()
        if crop not in ("true", "false", "auto"):
            raise ValueError(f"crop_to_patches={crop!r}: must be true, false or auto")
        out["crop_to_patches"] = crop
        out["num_frames"] = int_arg("num_frames", args.pop("num_frames", 32), 1)
        out["fps"] = optional_float_arg("fps", args.pop("fps", None))
        out["default_max_new_tokens"] = 1024  # lmms-eval's internvl_hf, when a task sets none
        return out

    @classmethod
    def video_sampling(cls, options):
        """Videos go to the processor as frames, one 448 px tile each ("Frame1: <img>...</img>", lmms-eval's
        internvl_hf). The processor output does not say which tile runs form a video, so the runner hands the
        engine each request's frame counts (``PruneHandle.video_frames``) and :meth:`join_videos` makes each
        video ONE span, one 16x16 grid per frame, the text between frames structural."""
        return {"num_frames": options["num_frames"], "fps": options["fps"]}

    @classmethod
    def processor_kwargs(cls, options):
        # lmms-eval passes min_patches/max_patches and relies on the checkpoint's crop_to_patches, which the
        # -hf checkpoints save as false (one tile whatever max_patches says); true is InternVL's own dynamic
        # preprocessing (1..max_patches tiles + thumbnail), auto restores lmms-eval's behaviour.
        out = {"min_patches": options["min_patches"], "max_patches": options["max_patches"]}
        if options["crop_to_patches"] != "auto":
            out["crop_to_patches"] = options["crop_to_patches"] == "true"
        return out

    @classmethod
    def image_kwargs(cls, max_num):
        return {} if max_num is None else {"images_kwargs": {"max_patches": max_num}}

    # ---- processor-level token budget: the tile count
    input_budget_refusal = None

    @classmethod
    def check_input_budget(cls, keep_ratio, keep_tokens, options):
        """InternVL resizes every tile to 448 px, so only the tile count moves the token count: refused with
        one tile per image (``crop_to_patches`` not true), and below the fewest tiles' share of the most."""
        super().check_input_budget(keep_ratio, keep_tokens, options)
        if options.get("crop_to_patches") != "true":
            raise ValueError(f"crop_to_patches={options.get('crop_to_patches')!r}: InternVL then resizes every image "
                             f"to one {TILE} px tile (256 tokens) whatever its size, so a smaller image yields no fewer "
                             "tokens; use crop_to_patches=true (the budget then sets the number of tiles)")
        low, high = options["min_patches"], options["max_patches"]
        fewest = low + (low > 1)  # tiles + thumbnail
        floor = fewest / (high + (high > 1))
        if keep_ratio < floor:
            raise ValueError(f"keep_ratio={keep_ratio}: with min_patches={low} and max_patches={high}, InternVL's "
                             f"fewest tiles ({fewest}) are {floor:.3g} of the most ({high + (high > 1)}); raise "
                             f"keep_ratio to >= {floor:.3g} or max_patches")

    @classmethod
    def budget_images(cls, images, keep_ratio, options, processor=None):
        """The budget as a tile count: per image, the ``max_patches`` ``m`` in ``min_patches..max_patches``
        whose tiles (grid + thumbnail, InternVL's ``dynamic_preprocess``) come closest to ``keep_ratio`` of its
        tiles at ``max_patches`` (ties: fewer); a batch shares the smallest ``m``. The images are unchanged."""
        cls.check_input_budget(keep_ratio, None, options)
        ip = getattr(processor, "image_processor", None)
        tile = int(ip.size["height"]) if ip is not None and getattr(ip, "size", None) is not None else TILE
        low, high = options["min_patches"], options["max_patches"]
        chosen = []
        for image in images:
            width, height = image.size
            counts = {m: num_tiles(width, height, m, low, tile) for m in range(low, high + 1)}
            target = keep_ratio * counts[high]
            chosen.append(min(counts, key=lambda m: (abs(counts[m] - target), counts[m])))
        return images, {**options, "max_patches": min(chosen)}

    # ---- geometry
    @classmethod
    def token_boxes(cls, image_size, grids, processor=None, max_num=None):
        width, height = geo.check_size(image_size)
        grids = geo.grid_list(grids)
        if len(grids) == 1:
            return geo.raster((0, 0, width, height), grids[0]).float()
        cols, rows = tiles_of((width, height), grids, processor, max_num)
        tile_grids = grids[:-1]
        if len(set(tile_grids)) != 1:
            raise ValueError(f"grids={grids!r}: InternVL tiles must all have the same token grid")
        gr, gc = tile_grids[0]
        # One raster over the whole image, so neighbouring tiles share their edges exactly.
        xs, ys = geo.edges(0, width, cols * gc), geo.edges(0, height, rows * gr)
        out = []
        for k in range(cols * rows):
            r, c = divmod(k, cols)
            out.append(geo.lattice(xs[c * gc: (c + 1) * gc + 1], ys[r * gr: (r + 1) * gr + 1]))
        out.append(geo.raster((0, 0, width, height), grids[-1]))
        return torch.cat(out).float()

    @classmethod
    def token_views(cls, grids):
        grid_list = geo.grid_list(grids)
        if len(grid_list) == 1:
            return super().token_views(grids)
        n = sum(r * c for r, c in grid_list)
        thumb = grid_list[-1][0] * grid_list[-1][1]
        tiles = torch.arange(n) < n - thumb
        return {"tiles": tiles, "thumbnail": ~tiles}

    @classmethod
    def grid_labels(cls, image_size, grids, processor=None, max_num=None):
        grid_list = geo.grid_list(grids)
        if len(grid_list) == 1:
            return ["image"]
        cols, _ = tiles_of(image_size, grid_list, processor, max_num)
        return [f"tile r{k // cols + 1} c{k % cols + 1}" for k in range(len(grid_list) - 1)] + ["thumbnail"]

    @classmethod
    def layout_key(cls, image_size, grids, processor=None, max_num=None):
        cols, rows = tiles_of(image_size, grids, processor, max_num)
        return f"tiles{cols}x{rows}"

    # ---- benchmark geometry
    @classmethod
    def build_geometry(cls, spec, layers=None):
        import transformers as tf

        depth, hidden, heads, kv, ffn, kind = spec["text"]
        text = bench_text_config(layers or depth, hidden, heads, kv, ffn, kind)
        text_cfg = {"qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}.get(kind, tf.LlamaConfig)(**text)
        vision = tf.InternVLVisionConfig(**_INTERNVIT_300M, image_size=TILE, patch_size=14,
                                         norm_type="layer_norm", use_qk_norm=False)
        config = tf.InternVLConfig(vision_config=vision, text_config=text_cfg, image_token_id=IMAGE_TOKEN,
                                   image_seq_length=256, downsample_ratio=0.5)
        return tf.InternVLForConditionalGeneration, config

    @classmethod
    def synthetic_inputs(cls, model, visual_tokens, text, gen):
        if visual_tokens % 256:
            raise ValueError(f"--tokens {visual_tokens}: InternVL uses 256 tokens per tile; give a multiple of 256")
        return torch.randn(visual_tokens // 256, 3, TILE, TILE, generator=gen), {}

    # ---- adapter
    @classmethod
    def projector_flops(cls, config, patches):
        """Pixel shuffle merges ``r x r`` patches (``r = 1 / downsample_ratio``) into one row of ``r^2`` times the
        width, then LayerNorm and the MLP to the LM's width."""
        r = round(1 / config.downsample_ratio)
        width = int(config.get_text_config().hidden_size)
        return mlp_flops(patches // (r * r), (int(config.vision_config.hidden_size) * r * r, width, width))

    def vision_layers(self):
        return self.vision_tower.encoder.layer

    def cls_importance(self, rows):
        """InternViT [CLS] row over 32x32 patches, summed over the 2x2 groups pixel shuffle merges."""
        from lmms_prune.scores import cls_attention, merge_pixel_shuffle

        side = math.isqrt(rows.shape[-1] - 1)
        factor = round(1 / self.config.downsample_ratio)
        return torch.cat([merge_pixel_shuffle(cls_attention(r, has_cls=True), side, factor) for r in rows])

    def wrap_image_features(self, encoded, kept):
        encoded.pooler_output = kept[None]
        return encoded

    def encoder_modality(self, span):
        """Video frames are image tiles in ``pixel_values``, in prompt order with the images."""
        return "image"

    def encoder_rows(self, span):
        """Video spans: the text between frames (``</img>\\nFrame2: <img>``) has no encoder row."""
        if not span.video:
            return torch.arange(span.length)
        rows = torch.full((span.length,), -1, dtype=torch.long)
        rows[span.visual_index] = torch.arange(span.num_visual)
        return rows

    def join_videos(self, spans, video_frames):
        """Each video's per-frame runs (one one-tile image span each, as the processor writes them) joined into
        one video span. ``video_frames[b]``: sample ``b``'s visual parts in prompt order, None for an image (one
        run, any number of tiles), ``k`` for a ``k``-frame video (``k`` runs); a batch ``r`` times larger
        (``num_beams``) repeats each sample's entry."""
        if video_frames is None:
            return spans
        if not video_frames or len(spans) % len(video_frames):
            raise ValueError(f"video_frames describes {len(video_frames)} samples, but the call has {len(spans)}")
        repeat = len(spans) // len(video_frames)
        out: list[list[ImageSpan]] = []
        for b, runs in enumerate(spans):
            parts = video_frames[b // repeat]
            runs_needed = sum(1 if k is None else k for k in parts)
            if runs_needed != len(runs):
                raise ValueError(f"video_frames of sample {b // repeat} ({parts}) accounts for {runs_needed} runs "
                                 f"of image tokens, but the sample has {len(runs)}")
            joined, i = [], 0
            for k in parts:
                if k is None:
                    joined.append(runs[i])
                    i += 1
                    continue
                frames = runs[i:i + k]
                if any(f.grids != frames[0].grids or len(f.grids) != 1 for f in frames):
                    raise ValueError(f"video_frames of sample {b // repeat}: a {k}-frame video must be {k} one-tile "
                                     f"runs, got grids {[f.grids for f in frames]}")
                joined.append(join_frames(frames))
                i += k
            out.append(joined)
        return out

    def image_grids(self, run_length, image_index, forward_kwargs, sample=0, start=0):
        per_tile = self.tokens_per_image()
        side = math.isqrt(per_tile)
        if run_length % per_tile:
            raise ValueError(f"internvl: a run of {run_length} image tokens is not a multiple of {per_tile}")
        return [[(side, side)] * (run_length // per_tile)]


FAMILY = InternVL
