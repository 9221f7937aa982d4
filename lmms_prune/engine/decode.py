"""Decode-time selection of the visual KV entries each generated token attends to (DyCoke's dynamic KV-cache
pruning, its stage 2; names no method).

A selector that declares :meth:`~lmms_prune.methods.base.Selector.decode_layer` ``L`` gets, at every decode
step of a call, the current token's attention row of layer ``L - 1`` (heads averaged, over the whole cache)
restricted to each visual span's columns of the (pre-LLM shortened) prompt (``PruneRecord.spans_after``), with
the previous step's row of that span; it answers the span's kept columns (:meth:`~lmms_prune.methods.base.Selector.decode_keep`) or None (all).
Layers ``L..`` then attend, at that step, to the kept visual columns and every other column (text, generated
tokens, the current one). The cache itself is never shrunk: a column dropped at one step can return at the next.

``mode="prune"`` gathers the kept key/value columns before the attention kernel (fewer columns);
``mode="mask"`` (the reference) gives the kernel the full cache with the dropped columns masked. Both run through
the engine's attention wrapper (:func:`lmms_prune.engine.attention.add_key_filter`), so they agree at every
step (tests/test_dycoke.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmms_prune.engine import attention as attn

if TYPE_CHECKING:
    from lmms_prune.engine.core import PruneHandle


def masked(mask: torch.Tensor | None, keep: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The attention mask ``mask`` (None, bool ``[B|1, 1|H, q, S]`` True = attend, or additive float) with the
    columns where ``keep`` ``[B, S]`` is False masked for every query row."""
    allowed = keep[:, None, None, :]
    if mask is None:
        out = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        return out.masked_fill(~allowed, torch.finfo(query.dtype).min)
    mask = mask[..., : keep.shape[1]]
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def gathered(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor,
             query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``key``/``value`` ``[B, KV, S, d]`` (and the mask's columns) gathered at the kept columns ``keep`` ``[B, S]``
    in their order; samples that keep fewer than the most are padded with masked columns."""
    counts = keep.sum(1)
    width = int(counts.max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # kept columns first
    index = order[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
    key, value = key.gather(2, index), value.gather(2, index)
    if mask is not None:
        mask = mask[..., : keep.shape[1]]
        mask = mask.expand(keep.shape[0], *mask.shape[1:])
        mask = mask.gather(-1, order[:, None, None, :].expand(*mask.shape[:-1], width))
    valid = torch.arange(width, device=keep.device)[None] < counts[:, None]
    if not bool(valid.all()):
        mask = masked(mask, valid, query)
    return key, value, mask


class DecodeColumns:
    """The decode-time column selection of one handle (see the module docstring); ``history`` holds, per decode
    step of the current call, the bool ``[B, S]`` columns layers ``>= L`` attended to."""

    def __init__(self, handle: PruneHandle, layer: int):
        depth = handle.adapter.num_layers  # 1 <= layer < depth: checked with the config (presets.check_model)
        self.handle, self.layer = handle, layer
        text_cfg = handle.adapter.text_config
        self._old = text_cfg._attn_implementation
        text_cfg._attn_implementation = attn.wrapped_name(attn.base_name(self._old))
        layers = handle.adapter.layers
        self._observed = layers[layer - 1].self_attn
        attn.add_observer(self._observed, self._observe)
        self._filtered = [layers[i].self_attn for i in range(layer, depth)]
        for module in self._filtered:
            attn.add_key_filter(module, self._filter)
        self.keep: torch.Tensor | None = None
        self.previous: dict[tuple[int, int], torch.Tensor] = {}
        self.history: list[torch.Tensor] = []
        self._call: object = None

    def _observe(self, module, query, key, attention_mask, scaling) -> None:
        st = self.handle.state
        if st is not self._call:  # a new call: the previous rows belong to another prompt
            self._call, self.previous, self.history = st, {}, []
        self.keep = None
        if st.phase != "decode":
            return
        # per sample, each image's tokens in the prompt the LLM saw (PruneRecord.spans_after, left padding included)
        columns = [[(span, span.visual_positions) for span in rec.spans_after] for rec in self.handle.records]
        row = attn.attention_rows(query, key, attention_mask, scaling)[:, -1]  # [B, S] the current token's row
        if len(columns) != row.shape[0]:
            raise ValueError(f"decode-time selection: {row.shape[0]} sequences at decode for {len(columns)} prompts "
                             "(num_beams > 1 is not supported with a decode layer)")
        keep = torch.ones_like(row, dtype=torch.bool)
        for b, spans in enumerate(columns):
            for span, cols in spans:
                cols = cols.to(row.device)
                part = row[b, cols]
                kept = self.handle.selector.decode_keep(span, part, self.previous.get((b, span.start)))
                self.previous[(b, span.start)] = part
                if kept is not None:
                    keep[b, cols] = False
                    keep[b, cols[kept.to(row.device)]] = True
        self.keep = keep
        self.history.append(keep)

    def _filter(self, module, query, key, value, attention_mask):
        keep = self.keep
        if keep is None or self.handle.state.phase != "decode":
            return key, value, attention_mask
        if keep.shape[1] != key.shape[2]:
            raise RuntimeError(f"decode-time selection: {keep.shape[1]} columns chosen for a cache of {key.shape[2]}")
        if self.handle.mode == "mask":
            return key, value, masked(attention_mask, keep, query)
        return gathered(key, value, attention_mask, keep, query)

    def close(self) -> None:
        attn.remove_observer(self._observed)
        for module in self._filtered:
            attn.remove_key_filter(module)
        self.handle.adapter.text_config._attn_implementation = self._old
