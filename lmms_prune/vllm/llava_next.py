"""LLaVA-NeXT in vLLM with pre-LLM pruning (``LlavaNextForConditionalGeneration`` with a CLIP tower; the shared
parts are :mod:`lmms_prune.vllm.base` and :mod:`lmms_prune.vllm.llava`).

* **Layout.** vLLM packs each image as our engine's ``LlavaNext`` adapter reads it: the base image's grid, then
  the AnyRes tiles as one mosaic unpadded to the image's aspect ratio, one ``image_newline`` after each mosaic
  row. The newlines are structure (our ``ImageSpan.structural``): never scored, never counted in the budget,
  always kept in their places. So the prompt processor cuts each run to ``budget(N - rows) + rows``
  placeholders, ``rows`` being the newline count vLLM's own processor computes from the image size.
* **Signals in packed order.** The tower runs once over all tiles; the [CLS] attention of the feature layer and
  the projector's input are observed per tile (as for LLaVA-1.5, :mod:`lmms_prune.vllm.llava`) and put into the
  packed order by vLLM's own packing function run on the tiles' row indices (one channel, a newline of -1), as
  our adapter repacks them with transformers' ``pack_image_features``; the newline marks give the layout
  (:func:`lmms_prune.families.llava_next.layout_from_newlines`: the base grid and the mosaic's ``rows x cols``).
* **Refused** as in our engine: methods that merge (a merged sequence cannot place the newlines inside the run),
  towers other than CLIP, several feature layers, strategies other than ``default``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    get_anyres_image_grid_shape,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems

from lmms_prune.families.llava_next import layout_from_newlines
from lmms_prune.scores import cls_attention
from lmms_prune.vllm.base import (
    BudgetedPrompts,
    PrunedModel,
    check_observed,
    observe_encoder,
    pixel_input,
)
from lmms_prune.vllm.llava import check_tower, feature_layer, refuse_merges


def newline_count(info: LlavaNextProcessingInfo, width: int, height: int) -> int:
    """The row newlines of an image's placeholder run, by vLLM's own count (``get_num_image_tokens``)."""
    config, encoder = info.get_hf_config(), info.get_vision_encoder_info()
    rows, cols = get_anyres_image_grid_shape(image_size=(height, width), grid_pinpoints=config.image_grid_pinpoints,
                                             patch_size=encoder.get_image_size())
    _, newlines = info._get_num_unpadded_features(original_height=height, original_width=width,
                                                   npatches=encoder.get_patch_grid_length(), num_patch_height=rows,
                                                   num_patch_width=cols)
    return newlines


class PrunedLlavaNextProcessor(BudgetedPrompts, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's prompt processor: each image's run cut to the budget of its visual tokens plus its newlines."""

    def structural_tokens(self, mm_items: Any, item_idx: int) -> int:
        images = mm_items.get_items("image", ImageProcessorItems)  # embeddings are refused by the model
        size = images.get_image_size(item_idx)
        return newline_count(self.info, size.width, size.height)


def _packed(per_row: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """Tower rows ``[tiles * P, ...]`` gathered into an image's packed order (``rows``: one tower row per token)."""
    return None if per_row is None else per_row[rows.to(per_row.device)]


@MULTIMODAL_REGISTRY.register_processor(PrunedLlavaNextProcessor, info=LlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlavaNext(PrunedModel, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; with ``hf_overrides['lmms_prune']`` it keeps only the method's tokens of each image."""

    def check_served(self, vllm_config: Any) -> None:
        check_tower(vllm_config.model_config.hf_config)
        refuse_merges(self.prune, "LLaVA-NeXT")

    def packed_rows(self, image: Any) -> list[torch.Tensor]:
        """Per image, the tower's row (``tile * P + patch`` over the call's stacked tiles) behind each token of
        its packed run, -1 at the newlines: vLLM's own packing run on the row indices."""
        pixels = image["pixel_values"]
        tiles = ([int(p.shape[0]) for p in pixels] if not isinstance(pixels, torch.Tensor)
                 else [int(pixels.shape[1])] * int(pixels.shape[0]))
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        sizes = image.get("image_sizes")
        if sizes is None:
            sizes = torch.as_tensor([[self.config.vision_config.image_size] * 2 for _ in tiles])
        newline = self._parameters["image_newline"]
        self._parameters["image_newline"] = torch.nn.Parameter(torch.full((1,), -1.0), requires_grad=False)
        try:
            out, start = [], 0
            for size, count in zip(sizes, tiles):
                index = torch.arange(start, start + count * side * side, dtype=torch.float32)
                packed = self._merge_image_patch_embeddings(size, index.view(count, side * side, 1),
                                                            strategy="spatial_unpad")
                out.append(packed[:, 0].round().long())
                start += count * side * side
        finally:
            self._parameters["image_newline"] = newline
        return out

    def select_images(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        image = pixel_input(self._parse_and_validate_image_input(**kwargs))
        if image is None:
            return [], []
        needs = self.stage_needs
        with torch.no_grad(), observe_encoder(feature_layer(self).self_attn.attn, self.multi_modal_projector,
                                              needs) as captured:
            embeds = self._process_image_input(image)
        check_observed(captured, "the CLIP tower")
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        importance = features = None
        if "cls" in captured:  # [tiles, H, 1 + P] -> one row per tile patch
            importance = torch.stack([cls_attention(r, has_cls=True) for r in captured["cls"]]).reshape(-1)
        if "pre" in captured:  # the projector's input [tiles, P, C]
            features = captured["pre"].reshape(-1, captured["pre"].shape[-1])
        out, lines = [], []
        for emb, rows in zip(embeds, self.packed_rows(image)):
            newline = rows < 0
            layout = layout_from_newlines(newline.cpu(), side, papers=False)
            at = rows.clamp(min=0)  # newline rows read row 0; select never reads them
            kept, line = self.select(emb, layout.grids, importance=_packed(importance, at),
                                     features=_packed(features, at), embeddings=emb if needs.embeddings else None,
                                     structural=layout.structural)
            out.append(kept)
            lines.append(line)
        return out, lines
