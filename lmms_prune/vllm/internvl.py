"""InternVL (transformers-format ``InternVLForConditionalGeneration`` checkpoints, which vLLM 0.32 serves with its
``InternS1ForConditionalGeneration`` class) in vLLM with pre-LLM pruning; the shared part is
:mod:`lmms_prune.vllm.base`.

* **Budget.** Each image is ``<img>`` + ``tiles * 256`` context tokens + ``</img>``; the budget cuts the context
  run of the whole image (all its tiles, as our engine's one span per image) and keeps ``<img>``/``</img>``.
* **Signals.** vLLM runs InternViT to its last layer (``vision_feature_layer=-1``, the only setting its InternVL
  code reads). :func:`lmms_prune.vllm.base.observe_encoder` observes that layer's attention kernel (``q``/``k`` after the QK norm, as our
  engine's observer sees them) for each tile's [CLS] row, summed over the 2x2 groups pixel shuffle merges
  (:func:`lmms_prune.scores.merge_pixel_shuffle`, as our ``InternVL`` adapter), and the projector's input (the
  pixel-shuffled features, one row per LLM token).
* **Positions.** The LLM has 1-D RoPE and vLLM numbers the pruned prompt by token index: ``contiguous``;
  ``original`` as for LLaVA (:mod:`lmms_prune.vllm.llava`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from lmms_prune.scores import cls_attention, merge_pixel_shuffle
from lmms_prune.vllm.base import (
    BudgetedPrompts,
    PrunedModel,
    check_observed,
    observe_encoder,
    pixel_input,
)


class PrunedInternVLProcessor(BudgetedPrompts, InternS1MultiModalProcessor):
    """InternVL's prompt processor with each image's context run cut to the method's budget."""


@MULTIMODAL_REGISTRY.register_processor(PrunedInternVLProcessor, info=InternS1ProcessingInfo,
                                        dummy_inputs=InternS1DummyInputsBuilder)
class PrunedInternVL(PrunedModel, InternS1ForConditionalGeneration):
    """vLLM's InternVL; with ``hf_overrides['lmms_prune']`` it keeps only the method's tokens of each image."""

    def check_served(self, vllm_config: Any) -> None:
        config = vllm_config.model_config.hf_config
        if config.vision_feature_layer != -1:
            raise ValueError(f"lmms_prune: vision_feature_layer={config.vision_feature_layer!r}: vLLM's InternVL "
                             "code reads the last vision layer only, where our engine would read this one; serve "
                             "without hf_overrides['lmms_prune']")
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise ValueError(f"lmms_prune: vision_feature_select_strategy={config.vision_feature_select_strategy!r}:"
                             " the plug-in prunes the patch tokens of the 'default' strategy only")

    def pixel_rows(self, kwargs: dict[str, Any]) -> list[int] | None:
        """``image_num_patches`` tiles per image."""
        counts = kwargs.get("image_num_patches")
        return [] if counts is None else torch.as_tensor(counts).flatten().tolist()

    def select_images(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if inputs.get("videos") is not None:
            raise ValueError("lmms_prune: videos are not pruned by the vLLM plug-in yet")
        image = pixel_input(inputs.get("images"))
        if image is None:
            return [], []
        needs = self.stage_needs
        kernel = self.vision_tower.encoder.layer[-1].attention.attn  # vLLM's InternVL reads the last layer
        with torch.no_grad(), observe_encoder(kernel, self.multi_modal_projector, needs) as captured:
            embeds = self._process_vision_input(image)
        check_observed(captured, "the InternViT tower")
        factor = round(1 / self.downsample_ratio)
        out, lines, tile = [], [], 0
        for emb, tiles in zip(embeds, torch.as_tensor(image["num_patches"]).flatten().tolist()):
            per_tile = emb.shape[0] // tiles
            side = math.isqrt(per_tile)
            rows = slice(tile, tile + tiles)
            tile += tiles
            importance = features = None
            if "cls" in captured:
                patches = math.isqrt(captured["cls"].shape[-1] - 1)
                importance = torch.cat([merge_pixel_shuffle(cls_attention(r, has_cls=True), patches, factor)
                                        for r in captured["cls"][rows]])
            if "pre" in captured:
                features = captured["pre"][rows].reshape(-1, captured["pre"].shape[-1])
            kept, line = self.select(emb, [(side, side)] * tiles, importance, features,
                                     emb if needs.embeddings else None)
            out.append(kept)
            lines.append(line)
        return out, lines
