"""The pruning engine: applies a visual-token selection inside a transformers-native VLM (methods.md 2-3).

``apply(model, method=..., **params)`` installs, through public extension points only:

* a forward pre-hook on the top-level model that reads the prompt's image layout at prefill;
* an observing attention implementation (``attention.py``) on the language model, which records the last
  prompt token's attention row (or key norms) at the scoring layers;
* forward pre-hooks on decoder layers ``K..L-1``. At prefill, layer ``K``'s hook selects the kept visual
  tokens and gathers hidden states, position embeddings (original RoPE positions), position ids and the
  attention mask; the later layers receive the gathered tensors. At decode, those layers' masks are gathered
  to the pruned KV cache's columns. Layers ``< K`` keep their full cache, so new tokens get positions that
  continue from the unpruned length.

``mode="mask"`` is the reference used by the tests: full length, with the pruned key columns masked for
layers >= K. ``PruneHandle.remove()`` restores the model exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmms_prune import scores as S
from lmms_prune import selection as sel
from lmms_prune.engine import attention as attn
from lmms_prune.engine.adapters import Adapter, ImageSpan, get_adapter
from lmms_prune.engine.pre_llm import shrink_inputs
from lmms_prune.engine.prior import Prior, load_prior
from lmms_prune.presets import PruneConfig, resolve_config


@dataclass
class PruneRecord:
    """What one prefill did to one sample."""

    visual_before: int
    visual_after: int
    kept: list[torch.Tensor]  # per image: kept indices within that image's visual tokens, ascending
    seq_len_before: int  # non-padding tokens entering the LLM
    seq_len_after: int  # non-padding tokens from layer K on
    kv_lengths: list[int]  # per decoder layer, cache entries of this sample after prefill
    scores: list[torch.Tensor | None] = field(default_factory=list)  # per image, the scores selection used
    select_seconds: float = 0.0  # scoring rows + score combination + selection
    llm_prefill_seconds: float = 0.0
    vision_seconds: float = 0.0  # pre-LLM methods: the image encoding the engine ran itself


def _sync(t: torch.Tensor | None) -> None:
    if t is not None and t.is_cuda:
        torch.cuda.synchronize(t.device)


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


def _cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache a model call was given: ``cache`` (transformers >= 5.24) or ``past_key_values`` (before)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _cache_output(output: Any) -> Any:
    """The KV cache a model output carries, under either of transformers 5's names (see :func:`_cache_argument`)."""
    cache = getattr(output, "cache", None)
    return getattr(output, "past_key_values", None) if cache is None else cache


class PruneHandle:
    """A pruning patch on one model. Use ``records`` after a prefill; ``remove()`` to undo."""

    def __init__(self, model: nn.Module, config: PruneConfig, mode: str = "prune"):
        if mode not in ("prune", "mask"):
            raise ValueError(f"mode={mode!r}: must be 'prune' or 'mask'")
        self.model = model
        self.config = config
        self.mode = mode
        self.adapter: Adapter = get_adapter(model)
        self.task_kind: str | None = None
        self.records: list[PruneRecord] = []
        self._hooks: list[Any] = []
        self._observed: list[nn.Module] = []
        self._old_attn: str | None = None
        self._base_attn = attn.base_name(self.adapter.text_config._attn_implementation)
        self._prior: Prior | None = None
        self._trend_fits: dict[int, tuple[float, float]] = {}
        self._state: dict[str, Any] = {}
        self._check_model()
        if config.bias_prior and config.score in ("prior", "trend"):
            self._prior = load_prior(config.bias_prior)
            self._prior.check(getattr(model.config, "_name_or_path", None), config.effective_score_layer)
        if config.stage == "llm":
            self._install_llm()
        elif config.stage == "pre_llm":
            self._install_pre_llm()
        else:
            self._install_observe_only()

    # ------------------------------------------------------------------ setup
    def _check_model(self) -> None:
        cfg, depth = self.config, self.adapter.num_layers
        if cfg.stage == "llm" and not 0 <= cfg.prune_layer < depth:
            raise ValueError(
                f"prune_layer={cfg.prune_layer}: this model has {depth} decoder layers, so it must be in "
                f"[0, {depth - 1}]"
            )
        for layer in cfg.score_layers():
            if not 0 <= layer < depth:
                raise ValueError(f"score_layer={layer}: must be in [0, {depth - 1}] for this model")

    def _install_observe_only(self) -> None:
        self._hooks.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        lm = self.adapter.language_model
        self._hooks.append(lm.register_forward_pre_hook(self._on_lm_start, with_kwargs=True))
        self._hooks.append(lm.register_forward_hook(self._on_lm_end, with_kwargs=True))

    def _install_llm(self) -> None:
        self._install_observe_only()
        layers = self.adapter.layers
        need = self.config.score_layers()
        if need:
            text_cfg = self.adapter.text_config
            self._old_attn = text_cfg._attn_implementation
            text_cfg._attn_implementation = attn.wrapped_name(attn.base_name(self._old_attn))
            for layer in need:
                module = layers[layer].self_attn
                attn.add_observer(module, self._make_observer(layer))
                self._observed.append(module)
        for idx in range(self.config.prune_layer, len(layers)):
            self._hooks.append(layers[idx].register_forward_pre_hook(self._make_layer_hook(idx), with_kwargs=True))

    def _install_pre_llm(self) -> None:
        if self.config.selector == "vispruner":
            self.adapter.vision_feature_attention()  # fails early, with the reason, where there is no [CLS]
        self._install_observe_only()
        original = self.model.generate

        def generate(*args: Any, **kwargs: Any):
            if args:
                kwargs["input_ids"] = args[0]
                args = args[1:]
            if kwargs.get("pixel_values") is None:
                return original(*args, **kwargs)
            prompt = kwargs["input_ids"]
            kwargs = shrink_inputs(self, kwargs)
            self._state = {"phase": "pre_llm"}
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
        self._observed.clear()
        if self._old_attn is not None:
            self.adapter.text_config._attn_implementation = self._old_attn
            self._old_attn = None
        self._state = {}

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
        if not self._is_prefill(kwargs):
            st = self._state
            if "T" in st:
                ids = kwargs.get("input_ids", args[0] if args else None)
                q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
                st["phase"] = "decode"
                st["kv_full"] = st.get("kv_full", st["T"]) + q
                if mask2d is not None:
                    st["padding"] = mask2d
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            if kwargs.get("pixel_values") is not None:
                raise ValueError("lmms_prune needs input_ids (not inputs_embeds) to locate the image tokens")
            self._state = {"phase": "prefill", "spans": None}
            return None
        spans = self.adapter.spans(input_ids, kwargs)
        lengths = mask2d.sum(-1).tolist() if mask2d is not None else [input_ids.shape[1]] * input_ids.shape[0]
        self._state = {
            "phase": "prefill", "spans": spans, "T": input_ids.shape[1], "rows": {}, "key_norms": {},
            "score_seconds": 0.0, "lengths": [int(x) for x in lengths], "padding": mask2d,
        }
        self.records = []
        return None

    def _on_model_call_pre_llm(self, args: tuple, kwargs: dict[str, Any]):
        """A direct forward with images: shrink its inputs; inside generate they were shrunk already."""
        if not self._is_prefill(kwargs):
            self._state["phase"] = "decode"
            return None
        if kwargs.get("pixel_values") is None:
            if self._state.get("phase") == "pre_llm":
                self._state["phase"] = "prefill"
            else:  # a prompt without images: nothing to prune, nothing to record
                self._state = {"phase": "prefill", "spans": None}
                self.records = []
            return None
        if args:
            kwargs = {**kwargs, "input_ids": args[0]}
        kwargs = shrink_inputs(self, kwargs)
        self._state = {"phase": "prefill"}
        return (), kwargs

    def _on_lm_start(self, module, args, kwargs):
        if self._state.get("phase") == "prefill":
            ref = kwargs.get("inputs_embeds")
            _sync(ref)
            self._state["lm_t0"] = time.perf_counter()

    def _on_lm_end(self, module, args, kwargs, output):
        st = self._state
        if st.get("phase") != "prefill" or "lm_t0" not in st:
            return
        _sync(getattr(output, "last_hidden_state", None))
        seconds = time.perf_counter() - st.pop("lm_t0")
        if self.config.stage == "pre_llm":
            for rec in self.records:
                rec.llm_prefill_seconds = seconds
                rec.kv_lengths = [rec.seq_len_after] * self.adapter.num_layers
            st["phase"] = "prefilled"
            return
        if st.get("spans") is None:
            return
        if not self.records:  # no pruning happened (method none): record the unpruned layout
            self.records = [self._record_unpruned(b) for b in range(len(st["spans"]))]
        cache = _cache_output(output)
        for b, rec in enumerate(self.records):
            rec.llm_prefill_seconds = seconds
            rec.kv_lengths = self._kv_lengths(cache, b)
        st["phase"] = "prefilled"

    def _kv_lengths(self, cache: Any, b: int) -> list[int]:
        st, depth = self._state, self.adapter.num_layers
        full = st["lengths"][b]
        if "keep_valid" not in st or self.mode == "mask":
            return [full] * depth
        kept = int(st["keep_valid"][b].sum()) - (st["T"] - full)  # kept slots minus padding tokens
        return [full if i < self.config.prune_layer else kept for i in range(depth)]

    def _record_unpruned(self, b: int) -> PruneRecord:
        spans = self._state["spans"][b]
        n = sum(s.length for s in spans)
        full = self._state["lengths"][b]
        return PruneRecord(n, n, [torch.arange(s.length) for s in spans], full, full, [])

    def _make_observer(self, layer: int):
        def observe(module, query, key, attention_mask, scaling):
            st = self._state
            if st.get("phase") != "prefill" or st.get("spans") is None or query.shape[2] < 2:
                return
            t0 = time.perf_counter()
            if self.config.score == "key_norm":
                st["key_norms"][layer] = attn.key_l1_norms(key)
            else:
                rows = self._text_rows() if self.config.query == "text_mean" else 1
                probs = attn.attention_rows(query, key, attention_mask, scaling, rows)
                st["rows"][layer] = self._combine_rows(probs)
            _sync(query)
            st["score_seconds"] += time.perf_counter() - t0

        return observe

    def _text_rows(self) -> int:
        """Number of trailing query rows that cover every sample's text after its last image."""
        st = self._state
        ends = [max((s.start + s.length for s in spans), default=st["T"] - 1) for spans in st["spans"]]
        return max(1, st["T"] - min(ends))

    def _combine_rows(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, R, S] -> [B, S]: the last row, or the mean of each sample's own text rows."""
        if probs.shape[1] == 1:
            return probs[:, 0]
        st = self._state
        t = st["T"]
        out = []
        for b, spans in enumerate(st["spans"]):
            end = max((s.start + s.length for s in spans), default=t - 1)
            first = probs.shape[1] - (t - end)
            out.append(probs[b, first:].mean(0))
        return torch.stack(out)

    # ------------------------------------------------------------------ selection
    def _image_scores(self, b: int, span: ImageSpan) -> torch.Tensor | None:
        cfg, st = self.config, self._state
        pos = span.positions
        layer = cfg.effective_score_layer
        if cfg.score == "none":
            return None
        if cfg.score == "key_norm":
            return st["key_norms"][layer][b, pos]
        a = st["rows"][layer][b, pos]
        if cfg.score == "attention":
            return a
        if cfg.score == "prior":
            return S.prior_debias(a, self._prior.for_tokens(span.length).to(a.device), eps=cfg.eps)
        if cfg.score in ("ratio", "ratio_combo"):
            shallow = st["rows"][cfg.shallow_layer][b, pos]
            if cfg.score == "ratio":
                return S.ratio(a, shallow, eps=cfg.eps)
            return S.ratio_combo(a, shallow, weight=cfg.combo_weight, eps=cfg.eps)
        if cfg.score == "trend":
            mu, sigma = self._trend_fit(span.length)
            return S.trend_debias(a, mu, sigma)
        raise ValueError(f"score={cfg.score!r} is not an intra-LLM score")

    def _trend_fit(self, n: int) -> tuple[float, float]:
        """(mu, sigma) of the positional trend of the calibrated attention for ``n`` tokens, fitted once."""
        fits = self._trend_fits
        if n not in fits:
            fits[n] = S.fit_trend(S.resize_prior(self._prior.for_tokens(n), n))
        return fits[n]

    def _select_image(self, b: int, span: ImageSpan, hidden: torch.Tensor, n: int) -> tuple[torch.Tensor, Any]:
        cfg = self.config
        scores = self._image_scores(b, span)
        feats = hidden[b, span.start: span.start + span.length]
        selector = cfg.trend_selector if cfg.score == "trend" else cfg.selector
        if selector == "topk":
            kept = sel.topk(scores, n)
        elif selector == "pivot_mis":
            kept = sel.pivot_mis(scores, feats, span.grids, n, r_pivot=cfg.r_pivot, theta_sim=cfg.theta_sim,
                                 alpha=cfg.resolved_alpha(self.task_kind))
        elif selector == "dart":
            kept = sel.dart(scores, feats, n, num_pivots=cfg.num_pivots)
        elif selector == "random":
            kept = sel.random_select(span.length, n, seed=cfg.seed + b, device=feats.device)
        elif selector == "uniform":
            kept = sel.uniform_select(span.grids, n)
        else:
            raise ValueError(f"selector={selector!r} cannot run inside the LLM")
        return kept.to(hidden.device), scores

    def _fixed_indices(self, b: int, num_visual: int) -> torch.Tensor:
        keep = self.config.keep_indices
        if keep and isinstance(keep[0], (list, tuple, torch.Tensor)):
            if b >= len(keep):
                raise ValueError(f"keep_indices has {len(keep)} lists but the batch has sample {b}")
            keep = keep[b]
        idx = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError("keep_indices is empty: keep at least one visual token")
        if int(idx.min()) < 0 or int(idx.max()) >= num_visual:
            raise ValueError(f"keep_indices out of range: values must be in [0, {num_visual - 1}] "
                             f"(this sample has {num_visual} visual tokens), got min {int(idx.min())}, "
                             f"max {int(idx.max())}")
        if idx.unique().numel() != idx.numel():
            raise ValueError("keep_indices has duplicates: each visual token can be kept once")
        return idx.sort().values

    def _select(self, hidden: torch.Tensor) -> None:
        """Choose the kept tokens of every sample; store the gather index and its validity mask."""
        cfg, st = self.config, self._state
        _sync(hidden)
        t0 = time.perf_counter()
        bsz, t_len = hidden.shape[:2]
        keep_rows, records = [], []
        for b in range(bsz):
            spans = st["spans"][b]
            keep = torch.ones(t_len, dtype=torch.bool, device=hidden.device)
            kept_per_image, scores_per_image = [], []
            num_visual = sum(s.length for s in spans)
            fixed = self._fixed_indices(b, num_visual) if cfg.selector == "fixed" else None
            offset = 0
            for span in spans:
                keep[span.start: span.start + span.length] = False
                if fixed is not None:
                    local = fixed[(fixed >= offset) & (fixed < offset + span.length)] - offset
                    local, scores = local.to(hidden.device), None
                else:
                    n = sel.budget(span.length, keep_ratio=cfg.keep_ratio, keep_tokens=cfg.keep_tokens)
                    local, scores = self._select_image(b, span, hidden, n)
                keep[span.start + local] = True
                kept_per_image.append(local.cpu())
                scores_per_image.append(None if scores is None else scores.detach().cpu())
                offset += span.length
            keep_rows.append(keep)
            kept = sum(k.numel() for k in kept_per_image)
            full = st["lengths"][b]
            records.append(PruneRecord(num_visual, kept, kept_per_image, full, full - num_visual + kept, [],
                                       scores_per_image))
        keep_mask = torch.stack(keep_rows)
        st["keep_mask"] = keep_mask
        counts = keep_mask.sum(1)
        t_new = int(counts.max())
        index = torch.zeros(bsz, t_new, dtype=torch.long, device=hidden.device)
        valid = torch.zeros(bsz, t_new, dtype=torch.bool, device=hidden.device)
        for b in range(bsz):
            pos = torch.nonzero(keep_mask[b]).flatten()
            index[b, t_new - pos.numel():] = pos  # left-align pad slots, so the last token stays last
            valid[b, t_new - pos.numel():] = True
        st["keep_index"], st["keep_valid"] = index, valid
        _sync(hidden)
        seconds = time.perf_counter() - t0 + st["score_seconds"]
        for rec in records:
            rec.select_seconds = seconds
        self.records = records

    # ------------------------------------------------------------------ masks
    # Layers >= K get masks built here from the 2-D padding mask and the tokens' original positions, so the
    # same rule serves prefill and decode, pruned and mask mode, and every attention implementation.
    def _padding(self, length: int, device: torch.device) -> torch.Tensor:
        """Bool [B, length]: True for real (non-padding) tokens of the full-length sequence."""
        pad = self._state.get("padding")
        bsz = self._state["keep_mask"].shape[0]
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
                    device: torch.device) -> torch.Tensor | None:
        """The attention mask of a layer >= K for the current call (prefill or decode, prune or mask mode)."""
        st = self._state
        pad = self._padding(kv_full, device)
        if self.mode == "mask":
            cols = torch.cat([st["keep_mask"], pad.new_ones(pad.shape[0], kv_full - st["T"])], 1) & pad
            k_pos = torch.arange(kv_full, device=device).expand(pad.shape[0], -1)
            q_pos = k_pos[:, kv_full - q_len:]
        else:
            index, valid = st["keep_index"], st["keep_valid"]
            extra = torch.arange(st["T"], kv_full, device=device).expand(index.shape[0], -1)
            k_pos = torch.cat([index, extra], 1)
            cols = torch.cat([valid, extra >= 0], 1) & torch.gather(pad, 1, k_pos)
            q_pos = index if q_len == index.shape[1] and kv_full == st["T"] else k_pos[:, -q_len:]
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
        first = idx == self.config.prune_layer

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            st = self._state
            if st.get("spans") is None or not any(st["spans"]):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            phase = st.get("phase")
            if phase == "prefill":
                if first:
                    self._select(hidden)
                    if self.mode == "prune":
                        st["pruned"] = self._gather_kwargs(kwargs)
                if self.mode == "prune":
                    if first:
                        hidden = _gather_seq(hidden, st["keep_index"], 1)
                    kwargs.update(st["pruned"])
                kv_full = st["T"]
            elif phase == "decode" and "keep_index" in st:
                kv_full = st["kv_full"]
            else:
                return None
            kwargs["attention_mask"] = self._layer_mask(
                kwargs.get("attention_mask"), hidden.shape[1], kv_full, hidden.dtype, hidden.device)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _gather_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The decoder-layer kwargs of the pruned sequence: mask, RoPE tables and position ids gathered at the
        kept tokens' ORIGINAL positions (RoPE positions are not renumbered)."""
        index = self._state["keep_index"]
        out: dict[str, Any] = {}
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            out["position_embeddings"] = tuple(_gather_seq(t, index, -2) for t in pe)
        pid = kwargs.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.shape[-1] == self._state["T"]:
            out["position_ids"] = _gather_seq(pid, index, -1)
        return out


def apply(model: nn.Module, method: str = "fastv", *, mode: str = "prune", **params: Any) -> PruneHandle:
    """Patch ``model`` in place so that it prunes visual tokens as ``method`` says; returns the handle.

    ``params`` override the preset's parameters (see ``lmms-prune methods``), e.g.
    ``apply(model, "fastv", keep_ratio=0.1, prune_layer=2)``.
    """
    config = params.pop("config", None) or resolve_config(method, **params)
    return PruneHandle(model, config, mode=mode)
