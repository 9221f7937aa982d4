"""The pruning engine: applies a visual-token selection inside a transformers-native VLM (methods.md 2-3).

``apply(model, method=..., **params)`` installs, through public extension points only:

* a forward pre-hook on the top-level model that reads the prompt's image layout at prefill (the model's
  family, :mod:`lmms_prune.families`, says where the image tokens are and how they form grids);
* an observing attention implementation (``attention.py``) on the language model, which records the signals
  the method declares (:class:`lmms_prune.methods.base.Needs`: the last prompt token's attention row, key
  norms) at the layers it names;
* forward pre-hooks on decoder layers ``K..L-1``. At prefill, layer ``K``'s hook hands every image's signals
  to the method's score and selector plug-ins and gathers hidden states, position embeddings (original RoPE
  positions), position ids and the attention mask of the kept tokens; the later layers receive the gathered
  tensors. At decode, those layers' masks are gathered to the pruned KV cache's columns. Layers ``< K`` keep
  their full cache, so new tokens get positions that continue from the unpruned length.

The engine names no method and no score: what to record and how to select comes from the config's plug-ins.
``mode="mask"`` is the reference used by the tests: full length, with the pruned key columns masked for
layers >= K. ``PruneHandle.remove()`` restores the model exactly.

Multi-stage pruning (``prune_layers=(K_1, K_2, ...)``, PyramidDrop) repeats the single stage: the hook of layer
``K_s`` scores the tokens still present with stage ``s``'s own plug-ins (built from a single-stage config with
``prune_layer=K_s``, so scored at ``K_s-1``), keeps a subset of them, and gathers the hidden states of stage
``s-1``'s sequence; layers ``K_s..K_{s+1}-1`` get stage ``s``'s gathered kwargs and masks, and their KV cache
holds stage ``s``'s tokens (mask mode: stage ``s``'s removed set is masked as keys from layer ``K_s`` on).
Per-stage budgets: ``lmms_prune.selection.budget.stage_budgets`` (see :meth:`PruneHandle._stage_counts`).
With ``positions='contiguous'`` the survivors of each stage are renumbered (every token's position ids drop by the
tokens removed before it; decoded tokens continue from the stage's renumbered length), in prune and mask mode
alike (:meth:`PruneHandle._renumbered`, :meth:`PruneHandle._decode_rope`). ``decode_cache='final'`` (MustDrop's
decode-stage cache cut): at decode, every layer from ``K_1 - 1`` on attends to the LAST stage's survivors only
(the other columns of its cache masked, in prune and mask mode alike) at the last stage's renumbered positions
(:meth:`PruneHandle._make_final_decode_hook` for layer ``K_1 - 1``). A stage may be ranked by its own
layer ``K_s`` (``Needs.query_key_attention``): the hook of layer ``K_s`` first calls that layer's attention on
its input with the current geometry and records the last prompt token's row (:meth:`PruneHandle._own_attention`);
or by layer ``K_s - 1`` so, before it runs (a pre-hook after the engine's own on that layer); options: without
RoPE (``Needs.query_key_unrotated``) and soft-maxed over the visual keys only (``Needs.query_key_visual_softmax``).

Merged tokens inside the LLM (SparseVLM's recycling): a selector may return a
:class:`lmms_prune.selection.Merge` whose ``slots`` name removed tokens; each slot is kept and its hidden state
at the stage's layer is replaced by its group's mean (:meth:`PruneHandle._place_merge`,
:meth:`PruneHandle._write_recycled`), in prune and mask mode alike, so the proof (prune = mask) still holds; the
slot keeps its token's original position and cache slot, and layers before the stage its original state.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from lmms_prune import scores as S
from lmms_prune import selection as sel
from lmms_prune.engine import attention as attn
from lmms_prune.engine.decode import DecodeColumns
from lmms_prune.engine.pre_llm import shrink_inputs
from lmms_prune.engine.prior import Prior, load_prior
from lmms_prune.engine.state import CallState, PruneRecord, sync
from lmms_prune.families import get_adapter
from lmms_prune.families.base import Family, ImageSpan
from lmms_prune.methods import SCORES, SELECTORS
from lmms_prune.methods.base import ImageSignals, Needs
from lmms_prune.presets import PruneConfig, check_model, resolve_config

__all__ = ["PruneHandle", "PruneRecord", "apply"]

TASK_KINDS = (None, "grounding", "understanding")


def _gather_seq(x: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather ``x`` along ``seq_dim`` with a per-sample index [B, T']; the batch dim is ``seq_dim - 1``
    (broadcast batch 1 is expanded). Leading dims before the batch (M-RoPE's 3) are kept."""
    seq_dim = seq_dim % x.dim()
    bdim = seq_dim - 1
    b, t_new = index.shape
    shape = list(x.shape)
    shape[bdim] = b
    x = x.expand(*shape)
    idx_shape = [1] * x.dim()
    idx_shape[bdim], idx_shape[seq_dim] = b, t_new
    idx = index.view(idx_shape)
    expand = list(x.shape)
    expand[seq_dim] = t_new
    return torch.gather(x, seq_dim, idx.expand(*expand))


def _has_pixels(kwargs: dict[str, Any]) -> bool:
    """Whether a model call carries images or videos to encode (``pixel_values`` / ``pixel_values_videos``)."""
    return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None


def _cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache a model call was given: ``cache`` (transformers >= 5.24) or ``past_key_values`` (before)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _cache_output(output: Any) -> Any:
    """The KV cache a model output carries, under either of transformers 5's names (see :func:`_cache_argument`)."""
    cache = getattr(output, "cache", None)
    return getattr(output, "past_key_values", None) if cache is None else cache


class PruneHandle:
    """A pruning patch on one model. Use ``records`` after a prefill; ``remove()`` to undo.

    ``task_kind`` (``None``, ``"grounding"`` or ``"understanding"``) is the kind of the requests being run; it
    selects ``alpha='auto'``. ``state`` is the per-call state (read-only use: tests and diagnostics).

    ``image_padding``: set before a call whose images the family padded (``Family.padding_masks``: per sample,
    per image, a bool ``[N visual tokens]`` mask, True = padding token, or None); the next prefill takes it (and
    resets it to None) and hands each image's mask to the scores that need it (``Needs.padding``). A batch
    expanded inside ``generate`` (``num_beams``) repeats each sample's masks.

    ``video_frames``: per sample, per visual part in prompt order, None for an image or a video's frame count;
    for families whose processor writes a video as separate image runs (InternVL: one tile per frame), the
    engine then sees each video as ONE span with one grid per frame (``Family.join_videos``). It stays set for
    later calls until changed (the runner sets it per batch); None: every run is its own image."""

    def __init__(self, model: nn.Module, config: PruneConfig, mode: str = "prune"):
        if mode not in ("prune", "mask"):
            raise ValueError(f"mode={mode!r}: must be 'prune' or 'mask'")
        self.model = model
        self.config = config
        self.mode = mode
        self.adapter: Family = get_adapter(model)
        self._task_kind: str | None = None
        self.image_padding: list[list[torch.Tensor | None]] | None = None
        self.video_frames: list[list[int | None]] | None = None
        self.decode: DecodeColumns | None = None
        self.records: list[PruneRecord] = []
        # where the images are in a prefill's input_ids ([B, T] -> spans per sample), when not the family's own
        # layout: an LLM stage composed after a pre-LLM stage (engine/compose.py) sees the shortened prompt
        self.span_source: Any = None
        # input_ids -> per sample, per image: visual token indices every stage keeps (a composed pre-LLM stage's
        # PruneRecord.protected), or None
        self.protected_source: Any = None
        self._hooks: list[Any] = []
        self._observed: list[nn.Module] = []
        self._old_attn: str | None = None
        self._base_attn = attn.base_name(self.adapter.text_config._attn_implementation)
        self._state = CallState()
        check_model(config, self.adapter.text_config)
        for plugin in (SCORES.get(config.score), SELECTORS.get(config.selector)):
            if plugin is not None:  # values a method leaves to the model's family (Plugin.for_family)
                config = self.config = plugin.for_family(config, self.adapter.name)
        depth = self.adapter.num_layers
        if config.multi_stage:  # resolve prune_layers='auto' to this model's layers
            config = self.config = dataclasses.replace(config, prune_layers=config.stage_layers(depth))
        self.stage_layers: tuple[int, ...] = config.stage_layers(depth) if config.stage == "llm" else ()
        self.stage_configs = config.stage_configs(depth) if config.stage == "llm" else [config]
        self._stage_of = {idx: sum(k <= idx for k in self.stage_layers) - 1 for idx in range(depth)}
        self._ratio: float | None = None
        self.stage_needs: list[Needs] = [c.needs() if config.stage != "none" else Needs() for c in self.stage_configs]
        self.needs: Needs = Needs()
        for stage_needs in self.stage_needs:
            self.needs = self.needs | stage_needs
        prior: Prior | None = None
        if self.needs.prior and config.bias_prior:
            prior = load_prior(config.bias_prior)
            prior.check(model.config, config.effective_score_layer)
        self.scores = [SCORES[c.score](c, prior) for c in self.stage_configs]
        self.selectors = [SELECTORS[c.selector](c, prior) if c.selector in SELECTORS else None
                          for c in self.stage_configs]
        self.score, self.selector = self.scores[0], self.selectors[0]
        # multi-stage with positions='contiguous': each stage's survivors are renumbered (see _renumbered)
        self.renumber = config.multi_stage and config.positions == "contiguous"
        # decode_cache='final': from layer K_1 - 1 on, decoded tokens see the last stage's survivors only
        self.final_cache = config.multi_stage and config.decode_cache == "final"
        for c, n in zip(self.stage_configs, self.stage_needs):
            late = sorted({*n.attention, *n.text_attention, *n.key_norms} & set(range(c.prune_layer or 0, depth)))
            if config.stage == "llm" and late:
                raise ValueError(f"method {config.method!r}: its stage at layer {c.prune_layer} needs signals "
                                 f"recorded inside layer(s) {late}, which run after it; only a last-row attention "
                                 "can come from the stage's own layer (score_at='K'); use score_at='K-1'")
        if config.stage == "llm":
            self._install_llm()
        elif config.stage == "pre_llm":
            self._install_pre_llm()
        else:
            self._install_observe_only()

    @property
    def state(self) -> CallState:
        return self._state

    @property
    def task_kind(self) -> str | None:
        return self._task_kind

    @task_kind.setter
    def task_kind(self, kind: str | None) -> None:
        if kind not in TASK_KINDS:
            raise ValueError(f"task_kind={kind!r}: must be one of {TASK_KINDS}")
        self._task_kind = kind

    # ------------------------------------------------------------------ setup
    def _install_observe_only(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        lm = self.adapter.language_model
        self._hooks.append(lm.register_forward_pre_hook(self._on_lm_start, with_kwargs=True))
        self._hooks.append(lm.register_forward_hook(self._on_lm_end, with_kwargs=True))
        self._hooks.extend(self.adapter.install_hooks())  # the family's own observers (removed with ours)

    def _install_llm(self) -> None:
        last = min(self.adapter.injected_layers(), self.adapter.num_layers)
        if any(getattr(s, "merges", False) for s in self.selectors) and self.stage_layers[0] < last:
            raise ValueError(f"method {self.config.method!r} merges tokens inside the LLM from layer "
                             f"{self.stage_layers[0]}, but {self.adapter.name} adds per-token vision features to "
                             f"its first {last} layers (DeepStack) that a merged token has none of; start its "
                             f"prune_layers at >= {last}")
        self._install_observe_only()
        layers = self.adapter.layers
        need = sorted({layer for c in self.stage_configs for layer in c.score_layers()})
        if need:
            text_cfg = self.adapter.text_config
            self._old_attn = text_cfg._attn_implementation
            text_cfg._attn_implementation = attn.wrapped_name(attn.base_name(self._old_attn))
            for layer in need:
                module = layers[layer].self_attn
                attn.add_observer(module, self._make_observer(layer))
                self._observed.append(module)
        if self.final_cache:  # the layer whose output the first stage prunes: its decode steps only
            self._hooks.append(layers[self.stage_layers[0] - 1].register_forward_pre_hook(
                self._make_final_decode_hook(), with_kwargs=True))
        for idx in range(self.stage_layers[0], len(layers)):
            self._hooks.append(layers[idx].register_forward_pre_hook(self._make_layer_hook(idx), with_kwargs=True))
        # own-layer rows of a layer before its stage's (K_s - 1): a hook after the engine's own on that layer, so
        # it sees the layer's input as the layer will (stage s-1's sequence, positions and mask)
        for stage, needs in enumerate(self.stage_needs):
            k = self.stage_layers[stage]
            for idx in needs.query_key_attention:
                if idx == k:
                    continue
                if not (self.stage_layers[stage - 1] if stage else 0) <= idx < k:
                    raise ValueError(f"method {self.config.method!r}: its stage at layer {k} is ranked by layer "
                                     f"{idx}'s own query/key, which is outside that stage's span; use score_at='K' "
                                     "or 'own-K-1'")
                self._hooks.append(layers[idx].register_forward_pre_hook(
                    self._make_own_attention_hook(idx, stage), with_kwargs=True))
        self._install_injections()

    def _install_injections(self) -> None:
        """Per-token additions the language model makes to the outputs of its first layers (the family's
        :meth:`~lmms_prune.families.base.Family.injected_layers`): at prefill the model keeps those of layers
        < K (full length) and hands those of layers >= K (``Family.take_injections``) to forward hooks on those
        layers that add them to the kept tokens only. Mask mode runs at full length and leaves them to the
        model, which is why the two agree."""
        first, last = self.stage_layers[0], min(self.adapter.injected_layers(), self.adapter.num_layers)
        if self.mode != "prune" or first >= last:
            return
        if len(self.stage_layers) > 1:
            raise ValueError(f"prune_layers={tuple(self.stage_layers)}: {self.adapter.name} adds per-token vision "
                             f"features to the outputs of its first {last} layers (DeepStack); multi-stage pruning "
                             f"must start at layer >= {last} on it")
        lm = self.adapter.language_model
        self._hooks.append(lm.register_forward_pre_hook(self._take_injections, with_kwargs=True))
        for idx in range(first, last):
            self._hooks.append(self.adapter.layers[idx].register_forward_hook(self._make_injection_hook(idx)))

    def _take_injections(self, module, args, kwargs):
        st = self._state
        if st.phase != "prefill" or not st.has_images:
            return None
        st.injections = self.adapter.take_injections(kwargs, self.stage_layers[0])
        return args, kwargs

    def _make_injection_hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            st = self._state
            if st.phase != "prefill" or idx not in st.injections or st.keep_index is None:
                return None
            positions, values = st.injections[idx]  # bool [B, T] of the full sequence, [positions.sum(), D]
            positions = positions.to(output.device)
            kept = _gather_seq(positions, st.keep_index, 1) & st.keep_valid
            out = output.clone()
            out[kept] = out[kept] + values.to(output.device, output.dtype)[st.keep_mask[positions]]
            return out

        return hook

    def _install_pre_llm(self) -> None:
        if getattr(self.selector, "tower_layer", lambda: None)() is not None:
            self.adapter.check_tower_merge(self.config.method)
        if self.needs.vision_attention:
            self.adapter.vision_feature_attention()  # fails early, with the reason, where the signal is missing
        if getattr(self.selector, "merges", False) and self.adapter.injected_layers():
            raise ValueError(f"method {self.config.method!r} merges tokens, but {self.adapter.name} also adds "
                             "per-token vision features inside the LLM (DeepStack) that a merged token has none "
                             "of; use a method that keeps a subset (vispruner, divprune, fastervlm, cdpruner)")
        layer = self.selector.decode_layer(self.config) if self.selector is not None else None
        self.decode = DecodeColumns(self, layer) if layer is not None else None  # checks L before any hook
        self._install_observe_only()
        original = self.model.generate

        def generate(*args: Any, **kwargs: Any):
            if args:
                kwargs["input_ids"] = args[0]
                args = args[1:]
            if not _has_pixels(kwargs):
                return original(*args, **kwargs)
            prompt = kwargs["input_ids"]
            kwargs, self.records = shrink_inputs(self, kwargs)
            self._state = CallState(phase="pre_llm")
            out = original(*args, **kwargs)
            # Report the caller's own prompt in front of the new tokens, so `out[:, prompt_len:]` works as usual.
            short = kwargs["input_ids"].shape[1]
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            full = torch.cat([prompt.repeat_interleave(seqs.shape[0] // prompt.shape[0], 0), seqs[:, short:]], 1)
            if isinstance(out, torch.Tensor):
                return full
            out.sequences = full
            return out

        self.model.generate = generate  # instance attribute: `remove()` deletes it and the class method is back
        self._patched_generate = True

    def remove(self) -> None:
        """Undo every change: hooks, observers, the attention implementation name, the generate wrapper."""
        if getattr(self, "_patched_generate", False):
            del self.model.generate
            self._patched_generate = False
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module in self._observed:
            attn.remove_observer(module)
        if getattr(self, "decode", None) is not None:
            self.decode.close()
            self.decode = None
        self._observed.clear()
        if self._old_attn is not None:
            self.adapter.text_config._attn_implementation = self._old_attn
            self._old_attn = None
        self._state = CallState()

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ hooks
    @staticmethod
    def _is_prefill(kwargs: dict[str, Any]) -> bool:
        cache = _cache_argument(kwargs)
        return cache is None or cache.get_seq_length() == 0

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if self.config.stage == "pre_llm":
            return self._on_model_call_pre_llm(args, kwargs)
        mask2d = kwargs.get("attention_mask")
        mask2d = mask2d if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else None
        st = self._state
        if not self._is_prefill(kwargs):
            if st.spans is not None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
                st.phase = "decode"
                st.kv_full = (st.kv_full if st.kv_full is not None else st.seq_len) + q
                if mask2d is not None:
                    st.padding = mask2d
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            if _has_pixels(kwargs):
                raise ValueError("lmms_prune needs input_ids (not inputs_embeds) to locate the image tokens")
            self._state = CallState(phase="prefill")
            return None
        spans = (self.span_source(input_ids) if self.span_source is not None
                 else self.adapter.join_videos(self.adapter.spans(input_ids, kwargs), self.video_frames))
        lengths = mask2d.sum(-1).tolist() if mask2d is not None else [input_ids.shape[1]] * input_ids.shape[0]
        self._state = CallState(phase="prefill", spans=spans, seq_len=input_ids.shape[1],
                                lengths=[int(x) for x in lengths], padding=mask2d,
                                image_padding=self._take_image_padding(spans),
                                protected=None if self.protected_source is None else self.protected_source(input_ids))
        self.records = []
        return None

    def _take_image_padding(self, spans: list[list[ImageSpan]]) -> list[dict[int, torch.Tensor]] | None:
        """The caller's :attr:`image_padding` for this prefill (then reset), checked against its images and keyed
        by span start; sample ``b`` of a batch ``k`` times larger (``num_beams``) takes sample ``b // k``'s."""
        given, self.image_padding = self.image_padding, None
        if given is None:
            return None
        if not given or len(spans) % len(given):
            raise ValueError(f"image_padding has masks for {len(given)} samples, but the call has {len(spans)}")
        repeat = len(spans) // len(given)
        out = []
        for b, sample in enumerate(spans):
            masks = given[b // repeat]
            if len(masks) != len(sample):
                raise ValueError(f"image_padding of sample {b // repeat} has {len(masks)} masks for its "
                                 f"{len(sample)} images")
            for mask, span in zip(masks, sample):
                if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (span.num_visual,)):
                    raise ValueError(f"image_padding: a mask must be bool [{span.num_visual}] (the image's visual "
                                     f"tokens), got {mask.dtype} {tuple(mask.shape)}")
            out.append({span.start: mask.cpu() for mask, span in zip(masks, sample) if mask is not None})
        return out

    def _on_model_call_pre_llm(self, args: tuple, kwargs: dict[str, Any]):
        """A direct forward with images: shrink its inputs; inside generate they were shrunk already."""
        if not self._is_prefill(kwargs):
            self._state.phase = "decode"
            return None
        if not _has_pixels(kwargs):
            # inside generate (phase pre_llm), or generate without a cache recomputing the whole shortened prompt
            # with its pre-encoded images: the records of the shrink stand
            if self._state.phase == "pre_llm" or (kwargs.get("mm_encoder_outputs") and self.records):
                self._state.phase = "prefill"
            else:  # a prompt without images: nothing to prune, nothing to record
                self._state = CallState(phase="prefill")
                self.records = []
            return None
        if args:
            kwargs = {**kwargs, "input_ids": args[0]}
        kwargs, self.records = shrink_inputs(self, kwargs)
        self._state = CallState(phase="prefill")
        return (), kwargs

    def _on_lm_start(self, module, args, kwargs):
        self._state.lm_position_ids = kwargs.get("position_ids")
        self._state.decode_rope = {}
        if self._state.phase == "prefill":
            sync(kwargs.get("inputs_embeds"))
            self._state.lm_t0 = time.perf_counter()

    def _on_lm_end(self, module, args, kwargs, output):
        st = self._state
        if st.phase != "prefill" or st.lm_t0 is None:
            return
        sync(getattr(output, "last_hidden_state", None))
        seconds = time.perf_counter() - st.lm_t0
        st.lm_t0 = None
        if self.config.stage == "pre_llm":
            for rec in self.records:
                rec.llm_prefill_seconds = seconds
                rec.kv_lengths = [rec.seq_len_after] * self.adapter.num_layers
            st.phase = "prefilled"
            return
        if st.spans is None:
            return
        if not self.records:  # no pruning happened (method none): record the unpruned layout
            self.records = [self._record_unpruned(b) for b in range(len(st.spans))]
        cache = _cache_output(output)
        for b, rec in enumerate(self.records):
            rec.llm_prefill_seconds = seconds
            rec.kv_lengths = self._kv_lengths(cache, b)
        st.phase = "prefilled"

    def _kv_lengths(self, cache: Any, b: int) -> list[int]:
        st, depth = self._state, self.adapter.num_layers
        full = st.lengths[b]
        if st.keep_valid is None or self.mode == "mask":
            return [full] * depth
        padding = st.seq_len - full
        kept = [int(valid[b].sum()) - padding for valid in st.stage_valid]  # kept slots minus padding tokens
        return [full if self._stage_of[i] < 0 else kept[self._stage_of[i]] for i in range(depth)]

    def _record_unpruned(self, b: int) -> PruneRecord:
        spans = self._state.spans[b]
        n = sum(s.num_visual for s in spans)
        full = self._state.lengths[b]
        return PruneRecord(n, n, [torch.arange(s.num_visual) for s in spans], full, full, [], spans=list(spans))

    def _make_observer(self, layer: int):
        want_norms = layer in self.needs.key_norms
        want_text = layer in self.needs.text_attention
        # query='raters': the row is made per image from the text rows (see _signals)
        want_rows = layer in self.needs.attention and self.config.query != "raters"

        def observe(module, query, key, attention_mask, scaling):
            st = self._state
            if st.phase != "prefill" or st.spans is None or query.shape[2] < 2:
                return
            t0 = time.perf_counter()
            if want_norms:
                st.key_norms[layer] = attn.key_l1_norms(key)
            if want_rows or want_text:
                last = self.config.query_rows  # query='last': the mean of the last rows (FrameFusion's num)
                text = self._text_rows() if want_text or self.config.query == "text_mean" else 0
                probs = attn.attention_rows(query, key, attention_mask, scaling, max(text, last))
                if want_text:
                    st.text_attention[layer] = probs[:, probs.shape[1] - text:]
                if want_rows:
                    st.attention[layer] = (self._combine_rows(probs) if self.config.query == "text_mean"
                                           else probs[:, -last:].mean(1))
            sync(query)
            st.score_seconds += time.perf_counter() - t0

        return observe

    def _text_rows(self) -> int:
        """Number of trailing query rows that cover every sample's text after its last image."""
        st = self._state
        ends = [max((s.start + s.length for s in spans), default=st.seq_len - 1) for spans in st.spans]
        return max(1, st.seq_len - min(ends))

    def _combine_rows(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, R, S] -> [B, S]: the last row, or the mean of each sample's own text rows."""
        if probs.shape[1] == 1:
            return probs[:, 0]
        return torch.stack([self._sample_rows(probs, b).mean(0) for b in range(probs.shape[0])])

    def _sample_rows(self, probs: torch.Tensor, b: int) -> torch.Tensor:
        """[R', S]: sample ``b``'s own rows of the trailing text rows ``probs`` [B, R, S] (its text after its last
        image; rows of shorter texts that belong to the image or the prompt before it are left out)."""
        t = self._state.seq_len
        end = max((s.start + s.length for s in self._state.spans[b]), default=t - 1)
        return probs[b, probs.shape[1] - (t - end):]

    # ------------------------------------------------------------------ selection
    def _signals(self, b: int, span: ImageSpan, offset: int, num_visual: int, hidden: torch.Tensor,
                 normed: torch.Tensor | None, stage: int = 0, present: torch.Tensor | None = None) -> ImageSignals:
        """The declared signals of one image of sample ``b`` (visual columns only: structural tokens, e.g. row
        newlines, are hidden); at a later stage of multi-stage pruning, of its visual tokens still ``present``
        (indices among the image's visual tokens; columns of the current, shorter sequence)."""
        st, needs = self._state, self.stage_needs[stage]
        vis = span.visual_positions if present is None else span.visual_positions[present.cpu()]
        pos = vis if present is None else self._columns(b, vis, stage)
        image = ImageSignals(sample=b, span=span, offset=offset, sample_visual=num_visual,
                             task_kind=self._task_kind, device=hidden.device, present=present)
        image.text_attention = {layer: self._sample_rows(st.text_attention[layer], b)[:, pos.to(
            st.text_attention[layer].device)] for layer in needs.text_attention}
        if self.config.query == "raters":  # SparseVLM: the raters' mean row over this image's tokens present
            image.attention = {layer: S.rater_importance(image.text_attention[layer]) for layer in needs.attention}
        else:
            image.attention = {layer: st.attention[layer][b, pos.to(st.attention[layer].device)]
                               for layer in (*needs.attention, *needs.query_key_attention)}
        image.key_norms = {layer: st.key_norms[layer][b, pos] for layer in needs.key_norms}
        if needs.hidden:
            image.hidden = hidden[b, pos.to(hidden.device)]
        if normed is not None:
            image.final_norm = normed[b, pos.to(normed.device)]
        if needs.padding and st.image_padding is not None and span.start in st.image_padding[b]:
            mask = st.image_padding[b][span.start]
            image.padding = mask if present is None else mask[present.cpu()]
        if needs.text:
            text = self._columns(b, self._text_after(b, span), stage)
            image.text_key_norms = {layer: st.key_norms[layer][b, text] for layer in needs.key_norms}
            image.text_hidden = hidden[b, text]
            if normed is not None:
                image.text_final_norm = normed[b, text]
        return image

    def _text_after(self, b: int, span: ImageSpan) -> torch.Tensor:
        """Sequence positions of the tokens after the image up to the next image or the prompt's end."""
        later = [s.start for s in self._state.spans[b] if s.start > span.start]
        end = min(later) if later else self._state.seq_len
        return torch.arange(span.start + span.length, end)

    def _columns(self, b: int, positions: torch.Tensor, stage: int) -> torch.Tensor:
        """Columns of the current sequence (stage ``stage-1``'s, in prune mode) holding the given ORIGINAL
        positions of sample ``b`` (which must still be present); the identity before the first stage."""
        if stage == 0 or self.mode == "mask":
            return positions
        return self._inverse(stage - 1)[b, positions.to(self._inverse(stage - 1).device)]

    def _inverse(self, stage: int) -> torch.Tensor:
        """[B, T]: for each original position kept by ``stage``, its slot in that stage's sequence (else 0)."""
        st = self._state
        if stage in st.stage_inverse:
            return st.stage_inverse[stage]
        index, valid = st.stage_index[stage], st.stage_valid[stage]
        inv = torch.zeros(index.shape[0], st.seq_len, dtype=torch.long, device=index.device)
        slots = torch.arange(index.shape[1], device=index.device).expand_as(index)
        for b in range(index.shape[0]):
            inv[b, index[b, valid[b]]] = slots[b, valid[b]]
        st.stage_inverse[stage] = inv
        return inv

    def _stage_counts(self, num_tokens: int) -> list[int]:
        """Visual tokens of an ``num_tokens``-token image kept after each stage.

        Single stage: ``sel.budget`` (keep_ratio or keep_tokens). Multi-stage (PyramidDrop's rule, paper eq. and
        authors' code: stage ``s`` keeps ``stage_ratio^s`` of the original tokens): with ``stage_ratio`` given,
        that; with ``keep_ratio``/``keep_tokens``, the ratio whose AVERAGE visual tokens per decoder layer (over
        all ``L`` layers, the first stage's earlier layers counting every token) equals ``keep_ratio * N`` (or
        ``keep_tokens``) -- the same first-order prefill FLOPs as single-stage pruning of that many tokens at
        layer 0 (see :func:`lmms_prune.selection.budget.stage_ratio_for_average`)."""
        cfg = self.config
        if not cfg.multi_stage:
            return [sel.budget(num_tokens, keep_ratio=cfg.keep_ratio, keep_tokens=cfg.keep_tokens)]
        return sel.stage_budgets(num_tokens, self._stage_ratio(num_tokens), len(self.stage_layers),
                                 rounding=cfg.budget_rounding)

    def _stage_ratio(self, num_tokens: int) -> float:
        """Multi-stage: ``stage_ratio``, or the one solved from ``keep_ratio``/``keep_tokens`` (the average)."""
        cfg, depth = self.config, self.adapter.num_layers
        if cfg.stage_ratio is not None:
            return cfg.stage_ratio
        if cfg.keep_ratio is not None:
            if self._ratio is None:
                self._ratio = sel.stage_ratio_for_average(cfg.keep_ratio, self.stage_layers, depth)
            return self._ratio
        return sel.stage_ratio_for_average(min(1.0, cfg.keep_tokens / num_tokens), self.stage_layers, depth)

    def _stage_count(self, num_tokens: int, present: int, stage: int) -> int:
        """Visual tokens an image of ``num_tokens`` tokens keeps at ``stage``, ``present`` of them still there:
        :meth:`_stage_counts`, or with ``budget_base='present'`` counted from the ``present`` tokens
        (:func:`lmms_prune.selection.budget.present_stage_budget`, FEATHER's code)."""
        cfg = self.config
        if cfg.multi_stage and cfg.budget_base == "present" and stage > 0:
            return sel.present_stage_budget(present, self._stage_ratio(num_tokens), stage,
                                            rounding=cfg.budget_rounding)
        return min(self._stage_counts(num_tokens)[stage], present)

    def _select(self, hidden: torch.Tensor, stage: int = 0) -> None:
        """Choose the kept tokens of every sample at ``stage``; store the gather index and its validity mask."""
        st = self._state
        sync(hidden)
        t0 = time.perf_counter()
        bsz = hidden.shape[0]
        normed = self.adapter.final_norm()(hidden) if self.stage_needs[stage].final_norm else None
        score, selector = self.scores[stage], self.selectors[stage]
        keep_rows, records, stage_kept, stage_scores = [], [], [], []
        for b in range(bsz):
            spans = st.spans[b]
            keep = (torch.ones(st.seq_len, dtype=torch.bool, device=hidden.device) if stage == 0
                    else st.stage_mask[stage - 1][b].clone())
            kept_per_image, scores_per_image = [], []
            num_visual = sum(s.num_visual for s in spans)
            offset = 0
            for i, span in enumerate(spans):
                present = None if stage == 0 else st.stage_kept[stage - 1][b][i]
                keep[span.start: span.start + span.length] = False
                keep[span.structural_positions.to(hidden.device)] = True  # structure: always kept, never scored
                image = self._signals(b, span, offset, num_visual, hidden, normed, stage, present)
                scores = score(image)
                n = self._stage_count(span.num_visual, image.num_tokens, stage)
                local = selector(image, scores, n)
                if isinstance(local, sel.Merge):
                    local = self._place_merge(b, i, span, present, local, hidden, stage)
                local = local.to(hidden.device)
                if present is not None:
                    local = present.to(hidden.device)[local]
                if st.protected is not None and st.protected[b][i].numel():  # kept by every stage
                    local = torch.unique(torch.cat([local, st.protected[b][i].to(local.device)]))
                keep[span.visual_positions.to(hidden.device)[local]] = True
                kept_per_image.append(local.cpu())
                scores_per_image.append(None if scores is None else scores.detach().cpu())
                offset += span.num_visual
            keep_rows.append(keep)
            stage_kept.append(kept_per_image)
            kept = sum(k.numel() for k in kept_per_image)
            full = st.lengths[b]
            records.append(PruneRecord(num_visual, kept, kept_per_image, full, full - num_visual + kept, [],
                                       scores_per_image, spans=list(spans)))
            if st.recycled:  # merged tokens still present after this stage, per image
                for i, k in enumerate(kept_per_image):
                    slots = st.recycled.setdefault((b, i), set()) & set(k.tolist())
                    st.recycled[(b, i)] = slots
                    records[-1].merged.append(len(slots))
            stage_scores.append(scores_per_image)
        st.stage_kept.append(stage_kept)
        st.stage_scores.append(stage_scores)
        keep_mask = torch.stack(keep_rows)
        st.keep_mask = keep_mask
        st.stage_mask.append(keep_mask)
        counts = keep_mask.sum(1)
        t_new = int(counts.max())
        index = torch.zeros(bsz, t_new, dtype=torch.long, device=hidden.device)
        valid = torch.zeros(bsz, t_new, dtype=torch.bool, device=hidden.device)
        for b in range(bsz):
            pos = torch.nonzero(keep_mask[b]).flatten()
            index[b, t_new - pos.numel():] = pos  # left-align pad slots, so the last token stays last
            valid[b, t_new - pos.numel():] = True
        st.keep_index, st.keep_valid = index, valid
        st.stage_index.append(index)
        st.stage_valid.append(valid)
        sync(hidden)
        seconds = time.perf_counter() - t0 + st.score_seconds
        st.score_seconds = 0.0
        for b, rec in enumerate(records):
            rec.select_seconds = seconds + (self.records[b].select_seconds if stage else 0.0)
        self.records = records

    def _place_merge(self, b: int, i: int, span: ImageSpan, present: torch.Tensor | None, merge: sel.Merge,
                     hidden: torch.Tensor, stage: int) -> torch.Tensor:
        """Merged tokens inside the LLM (SparseVLM's recycling): image ``i`` of sample ``b`` keeps
        ``merge.index`` and ``merge.slots`` (indices among the tokens present); each slot's hidden state at this
        stage's layer becomes its group's mean ``weights @ x`` (``x``: the hidden states of the tokens present at
        the layer's input, float32 sums), written by :meth:`_write_recycled` in both modes. A slot keeps its
        token's original position and cache slot; layers before the stage keep the token's own state.
        Returns the kept local indices (ascending)."""
        slots = merge.slots
        if slots is None or slots.numel() != merge.weights.shape[0]:
            raise ValueError(f"selector {self.config.selector!r} merged {merge.weights.shape[0]} groups inside the "
                             "LLM without one slot per merged token (Merge.slots): a merged token needs a place")
        index, slots = merge.index.cpu().long(), slots.cpu().long()
        if set(index.tolist()) & set(slots.tolist()) or len(set(slots.tolist())) != slots.numel():
            raise ValueError(f"selector {self.config.selector!r}: Merge.slots must be distinct tokens not in index")
        local = torch.sort(torch.cat([index, slots])).values
        if slots.numel() == 0:
            return local
        vis = span.visual_positions if present is None else span.visual_positions[present.cpu()]
        x = hidden[b, self._columns(b, vis, stage).to(hidden.device)]
        values = (merge.weights.to(device=x.device, dtype=torch.float32) @ x.float()).to(x.dtype)
        st = self._state
        st.stage_recycled.setdefault(stage, []).append((b, vis[slots], values))
        image_slots = slots if present is None else present.cpu()[slots]
        st.recycled.setdefault((b, i), set()).update(image_slots.tolist())
        return local

    def _write_recycled(self, hidden: torch.Tensor, stage: int) -> torch.Tensor:
        """``hidden`` (this stage's first layer's input: full length in mask mode, the stage's gathered sequence
        in prune mode) with the merged tokens of :meth:`_place_merge` written at their slots."""
        items = self._state.stage_recycled.get(stage)
        if not items:
            return hidden
        hidden = hidden.clone()
        for b, positions, values in items:
            cols = positions if self.mode == "mask" else self._inverse(stage)[b, positions.to(hidden.device)]
            hidden[b, cols.to(hidden.device)] = values.to(hidden.dtype)
        return hidden

    # ------------------------------------------------------------------ masks
    # Layers >= K get masks built here from the 2-D padding mask and the tokens' original positions, so the
    # same rule serves prefill and decode, pruned and mask mode, and every attention implementation.
    def _padding(self, length: int, device: torch.device) -> torch.Tensor:
        """Bool [B, length]: True for real (non-padding) tokens of the full-length sequence."""
        pad = self._state.padding
        bsz = self._state.stage_mask[0].shape[0]
        if pad is None:
            return torch.ones(bsz, length, dtype=torch.bool, device=device)
        pad = pad.to(device=device, dtype=torch.bool)
        if pad.shape[1] < length:  # plain forward calls in decode may not extend the mask
            pad = torch.cat([pad, pad.new_ones(bsz, length - pad.shape[1])], 1)
        return pad[:, :length]

    @staticmethod
    def _build(q_pos: torch.Tensor, k_pos: torch.Tensor, k_ok: torch.Tensor) -> torch.Tensor:
        """Bool [B, 1, Q, K]: causal on original positions, keys restricted to ``k_ok``; a query row left with no
        key (padding, pad slots) attends to itself only, so no softmax row is empty (its output is unused)."""
        m = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_ok[:, None, :]
        empty = ~m.any(-1)
        if bool(empty.any()):
            m = m | (empty[:, :, None] & (k_pos[:, None, :] == q_pos[:, :, None]))
        return m[:, None]

    def _layer_mask(self, like: torch.Tensor | None, q_len: int, kv_full: int, dtype: torch.dtype,
                    device: torch.device, stage: int = 0, final: bool = False) -> torch.Tensor | None:
        """The attention mask of a layer of ``stage`` (>= K; -1: the layer before, whose cache is full) for the
        current call (prefill or decode, prune or mask mode); ``final``: the keys restricted to the last stage's
        survivors (``decode_cache='final'``, in decode)."""
        st = self._state
        pad = self._padding(kv_full, device)
        generated = pad.new_ones(pad.shape[0], kv_full - st.seq_len)
        if self.mode == "mask" or stage < 0:
            cols = torch.cat([st.stage_mask[-1 if final else stage], generated], 1) & pad
            k_pos = torch.arange(kv_full, device=device).expand(pad.shape[0], -1)
            q_pos = k_pos[:, kv_full - q_len:]
        else:
            index, valid = st.stage_index[stage], st.stage_valid[stage]
            extra = torch.arange(st.seq_len, kv_full, device=device).expand(index.shape[0], -1)
            k_pos = torch.cat([index, extra], 1)
            cols = torch.cat([valid, extra >= 0], 1) & torch.gather(pad, 1, k_pos)
            if final:  # the stage's cache columns that the last stage kept
                cols = cols & torch.gather(torch.cat([st.stage_mask[-1], generated], 1), 1, k_pos)
            q_pos = index if q_len == index.shape[1] and kv_full == st.seq_len else k_pos[:, -q_len:]
        if self._base_attn.startswith("flash"):
            # flash attention takes a 2-D padding mask and applies causality itself; pad slots sit on the left,
            # like left padding, and the kept tokens keep their order (not exercised without a GPU here)
            return None if bool(cols.all()) else cols.to(torch.int32)
        if bool(cols.all()) and (q_len == 1 or (q_len == k_pos.shape[1] and self._base_attn != "eager")):
            return None  # plain causal attention: let SDPA use is_causal (or no mask in decode)
        m = self._build(q_pos, k_pos, cols)
        if (like is not None and like.dtype != torch.bool) or self._base_attn == "eager":
            return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m, torch.finfo(dtype).min)
        return m

    # ------------------------------------------------------------------ layer hooks
    def _make_layer_hook(self, idx: int):
        stage = self._stage_of[idx]
        first = idx == self.stage_layers[stage]

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            st = self._state
            if not st.has_images:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            phase = st.phase
            if phase == "prefill":
                if first:
                    if idx in self.stage_needs[stage].query_key_attention:
                        self._stage_own_attention(module, hidden, kwargs, stage)
                    self._select(hidden, stage)
                    if self.renumber:
                        st.stage_rope.append(self._renumbered(kwargs, hidden, stage))
                    if self.mode == "prune":
                        st.pruned = self._gather_kwargs(st.stage_rope[stage] if self.renumber else kwargs)
                        st.stage_pruned.append(st.pruned)
                if self.mode == "prune":
                    if first:  # stage s gathers from stage s-1's sequence (the full one for the first)
                        index = st.keep_index if stage == 0 else torch.gather(
                            self._inverse(stage - 1), 1, st.stage_index[stage])
                        hidden = _gather_seq(hidden, index, 1)
                    kwargs.update(st.stage_pruned[stage])
                elif self.renumber:
                    kwargs.update(st.stage_rope[stage])
                if first:
                    hidden = self._write_recycled(hidden, stage)
                kv_full = st.seq_len
            elif phase == "decode" and st.keep_index is not None:
                kv_full = st.kv_full
                if self.renumber:
                    kwargs.update(self._decode_rope(kwargs, hidden, -1 if self.final_cache else stage))
            else:
                return None
            kwargs["attention_mask"] = self._layer_mask(
                kwargs.get("attention_mask"), hidden.shape[1], kv_full, hidden.dtype, hidden.device, stage,
                final=self.final_cache and phase == "decode")
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _make_final_decode_hook(self):
        """Pre-hook of layer ``K_1 - 1`` under ``decode_cache='final'``: at decode its full cache is restricted to
        the last stage's survivors, and the decoded tokens take the last stage's renumbered positions (MustDrop's
        decode-stage cache cut, which also cuts that layer's cache); prefill runs unchanged."""

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            st = self._state
            if not st.has_images or st.phase != "decode" or st.keep_index is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.renumber:
                kwargs.update(self._decode_rope(kwargs, hidden, -1))
            kwargs["attention_mask"] = self._layer_mask(kwargs.get("attention_mask"), hidden.shape[1], st.kv_full,
                                                        hidden.dtype, hidden.device, -1, final=True)
            return args, kwargs

        return hook

    # ------------------------------------------------------------------ positions
    # Renumbering (multi-stage, positions='contiguous'; PyramidDrop's and SparseVLM's code): after stage s every
    # token's position ids drop by the number of tokens removed before it, on every axis of M-RoPE; with 1-D
    # RoPE the survivors are numbered 0..n-1 (``arange(0, cur_len)`` of the authors), left padding included.
    # A decoded token's ids drop by all the tokens the stage removed, so decoding continues from the renumbered
    # length at every stage (the authors' decode step subtracts the tokens each stage dropped). Mask mode gives
    # the full sequence the same ids (a removed token's are never seen: it is masked as a key), so the two agree.
    def _rope_ids(self, q_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The position ids of this call's ``q_len`` tokens as the language model was called with them: the RoPE
        ids ([B|1, q], or [3, B|1, q] for M-RoPE) and the text row the decoder layers take as ``position_ids``
        (Qwen-VL's leading fourth row where given, else the first row); the cache positions when none given."""
        pid = self._state.lm_position_ids
        if pid is None:
            end = self._state.seq_len if self._state.phase == "prefill" else self._state.kv_full
            pid = torch.arange(end - q_len, end, device=device)[None]
        pid = pid.to(device)
        if pid.dim() == 3 and pid.shape[0] == 4:
            return pid[1:], pid[0]
        return pid, pid if pid.dim() == 2 else pid[0]

    def _rope_kwargs(self, kwargs: dict[str, Any], hidden: torch.Tensor, shift: torch.Tensor) -> dict[str, Any]:
        """Decoder-layer kwargs for this call's position ids minus ``shift`` ([B, q]): the RoPE tables from the
        model's own rotary embedding, and ``position_ids`` (the text row) where the layer takes them."""
        ids, text = self._rope_ids(shift.shape[1], hidden.device)
        shift = shift.to(hidden.device)
        out: dict[str, Any] = {"position_embeddings": self.adapter.language_model.rotary_emb(hidden, ids - shift)}
        if isinstance(kwargs.get("position_ids"), torch.Tensor):
            out["position_ids"] = text - shift
        return out

    def _renumbered(self, kwargs: dict[str, Any], hidden: torch.Tensor, stage: int) -> dict[str, Any]:
        """Full-length decoder-layer kwargs of ``stage`` at the renumbered positions: ids minus the tokens removed
        (by this stage and the earlier ones) before each token."""
        removed = (~self._state.stage_mask[stage]).long()
        return self._rope_kwargs(kwargs, hidden, torch.cumsum(removed, 1) - removed)

    def _decode_rope(self, kwargs: dict[str, Any], hidden: torch.Tensor, stage: int) -> dict[str, Any]:
        """The decoded tokens' kwargs at ``stage``'s layers: their ids minus the tokens the stage removed."""
        st = self._state
        if stage not in st.decode_rope:
            removed = st.seq_len - st.stage_mask[stage].sum(1)  # [B]
            shift = removed[:, None].expand(-1, hidden.shape[1])
            st.decode_rope[stage] = self._rope_kwargs(kwargs, hidden, shift)
        return st.decode_rope[stage]

    def _make_own_attention_hook(self, idx: int, stage: int):
        """Pre-hook of layer ``idx`` (before stage ``stage``'s layer): its own last-row attention at prefill, on
        its input as it will run it (``Needs.query_key_attention``; FEATHER's code scores stage ``K`` so)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            st = self._state
            if st.phase == "prefill" and st.has_images:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._own_attention(module, hidden, kwargs["position_embeddings"], kwargs.get("attention_mask"),
                                    idx, stage)
            return None

        return hook

    def _stage_own_attention(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any],
                             stage: int) -> None:
        """Layer ``K_s``'s own row, before its hook changes its kwargs: the geometry of the sequence as it stands
        (stage ``s-1``'s kept tokens, positions and mask). PyramidDrop's code ranks a stage this way
        (``pdrop_rank_drop``: softmax over the whole row in float32, heads averaged)."""
        st = self._state
        if stage == 0:
            geometry, mask = kwargs, kwargs.get("attention_mask")
        else:
            geometry = (st.stage_pruned[stage - 1] if self.mode == "prune"
                        else st.stage_rope[stage - 1] if self.renumber else kwargs)
            mask = self._layer_mask(kwargs.get("attention_mask"), hidden.shape[1], st.seq_len, hidden.dtype,
                                    hidden.device, stage - 1)
        self._own_attention(layer, hidden, geometry["position_embeddings"], mask, self.stage_layers[stage], stage)

    def _own_attention(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, ...],
                       mask: torch.Tensor | None, idx: int, stage: int) -> None:
        """``Needs.query_key_attention``: the last prompt token's attention row of layer ``idx``'s OWN query/key
        projections (its input norm, q/k projections, q/k norms where the model has them, and RoPE, through its
        attention module) applied to its input ``hidden`` of stage ``stage``'s sequence, recorded as
        ``attention[idx]`` [B, T_s]. ``query_key_unrotated``: the RoPE tables are replaced by cos = 1, sin = 0,
        the identity rotation, so the scores are those of the unrotated projections (FEATHER's ``no_rope``);
        ``query_key_visual_softmax``: soft-maxed over the visual keys only (FEATHER's image keys)."""
        st, needs = self._state, self.stage_needs[stage]
        sync(hidden)
        t0 = time.perf_counter()
        if needs.query_key_unrotated:
            cos, sin = position_embeddings
            position_embeddings = (torch.ones_like(cos), torch.zeros_like(sin))
        columns = self._visual_columns(stage, hidden.device) if needs.query_key_visual_softmax else None
        rows: list[torch.Tensor] = []

        def observe(module, query, key, attention_mask, scaling):
            rows.append(attn.attention_rows(query, key, attention_mask, scaling, 1, columns=columns)[:, -1])

        with attn.observing(layer.self_attn, observe):
            layer.self_attn(hidden_states=layer.input_layernorm(hidden), position_embeddings=position_embeddings,
                            attention_mask=mask)
        st.attention[idx] = rows[0]
        sync(hidden)
        st.score_seconds += time.perf_counter() - t0

    def _visual_columns(self, stage: int, device: torch.device) -> torch.Tensor:
        """bool [B, T_s]: the visual tokens' columns of stage ``stage``'s input sequence (the full one in mask
        mode, where the removed ones are masked as keys; stage ``s-1``'s kept tokens in prune mode)."""
        st = self._state
        full = torch.zeros(len(st.spans), st.seq_len, dtype=torch.bool, device=device)
        for b, spans in enumerate(st.spans):
            for span in spans:
                full[b, span.visual_positions.to(device)] = True
        if stage == 0 or self.mode == "mask":
            return full
        index, valid = st.stage_index[stage - 1], st.stage_valid[stage - 1]
        return torch.gather(full, 1, index.to(device)) & valid.to(device)

    def _gather_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The decoder-layer kwargs of the pruned sequence: RoPE tables and position ids gathered at the kept
        tokens' places in ``kwargs`` (the layer's own: ORIGINAL positions; or :meth:`_renumbered`'s)."""
        index = self._state.keep_index
        out: dict[str, Any] = {}
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            out["position_embeddings"] = tuple(_gather_seq(t, index, -2) for t in pe)
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.shape[-1] == self._state.seq_len:
            out["position_ids"] = _gather_seq(pid, index, -1)
        return out


def apply(model: nn.Module, method: str = "fastv", *, mode: str = "prune", **params: Any) -> Any:
    """Patch ``model`` in place so that it prunes visual tokens as ``method`` says; returns the handle.

    ``params`` override the preset's parameters (see ``lmms-prune methods``), e.g.
    ``apply(model, "fastv", keep_ratio=0.1, prune_layer=2)``. A pre-LLM method with an LLM stage
    (``llm_selector``) returns a :class:`lmms_prune.engine.compose.ComposedHandle` (the same interface).
    """
    config = params.pop("config", None) or resolve_config(method, **params)
    if config.composed:
        from lmms_prune.engine.compose import ComposedHandle

        return ComposedHandle(model, config, mode=mode)
    return PruneHandle(model, config, mode=mode)
