"""Qwen2.5-VL (transformers-native): one ``(h/28) x (w/28)`` grid of merged tokens per image, 3-D M-RoPE.

Images go through Qwen's own pipeline (qwen_vl_utils ``fetch_image``, as lmms-eval's ``qwen2_5_vl`` does), then
the processor smart-resizes them to multiples of 28 px within ``min_pixels``..``max_pixels`` (lmms-eval's
defaults: 256*28*28..1605632). The grid comes from ``image_grid_thw`` when the forward call has it;
``generate`` in transformers 5 encodes images before the first forward and passes only the 3-D M-RoPE
``position_ids``, whose height and width rows span exactly the grid of each image. Grounding answers:
``{"bbox_2d": [x1, y1, x2, y2]}`` in pixels of the resized image.

Videos (``pixel_values_videos``, ``video_grid_thw``): frames go through qwen_vl_utils ``fetch_video`` (even frame
count, 28 px multiples within ``min_pixels``..``max_pixels``, as lmms-eval's ``qwen2_5_vl``) and the processor
merges two frames in time (``temporal_patch_size``): one video is one span of ``t`` grids of ``(h/28, w/28)``;
M-RoPE numbers the merged frames ``second_per_grid_ts * tokens_per_second`` apart. ``max_num_frames`` / ``fps``
are lmms-eval's frame sampling (:meth:`Qwen25VL.video_sampling`).

VisPruner (no [CLS] token): the mean attention each patch receives at the last full-attention vision block
(``fullatt_block_indexes[-1]``; the windowed blocks do not qualify), summed over each 2x2 merge group and
mapped from the tower's window order back to the prompt's token order (methods.md section 4).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lmms_prune.efficiency import EncoderDims, encoder_flops, mlp_flops
from lmms_prune.families.base import (
    IMAGE_TOKEN,
    Family,
    bench_text_config,
    bool_arg,
    int_arg,
    optional_float_arg,
)


class Qwen25VL(Family):
    """Qwen2.5-VL: one (h/28, w/28) grid per image."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    tower_refusal = ("its tower applies 2-D rotary positions and windowed attention in every layer and merges "
                     "2 x 2 patches after it, so masking a token is not removing it; the in-tower merge runs on "
                     "llava")
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    default_pretrained = "Qwen/Qwen2.5-VL-7B-Instruct"
    # lmms-eval's qwen2_5_vl keys and defaults (Qwen2-VL: its qwen2_vl wrapper's pixel defaults).
    lmms_eval_pixels: ClassVar[tuple[int, int]] = (256 * 28 * 28, 1605632)  # (min_pixels, max_pixels)
    model_args: ClassVar[dict[str, str]] = {
        "min_pixels": "lower bound of an image's resized area in pixels (default 200704 = 256*28*28, lmms-eval's)",
        "max_pixels": "upper bound of an image's resized area in pixels (default 1605632, lmms-eval's)",
        "system_prompt": "system message of conversations that have none (default 'You are a helpful "
                         "assistant.'; none: no system message, the chat template's own default applies)",
        "reasoning_prompt": "text appended to the last user turn (default none; \\n is a newline)",
        "interleave_visuals": "accepted for lmms-eval (default false); chat requests keep the task's own order of "
                              "images and text, as lmms-eval's chat wrapper does",
        "max_num_frames": "frames sampled per video, uniformly (default 32, lmms-eval's); with fps, unused "
                          "(lmms-eval's qwen2_5_vl does not cap fps sampling; Qwen3-VL does)",
        "fps": "video frames per second to sample (default unset: max_num_frames uniform frames, lmms-eval's)",
    }
    box_convention = "resized_pixels"
    has_cls = False
    image_input_keys = ("pixel_values", "image_grid_thw")
    video_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values_videos", "video_grid_thw")
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {
        "qwen2_5_vl-7b": {"text": (28, 3584, 28, 4, 18944, "qwen2")},
        # one video: 32 frames of 448x448 -> 16 merged frames of 16x16 tokens (--tokens 4096), sampled at 2 fps
        "qwen2_5_vl_7b_video": {"text": (28, 3584, 28, 4, 18944, "qwen2"), "video": {"size": 448, "fps": 2.0}},
    }
    config_class: ClassVar[str] = "Qwen2_5_VLConfig"
    # Side of one merged token in pixels (patch 14 x merge 2): min_pixels/max_pixels below its square are refused.
    # Adapters read the geometry from the loaded config; this bound serves argument checks before loading.
    token_pixels: ClassVar[int] = 28

    @classmethod
    def bench_vision(cls, text_hidden: int) -> dict[str, Any]:
        """The vision tower of the benchmark geometries (the 7B's widths) for an LM of width ``text_hidden``."""
        return {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "patch_size": 14,
                "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31], "out_hidden_size": text_hidden}

    @classmethod
    def parse_model_args(cls, args):
        out, given = {}, set()
        for name, default in zip(("min_pixels", "max_pixels"), cls.lmms_eval_pixels):
            value = args.pop(name, None)
            unset = value is None or str(value).strip().lower() in ("", "none")
            out[name] = default if unset else int_arg(name, value, cls.token_pixels**2)
            given |= set() if unset else {name}
        # a bound the user set wins over the other bound's default: max_pixels=65536 alone lowers min_pixels to
        # qwen_vl_utils' floor of 4 tokens (not to max_pixels itself: smart_resize rounds up to reach a minimum)
        if given == {"max_pixels"} and out["min_pixels"] > out["max_pixels"]:
            out["min_pixels"] = min(4 * cls.token_pixels**2, out["max_pixels"])
        elif given == {"min_pixels"}:
            out["max_pixels"] = max(out["min_pixels"], out["max_pixels"])
        if out["min_pixels"] > out["max_pixels"]:
            raise ValueError(f"min_pixels={out['min_pixels']} > max_pixels={out['max_pixels']}: swap them")
        system = args.pop("system_prompt", "You are a helpful assistant.")
        out["system_prompt"] = None if system is None or str(system).strip().lower() in ("", "none") else str(system)
        reasoning = args.pop("reasoning_prompt", None)
        reasoning = None if reasoning is None or str(reasoning).lower() in ("", "none") else str(reasoning)
        out["reasoning_prompt"] = reasoning.replace("\\n", "\n") if reasoning else None
        out["interleave_visuals"] = bool_arg("interleave_visuals", args.pop("interleave_visuals", False))
        out["max_num_frames"] = int_arg("max_num_frames", args.pop("max_num_frames", 32), 1)
        out["fps"] = optional_float_arg("fps", args.pop("fps", None))
        out["default_max_new_tokens"] = 128  # lmms-eval's qwen2_5_vl, when a task sets none
        return out

    @classmethod
    def processor_kwargs(cls, options):
        # transformers' name of the pixel budget (min_pixels/max_pixels call arguments are deprecated)
        return {"size": {"shortest_edge": options["min_pixels"], "longest_edge": options["max_pixels"]}}

    @classmethod
    def prepare_images(cls, images, options, processor=None):
        """Qwen's own pipeline (qwen_vl_utils ``fetch_image``, which lmms-eval's wrapper runs through
        ``process_vision_info``): RGB, resized to multiples of 28 px within qwen_vl_utils' own pixel bounds,
        before the processor resizes within ``min_pixels``/``max_pixels``."""
        from qwen_vl_utils import fetch_image

        patch = cls.token_pixels // 2  # the patch of one merged token's 2x2 (Qwen3-VL: 16, lmms-eval's qwen3_vl)
        return [fetch_image({"image": image}, image_patch_size=patch) for image in images]

    input_budget_refusal = None  # dynamic resolution: fewer pixels, fewer tokens

    @classmethod
    def budget_images(cls, images, keep_ratio, options, processor=None):
        """VTC-Bench's downsampling baseline (Liao et al., 2025, arXiv 2510.07143) for a budget: each image, as
        the processor would resize it under ``options`` (``H x W``, multiples of the merged-token side ``f``),
        is resized (bicubic, as VTC-Bench) by ``sqrt(keep_ratio)`` per side, rounded to multiples of ``f`` (at
        least one token per side), so it yields about ``keep_ratio`` of its tokens; ``min_pixels`` is lowered to
        the smallest new area so the processor does not enlarge it back (lmms-eval's Qwen2.5-VL default floor
        is 256 tokens)."""
        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        cls.check_input_budget(keep_ratio, None, options)
        ip = getattr(processor, "image_processor", None)
        side = (int(ip.patch_size) * int(ip.merge_size) if ip is not None and hasattr(ip, "merge_size")
                else cls.token_pixels)
        scale = keep_ratio ** 0.5
        out, areas = [], []
        for image in images:
            width, height = image.size
            rows, cols = smart_resize(height, width, factor=side, min_pixels=options["min_pixels"],
                                      max_pixels=options["max_pixels"])
            new_rows = max(side, round(rows * scale / side) * side)
            new_cols = max(side, round(cols * scale / side) * side)
            out.append(image.resize((new_cols, new_rows), resample=Image.BICUBIC))
            areas.append(new_rows * new_cols)
        return out, {**options, "min_pixels": min(options["min_pixels"], *areas)}

    @classmethod
    def box_frame(cls, image_size, inputs, index, options, processor=None):
        """``resized_pixels`` with the size the processor really resized image ``index`` to: ``image_grid_thw``
        rows ``(t, h, w)`` are patches, so the input is ``h * patch`` x ``w * patch`` pixels (patch: the image
        processor's ``patch_size``, else half of :attr:`token_pixels`). Families answering on a relative grid
        (Qwen2-VL, Qwen3-VL: ``grid1000``) record the resized size too, for information, when ``inputs`` has it."""
        from lmms_prune import geometry as geo

        width, height = geo.check_size(image_size)
        if cls.box_convention not in ("resized_pixels", "grid1000"):
            raise TypeError(f"{cls.name}: box_convention={cls.box_convention!r} has no Qwen box frame")
        frame = {"convention": cls.box_convention, "width": int(width), "height": int(height)}
        grid = None if inputs is None else inputs.get("image_grid_thw")
        if grid is None:
            if cls.box_convention == "resized_pixels":
                raise ValueError(f"{cls.name}: a resized_pixels box frame needs the processor's image_grid_thw")
            return frame
        _, rows, cols = (int(v) for v in grid[index])
        ip = geo.image_processor(processor) if processor is not None else None
        patch = int(getattr(ip, "patch_size", None) or cls.token_pixels // 2)
        return {**frame, "resized_width": cols * patch, "resized_height": rows * patch}

    @classmethod
    def video_sampling(cls, options):
        return {"num_frames": options["max_num_frames"], "fps": options["fps"]}

    @classmethod
    def prepare_videos(cls, videos, options):
        """Qwen's own video pipeline on already-sampled frames (qwen_vl_utils ``fetch_video`` on a frame list, as
        lmms-eval's ``qwen2_5_vl`` runs it through ``process_vision_info``): an even number of frames (the last
        repeated), each resized to multiples of 28 px within ``min_pixels``..``max_pixels`` and qwen_vl_utils'
        per-video pixel cap; the processor then neither resamples nor resizes them. The part's ``fps`` (the
        sampled frames' rate, default qwen_vl_utils' 2.0) sets the M-RoPE time step (``second_per_grid_ts``)."""
        from qwen_vl_utils import fetch_video

        from lmms_prune.families.base import check_frames

        patch = cls.token_pixels // 2
        tensors, metadata = [], []
        for part in videos:
            fps = part.get("fps")
            ele = {"video": check_frames(part), "min_pixels": options["min_pixels"],
                   "max_pixels": options["max_pixels"]}
            if fps is not None:
                ele["sample_fps"] = optional_float_arg("video fps", fps)
            (video, meta), _ = fetch_video(ele, image_patch_size=patch, return_video_metadata=True,
                                           return_video_sample_fps=True)
            tensors.append(video)
            metadata.append(meta)
        return {"videos": tensors, "video_metadata": metadata,
                "videos_kwargs": {"do_sample_frames": False, "do_resize": False}}

    @classmethod
    def build_geometry(cls, spec, layers=None):
        import transformers as tf

        depth, hidden, heads, kv, ffn, kind = spec["text"]
        text = bench_text_config(layers or depth, hidden, heads, kv, ffn, kind)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}
        vision = cls.bench_vision(hidden)
        config = getattr(tf, cls.config_class)(
            vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, video_token_id=IMAGE_TOKEN + 1,
            vision_start_token_id=IMAGE_TOKEN + 2, vision_end_token_id=IMAGE_TOKEN + 3)
        if "video" in spec:  # synthetic_inputs makes one video of this frame size instead of an image
            config.lmms_prune_bench_video = dict(spec["video"])
        return getattr(tf, cls.model_class), config

    @classmethod
    def vision_depth(cls, config):
        return int(config.vision_config.depth)

    @classmethod
    def cut_vision(cls, config, layers):
        """The first ``layers`` blocks; full-attention blocks (Qwen2.5-VL) and DeepStack taps (Qwen3-VL) past
        the cut move to its last block."""
        vc = config.vision_config
        vc.depth = layers
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            taps = getattr(vc, key, None)
            if taps:
                setattr(vc, key, sorted({min(int(i), layers - 1) for i in taps}))

    @classmethod
    def synthetic_inputs(cls, model, visual_tokens, text, gen):
        video = getattr(model.config, "lmms_prune_bench_video", None)
        if video:
            return cls.synthetic_video(model, visual_tokens, video, gen)
        rows = max(r for r in range(1, int(visual_tokens**0.5) + 1) if visual_tokens % r == 0)
        cols = visual_tokens // rows
        vc = model.config.vision_config
        merge = int(vc.spatial_merge_size)
        patch_dim = 3 * vc.temporal_patch_size * vc.patch_size**2
        pixels = torch.randn(visual_tokens * merge * merge, patch_dim, generator=gen)
        return pixels, {"image_grid_thw": torch.tensor([[1, merge * rows, merge * cols]])}

    @classmethod
    def synthetic_video(cls, model, visual_tokens, video, gen):
        """One video of ``visual_tokens`` tokens: merged frames (two frames each) of ``video["size"]`` px square,
        i.e. ``(size / 28)^2`` tokens each; random patches, ``second_per_grid_ts`` from ``video["fps"]``."""
        vc = model.config.vision_config
        merge, patch = int(vc.spatial_merge_size), int(vc.patch_size)
        side = int(video["size"]) // (patch * merge)
        per_frame = side * side
        if visual_tokens % per_frame:
            raise ValueError(f"--tokens {visual_tokens}: a video of {video['size']}x{video['size']} frames has "
                             f"{per_frame} tokens per merged frame (two frames); give a multiple of {per_frame}, "
                             f"e.g. {16 * per_frame} for 32 frames")
        t = visual_tokens // per_frame
        patch_dim = 3 * vc.temporal_patch_size * patch**2
        pixels = torch.randn(visual_tokens * merge * merge, patch_dim, generator=gen)
        return pixels, {"video_grid_thw": torch.tensor([[t, merge * side, merge * side]]),
                        "second_per_grid_ts": torch.tensor([vc.temporal_patch_size / float(video["fps"])])}

    # ---- adapter
    @property
    def vision_tower(self):
        return self.model.model.visual

    # ---- theoretical vision cost: attention within each frame (``cu_seqlens``), 2x2 merger to the LM's width
    @classmethod
    def vision_encoder(cls, vc: Any, patch_dim: int) -> tuple[EncoderDims, int]:
        """(the tower's dimensions, the merger's output width) of vision config ``vc``. Qwen2.5-VL: SwiGLU."""
        return (EncoderDims(int(vc.hidden_size), int(vc.intermediate_size), int(vc.depth), patch_dim, 3),
                int(vc.out_hidden_size))

    @classmethod
    def mergers(cls, vc: Any) -> int:
        """How many patch mergers project the tower's output (Qwen3-VL: one more per DeepStack tap)."""
        return 1

    @classmethod
    def tower_flops(cls, vc: Any, dims: EncoderDims, frames: list[tuple[int, int]]) -> int:
        """Qwen2.5-VL's blocks: full attention per frame in ``fullatt_block_indexes``, elsewhere within windows
        of ``window_size`` pixels (``get_window_index``: ``w x w`` merged tokens, smaller at the edges)."""
        merge = int(vc.spatial_merge_size)
        side = int(vc.window_size) // merge // int(vc.patch_size)
        windows = []
        for h, w in frames:
            rows = [min(side, h // merge - i) for i in range(0, h // merge, side)]
            cols = [min(side, w // merge - j) for j in range(0, w // merge, side)]
            windows += [r * c * merge * merge for r in rows for c in cols]
        return encoder_flops(dims, sum(h * w for h, w in frames), [h * w for h, w in frames], windows,
                             vc.fullatt_block_indexes)

    @classmethod
    def vision_flops(cls, config, inputs):
        """FLOPs of the tower and mergers over every frame of ``image_grid_thw`` / ``video_grid_thw``
        (rows of ``t x h x w`` patches; each temporal step attends on its own)."""
        vc = config.vision_config
        merge = int(vc.spatial_merge_size)
        total = 0
        for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            pixels, grid = inputs.get(key), inputs.get(grid_key)
            if pixels is None or grid is None:
                continue
            dims, out = cls.vision_encoder(vc, int(pixels.shape[-1]))
            frames = [(int(h), int(w)) for t, h, w in grid.tolist() for _ in range(int(t))]
            patches = sum(h * w for h, w in frames)
            width = dims.hidden_size * merge * merge
            merged = mlp_flops(patches // (merge * merge), (width, width, out))
            total += cls.tower_flops(vc, dims, frames) + cls.mergers(vc) * merged
        return total

    def projector(self):
        return self.vision_tower.merger

    def vision_layers(self):
        return self.vision_tower.blocks

    def vision_feature_attention(self):
        """The last full-attention block's attention (VisPruner without [CLS], methods.md section 4):
        Qwen2.5-VL's windowed blocks do not qualify, so ``fullatt_block_indexes[-1]``; towers without
        windows (Qwen2-VL, Qwen3-VL): the last block, whose output the merger projects."""
        blocks = self.vision_layers()
        full = getattr(self.vision_config, "fullatt_block_indexes", None)
        return blocks[full[-1] if full else len(blocks) - 1].attn

    def early_vision_attention(self):
        """The first full-attention block at or after the tower's layer ``L // 4 - 1`` (Qwen2.5-VL-7B: block 7 of
        32, ``fullatt_block_indexes[0]``, VScan's Qwen code's local layer): a windowed block sees one window, not
        the image. Towers without windows (Qwen2-VL, Qwen3-VL): block ``L // 4 - 1``."""
        blocks = self.vision_layers()
        early = max(0, len(blocks) // 4 - 1)
        full = getattr(self.vision_config, "fullatt_block_indexes", None)
        return blocks[next((i for i in full if i >= early), full[-1]) if full else early].attn

    def frame_query_block(self):
        """The tower's last block, whatever its attention span (FastVID's Qwen2.5-VL port reads block
        ``depth - 1``, lines 581-584; on Qwen2.5-VL-7B it is also ``fullatt_block_indexes[-1]``), and its 2 x 2
        merge unit."""
        return self.vision_layers()[-1].attn, int(self.vision_config.spatial_merge_size) ** 2

    def frame_query_attention(self, unit_queries: list[torch.Tensor], unit_keys: list[torch.Tensor],
                              kwargs: dict[str, Any]) -> torch.Tensor:
        """FastVID's Qwen2.5-VL attention ``[num_visual_tokens]`` in the prompt's token order, each frame's
        summing to 1 (:func:`lmms_prune.selection.frame_query_attention`, per image or video of
        ``image_grid_thw``: its ``t`` merged frames are the frames).

        ``unit_queries`` / ``unit_keys``: per call of :meth:`frame_query_block`'s attention, ``[H, s, d]`` means
        per merge unit, in the tower's (window) order; together they are the tower's whole sequence, each
        image's or video's units in a run, frame after frame (``get_vision_window_index`` permutes units within
        a frame). Their port restores the order after the softmax (``attn_weights[reverse_indices]``, line 593),
        as :meth:`_merged_order` does here."""
        from lmms_prune.selection import frame_query_attention

        queries, keys = torch.cat(unit_queries, 1), torch.cat(unit_keys, 1)
        thw = kwargs["image_grid_thw"].tolist()
        unit = int(self.vision_config.spatial_merge_size) ** 2
        sizes = [t * h * w // unit for t, h, w in thw]
        if sum(sizes) != keys.shape[1]:
            raise ValueError(f"the tower's block {len(self.vision_layers()) - 1} saw {keys.shape[1]} merge units "
                             f"but image_grid_thw={thw} has {sum(sizes)}")
        parts = zip(torch.split(queries, sizes, 1), torch.split(keys, sizes, 1), thw)
        tokens = torch.cat([frame_query_attention(q, k, t).flatten() for q, k, (t, _, _) in parts])
        order = self._merged_order(kwargs)
        return tokens if order is None else tokens[order.to(tokens.device)]

    def _merged_order(self, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Position in the prompt's token order of each merged unit the tower processes, or None when the
        tower keeps the processor's order. Qwen2.5-VL permutes the merge units into attention windows before
        its blocks (``get_vision_window_index``) and restores the order after the merger."""
        vc = self.vision_config
        if getattr(vc, "window_size", None) is None:
            return None
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(kwargs["image_grid_thw"], spatial_merge_size=vc.spatial_merge_size,
                                                  window_size=vc.window_size, patch_size=vc.patch_size)
        return torch.argsort(window_index)

    def vision_importance(self, rows, kwargs):
        """Mean received attention per patch (in the tower's order), summed over each merged 2x2 group, in
        the prompt's token order."""
        from lmms_prune.scores import merge_consecutive

        unit = int(self.vision_config.spatial_merge_size) ** 2
        tokens = merge_consecutive(torch.cat(rows), unit)
        order = self._merged_order(kwargs)
        return tokens if order is None else tokens[order.to(tokens.device)]

    def flatten_pre_projector(self, pre, kwargs=None):
        """The merger's input per LLM token: the ``unit`` patch features it merges, concatenated."""
        unit = int(self.vision_config.spatial_merge_size) ** 2
        tokens = pre.reshape(-1, unit * pre.shape[-1])
        order = self._merged_order(kwargs) if kwargs is not None else None
        return tokens if order is None else tokens[order.to(tokens.device)]

    def encode_images(self, kwargs):
        return self.model.model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"], return_dict=True)

    def encode_videos(self, kwargs):
        return self.model.model.get_video_features(kwargs["pixel_values_videos"], kwargs["video_grid_thw"],
                                                   return_dict=True)

    def video_signal_kwargs(self, kwargs):
        """The tower runs videos as images of ``t`` merged frames: the same window order and merge units."""
        return {"image_grid_thw": kwargs["video_grid_thw"]}

    def wrap_image_features(self, encoded, kept):
        encoded.pooler_output = (kept,)
        return encoded

    def original_positions(self, input_ids, mask2d, kwargs):
        """[4, B, T]: the text row transformers uses for masks, then the 3-D M-RoPE (t, h, w) rows."""
        text = super().original_positions(input_ids, mask2d, kwargs)
        mrope, _ = self.model.model.get_rope_index(
            input_ids, image_grid_thw=kwargs.get("image_grid_thw"), video_grid_thw=kwargs.get("video_grid_thw"),
            second_per_grid_ts=kwargs.get("second_per_grid_ts"), attention_mask=mask2d,
            mm_token_type_ids=kwargs.get("mm_token_type_ids"))
        return torch.cat([text[None], mrope], 0)

    def image_grids(self, run_length, image_index, forward_kwargs, sample=0, start=0):
        thw = forward_kwargs.get("image_grid_thw")
        if thw is not None:
            return self._grids_from_thw(thw, run_length, image_index)
        pos = forward_kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (3, 4):
            return self._grids_from_positions(pos[-3:, sample, start: start + run_length])
        raise ValueError(f"{self.name}: image_grid_thw or 3-D position_ids are needed to lay out the visual tokens")

    def install_hooks(self):
        """Wrap ``get_video_features`` (an instance attribute, signature kept) so that its output remembers the
        ``video_grid_thw`` it was made for: ``generate`` encodes videos before the first forward and hands that
        forward only the encoder output and the M-RoPE positions."""
        import functools
        import inspect

        from lmms_prune.families.llava_next import ENCODER_INPUTS, _RestoreMethod

        inner = self.model.model
        original = inner.get_video_features

        @functools.wraps(original)
        def get_video_features(*args: Any, **kwargs: Any):
            out = original(*args, **kwargs)
            bound = inspect.signature(original).bind_partial(*args, **kwargs).arguments
            if not isinstance(out, tuple):
                setattr(out, ENCODER_INPUTS, {"video_grid_thw": bound.get("video_grid_thw")})
            return out

        inner.get_video_features = get_video_features
        return [_RestoreMethod(inner, "get_video_features")]

    def video_thw(self, forward_kwargs: dict[str, Any]) -> torch.Tensor | None:
        """``[videos, 3]`` (frames / temporal patch, rows, cols in patches) of the call's videos: the forward's
        own ``video_grid_thw``, or the one the encoder output was made for (see :meth:`install_hooks`)."""
        from lmms_prune.families.llava_next import ENCODER_INPUTS

        thw = forward_kwargs.get("video_grid_thw")
        if thw is None:
            encoded = (forward_kwargs.get("mm_encoder_outputs") or {}).get("video")
            thw = (getattr(encoded, ENCODER_INPUTS, None) or {}).get("video_grid_thw")
        return thw

    def video_grids(self, run_length, video_index, forward_kwargs, sample=0, start=0):
        """One run of video tokens is one video (between its vision start/end tokens): ``t`` merged frames
        (two frames each, ``temporal_patch_size``) of one ``(h/merge, w/merge)`` grid each, from the videos'
        grid sizes, else from the 3-D M-RoPE positions (each merged frame restarts the height/width raster)."""
        thw = self.video_thw(forward_kwargs)
        if thw is not None:
            if video_index >= len(thw):
                raise ValueError(f"{self.name}: video tokens at {start} but video_grid_thw describes "
                                 f"{len(thw)} video(s)")
            merge = int(self.config.vision_config.spatial_merge_size)
            t, h, w = (int(v) for v in thw[video_index])
            grids = [(h // merge, w // merge)] * t
        else:
            pos = forward_kwargs.get("position_ids")
            if not (isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (3, 4)):
                raise ValueError(f"{self.name}: video_grid_thw or 3-D position_ids are needed to lay out the "
                                 "video tokens")
            grids = [g for frame in self._grids_from_positions(pos[-3:, sample, start: start + run_length])
                     for g in frame]
        if sum(r * c for r, c in grids) != run_length:
            raise ValueError(f"{self.name}: a run of {run_length} video tokens does not match the video's "
                             f"{len(grids)} frame grids {grids[:1]}")
        return [(grids, ())]

    def _grids_from_thw(self, thw, run_length, image_index):
        merge = int(self.config.vision_config.spatial_merge_size)
        images: list[list[tuple[int, int]]] = []
        covered, i = 0, image_index
        while covered < run_length:
            t, h, w = (int(v) for v in thw[i])
            grid = (h // merge, w // merge)
            images.append([grid] * t)
            covered += t * grid[0] * grid[1]
            i += 1
        if covered != run_length:
            raise ValueError(f"{self.name}: image_grid_thw does not match a run of {run_length} image tokens")
        return images

    def _grids_from_positions(self, pos: torch.Tensor) -> list[list[tuple[int, int]]]:
        """pos: [3, n] (temporal, height, width) positions of one run; images restart the raster each time the
        width position stops increasing after a full row and the height position jumps back."""
        images: list[list[tuple[int, int]]] = []
        n = pos.shape[1]
        i = 0
        while i < n:
            t0, h0, w0 = (int(v) for v in pos[:, i])
            rows = cols = 0
            j = i
            while j < n and int(pos[0, j]) == t0 and int(pos[1, j]) - h0 == rows:
                width = 0
                while j < n and int(pos[1, j]) - h0 == rows and int(pos[2, j]) - w0 == width:
                    width += 1
                    j += 1
                if cols and width != cols:
                    break
                cols = width
                rows += 1
            if rows * cols == 0:
                raise ValueError(f"{self.name}: cannot read the image grid from position_ids")
            images.append([(rows, cols)])
            i += rows * cols
        return images


FAMILY = Qwen25VL
