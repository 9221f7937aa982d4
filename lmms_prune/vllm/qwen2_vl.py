"""Qwen2-VL in vLLM with pre-LLM pruning (lmms_prune.vllm.qwen has the shared part): a full-attention vision
tower (VisPruner reads its last block), no window order; vLLM files its images under the key ``"images"``."""

from __future__ import annotations

from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from lmms_prune.vllm.base import BudgetedPrompts
from lmms_prune.vllm.qwen import PrunedQwenVL


class PrunedQwen2VLProcessor(BudgetedPrompts, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's prompt processor with each image's placeholder run cut to the method's budget."""


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class PrunedQwen2VL(PrunedQwenVL, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL; with ``hf_overrides['lmms_prune']`` it keeps only the method's tokens of each image."""

    image_key = "images"
