"""A pre-LLM stage followed by an LLM stage (VScan's vision-side reduction, then pruning at a middle LLM layer).

A config whose ``stage`` is ``pre_llm`` and whose ``llm_selector`` is set is two configs
(:meth:`PruneConfig.split_stages`): the pre-LLM stage (any pre-LLM selector and score, ``keep_ratio`` /
``keep_tokens``) and an LLM stage (any selector and score that work on a subset of an image's tokens, at
``prune_layers``, keeping ``stage_ratio`` of the tokens present: the multi-stage machinery of
:mod:`lmms_prune.engine.core`, with its own position rule ``llm_positions``: 'original' keeps each survivor's
position in the shortened prompt and decodes on from that prompt's length, 'contiguous' renumbers after the stage)
and its rule for a video's structural tokens there, ``llm_structural``: 'keep' them outside its candidates, or count
them among the 'candidates' (HoliTom's code merges LLaVA-OneVision's newline after a video with its tokens).
:class:`ComposedHandle` installs one :class:`PruneHandle` per stage on the same
model, the pre-LLM one first, so its hooks run first:

* the pre-LLM handle shortens the prompt (``shrink_inputs``: inside ``generate``, or in its forward pre-hook) and
  records, per sample, where each image's kept tokens are in the shortened prompt (``PruneRecord.spans_after``);
* the LLM handle runs on that shortened prompt as on any prompt, but locates the images by those spans
  (``PruneHandle.span_source``) instead of the family's layout (a kept subset is no grid: a ``1 x n`` row).

Neither handle names a method. Mask mode (``mode="mask"``) applies to the LLM stage (full length from the
shortened prompt, the dropped keys masked), so "prune = mask" proves the LLM stage on the shrunk inputs; the
pre-LLM stage's own proof is the pre-LLM one (dropping tokens before the LLM at their original positions equals
mask mode at layer 0). Records are composed per sample (:func:`compose_records`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lmms_prune.engine.core import PruneHandle
from lmms_prune.engine.state import CallState, PruneRecord
from lmms_prune.families.base import ImageSpan


def compose_records(pre: PruneRecord, llm: PruneRecord) -> PruneRecord:
    """One sample's record of both stages: the pre-LLM stage's ``before`` counts and images, the LLM stage's
    ``after`` counts and per-layer cache lengths; ``kept[i]``: image ``i``'s original tokens present after both
    (the LLM stage's kept indices among the pre-LLM stage's output mapped back through ``PruneRecord.sources``);
    ``merged[i]``: the new tokens of the pre-LLM stage (merged, not in a slot) that the LLM stage kept)."""
    kept, merged = [], []
    for sources, second in zip(pre.sources, llm.kept):
        source = sources[second.cpu()]
        kept.append(source[source >= 0])
        merged.append(int((source < 0).sum()))
    return PruneRecord(pre.visual_before, llm.visual_after, kept, pre.seq_len_before, llm.seq_len_after,
                       llm.kv_lengths, scores=llm.scores, select_seconds=pre.select_seconds + llm.select_seconds,
                       llm_prefill_seconds=llm.llm_prefill_seconds, vision_seconds=pre.vision_seconds,
                       spans=pre.spans, merged=merged, spans_after=pre.spans_after)


class ComposedHandle:
    """A pre-LLM stage then an LLM stage on one model (see the module docstring); the interface of
    :class:`PruneHandle` (``records``, ``state``, ``remove()``, ``task_kind``, ``image_padding``, ...)."""

    def __init__(self, model: nn.Module, config: Any, mode: str = "prune"):
        self.model, self.config, self.mode = model, config, mode
        depth = int(model.config.get_text_config().num_hidden_layers)
        pre_config, llm_config = config.split_stages(depth)
        self.pre = PruneHandle(model, pre_config, mode="prune")
        try:
            self.llm = PruneHandle(model, llm_config, mode=mode)
        except BaseException:
            self.pre.remove()
            raise
        self.llm.span_source = self._shortened_spans
        self.llm.protected_source = self._protected
        self.adapter = self.pre.adapter
        self.stage_layers = self.llm.stage_layers
        self.scores = [*self.pre.scores, *self.llm.scores]
        self.selectors = [*self.pre.selectors, *self.llm.selectors]

    def _shortened_spans(self, input_ids: torch.Tensor) -> list[list[ImageSpan]]:
        """The LLM stage's image spans: those the pre-LLM stage recorded for this prompt (none without images)."""
        records = self.pre.records
        if not records:
            return [[] for _ in range(input_ids.shape[0])]
        if len(records) != input_ids.shape[0]:
            raise ValueError(f"method {self.config.method!r}: the pre-LLM stage shortened {len(records)} prompt(s) "
                             f"but the LLM stage got {input_ids.shape[0]} (num_beams or num_return_sequences > 1 "
                             "repeat the prompts inside generate); use one sequence per prompt")
        if self.config.llm_structural == "keep":
            return [rec.spans_after for rec in records]
        # 'candidates': a video's structural tokens are the LLM stage's candidates like its visual ones
        return [[dataclasses.replace(s, structural=(), grids=[(1, s.length)]) if s.video else s
                 for s in rec.spans_after] for rec in records]

    def _protected(self, input_ids: torch.Tensor) -> list[list[torch.Tensor]] | None:
        """Per sample, per image: the tokens the pre-LLM stage protected (``PruneRecord.protected``), which the
        LLM stage keeps at every layer; None where it protected none."""
        records = self.pre.records
        if len(records) != input_ids.shape[0] or not any(p.numel() for r in records for p in r.protected):
            return None
        return [list(r.protected) for r in records]

    @property
    def records(self) -> list[PruneRecord]:
        pre, llm = self.pre.records, self.llm.records
        if not pre or len(llm) != len(pre):
            return list(pre)
        return [compose_records(a, b) for a, b in zip(pre, llm)]

    @records.setter
    def records(self, value: list[PruneRecord]) -> None:
        self.pre.records = list(value)
        self.llm.records = list(value)

    @property
    def state(self) -> CallState:
        """The LLM stage's call state (its gather index counts positions of the shortened prompt)."""
        return self.llm.state

    @property
    def task_kind(self) -> str | None:
        return self.pre.task_kind

    @task_kind.setter
    def task_kind(self, kind: str | None) -> None:
        self.pre.task_kind = self.llm.task_kind = kind

    @property
    def image_padding(self) -> Any:
        return self.pre.image_padding

    @image_padding.setter
    def image_padding(self, value: Any) -> None:
        self.pre.image_padding = value

    @property
    def video_frames(self) -> Any:
        return self.pre.video_frames

    @video_frames.setter
    def video_frames(self, value: Any) -> None:
        self.pre.video_frames = value

    def remove(self) -> None:
        """Undo both stages (the LLM stage's hooks first: they were installed last)."""
        self.llm.remove()
        self.pre.remove()

    def __enter__(self) -> ComposedHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
