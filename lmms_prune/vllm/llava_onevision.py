"""LLaVA-OneVision in vLLM with pre-LLM pruning (``LlavaOnevisionForConditionalGeneration``, SigLIP tower; shared
parts: :mod:`lmms_prune.vllm.base`, :mod:`lmms_prune.vllm.llava_next`).

* **Layout.** LLaVA-NeXT's (base grid, unpadded mosaic, a newline after each mosaic row: kept outside the budget,
  :class:`PrunedLlavaOnevisionProcessor` counts them with vLLM's own rule), with ``anyres_max_9``: a mosaic larger
  than 1.1 x 9 tiles is bilinearly shrunk before the newlines are added.
* **Signals in packed order.** SigLIP has no [CLS]: VisPruner's importance is each patch's mean received
  attention at the feature layer, per tile, as our ``LlavaOnevision`` adapter; it and the projector's input are
  put into the packed order by vLLM's own packing function (``_merge_image_patch_embeddings``, which takes the
  newline as an argument), run on the signal itself with a zero newline, so a shrunk mosaic's signals are
  interpolated exactly as its embeddings, as our adapter does with transformers' ``pack_image_features``. The
  newline rows are where a packed channel of ones reads 0.
* **Refused**: merges (newlines inside the run, as our engine), towers other than SigLIP, several feature layers,
  videos (``embed_multimodal``). vLLM packs every image with its mosaic, as transformers does for images passed
  flat (``batch_num_images`` of 1 each; images nested per prompt are base grids there).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems

from lmms_prune.families.llava_next import layout_from_newlines
from lmms_prune.vllm.base import (
    BudgetedPrompts,
    PrunedModel,
    check_observed,
    observe_encoder,
    pixel_input,
)
from lmms_prune.vllm.llava import check_tower, feature_layer, refuse_merges
from lmms_prune.vllm.llava_next import newline_count


class PrunedLlavaOnevisionProcessor(BudgetedPrompts, LlavaOnevisionMultiModalProcessor):
    """OneVision's prompt processor: each image's run cut to the budget of its visual tokens plus its newlines."""

    def structural_tokens(self, mm_items: Any, item_idx: int) -> int:
        size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
        return newline_count(self.info, size.width, size.height)


@MULTIMODAL_REGISTRY.register_processor(PrunedLlavaOnevisionProcessor, info=LlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class PrunedLlavaOnevision(PrunedModel, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision; with ``hf_overrides['lmms_prune']`` it keeps only the method's tokens of each
    image."""

    def check_served(self, vllm_config: Any) -> None:
        check_tower(vllm_config.model_config.hf_config, tower="siglip_vision_model", served="LLaVA-OneVision",
                    strategy=None)
        refuse_merges(self.prune, "LLaVA-OneVision")

    def pack(self, size: torch.Tensor, per_tile: torch.Tensor) -> torch.Tensor:
        """One image's per-tile rows ``[tiles, P, C]`` in its packed order ``[L, C]``, newline rows zero: vLLM's own
        packing (unpad, ``anyres_max_9`` bilinear shrink, newlines) with a zero newline of ``C`` channels."""
        newline = per_tile.new_zeros(per_tile.shape[-1])
        if per_tile.shape[0] == 1:  # no tiles: the base grid and one newline (vLLM's own branch reads its parameter)
            return torch.cat([per_tile[0], newline[None]])
        return self._merge_image_patch_embeddings(size, per_tile, image_newline=newline, strategy="spatial_unpad")

    def select_images(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        if "pixel_values_videos" in kwargs or "video_embeds" in kwargs:
            raise ValueError("lmms_prune: videos are not pruned by the vLLM plug-in yet; send images, or serve "
                             "without hf_overrides['lmms_prune']")
        image = pixel_input(self._parse_and_validate_image_input(**kwargs))
        if image is None:
            return [], []
        needs = self.stage_needs
        with torch.no_grad(), observe_encoder(feature_layer(self).self_attn.attn, self.multi_modal_projector,
                                              needs, received=True) as captured:
            embeds = self._process_image_input(image)
        check_observed(captured, "the SigLIP tower")
        pixels = image["pixel_values"]
        tiles = ([int(p.shape[0]) for p in pixels] if not isinstance(pixels, torch.Tensor)
                 else [int(pixels.shape[1])] * int(pixels.shape[0]))
        sizes = image.get("image_sizes")
        if sizes is None:
            sizes = torch.as_tensor([[self.config.vision_config.image_size] * 2 for _ in tiles])
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        received = captured.get("received")  # [tiles, P]
        pre = captured.get("pre")  # [tiles, P, C]
        out, lines, start = [], [], 0
        for emb, size, count in zip(embeds, sizes, tiles):
            part = slice(start, start + count)
            start += count
            ones = emb.new_ones(count, side * side, 1, dtype=torch.float32)
            newline = self.pack(size, ones)[:, 0] < 0.5
            layout = layout_from_newlines(newline.cpu(), side, papers=False)
            importance = None if received is None else self.pack(size, received[part, :, None].float())[:, 0]
            features = None if pre is None else self.pack(size, pre[part])
            kept, line = self.select(emb, layout.grids, importance=importance, features=features,
                                     embeddings=emb if needs.embeddings else None, structural=layout.structural)
            out.append(kept)
            lines.append(line)
        return out, lines
