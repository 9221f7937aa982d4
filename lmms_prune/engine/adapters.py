"""Per-architecture facts the engine needs: where the decoder is, which ids are image tokens, how each
image's visual tokens are laid out as grids (methods.md section 1).

Supported transformers-native classes: ``InternVLForConditionalGeneration`` (Llama or Qwen2 text model),
``Qwen2_5_VLForConditionalGeneration`` and ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SUPPORTED = ("InternVLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "LlavaForConditionalGeneration")


@dataclass
class ImageSpan:
    """One image's visual tokens inside one sample: ``length`` tokens from sequence index ``start``.

    ``grids`` lists the (rows, cols) of its consecutive token blocks in order (InternVL: one 16x16 grid per
    tile, thumbnail last; Qwen2.5-VL: one (h/28, w/28) grid; LLaVA-1.5: one 24x24 grid).
    """

    start: int
    length: int
    grids: list[tuple[int, int]] = field(default_factory=list)

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.length)


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D bool tensor, as (start, length)."""
    idx = torch.nonzero(mask, as_tuple=False).flatten().tolist()
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class Adapter:
    """Base: the language model and the visual layout of a transformers-native VLM."""

    family = "base"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        inner = model.model
        self.language_model: nn.Module = inner.language_model
        self.layers: nn.ModuleList = self.language_model.layers
        self.text_config = self.language_model.config
        self.image_token_id: int = int(self.config.image_token_id)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # --- pre-LLM pruning: encode images once, select, hand the kept embeddings to the model ---------------
    image_input_keys: tuple[str, ...] = ("pixel_values", "image_sizes")
    has_cls = True

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_config(self):
        return self.vision_tower.config

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def vision_layers(self) -> nn.ModuleList:
        raise TypeError(f"{self.family}: vision-encoder attention is not available")

    def vision_feature_attention(self) -> nn.Module:
        """The attention module of the vision layer whose output the model feeds to the projector."""
        layers = self.vision_layers()
        fl = self.config.vision_feature_layer
        if not isinstance(fl, int):
            raise ValueError(f"{self.family}: vispruner needs one vision_feature_layer, got {fl!r}")
        hidden_index = fl if fl >= 0 else len(layers) + 1 + fl  # hidden_states[0] is the embedding output
        return self._attention_of(layers[hidden_index - 1])

    @staticmethod
    def _attention_of(layer: nn.Module) -> nn.Module:
        return getattr(layer, "self_attn", None) or layer.attention

    def encode_images(self, kwargs: dict[str, Any]):
        return self.model.model.get_image_features(pixel_values=kwargs["pixel_values"], return_dict=True)

    @staticmethod
    def flatten_image_features(pooled) -> torch.Tensor:
        """Projected visual embeddings of every image, in prompt order: [num_visual_tokens, D]."""
        if isinstance(pooled, (list, tuple)):
            return torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled], 0)
        return pooled.reshape(-1, pooled.shape[-1])

    def flatten_pre_projector(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.reshape(-1, pre.shape[-1])

    def cls_importance(self, rows: torch.Tensor) -> torch.Tensor:
        """[images or tiles, H, 1 + P] [CLS] rows -> [num_visual_tokens] VisPruner importance."""
        from lmms_prune.scores import cls_attention

        return torch.cat([cls_attention(r, has_cls=True) for r in rows])

    def wrap_image_features(self, encoded, kept: torch.Tensor):
        encoded.pooler_output = [kept]
        return encoded

    def original_positions(self, input_ids: torch.Tensor, mask2d: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """RoPE positions of the unpruned prompt, [B, T] (as ``generate`` numbers a left-padded batch)."""
        pos = mask2d.long().cumsum(-1) - 1
        return pos.masked_fill(mask2d == 0, 0)

    def pad_token_id(self) -> int:
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
        return int(pad) if pad is not None else 0

    def tokens_per_image(self) -> int:
        return int(self.config.image_seq_length)

    def image_grids(self, run_length: int, image_index: int, forward_kwargs: dict[str, Any],
                    sample: int = 0, start: int = 0) -> list[list[tuple[int, int]]]:
        """Split one run of image tokens into images, each a list of grids."""
        per_image = self.tokens_per_image()
        side = math.isqrt(per_image)
        if run_length % per_image:
            raise ValueError(f"{self.family}: a run of {run_length} image tokens is not a multiple of {per_image}")
        return [[(side, side)] for _ in range(run_length // per_image)]

    def spans(self, input_ids: torch.Tensor, forward_kwargs: dict[str, Any]) -> list[list[ImageSpan]]:
        """Image spans per sample, in sequence order. ``input_ids``: LongTensor[B, T]."""
        out: list[list[ImageSpan]] = []
        image_index = 0
        for b, row in enumerate(input_ids):
            spans: list[ImageSpan] = []
            for start, length in _runs(row == self.image_token_id):
                images = self.image_grids(length, image_index, forward_kwargs, b, start)
                image_index += len(images)
                offset = start
                for grids in images:
                    n = sum(r * c for r, c in grids)
                    spans.append(ImageSpan(offset, n, grids))
                    offset += n
            out.append(spans)
        return out


class InternVLAdapter(Adapter):
    """InternVL2.5/3 (-hf): each image is a run of ``tiles * 256`` tokens; one 16x16 grid per tile."""

    family = "internvl"

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

    def image_grids(self, run_length, image_index, forward_kwargs, sample=0, start=0):
        per_tile = self.tokens_per_image()
        side = math.isqrt(per_tile)
        if run_length % per_tile:
            raise ValueError(f"internvl: a run of {run_length} image tokens is not a multiple of {per_tile}")
        # InternVL wraps every image in <img>...</img>, so one run is one image (its tiles + thumbnail).
        return [[(side, side)] * (run_length // per_tile)]


class LlavaAdapter(Adapter):
    """LLaVA-1.5: 576 tokens (24x24) per image."""

    family = "llava"

    def vision_layers(self):
        return self.vision_tower.encoder.layers

    def tokens_per_image(self) -> int:
        seq = getattr(self.config, "image_seq_length", None)
        if seq:
            return int(seq)
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2


class Qwen25VLAdapter(Adapter):
    """Qwen2.5-VL: one (h/28, w/28) grid per image.

    The grid comes from ``image_grid_thw`` when the forward call has it; ``generate`` in transformers 5 encodes
    images before the first forward and passes only the 3-D M-RoPE ``position_ids``, whose height and width rows
    span exactly the grid of each image.
    """

    family = "qwen2_5_vl"
    image_input_keys = ("pixel_values", "image_grid_thw")
    has_cls = False

    @property
    def vision_tower(self):
        return self.model.model.visual

    def projector(self):
        return self.vision_tower.merger

    def vision_feature_attention(self):
        raise ValueError("vispruner needs a [CLS] token in the vision encoder; Qwen2.5-VL's has none "
                         "(use method=divprune, or an intra-LLM method)")

    def encode_images(self, kwargs):
        return self.model.model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"], return_dict=True)

    def wrap_image_features(self, encoded, kept):
        encoded.pooler_output = (kept,)
        return encoded

    def original_positions(self, input_ids, mask2d, kwargs):
        """[4, B, T]: the text row transformers uses for masks, then the 3-D M-RoPE (t, h, w) rows."""
        text = super().original_positions(input_ids, mask2d, kwargs)
        mrope, _ = self.model.model.get_rope_index(
            input_ids, image_grid_thw=kwargs.get("image_grid_thw"), attention_mask=mask2d,
            mm_token_type_ids=kwargs.get("mm_token_type_ids"))
        return torch.cat([text[None], mrope], 0)

    def image_grids(self, run_length, image_index, forward_kwargs, sample=0, start=0):
        thw = forward_kwargs.get("image_grid_thw")
        if thw is not None:
            return self._grids_from_thw(thw, run_length, image_index)
        pos = forward_kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (3, 4):
            return self._grids_from_positions(pos[-3:, sample, start: start + run_length])
        raise ValueError("qwen2_5_vl: image_grid_thw or 3-D position_ids are needed to lay out the visual tokens")

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
            raise ValueError(f"qwen2_5_vl: image_grid_thw does not match a run of {run_length} image tokens")
        return images

    @staticmethod
    def _grids_from_positions(pos: torch.Tensor) -> list[list[tuple[int, int]]]:
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
                raise ValueError("qwen2_5_vl: cannot read the image grid from position_ids")
            images.append([(rows, cols)])
            i += rows * cols
        return images


def get_adapter(model: nn.Module) -> Adapter:
    name = type(model).__name__
    if name == "InternVLForConditionalGeneration":
        return InternVLAdapter(model)
    if name == "Qwen2_5_VLForConditionalGeneration":
        return Qwen25VLAdapter(model)
    if name == "LlavaForConditionalGeneration":
        return LlavaAdapter(model)
    raise TypeError(f"model class {name} is not supported; supported: {', '.join(SUPPORTED)}")
