"""LLaVA-1.5 in vLLM with pre-LLM pruning (``LlavaForConditionalGeneration`` with a CLIP tower; the shared part is
:mod:`lmms_prune.vllm.base`).

* **Signals.** vLLM builds the CLIP tower only up to ``vision_feature_layer`` (-2: 23 of CLIP-L's 24 layers), so
  the layer whose output the projector reads is the last one built; :func:`lmms_prune.vllm.base.observe_encoder`
  observes that layer's
  attention kernel (its ``q``/``k``: the [CLS] query row, softmax over all keys with the layer's scale, heads
  averaged, the [CLS] column dropped without renormalising, as our engine's ``Llava`` adapter and
  :func:`lmms_prune.scores.cls_attention`) and the projector's input (the patch features after the ``default``
  strategy drops the [CLS]).
* **Positions.** LLaVA's LLM numbers the prompt ``0..T-1`` by token index (1-D RoPE), and vLLM numbers the
  pruned prompt the same way: ``positions="contiguous"``, our engine's renumbering. ``"original"``: with the
  M-RoPE declaration of :func:`lmms_prune.vllm.mrope_override`, vLLM asks
  :meth:`lmms_prune.vllm.base.PrunedModel.get_mrope_input_positions` (the same for every family).

Served only with a CLIP tower, one ``vision_feature_layer`` and the ``default`` feature strategy (LLaVA-1.5's);
other LLaVA-style checkpoints (Pixtral-HF, SigLIP towers, several feature layers) are refused with the reason
when the pruning key is set, and served unchanged without it.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
    _build_llava_or_pixtral_hf_info,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from lmms_prune.families.base import feature_layer_index
from lmms_prune.scores import cls_attention
from lmms_prune.vllm.base import (
    BudgetedPrompts,
    PrunedModel,
    check_observed,
    observe_encoder,
    pixel_input,
)


class PrunedLlavaProcessor(BudgetedPrompts, LlavaMultiModalProcessor):
    """LLaVA's prompt processor with each image's placeholder run cut to the method's budget."""


def _processor(info: Any, dummy_inputs: Any, **kwargs: Any) -> Any:
    """vLLM's choice between LLaVA and Pixtral-HF processing, with LLaVA's budgeted (Pixtral-HF is served unpruned
    only: :meth:`PrunedLlava.check_served`)."""
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs, **kwargs)
    if isinstance(info, LlavaProcessingInfo):
        return PrunedLlavaProcessor(info, dummy_inputs, **kwargs)
    raise NotImplementedError(type(info))


def check_tower(config: Any, tower: str = "clip_vision_model", served: str = "LLaVA-1.5 and LLaVA-NeXT",
                strategy: str | None = "default") -> None:
    """Refuse (``ValueError``) a LLaVA-style checkpoint whose tower signals the plug-in does not read as our engine
    does: a tower other than ``tower`` (what ``served`` have), several feature layers, a feature strategy other
    than ``strategy`` (None: any)."""
    if config.vision_config.model_type != tower:
        raise ValueError(f"lmms_prune: a {config.vision_config.model_type} vision tower: the vLLM plug-in prunes "
                         f"{served} with a {tower} only; serve this checkpoint without hf_overrides['lmms_prune']")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"lmms_prune: vision_feature_layer={config.vision_feature_layer!r}: the vLLM plug-in "
                         "reads one feature layer; serve without hf_overrides['lmms_prune']")
    if strategy is not None and config.vision_feature_select_strategy != strategy:
        raise ValueError(f"lmms_prune: vision_feature_select_strategy={config.vision_feature_select_strategy!r}: "
                         f"the plug-in prunes the patch tokens of the {strategy!r} strategy (the [CLS] dropped) only")


def refuse_merges(prune: Any, family: str) -> None:
    """Refuse a method that merges tokens on ``family``, whose images end each mosaic row in a newline (LLaVA-NeXT,
    LLaVA-OneVision): a merged sequence cannot place them, and our engine refuses it too."""
    from lmms_prune.methods import SELECTORS

    if getattr(SELECTORS[prune.selector], "merges", False):
        raise ValueError(f"lmms_prune: method {prune.method!r} merges tokens, but {family}'s images end each mosaic "
                         "row in a newline that a merged sequence cannot place (our engine refuses it too); use a "
                         "method that keeps a subset (vispruner, divprune, fastervlm)")


def feature_layer(model: Any) -> Any:
    """The CLIP layer whose output the projector reads: the last one vLLM built (it stops at
    ``vision_feature_layer``)."""
    config = model.config
    return model.vision_tower.vision_model.encoder.layers[
        feature_layer_index(config.vision_feature_layer, config.vision_config.num_hidden_layers)]


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_build_llava_or_pixtral_hf_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(PrunedModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA; with ``hf_overrides['lmms_prune']`` it keeps only the method's tokens of each image."""

    def check_served(self, vllm_config: Any) -> None:
        check_tower(vllm_config.model_config.hf_config)

    def select_images(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        image = pixel_input(self._parse_and_validate_image_input(**kwargs))
        if image is None:
            return [], []
        needs = self.stage_needs
        layer = feature_layer(self)
        with torch.no_grad(), observe_encoder(layer.self_attn.attn, self.multi_modal_projector, needs, keys=True,
                                              layer=layer) as captured:
            embeds = self._process_image_input(image)
        check_observed(captured, "the CLIP tower")
        cls = None
        if "states" in captured:  # VisionZip's [CLS]: the feature layer's [CLS] state through the projector
            with torch.no_grad():
                cls = self.multi_modal_projector(captured["states"][:, :1])[:, 0]
        out, lines = [], []
        for b, emb in enumerate(embeds):
            side = round(emb.shape[0] ** 0.5)
            rows, line = self.select(
                emb, [(side, side)],
                importance=cls_attention(captured["cls"][b], has_cls=True) if "cls" in captured else None,
                features=captured["pre"][b] if "pre" in captured else None,
                embeddings=emb if needs.embeddings else None,
                keys=captured["keys"][b, 1:] if "keys" in captured else None,  # the [CLS] row dropped
                cls=None if cls is None else cls[b])
            out.append(rows)
            lines.append(line)
        return out, lines
