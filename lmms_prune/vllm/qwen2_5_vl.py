"""Qwen2.5-VL in vLLM with pre-LLM pruning (lmms_prune.vllm.qwen has the shared part): windowed vision blocks
with a few full-attention ones, merge units permuted into windows (undone by ``merged_order``)."""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from lmms_prune.vllm.base import BudgetedPrompts
from lmms_prune.vllm.qwen import PrunedQwenVL


class PrunedQwen2_5_VLProcessor(BudgetedPrompts, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's prompt processor with each image's placeholder run cut to the method's budget."""


@MULTIMODAL_REGISTRY.register_processor(PrunedQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PrunedQwen2_5_VL(PrunedQwenVL, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with ``hf_overrides['lmms_prune']`` it keeps only the method's tokens of each image."""
