"""Qwen3-VL in vLLM with pre-LLM pruning (lmms_prune.vllm.qwen has the shared part): a full-attention vision
tower (patch 16) plus DeepStack.

DeepStack: vLLM's tower returns, per merged token, the main merger's output followed by the DeepStack mergers'
outputs along the channels (``[N, D * (1 + len(deepstack_visual_indexes))]``); ``embed_input_ids`` splits them
and adds the latter to the first decoder layers' outputs at the visual positions. Keeping rows of that tensor
keeps each kept token's DeepStack features with it, as our engine's ``Qwen3VL.keep_encoder_extras`` gathers
them at the kept tokens; the scores see only the first ``D`` channels (:meth:`PrunedQwen3VL.main_embeddings`).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from lmms_prune.vllm.base import BudgetedPrompts
from lmms_prune.vllm.qwen import PrunedQwenVL


class PrunedQwen3VLProcessor(BudgetedPrompts, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's prompt processor with each image's placeholder run cut to the method's budget."""


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class PrunedQwen3VL(PrunedQwenVL, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL; with ``hf_overrides['lmms_prune']`` it keeps only the method's tokens of each image."""

    def check_served(self, vllm_config):
        super().check_served(vllm_config)
        from lmms_prune.methods import SELECTORS

        if getattr(SELECTORS[self.prune.selector], "merges", False):
            raise ValueError(f"lmms_prune: method {self.prune.method!r} merges tokens, but Qwen3-VL also adds "
                             "per-token vision features inside the LLM (DeepStack) that a merged token has none of "
                             "(our engine refuses it too); use vispruner, divprune or fastervlm")

    def main_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        """The main merger's output ``[N, D]``: the first ``visual_dim`` channels (DeepStack's follow)."""
        return embeds[:, :self.visual_dim]
