"""InternVL (transformers-format ``InternVLForConditionalGeneration`` checkpoints, which vLLM 0.32 serves with its
``InternS1ForConditionalGeneration`` class) in vLLM with pre-LLM pruning; the shared part is
:mod:`lmms_prune.vllm.base`.

* **Budget.** Each image is ``<img>`` + ``tiles * 256`` context tokens + ``</img>``; the budget cuts the context
  run of the whole image (all its tiles, as our engine's one span per image) and keeps ``<img>``/``</img>``.
* **Signals.** vLLM runs InternViT to its last layer (``vision_feature_layer=-1``, the only setting its InternVL
  code reads). :func:`_capture` observes that layer's attention kernel (``q``/``k`` after the QK norm, as our
  engine's observer sees them) for each tile's [CLS] row, summed over the 2x2 groups pixel shuffle merges
  (:func:`lmms_prune.scores.merge_pixel_shuffle`, as our ``InternVL`` adapter), and the projector's input (the
  pixel-shuffled features, one row per LLM token).
* **Positions.** The LLM has 1-D RoPE and vLLM numbers the pruned prompt by token index: ``contiguous``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from lmms_prune.engine.attention import query_rows
from lmms_prune.methods.base import Needs
from lmms_prune.scores import cls_attention, merge_pixel_shuffle
from lmms_prune.vllm.base import (
    BudgetedPrompts,
    PrunedModel,
    encoder_qk,
    record,
    unwrap_forward,
    wrap_forward,
)


class PrunedInternVLProcessor(BudgetedPrompts, InternS1MultiModalProcessor):
    """InternVL's prompt processor with each image's context run cut to the method's budget."""


@contextmanager
def _capture(model: Any, needs: Needs) -> Iterator[dict[str, Any]]:
    """Observe vLLM's InternViT: the [CLS] attention rows ``[tiles, H, S]`` at the last layer
    (``Needs.vision_attention``) and the projector's input ``[tiles, P, 4C]`` (``Needs.vision_features``).
    Read-only, undone on exit."""
    out: dict[str, Any] = {}
    hooks = []
    if needs.vision_attention:
        kernel = model.vision_tower.encoder.layer[-1].attention.attn

        def grab_cls(module, args, kwargs):
            q, k = encoder_qk(module, args, kwargs)  # [B, H, S, d]
            out["cls"] = query_rows(q, k, module.scale, rows=slice(0, 1))[:, :, 0]  # [B, H, S]

        hooks.append(kernel.register_forward_pre_hook(grab_cls, with_kwargs=True))
    if needs.vision_features:
        wrap_forward(model.multi_modal_projector, out, "pre")
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
        unwrap_forward(model.multi_modal_projector)


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

    def embed_multimodal(self, **kwargs: object):
        if self.prune is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if inputs.get("videos") is not None:
            raise ValueError("lmms_prune: videos are not pruned by the vLLM plug-in yet")
        image = inputs.get("images")
        if image is None:
            return []
        if image["type"] != "pixel_values":
            raise ValueError("lmms_prune: precomputed image embeddings carry no vision-tower signals; send pixels")
        needs = self.stage_needs
        with torch.no_grad(), _capture(self, needs) as captured:
            embeds = self._process_vision_input(image)
        missing = [name for name, need, key in (("[CLS] attention", needs.vision_attention, "cls"),
                                                 ("projector input", needs.vision_features, "pre"))
                   if need and key not in captured]
        if missing:
            raise RuntimeError(f"lmms_prune: the vision tower ran without the hooks seeing its {', '.join(missing)} "
                               f"(observed: {sorted(captured)})")
        factor = round(1 / self.downsample_ratio)
        per_tile = None
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
        record(lines)
        return tuple(out)
