"""A merge inside the vision tower: after one tower layer, groups of patches become one token each, and the
later tower layers see the shorter set (MustDrop's vision stage, as its authors' code runs it).

The tower keeps its length: each group's merged token is written into one of its members' places (its slot,
:func:`lmms_prune.selection.merge_into_slots`), and the group's other members are masked as keys in every later
tower layer (:meth:`~lmms_prune.families.base.Family.tower_key_mask`). Where the later layers treat their tokens
as a set (no positions after the embeddings, no causal or windowed attention: CLIP,
:meth:`~lmms_prune.families.base.Family.tower_layout`), the kept places then hold exactly the outputs of a tower
that really shortened its sequence (softmax over the unmasked keys only; per-token MLPs), whatever the
order; the masked places carry values no kept token reads. The pre-LLM stage then keeps the unmasked places
(``ImageSignals.tower_groups``). The engine names no method: the selector gives the layer
(``Selector.tower_layer``) and the groups (``Selector.tower_merge``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmms_prune import selection as sel


class TowerMerge:
    """Install the merge after tower layer ``after`` and the key mask in the layers after it; ``kept`` holds
    the last call's ``[B, S]`` bool (False at the masked places) and ``groups`` every call's ``[B, P]`` patch
    groups (:func:`lmms_prune.selection.merge_into_slots`), in call order.

    ``merge(features [P, D], grid) -> Merge`` gives one image's groups (whole groups, each a mean)."""

    def __init__(self, adapter: Any, after: int, merge: Callable[[torch.Tensor, tuple[int, int]], sel.Merge]):
        self.adapter, self.merge = adapter, merge
        self.prefix, self.grid = adapter.tower_layout()  # refuses where the tower cannot host it
        layers: nn.ModuleList = adapter.vision_layers()
        if not 0 <= after < len(layers) - 1:
            raise ValueError(f"an in-tower merge after vision layer {after}: the tower has {len(layers)} layers, "
                             f"so it must be in [0, {len(layers) - 2}]")
        self.kept: torch.Tensor | None = None
        self.groups: list[torch.Tensor] = []
        self._hooks = [layers[after].register_forward_hook(self._merge)]
        self._hooks += [layer.register_forward_pre_hook(self._mask, with_kwargs=True) for layer in layers[after + 1:]]

    def _merge(self, module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # [B, S, D]
        rows, cols = self.grid
        if hidden.shape[1] != self.prefix + rows * cols:
            raise ValueError(f"an in-tower merge expects {self.prefix} + {rows} x {cols} tokens per tower call, got "
                             f"{hidden.shape[1]}")
        out, groups = hidden.clone(), []
        for b in range(hidden.shape[0]):  # each image its own groups (a batch is its samples)
            patches = hidden[b, self.prefix:]
            out[b, self.prefix:], image_groups = sel.merge_into_slots(patches, self.merge(patches, self.grid))
            groups.append(image_groups)
        self.groups.append(torch.stack(groups))
        self.kept = torch.cat([groups[0].new_full((hidden.shape[0], self.prefix), -1), self.groups[-1]], 1) != -2
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def _mask(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.kept is None or bool(self.kept.all()):
            return args, kwargs
        if len(args) > 1:
            mask = self.adapter.tower_key_mask(args[1], self.kept, hidden.dtype)
            return (args[0], mask, *args[2:]), kwargs
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = self.adapter.tower_key_mask(kwargs.get("attention_mask"), self.kept, hidden.dtype)
        return args, kwargs

    def patch_groups(self) -> torch.Tensor:
        """``[images * P]`` int64 over every call's patches (its prefix dropped), in call order."""
        return torch.cat([g.reshape(-1) for g in self.groups])

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
