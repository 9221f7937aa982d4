"""The engine's typed records: what one prefill did (:class:`PruneRecord`) and the per-call state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmms_prune.families.base import ImageSpan


@dataclass
class PruneRecord:
    """What one prefill did to one sample."""

    visual_before: int  # visual tokens present (structural ones such as LLaVA-NeXT's newlines excluded)
    visual_after: int
    kept: list[torch.Tensor]  # per image: kept indices among that image's visual (non-structural) tokens
    seq_len_before: int  # non-padding tokens entering the LLM
    seq_len_after: int  # non-padding tokens from layer K on
    kv_lengths: list[int]  # per decoder layer, cache entries of this sample after prefill
    scores: list[torch.Tensor | None] = field(default_factory=list)  # per image, the scores selection used
    select_seconds: float = 0.0  # scoring rows + score combination + selection
    llm_prefill_seconds: float = 0.0
    vision_seconds: float = 0.0  # pre-LLM methods: the image encoding the engine ran itself
    spans: list[ImageSpan] = field(default_factory=list)  # the sample's images, in sequence order
    # merging: per image, merged tokens (pre-LLM: added after the kept ones; inside the LLM: recycled tokens
    # present after the last stage, counted in visual_after and listed in kept at their slots)
    merged: list[int] = field(default_factory=list)
    # pre-LLM: the images' spans in the shortened (left-padded) prompt the LLM receives, each a 1 x n row of its
    # kept tokens; an LLM stage composed after the pre-LLM stage locates the images by them
    spans_after: list[ImageSpan] = field(default_factory=list)
    # pre-LLM: per image, for each visual token of its shortened span, the original token it is (its index among
    # the image's visual tokens; a slot's merged token counts as its slot) or -1 for a new (merged) token
    sources: list[torch.Tensor] = field(default_factory=list)

    @property
    def visual_before_papers(self) -> int:
        """The papers' count of this sample's visual tokens (LLaVA-NeXT's "of 2880": 576 x (1 + tiles), without
        unpadding); equals ``visual_before`` for families whose papers count the tokens present."""
        return sum(s.num_visual if s.papers_length is None else s.papers_length for s in self.spans)


@dataclass
class CallState:
    """The state of the model call in progress (one ``generate`` or ``forward``).

    ``phase``: ``idle`` (no images), ``pre_llm`` (inputs shrunk inside ``generate``), ``prefill``,
    ``prefilled``, ``decode``. ``seq_len``: the padded prompt length ``T``; ``lengths``: each sample's
    non-padding length; ``padding``: the 2-D mask (True = real token) as given. Signals recorded at prefill:
    ``attention[layer]`` ``[B, S]`` (last-row attention), ``key_norms[layer]`` ``[B, S]``. After selection:
    ``keep_mask`` ``[B, T]`` (kept positions of the full sequence), ``keep_index`` / ``keep_valid`` ``[B, T']``
    (the gather index of the pruned sequence, pad slots on the left, and which slots are real), ``pruned``
    (decoder-layer kwargs gathered at the kept positions), ``kv_full`` (the unpruned cache length in decode).
    Multi-stage pruning keeps one entry per stage done in ``stage_mask`` / ``stage_index`` / ``stage_valid`` /
    ``stage_pruned`` (the fields above are the last stage's), and ``stage_kept[s][b][i]``: image ``i``'s kept
    token indices after stage ``s`` (within the image, ascending).
    """

    phase: str = "idle"
    spans: list[list[ImageSpan]] | None = None
    seq_len: int = 0
    lengths: list[int] = field(default_factory=list)
    padding: torch.Tensor | None = None
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    text_attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, R, S] text rows
    key_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    score_seconds: float = 0.0
    lm_t0: float | None = None
    keep_mask: torch.Tensor | None = None
    keep_index: torch.Tensor | None = None
    keep_valid: torch.Tensor | None = None
    pruned: dict[str, Any] | None = None
    kv_full: int | None = None
    # layer -> (bool [B, T] positions, [n, D] values): per-token additions to that layer's output that the
    # engine applies to the kept tokens (see ``PruneHandle._install_injections``)
    injections: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stage_mask: list[torch.Tensor] = field(default_factory=list)
    stage_index: list[torch.Tensor] = field(default_factory=list)
    stage_valid: list[torch.Tensor] = field(default_factory=list)
    stage_pruned: list[dict[str, Any]] = field(default_factory=list)
    stage_kept: list[list[list[torch.Tensor]]] = field(default_factory=list)
    stage_inverse: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> [B, T] position -> slot
    # per sample: span start -> bool [N visual tokens] padding mask of that image (PruneHandle.image_padding)
    image_padding: list[dict[int, torch.Tensor]] | None = None
    stage_scores: list[list[list[torch.Tensor | None]]] = field(default_factory=list)  # [s][b][i] scores used
    # merges inside the LLM (SparseVLM's recycling): stage -> [(sample, original positions [m], values [m, D])]
    # written over the hidden states at those positions at the stage's layer; (sample, image) -> the image's
    # token indices holding a merged token
    stage_recycled: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    recycled: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    # renumbered positions (multi-stage, positions='contiguous'): the position ids the language model was called
    # with (this call), per stage the full-length decoder-layer kwargs at the renumbered positions (prefill),
    # and per stage those of the tokens being decoded (this decode call)
    lm_position_ids: torch.Tensor | None = None
    stage_rope: list[dict[str, Any]] = field(default_factory=list)
    decode_rope: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def has_images(self) -> bool:
        return self.spans is not None and any(self.spans)


def sync(t: torch.Tensor | None) -> None:
    """Wait for the GPU before reading a clock (no-op on the CPU)."""
    if t is not None and t.is_cuda:
        torch.cuda.synchronize(t.device)
