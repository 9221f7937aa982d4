"""Pre-LLM pruning (VisPruner, DivPrune): the dropped visual tokens never enter the language model.

Before the first forward, the images are encoded once; the method's score and selector plug-ins run on the
vision-side signals they declare (``Needs.vision_attention``: the vision encoder's [CLS] attention at the
feature layer, or its mean received attention without [CLS]; ``vision_frame_attention``: each frame's
mean-query attention at the family's ``frame_query_block``; ``vision_features``: the pre-projector features;
``embeddings``: the projected embeddings); each image's run of placeholder tokens in ``input_ids`` is
shortened to its budget and the kept embeddings (with the family's other per-token encoder outputs,
``Family.keep_encoder_extras``) are handed to the model as ``mm_encoder_outputs`` (transformers' public input
for pre-encoded images), so ``generate`` and ``forward`` run unchanged on the shorter prompt. Structural
tokens (e.g. LLaVA-NeXT's row newlines) always stay; per-token vision signals come one row per span token.

Positions: ``positions="contiguous"`` (default, as the VisPruner and DivPrune papers: the shorter prompt is
numbered 0..T'-1); ``positions="original"`` (= ``"gap"``, GAP's rule: :func:`lmms_prune.selection.gap_positions`)
gives each kept token its position in the unpruned prompt
(Qwen2.5-VL: its 3-D M-RoPE position), and generation continues from the unpruned length.

Merged tokens (VisionZip): a selector may return a :class:`lmms_prune.selection.Merge` (kept tokens + groups
whose means become new embeddings). The image's run of placeholders is shortened to ``k + m`` tokens holding
``[kept embeddings (ascending); group means (in group order)]`` (then the span's structural tokens where they all
follow its visual tokens: LLaVA-OneVision's newline after a video; structural tokens among the visual ones are
refused); merged tokens have no original position, so
positions are renumbered (``positions="contiguous"``, the only setting merging selectors accept): the short
prompt is numbered 0..T'-1 exactly as for pruning (1-D RoPE; Qwen's M-RoPE recomputes its grid positions
from the shortened prompt as for any pre-LLM selection). ``PruneRecord.kept`` lists the kept original tokens,
``PruneRecord.merged`` the number of merged tokens per image; ``visual_after`` counts both. A ``Merge`` with
``slots`` (VScan, FastVID) puts each merged token in its slot's place instead: the image keeps the slots (and its plain
kept tokens) as a pruning selection would, so any ``positions`` rule and structural tokens work, and the slots
count as kept tokens.

Each record also says where each image's kept tokens are in the shortened prompt (``spans_after``) and which
original token each is (``sources``): an LLM stage composed after this one reads them
(:mod:`lmms_prune.engine.compose`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmms_prune import selection as sel
from lmms_prune.engine import attention as attn
from lmms_prune.engine.state import PruneRecord, sync
from lmms_prune.engine.tower import TowerMerge
from lmms_prune.families.base import ImageSpan
from lmms_prune.methods.base import ImageSignals

if TYPE_CHECKING:
    from lmms_prune.engine.core import PruneHandle


class VisionCapture:
    """Observe the vision encoder's attention at the feature layer (or at ``module``, another vision attention
    module: ``Needs.vision_attention_early``) and the projector's input.

    With a [CLS] token, the attention signal is the [CLS] query row ``[B, H, T]`` of each call; without one
    (``adapter.has_cls`` False), each image's mean received attention ``[P]`` (:func:`attn.received_attention`),
    split at the varlen boundaries ``cu_seqlens`` the layer is called with, so images never mix.
    """

    def __init__(self, handle: PruneHandle, need_cls: bool, need_keys: bool = False, need_cls_token: bool = False,
                 module: nn.Module | None = None):
        self.handle = handle
        self.cls_rows: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []  # per call: [B, S, d] keys at the feature layer, heads averaged
        self.cls_states: list[torch.Tensor] = []  # per call: [B, S, D] hidden states of the feature layer
        self._need_cls, self._need_keys = need_cls, need_keys
        self._has_cls = handle.adapter.has_cls
        self._segments: torch.Tensor | None = None
        self.pre_projector: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._module: nn.Module | None = None
        self._old: str | None = None
        adapter = handle.adapter
        projector = adapter.projector()
        self._hooks.append(projector.register_forward_pre_hook(self._grab_projector_input))
        if (need_keys or need_cls_token) and not need_cls:
            try:  # keys and the [CLS] are optional signals (absent where the tower's layers are not reachable)
                adapter.vision_feature_attention()
            except (TypeError, ValueError):
                need_keys = self._need_keys = need_cls_token = False
        if need_cls_token and adapter.has_cls:
            self._hooks.append(_feature_layer(adapter).register_forward_hook(self._grab_states))
        if need_cls or need_keys:
            self._module = adapter.vision_feature_attention() if module is None else module
            vcfg = adapter.vision_config
            self._old = vcfg._attn_implementation
            vcfg._attn_implementation = attn.wrapped_name(attn.base_name(self._old))
            attn.add_observer(self._module, self._observe)
            if need_cls and not self._has_cls:
                self._hooks.append(self._module.register_forward_pre_hook(self._grab_segments, with_kwargs=True))

    def _grab_states(self, module, args, output):
        self.cls_states.append((output[0] if isinstance(output, tuple) else output).detach())

    def _grab_projector_input(self, module, args):
        self.pre_projector = args[0].detach()

    def _grab_segments(self, module, args, kwargs):
        cu = kwargs.get("cu_seqlens")
        self._segments = None if cu is None else cu.tolist()

    def _observe(self, module, query, key, attention_mask, scaling):
        if self._need_keys:
            self.keys.append(key.detach().float().mean(1))
        if not self._need_cls:
            return
        if self._has_cls:
            self.cls_rows.append(attn.query_rows(query, key, scaling, rows=slice(0, 1),
                                                 mask=attention_mask)[:, :, 0])  # [B, H, T]
            return
        cu = self._segments
        if cu is None or query.shape[2] != cu[-1]:  # the layer calls attention once per segment
            cu = [0, query.shape[2]]
        for b in range(query.shape[0]):
            for lo, hi in zip(cu[:-1], cu[1:]):
                self.cls_rows.append(attn.received_attention(query[b:b + 1, :, lo:hi], key[b:b + 1, :, lo:hi],
                                                             scaling)[0])

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        if self._module is not None:
            attn.remove_observer(self._module)
            self.handle.adapter.vision_config._attn_implementation = self._old


class FrameQueryCapture:
    """Observe the rotary-embedded queries and keys of the family's frame-query block
    (:meth:`~lmms_prune.families.base.Family.frame_query_block`, ``Needs.vision_frame_attention``), each call's
    reduced at once to its merge units' means ``[H, s / unit, d]`` (:func:`lmms_prune.selection.unit_means`;
    the block calls attention once per window or frame, or once in all with flash attention), read-only and
    besides the observer the block already has (a :class:`VisionCapture` of the same block)."""

    def __init__(self, adapter: Any, block: tuple[nn.Module, int]):
        self.module, self.unit = block
        self.queries: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self._config = adapter.vision_config
        self._old = self._config._attn_implementation
        self._previous = attn.observer_of(self.module)
        self._config._attn_implementation = attn.wrapped_name(attn.base_name(self._old))
        attn.add_observer(self.module, self._observe)

    def _observe(self, module, query, key, attention_mask, scaling):
        if self._previous is not None:
            self._previous(module, query, key, attention_mask, scaling)
        # [B, H, s, d] -> [H, B s, d]: the tower's sequence (Qwen's towers run one, B = 1)
        self.queries.append(sel.unit_means(query.detach().transpose(0, 1).flatten(1, 2), self.unit))
        self.keys.append(sel.unit_means(key.detach().transpose(0, 1).flatten(1, 2), self.unit))

    def close(self) -> None:
        if self._previous is None:
            attn.remove_observer(self.module)
        else:
            attn.add_observer(self.module, self._previous)
        self._config._attn_implementation = self._old


def _left_pad(rows: list[torch.Tensor], value: int | bool) -> torch.Tensor:
    width = max(r.shape[-1] for r in rows)
    out = rows[0].new_full((len(rows), *rows[0].shape[:-1], width), value)
    for i, r in enumerate(rows):
        out[i, ..., width - r.shape[-1]:] = r
    return out


MODALITIES = (("image", "pixel_values"), ("video", "pixel_values_videos"))  # mm_encoder_outputs key, pixel input


def _encode(handle: PruneHandle, kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Encode each modality the call has (images, videos) under its own vision capture: per modality the
    encoder output, the projected embeddings ``[rows, D]`` and the declared vision-side signals."""
    adapter, needs = handle.adapter, handle.needs
    out: dict[str, dict[str, Any]] = {}
    for modality, pixels in MODALITIES:
        if kwargs.get(pixels) is None:
            continue
        signal_kwargs = kwargs if modality == "image" else None
        if modality == "video" and (needs.vision_attention or needs.vision_features or needs.vision_frame_attention):
            signal_kwargs = adapter.video_signal_kwargs(kwargs)  # fails early where the family has none
        block = adapter.frame_query_block() if needs.vision_frame_attention else None  # fails before any hook
        capture = VisionCapture(handle, need_cls=needs.vision_attention, need_keys=needs.vision_keys,
                                need_cls_token=needs.vision_cls)
        early_module = adapter.early_vision_attention() if needs.vision_attention_early else None
        # one observer per module: where the early layer is the feature layer, its signal is the feature layer's
        same = early_module is not None and needs.vision_attention and early_module is capture._module
        early = (VisionCapture(handle, need_cls=True, module=early_module)
                 if early_module is not None and not same else None)
        after = _tower_layer(handle.selector)
        if after is not None and modality == "video":
            raise ValueError(f"method {handle.config.method!r} merges tokens inside the vision tower, for images "
                             "only; use the merge on the tower's output (its default) for videos")
        tower = TowerMerge(adapter, after, handle.selector.tower_merge) if after is not None else None
        last = (VisionCapture(handle, need_cls=True, module=adapter._attention_of(adapter.vision_layers()[-1]))
                if needs.vision_attention_last else None)
        # last: it chains onto an observer the captures above put on the same block, and is closed first
        frame = FrameQueryCapture(adapter, block) if block is not None else None
        try:
            with torch.no_grad():
                encoded = adapter.encode_images(kwargs) if modality == "image" else adapter.encode_videos(kwargs)
        finally:
            if frame is not None:
                frame.close()
            if last is not None:
                last.close()
            if tower is not None:
                tower.close()
            if early is not None:
                early.close()
            capture.close()
        out[modality] = {
            "encoded": encoded,
            "projected": adapter.flatten_image_features(encoded.pooler_output),
            "importance": adapter.vision_importance(capture.cls_rows, signal_kwargs) if needs.vision_attention
            else None,
            "early": adapter.vision_importance((capture if same else early).cls_rows, signal_kwargs)
            if early_module is not None else None,
            "features": adapter.flatten_pre_projector(capture.pre_projector, signal_kwargs) if needs.vision_features
            else None,
        }
        out[modality]["keys"] = _token_keys(capture.keys, out[modality]["projected"].shape[0], adapter.has_cls)
        out[modality]["cls"] = _projected_cls(adapter, capture.cls_states, out[modality]["projected"].shape[0])
        out[modality]["last"] = (adapter.vision_importance(last.cls_rows, signal_kwargs) if last is not None
                                 else None)
        out[modality]["frame"] = (adapter.frame_query_attention(frame.queries, frame.keys, signal_kwargs)
                                  if frame is not None else None)
        out[modality]["tower_groups"] = None if tower is None else _tower_groups(tower, out[modality]["projected"])
    return out


def _tower_layer(selector: Any) -> int | None:
    """The selector's in-tower merge layer (``Selector.tower_layer``; None for a plain callable)."""
    tower_layer = getattr(selector, "tower_layer", None)
    return None if tower_layer is None else tower_layer()


def _tower_groups(tower: TowerMerge, projected: torch.Tensor) -> torch.Tensor:
    """``[rows]`` int64, one per projected row: each patch's group in the in-tower merge
    (:func:`lmms_prune.selection.merge_into_slots`; the family's patches map one-to-one onto LLM tokens,
    :meth:`~lmms_prune.families.base.Family.tower_layout`)."""
    groups = tower.patch_groups().to(projected.device)
    if groups.numel() != projected.shape[0]:
        raise ValueError(f"an in-tower merge saw {groups.numel()} patches but the projector gave "
                         f"{projected.shape[0]} tokens: the family's patches are not one LLM token each")
    return groups


def _feature_layer(adapter: Any) -> nn.Module:
    """The vision layer whose output the model feeds to the projector (the one of
    :meth:`~lmms_prune.families.base.Family.vision_feature_attention`)."""
    return next(layer for layer in adapter.vision_layers()
                if any(m is adapter.vision_feature_attention() for m in layer.modules()))


def _projected_cls(adapter: Any, states: list[torch.Tensor], num_tokens: int) -> torch.Tensor | None:
    """``Needs.vision_cls``: ``[images, D]``, each image's [CLS] hidden state at the feature layer through the
    family's projector (VisionZip's code projects its [CLS] with the patches), where the tower has a [CLS] and
    each of its other tokens is one LLM token (LLaVA-1.5); None elsewhere (InternVL's projector takes 2x2 groups,
    Qwen's towers have no [CLS])."""
    if not states or sum(s.shape[0] * (s.shape[1] - 1) for s in states) != num_tokens:
        return None
    with torch.no_grad():
        return adapter.projector()(torch.cat([s[:, :1] for s in states]))[:, 0]


def _token_keys(keys: list[torch.Tensor], num_tokens: int, has_cls: bool) -> torch.Tensor | None:
    """``Needs.vision_keys``: one key row per visual token ``[num_tokens, d]`` where the tower's patches map
    one-to-one onto the LLM's visual tokens (LLaVA-1.5: ``[images, 1 + P, d]`` calls, the [CLS] row dropped as
    the projector's input drops it); None where they do not (InternVL's pixel shuffle and Qwen's 2x2 merger give
    one LLM token per group of patches, whose keys are not one row)."""
    if not keys:
        return None
    rows = [k[:, 1:] if has_cls else k for k in keys]
    if sum(r.shape[0] * r.shape[1] for r in rows) != num_tokens:
        return None
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])


def shrink_inputs(handle: PruneHandle, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[PruneRecord]]:
    """Encode the images and videos, select per image / video, and return the forward/generate kwargs of the
    shorter prompt with one ``PruneRecord`` per sample."""
    cfg, adapter, needs = handle.config, handle.adapter, handle.needs
    input_ids: torch.Tensor = kwargs["input_ids"]
    mask2d = kwargs.get("attention_mask")
    if mask2d is None:
        mask2d = torch.ones_like(input_ids)
    spans = adapter.join_videos(adapter.spans(input_ids, kwargs), handle.video_frames)
    t0 = time.perf_counter()
    modal = _encode(handle, kwargs)
    vision_t0 = time.perf_counter()
    offsets = dict.fromkeys(modal, 0)
    images = dict.fromkeys(modal, 0)  # spans seen per modality: the index of the span's [CLS] (Needs.vision_cls)
    kept_rows: dict[str, list] = {m: [] for m in modal}
    kept_feats: dict[str, list] = {m: [] for m in modal}
    new_ids, new_mask, new_pos, records, keeps = [], [], [], [], []
    # 'original' / 'gap': GAP's rule, each kept token keeps its position ID in the unpruned prompt
    original_positions = (adapter.original_positions(input_ids, mask2d, kwargs) if cfg.positions != "contiguous"
                          else None)
    for b, sample_spans in enumerate(spans):
        keep = mask2d[b].new_ones(input_ids.shape[1], dtype=torch.bool)
        kept_per_image, merged, sources, protected = [], [], [], []
        n_vis = sum(s.num_visual for s in sample_spans)
        sample_offset = 0
        for span in sample_spans:
            m = adapter.encoder_modality(span)
            if m not in modal:
                raise ValueError(f"{adapter.name}: {m} tokens at {span.start} but the call has no "
                                 f"{dict(MODALITIES)[m]}")
            enc = modal[m]
            projected, importance, features, early = enc["projected"], enc["importance"], enc["features"], enc["early"]
            # rows of the modality's encoder outputs (one per span token with a row: structural newlines have
            # one, Qwen3-VL's timestamps between video frames none) of the visual tokens
            span_rows = adapter.encoder_rows(span)
            offset = offsets[m]
            rows = (offset + span_rows[span.visual_index]).to(projected.device)
            image = ImageSignals(sample=b, span=span, offset=sample_offset, sample_visual=n_vis,
                                 task_kind=handle.task_kind, device=projected.device,
                                 vision_attention=None if importance is None else importance[rows],
                                 vision_attention_early=None if early is None else early[rows],
                                 vision_attention_last=None if enc["last"] is None else enc["last"][rows],
                                 vision_frame_attention=None if enc["frame"] is None else enc["frame"][rows],
                                 vision_features=None if features is None else features[rows],
                                 vision_keys=None if enc["keys"] is None else enc["keys"][rows],
                                 vision_cls=None if enc["cls"] is None else enc["cls"][images[m]],
                                 tower_groups=None if enc["tower_groups"] is None else enc["tower_groups"][rows],
                                 embeddings=projected[rows] if needs.embeddings else None,
                                 instruction=_instruction(handle, input_ids, mask2d, b, span, sample_spans)
                                 if needs.instruction else None)
            n = sel.budget(span.num_visual, keep_ratio=cfg.keep_ratio, keep_tokens=cfg.keep_tokens)
            result = handle.selector(image, handle.score(image), n)
            keep[span.start: span.start + span.length] = False
            if isinstance(result, sel.Merge) and result.slots is None:
                if cfg.positions != "contiguous":
                    raise ValueError(f"method {cfg.method!r} merges tokens, which have no original position: "
                                     "use positions='contiguous'")
                tail = _trailing_structural(span, span_rows)
                if tail is None:
                    raise ValueError(f"method {cfg.method!r} merges tokens, but {adapter.name} "
                                     f"{'videos' if span.video else 'images'} have structural tokens (row "
                                     "newlines, timestamps) inside them that a merged sequence cannot place; use a "
                                     "method that keeps a subset")
                local = result.index.to(input_ids.device)
                # identical placeholders, renumbered: the merged sequence, then the span's trailing structural
                # tokens (LLaVA-OneVision's newline after a video) in their own places, with their encoder rows
                keep[span.start: span.start + result.count] = True
                keep[span.start + torch.tensor(span.structural, dtype=torch.long, device=keep.device)] = True
                kept_feats[m].append(torch.cat([sel.merged_embeddings(projected[rows], result),
                                                projected[(offset + tail).to(projected.device)]]))
                kept_rows[m].append(None)  # new embeddings: no encoder row of their own
                merged.append(result.added)
                prefix, own = 0 if result.prefix is None else result.prefix.shape[0], local.cpu()
                sources.append(torch.cat([own.new_full((prefix,), -1), own, own.new_full((result.weights.shape[0],), -1)]))
                protected.append(torch.zeros(0, dtype=torch.long) if result.protected is None
                                 else result.protected.cpu().sort()[0])
            else:
                # a Merge with slots: each merged token in its slot's place (as a kept token of that position)
                slotted = isinstance(result, sel.Merge)
                if slotted:
                    _check_slots(result)
                local = torch.cat([result.index, result.slots]).sort()[0].cpu() if slotted else result.cpu()
                # structural tokens (row newlines, timestamps) always stay, with their own encoder rows if any
                in_span = torch.cat([torch.tensor(span.structural, dtype=torch.long), span.visual_index[local]]).sort()[0]
                keep[(span.start + in_span).to(keep.device)] = True
                in_rows = span_rows[in_span]
                index = (offset + in_rows[in_rows >= 0]).to(projected.device)
                feats = projected[index]
                if slotted:
                    feats = _place_slots(feats, index, rows, projected[rows], result)
                kept_feats[m].append(feats)
                kept_rows[m].append(None if slotted else index)
                merged.append(0)
                sources.append(local)
                protected.append(torch.zeros(0, dtype=torch.long))
            kept_per_image.append(local.cpu())
            offsets[m] += int((span_rows >= 0).sum())
            images[m] += 1
            sample_offset += span.num_visual
        real = mask2d[b].bool()
        keep &= real  # drop the old padding; the batch is left-padded again below
        keeps.append(keep)
        new_ids.append(input_ids[b][keep])
        new_mask.append(mask2d[b][keep])
        if original_positions is not None:
            new_pos.append(sel.gap_positions(original_positions[..., b, :], keep))
        n_kept = sum(k.numel() for k in kept_per_image) + sum(merged)
        full = int(real.sum())
        records.append(PruneRecord(n_vis, n_kept, kept_per_image, full, full - n_vis + n_kept, [],
                                   spans=list(sample_spans), merged=merged,
                                   spans_after=_shrunk_spans(sample_spans, keep), sources=sources,
                                   protected=protected))
    for enc in modal.values():
        sync(enc["projected"])
    seconds = time.perf_counter() - t0
    select_seconds = time.perf_counter() - vision_t0
    for rec in records:
        rec.select_seconds = select_seconds
        rec.vision_seconds = seconds - select_seconds
    dropped = set(adapter.image_input_keys) | set(adapter.video_input_keys)
    out = {k: v for k, v in kwargs.items() if k not in dropped}
    out["input_ids"] = _left_pad(new_ids, adapter.pad_token_id())
    for rec, ids in zip(records, new_ids):  # the spans of the left-padded shortened prompt
        pad = out["input_ids"].shape[1] - ids.shape[0]
        rec.spans_after = [dataclasses.replace(s, start=s.start + pad) for s in rec.spans_after]
    out["attention_mask"] = _left_pad(new_mask, 0)
    for key, value in kwargs.items():  # other per-token inputs (e.g. Qwen's mm_token_type_ids) follow the ids
        if (key not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor)
                and value.shape[:2] == input_ids.shape):
            out[key] = _left_pad([value[b][keeps[b]] for b in range(len(keeps))], 0)
    if new_pos:
        out["position_ids"] = torch.stack(_pad_positions(new_pos), dim=-2)
    mm_outputs = {}
    for m, enc in modal.items():
        projected, encoded = enc["projected"], enc["encoded"]
        kept_all = torch.cat(kept_feats[m], 0) if kept_feats[m] else projected[:0]
        if any(r is None for r in kept_rows[m]):
            if adapter.injected_layers():
                raise ValueError(f"method {cfg.method!r} merges tokens, but {adapter.name} also adds per-token "
                                 "vision features inside the LLM (DeepStack) that a merged token has none of; use a "
                                 "method that keeps a subset (vispruner, divprune, fastervlm, cdpruner)")
        else:
            rows = (torch.cat(kept_rows[m]) if kept_rows[m]
                    else torch.zeros(0, dtype=torch.long, device=projected.device))
            encoded = adapter.keep_encoder_extras(encoded, rows)
        wrap = adapter.wrap_image_features if m == "image" else adapter.wrap_video_features
        mm_outputs[m] = wrap(encoded, kept_all)
    out["mm_encoder_outputs"] = mm_outputs
    return out, records


def _check_slots(merge: sel.Merge) -> None:
    """A slotted pre-LLM merge names one distinct slot per merged token, none of them also kept as itself."""
    slots, index = merge.slots.cpu(), merge.index.cpu()
    if (slots.numel() != merge.weights.shape[0] or bool(torch.isin(slots, index).any())
            or slots.unique().numel() != slots.numel()):
        raise ValueError(f"Merge.slots={slots.tolist()}: need one distinct slot per merged token, none of them kept "
                         "(Merge.index), to place the merged tokens")


def _trailing_structural(span: ImageSpan, span_rows: torch.Tensor) -> torch.Tensor | None:
    """The encoder rows (counted from the span's first) of a span's structural tokens where they all come after
    its visual tokens and each has a row (LLaVA-OneVision's newline after a video): a merged sequence can end with
    them. Empty where there are none; None where they sit among the visual tokens (row newlines, timestamps)."""
    tail = torch.tensor(span.structural, dtype=torch.long)
    if tail.numel() and (not torch.equal(tail, torch.arange(span.num_visual, span.length))
                         or bool((span_rows[tail] < 0).any())):
        return None
    return span_rows[tail]


def _place_slots(feats: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, image: torch.Tensor,
                 merge: sel.Merge) -> torch.Tensor:
    """The kept rows ``feats`` (``projected[index]``, span order) with each of ``merge``'s slots holding its merged
    token (``merge.weights @ image``, ``image`` = the image's visual rows ``rows``, computed in float32)."""
    values = (merge.weights.to(image.device, torch.float32) @ image.float()).to(feats.dtype)
    at = torch.searchsorted(index, rows[merge.slots.to(rows.device)])  # encoder rows ascend along the span
    out = feats.clone()
    out[at] = values
    return out


def _shrunk_spans(spans: list[ImageSpan], keep: torch.Tensor) -> list[ImageSpan]:
    """The sample's image spans in its shortened prompt (unpadded positions; ``keep`` [T] marks the positions of
    the full prompt that stay): each image's kept tokens as one ``1 x n`` row (a kept subset is no grid), its
    structural tokens at their new places. An LLM stage after the pre-LLM stage sees these spans."""
    out = []
    for span in spans:
        inside = keep[span.start: span.start + span.length].cpu()
        structural = tuple(int(inside[:i].sum()) for i in span.structural)
        length = int(inside.sum())
        out.append(ImageSpan(int(keep[:span.start].sum()), length, [(1, length - len(structural))], structural,
                             video=span.video))
    return out


def _instruction(handle: PruneHandle, input_ids: torch.Tensor, mask2d: torch.Tensor, b: int, span: Any,
                 spans: list[Any]) -> torch.Tensor:
    """[M, D]: the LLM's input embeddings of sample ``b``'s real tokens after ``span``, up to the next image or
    the prompt's end (the instruction and the chat template's closing tokens)."""
    later = [s.start for s in spans if s.start > span.start]
    end = min(later) if later else input_ids.shape[1]
    pos = torch.arange(span.start + span.length, end, device=input_ids.device)
    pos = pos[mask2d[b, pos].bool()]
    if pos.numel() == 0:
        raise ValueError(f"method {handle.config.method!r} needs the instruction after the image, but the prompt "
                         "has no text after it; put the question after the image")
    with torch.no_grad():
        return handle.model.get_input_embeddings()(input_ids[b, pos])


def _pad_positions(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Left-pad per-sample position rows ([L] or [R, L]) to a common length with zeros."""
    width = max(r.shape[-1] for r in rows)
    out = []
    for r in rows:
        pad = width - r.shape[-1]
        out.append(torch.nn.functional.pad(r, (pad, 0)) if pad else r)
    return out
