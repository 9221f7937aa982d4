"""Where one request's time to first token goes: wall-clock marks of its phases inside one model call.

A :class:`PhaseClock` hooks a transformers VLM (through its family adapter) and stamps, during the FIRST forward
after :meth:`PhaseClock.start` (the prefill of a ``generate`` call):

* ``vision_start`` / ``vision_end``: the vision tower's first call begins / the last call of the tower or the
  projector before the LLM ends (a pre-LLM method's engine runs the tower itself, inside ``generate``);
* ``llm_start`` / ``llm_end``: the language model's prefill;
* ``head_end``: the LM head's logits of the first token.

:func:`ttft_parts` turns the marks and the engine's selection time into disjoint phases that add up to the time
to first token: ``setup`` (``generate``'s input preparation), ``vision`` (tower + projector), ``handover``
(features into the sequence: packing, M-RoPE positions, a pre-LLM method's shrinking, minus its selection),
``selection`` (scoring and selecting, wherever the method runs it), ``llm`` (the decoder's prefill minus an
in-LLM method's selection) and ``head`` (LM head, sampling, up to the first token).
On a GPU each mark synchronises the device first, so a mark is when the work before it is done.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

PHASES = ("setup", "vision", "handover", "selection", "llm", "head")


class PhaseClock:
    """Marks of the phases of one model call (module docstring); ``marks`` holds those stamped so far."""

    def __init__(self, model: nn.Module, adapter: Any, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, float] = {}
        towers = [adapter.vision_tower]
        try:
            projector = adapter.projector()
        except AttributeError:  # no separate projector module
            projector = None
        if projector is not None and all(projector is not t for t in towers):
            towers.append(projector)
        self._hooks = [adapter.vision_tower.register_forward_pre_hook(self._first("vision_start"))]
        self._hooks += [t.register_forward_hook(self._vision_end) for t in towers]
        self._hooks.append(adapter.language_model.register_forward_pre_hook(self._first("llm_start")))
        self._hooks.append(adapter.language_model.register_forward_hook(self._first("llm_end")))
        head = model.get_output_embeddings()
        if head is not None:
            self._hooks.append(head.register_forward_hook(self._first("head_end")))

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _first(self, name: str):
        def hook(*_: Any) -> None:
            if "start" in self.marks and name not in self.marks:
                self.marks[name] = self._now()
        return hook

    def _vision_end(self, *_: Any) -> None:
        if "start" in self.marks and "llm_start" not in self.marks:
            self.marks["vision_end"] = self._now()

    def start(self) -> float:
        """Forget the last call's marks and stamp the start of the next one (returns the time)."""
        self.marks = {}
        self.marks["start"] = self._now()
        return self.marks["start"]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def ttft_parts(marks: dict[str, float], first_token: float, select_seconds: float,
               pre_llm: bool) -> dict[str, float]:
    """Disjoint phases (:data:`PHASES`, seconds) from ``marks`` (:class:`PhaseClock`) to ``first_token``;
    their sum is ``first_token - marks["start"]``. A call without images has zero ``vision`` and ``handover``.
    ``select_seconds``: the engine's selection time, taken out of the hand-over (``pre_llm``) or the LLM."""
    start, llm_start, llm_end = marks["start"], marks["llm_start"], marks["llm_end"]
    vision_start = marks.get("vision_start", llm_start)
    vision_end = marks.get("vision_end", vision_start)
    handover, llm = llm_start - vision_end, llm_end - llm_start
    if pre_llm:
        handover -= select_seconds
    else:
        llm -= select_seconds
    return {"setup": vision_start - start, "vision": vision_end - vision_start, "handover": handover,
            "selection": select_seconds, "llm": llm, "head": first_token - llm_end}
